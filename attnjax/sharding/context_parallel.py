"""One entry for context parallelism: a registered attention family, its sequence split.

``context_parallel(family, mesh, ...)`` returns ``f(query, key, value)`` that
runs the layer registry's family ``family`` (``attnjax.layers.registry``) with
the sequence split over the mesh axis ``axis``, on the engine's own
context-parallel path:

* ``"block_sparse"``: families that are a static ``Mask`` (dense/causal,
  sliding window, Longformer, BigBird, LongLoRA/SinkLoRA shifted groups,
  streaming, composite, block-local) run
  :func:`context_parallel_block_sparse` (only the visited remote key blocks
  are exchanged).
* ``"s2"``: S2-Attention's mask on the same block-sparse exchange, with the
  heads split over ``head_axis`` (S2's head-sharded context partitioning: each
  device receives only the remote blocks of its KV heads' stride classes).
* ``"linear"``: linear attention, Lightning/TNL and BASED run the state scan
  of :func:`context_parallel_linear_attention` /
  :func:`context_parallel_based_attention`.
* ``"neighborhood"``: ``na1d`` runs the halo exchange of
  :func:`context_parallel_neighborhood_attention`.

Every other family raises ``NotImplementedError`` saying why
(``context_parallel_support()`` lists the route or the reason per family).
All routes are self-attention (T == S). The block-sparse and S2 routes take
custom concrete positions (NumPy or Python; [T] or [B, T] with equal rows):
their exchange plan is read off the mask at those positions. Elsewhere,
and for positions traced under jit on those two routes, the default positions
``arange(T)`` apply (custom concrete positions raise; traced ones are checked at
run time and give NaN unless they equal ``arange(T)``), except the
``"linear"`` family, which runs positions whose causal order is the order along
T (``check_linear_positions``; ``"lightning"`` and ``"based"`` take none
unsharded); T must be divisible
by the context axis size. Segment ids (packed documents)
are taken where the unsharded family takes them: the block-sparse and S2
routes carry them with the K/V blocks, ``"na1d"`` runs its neighborhood
``Mask`` on the block-sparse route (as unsharded), ``"linear"`` runs
a segmented state scan (causal and non-causal); ``"lightning"`` and ``"based"`` take none (raises).
The block-sparse route also takes ``implementation="pallas"``.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from attnjax.block_sparse.families import bigbird_mask, block_local_mask, longformer_mask
from attnjax.block_sparse.registry import sliding_window_sides
from attnjax.layers import registry
from attnjax.linear.decay import tnl_decay_slopes
from attnjax.masks import (S2, Causal, Full, Mask, Modality, ShiftedGroups, SinkWindow,
                           SlidingWindow)
from attnjax.masks.neighborhood import Neighborhood
from attnjax.sharding.block_sparse_context import context_parallel_block_sparse
from attnjax.sharding.linear_context import (check_linear_positions,
                                             context_parallel_based_attention,
                                             context_parallel_linear_attention)
from attnjax.sharding.neighborhood_context import context_parallel_neighborhood_attention

__all__ = ["context_parallel", "context_parallel_family", "context_parallel_support",
           "static_mask"]

_CONTENT = ("selects keys from the data (content-based selection), so every query needs "
            "all keys on its device; there is no static exchange plan")

#: Families with no context-parallel route, and why.
REASONS: Dict[str, str] = {
    "anchor": ("its document ids are run-time data (segment ids); the block-sparse context "
               "plan is built from a static mask and takes no segment ids"),
    "flow": ("Flowformer's flow-conservation normalisation needs sums over all keys and all "
             "queries before the attention; no context-parallel form is implemented"),
    "agent": ("its agent tokens pool all queries and attend to all keys before the queries "
              "read them; no context-parallel form is implemented"),
    "hip": "HiP " + _CONTENT,
    "hyper": "HyperAttention " + _CONTENT + " (LSH buckets over the whole sequence)",
    "combiner": ("Combiner summarises every span of the whole sequence for every query; no "
                 "context-parallel form is implemented"),
    "longheads": "LongHeads " + _CONTENT,
    "landmark": "landmark attention " + _CONTENT,
    "bi_level_routing": "bi-level routing (BiFormer) " + _CONTENT,
}

_BLOCK_SPARSE = ("dense", "sliding_window", "longformer", "bigbird", "shifted_group",
                 "longlora", "sinklora", "streaming", "composite", "block_local")
_LINEAR = ("linear", "lightning", "based")
#: Families on a route with segment ids whose unsharded function takes none.
_NO_SEGMENTS = ("lightning", "based")
#: Routes whose exchange plan is built from concrete custom positions.
_POSITIONED = ("block_sparse", "s2")
#: Options of the S2 family (``attnjax.masks.S2`` fields).
S2_OPTIONS = ("block_size", "local_blocks", "vert_stride", "homo_head", "num_dense_heads",
              "head_sliding_step", "head_sliding_offset", "vert_position_type")
_ROUTES = dict([(f, "block_sparse") for f in _BLOCK_SPARSE] + [(f, "linear") for f in _LINEAR]
               + [("s2", "s2"), ("na1d", "neighborhood")])


def context_parallel_support() -> Dict[str, str]:
  """Every registered family -> ``"block_sparse"``, ``"s2"``, ``"linear"``,
  ``"neighborhood"`` (its context-parallel route) or the reason it has none."""
  out = {}
  for name in registry.list_families():
    out[name] = _ROUTES.get(name) or REASONS.get(
        name, "not a built-in family of attnjax: no context-parallel route is known for it")
  return out


def _route(family: str) -> str:
  if not isinstance(family, str):
    raise TypeError(f"family must be a registered family name (str), got {family!r}.")
  registry.get_family(family)   # ValueError listing the choices for an unknown name
  route = context_parallel_support()[family]
  if route not in ("block_sparse", "s2", "linear", "neighborhood"):
    raise NotImplementedError(f"attention family {family!r} cannot run context-parallel: "
                              f"{route}.")
  return route


def _take(options: dict, family: str, allowed) -> dict:
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f"context-parallel {family!r} got unknown options {unknown}; expected "
                     f"some of {sorted(allowed)}.")
  return options


def _check_inputs(family, query, key, q_positions, k_positions, segment_ids, route,
                  causal=True, options=None):
  if query.shape[1] != key.shape[1]:
    raise NotImplementedError(f"context-parallel {family!r} is self-attention: query length "
                              f"T={query.shape[1]} must equal key length S={key.shape[1]}.")
  if segment_ids is not None and family in _NO_SEGMENTS:
    raise NotImplementedError(f"context-parallel {family!r} takes no segment_ids: the "
                              f"{family!r} family itself uses a single segment.")
  T = query.shape[1]
  if family == "linear":   # custom positions whose causal order is the order along T run
    return check_linear_positions(q_positions, k_positions, query.shape[0], T,
                                  segment_ids=segment_ids, causal=bool(causal),
                                  same_distances=bool(causal and (options or {}).get("decay")
                                                      is not None),
                                  what=f"context-parallel {family!r}")
  checks = []
  for name, pos in (("q_positions", q_positions), ("k_positions", k_positions)):
    if pos is None:
      continue
    traced = isinstance(pos, jax.core.Tracer)
    p = pos if traced else np.asarray(pos)
    if p.ndim not in (1, 2) or p.shape[-1] != T:
      raise ValueError(f"{name} must have shape [T] or [B, T] with T={T}, got {p.shape}.")
    if traced:   # checked at run time: other positions give NaN, never a wrong value
      checks.append(jnp.all(p == jnp.arange(T, dtype=p.dtype)))
    elif route not in _POSITIONED and not np.array_equal(
        p.reshape(-1, T), np.broadcast_to(np.arange(T), (p.size // T, T))):
      raise NotImplementedError(
          f"context-parallel {family!r} runs at the default positions arange(T); got custom "
          f"{name} (the exchange plans are read off the mask at those positions: other "
          "positions can make any block visible). A model kept in zig-zag order passes "
          "sequence_order='assignment' to the block-sparse route instead.")
  return functools.reduce(jnp.logical_and, checks) if checks else None


def _one_segment_array(family, seg):
  """Self-attention: (q ids, kv ids) must be one array; returns it (or None)."""
  if isinstance(seg, (tuple, list)):
    if len(seg) != 2 or seg[0] is not seg[1]:
      raise NotImplementedError(f"context-parallel {family!r}: query and key segment_ids must "
                                "be the same array (self-attention).")
    seg = seg[0]
  return seg


def _causal_only(family, causal):
  if not causal:
    raise NotImplementedError(f"the {family} family is defined for causal attention only.")


def _mask(family: str, causal: bool, N: int, T: int, o: dict, K: Optional[int] = None) -> Mask:
  """The static Mask of a block-sparse or S2 family, as its registry entry builds it."""
  if family == "s2":
    return S2(N, causal=causal, num_kv_heads=K, **_take(o, family, S2_OPTIONS))
  if family == "dense":
    _take(o, family, ("mask",))
    m = o.get("mask")
    if m is not None and not isinstance(m, Mask):
      raise NotImplementedError("context-parallel 'dense' takes a static attnjax Mask as "
                                f"mask=, not {type(m).__name__}.")
    m = Full() if m is None else m
    return Causal() & m if causal else m
  if family == "sliding_window":
    _take(o, family, ("window", "left", "right"))
    m = SlidingWindow(*sliding_window_sides(causal, **o))
  elif family == "longformer":
    _take(o, family, ("window", "global_positions"))
    return longformer_mask(T, causal=causal, **o)
  elif family == "bigbird":
    _take(o, family, ("block_size", "window_blocks", "num_global_blocks", "num_random_blocks",
                      "seed"))
    return bigbird_mask(T, num_heads=N if o.get("num_random_blocks", 3) else 1, causal=causal,
                        **o)
  elif family in ("shifted_group", "longlora", "sinklora"):
    _causal_only(family, causal)
    _take(o, family, ("group_ratio", "group_size", "wrap", "num_sink"))
    sink = family == "sinklora"
    g = o.get("group_size") or int(round(T * o.get("group_ratio", 0.25)))
    return ShiftedGroups(g, T, N, wrap=o.get("wrap", "none" if sink else "cyclic"),
                         num_sink=o.get("num_sink", 4 if sink else 0))
  elif family == "streaming":
    _causal_only(family, causal)
    _take(o, family, ("num_sink", "window"))
    return SinkWindow(o.get("num_sink", 4), o.get("window", 256))
  elif family == "composite":
    _causal_only(family, causal)
    _take(o, family, ("num_visual",))
    return Modality.vision_then_text(o["num_visual"], T - o["num_visual"])
  else:   # block_local
    _take(o, family, ("block_size", "include_prev_block"))
    return block_local_mask(causal=causal, **o)
  return m & Causal() if causal else m


def static_mask(family: str, seq_len: int, num_heads: int, *, causal: bool = False,
                **options) -> Mask:
  """The static ``Mask`` the block-sparse route builds for ``family`` (its registry options).

  For the families whose route is ``"block_sparse"`` or ``"s2"`` (which also
  takes ``num_kv_heads``); e.g. to read the exchange plan
  (``block_sparse_context_plan``) of a ``context_parallel`` call.
  """
  if _route(family) not in _POSITIONED:
    raise ValueError(f"family {family!r} is not on the block-sparse route.")
  o = dict(options)
  K = o.pop("num_kv_heads", None) if family == "s2" else None
  return _mask(family, bool(causal), num_heads, seq_len, o, K)


def context_parallel_family(family: str, mesh: Mesh, *, axis: str = "context",
                            head_axis: Optional[str] = None,
                            data_axis: Optional[str] = None) -> Callable:
  """``family`` context-parallel on ``mesh``, with the layer registry's signature.

  ``fn(query, key, value, *, causal, q_positions=None, k_positions=None,
  segment_ids=None, **options)`` (options as the family's registry entry;
  ``scale``, ``implementation`` where the route takes them; ``assignment``,
  ``sequence_order`` and ``block_size`` for block-sparse routes), so it can be registered with
  ``attnjax.layers.registry.register_family`` and used by
  ``MultiHeadAttention``. Raises ``NotImplementedError`` now when the family
  has no context-parallel route.
  """
  route = _route(family)
  if axis not in mesh.axis_names:
    raise ValueError(f"axis={axis!r} is not an axis of the mesh {mesh.axis_names}.")

  def fn(query, key, value, *, causal, q_positions=None, k_positions=None, segment_ids=None,
         **options):
    ok = _check_inputs(family, query, key, q_positions, k_positions, segment_ids, route,
                       causal, options)
    positions = ((None, None) if route not in _POSITIONED else
                 tuple(None if isinstance(p, jax.core.Tracer) else p
                       for p in (q_positions, k_positions)))
    out = run(query, key, value, causal=causal, segment_ids=segment_ids, positions=positions,
              **options)
    return out if ok is None else jnp.where(ok, out, jnp.nan).astype(out.dtype)

  def run(query, key, value, *, causal, segment_ids, positions, **options):
    o = dict(options)
    scale, impl = o.pop("scale", None), o.pop("implementation", None)
    axes = dict(data_axis=data_axis, heads_axis=head_axis, context_axis=axis)
    if route in _POSITIONED:
      if impl not in (None, "xla", "reference", "pallas"):
        raise NotImplementedError(f"context-parallel {family!r} runs the block-sparse engine "
                                  f"inside shard_map; implementation={impl!r} is not "
                                  "available there.")
      extra = {k: o.pop(k) for k in ("assignment", "block_size", "sequence_order") if k in o
               and not (family in ("bigbird", "block_local", "s2") and k == "block_size")}
      mask = _mask(family, bool(causal), query.shape[2], query.shape[1], o, key.shape[2])
      return context_parallel_block_sparse(query, key, value, mask=mask, mesh=mesh, axis=axis,
                                           head_axis=head_axis, data_axis=data_axis,
                                           scale=scale,
                                           segment_ids=_one_segment_array(family, segment_ids),
                                           implementation="pallas" if impl == "pallas" else None,
                                           q_positions=positions[0], k_positions=positions[1],
                                           **extra)
    if route == "neighborhood":
      _take(o, family, ("kernel_size", "dilation"))
      if segment_ids is not None:   # as unsharded: the neighborhood Mask with documents
        mask = Neighborhood((query.shape[1],), o.get("kernel_size", 7), o.get("dilation", 1),
                            bool(causal))
        return context_parallel_block_sparse(
            query, key, value, mask=mask, mesh=mesh, axis=axis, head_axis=head_axis,
            data_axis=data_axis, scale=scale, segment_ids=_one_segment_array(family, segment_ids),
            implementation="pallas" if impl == "pallas" else None)
      return context_parallel_neighborhood_attention(
          query, key, value, mesh, kernel_size=o.get("kernel_size", 7),
          dilation=o.get("dilation", 1), is_causal=bool(causal), scale=scale,
          implementation=impl, **axes)
    if family == "based":
      _take(o, family, ("window", "left", "right", "feature_map", "eps", "chunk_size", "branch"))
      left, right = o.pop("left", None), o.pop("right", None)
      if left is not None or right is not None:   # as the family: sides instead of window
        if o.get("window") is not None:
          raise ValueError(f"the based family takes the window as window={o['window']!r} or "
                           f"as left={left!r}/right={right!r}, not both.")
        o["window"] = (64 if left is None else left, 0 if right is None else right)
      return context_parallel_based_attention(query, key, value, mesh, causal=bool(causal),
                                              scale=scale, implementation=impl, **o, **axes)
    if scale is not None:
      raise ValueError(f"the {family!r} family takes no scale.")
    if family == "lightning":
      _take(o, family, ("decay", "layer_idx", "num_layers", "chunk_size"))
      slopes = o.get("decay")
      if slopes is None:
        slopes = tnl_decay_slopes(query.shape[2], o.get("layer_idx", 0), o.get("num_layers", 1))
      return context_parallel_linear_attention(
          query, key, value, mesh, feature_map="identity", causal=bool(causal),
          decay=slopes if causal else None, chunk_size=o.get("chunk_size", 64),
          implementation=impl, **axes)
    _take(o, family, ("feature_map", "decay", "normalize", "eps", "chunk_size"))
    o.setdefault("feature_map", "elu+1")
    o.setdefault("normalize", True)
    return context_parallel_linear_attention(query, key, value, mesh, causal=bool(causal),
                                             implementation=impl, segment_ids=segment_ids, **o,
                                             **axes)

  fn.__name__ = f"{family}_context_parallel"
  fn.__doc__ = f"Registry family {family!r} on the {route!r} context-parallel route."
  return fn


def context_parallel(family: str, mesh: Mesh, *, axis: str = "context",
                     head_axis: Optional[str] = None, data_axis: Optional[str] = None,
                     **family_options) -> Callable:
  """``f(query, key, value) -> out [B, T, N, Hv]``: the registry's ``family``, context-parallel.

  Args:
    family: a name from ``attnjax.layers.registry.list_families()``.
    mesh: a ``jax.sharding.Mesh``; ``axis`` splits the sequence, ``head_axis``
      (optional) the heads, ``data_axis`` (optional) the batch.
    **family_options: ``causal`` (default False, as ``MultiHeadAttention``)
      and the family's registry options (e.g. ``window=`` for
      ``"sliding_window"``, ``kernel_size=`` for ``"na1d"``).

  q [B, T, N, H], k [B, T, K, H], v [B, T, K, Hv] (global arrays, T divisible
  by the ``axis`` size); the result equals the unsharded family. Raises
  ``NotImplementedError`` naming the family and why when it has no
  context-parallel route (see ``context_parallel_support``).
  """
  causal = bool(family_options.pop("causal", False))
  fn = context_parallel_family(family, mesh, axis=axis, head_axis=head_axis,
                               data_axis=data_axis)

  def f(query, key, value):
    return fn(query, key, value, causal=causal, **family_options)

  f.__name__ = fn.__name__
  return f
