"""Spatially sharded neighborhood attention with a halo exchange (NATTEN semantics; arXiv:2403.04690).

"Faster Neighborhood Attention: Reducing the O(n^2) Cost of Self Attention at the
Threadblock Level".

One spatial axis of length ``n``, or several at once, is split into ``C``
shards of ``m = n / C`` rows over a mesh axis (heads optionally over
``heads``, batch over ``data``); the other spatial axes stay whole. The halo
of a split axis is read off the global window rule
(:func:`attnjax.masks.neighborhood.window_bounds`): ``left`` / ``right`` are
the most rows any shard's queries need before / after the shard
(``dilation * (k // 2)`` and ``dilation * (k // 2 + k % 2 - 1)`` for a
non-causal window away from the borders, ``dilation * (k - 1)`` and 0 for a
causal one). Each device receives exactly those key/value rows: the last
``left`` rows of its predecessor and the first ``right`` rows of its successor
(two ``ppermute`` calls per array and split axis; queries never travel).

The local neighborhood attention then runs on a buffer of
``left + m + right`` rows per split axis whose borders are placed so that the
window rule on the buffer equals the global one for the shard's queries:
interior shards use [left halo, shard, right halo]; the first shard's buffer
starts at the global row 0 ([shard, right halo, unused]) and the last shard's
ends at the global row n ([unused, left halo, shard]), so NATTEN's inward
shift at the global borders is reproduced exactly. :func:`halo_plan` checks
this for every shard on the host and raises when a shard is too short for the
window.

With several split axes (e.g. an image [B, X, Y, N, H] with X over ``"cx"``
and Y over ``"cy"``, a 2-D grid of devices) the exchanges run one axis after
the other: the exchange along Y sends slices of the tile already extended
along X, so the corner blocks of the diagonal neighbours arrive with it. The
window rule is a product of per-dimension rules, so the per-axis buffers
compose exactly. Autodiff through ``shard_map`` (``ppermute``, pads, rolls and
slices are linear) gives the backward.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Dict, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from attnjax.core import validation as V
from attnjax.masks.neighborhood import check_neighborhood_args, window_bounds
from attnjax.neighborhood.api import neighborhood_attention
from attnjax.sharding.linear_context import check_context_mesh


@dataclasses.dataclass(frozen=True)
class HaloPlan:
  """Rows one shard receives along the split axis.

  Attributes:
    shard_len: m = n / C rows per device.
    left: rows received from the previous shard; right: from the next one.
  """
  shard_len: int
  left: int
  right: int

  @property
  def buffer_len(self) -> int:
    return self.left + self.shard_len + self.right


def _key_range(x, n, k, d, causal):
  """First and last global key row of the windows of query rows ``x``."""
  g, lo, hi = window_bounds(x, n, k, d, causal)
  return g + d * lo, g + d * (hi - 1)


def _halos(n, k, d, causal, C):
  """(left, right): the most rows any of C shards' windows reach beyond the shard."""
  m = n // C
  x = np.arange(n)
  first, last = _key_range(x, n, k, d, causal)
  start = (x // m) * m
  return (int(max(0, (start - first).max())), int(max(0, (last - (start + m - 1)).max())),
          first, last)


def _plan(n, k, d, causal, C):
  """``(HaloPlan, None)``, or ``(None, why)`` when C shards cannot hold the windows."""
  m = n // C
  if C == 1:
    return HaloPlan(m, 0, 0), None
  left, right, first, last = _halos(n, k, d, causal, C)
  for side, h in (("left", left), ("right", right)):
    if h > m:
      return None, (f"the {side} halo of {h} rows (kernel_size {k}, dilation {d}, "
                    f"is_causal {causal}) is larger than the local shard of {m} rows "
                    f"({n} rows / {C} shards)")
  plan = HaloPlan(m, left, right)
  lb = plan.buffer_len
  if k * d > lb:
    return None, (f"kernel_size {k} * dilation {d} exceeds the local buffer of {lb} rows "
                  f"(shard {m} + halo {left} + {right})")
  p = np.arange(lb)
  b_first, b_last = _key_range(p, lb, k, d, causal)
  for c in range(C):
    shift = -left if c == 0 else (right if c == C - 1 else 0)
    origin = c * m - left - shift        # global row of buffer row 0
    rows = np.arange(left + shift, left + shift + m)   # buffer rows of the shard's queries
    valid_lo = right if c == C - 1 else 0          # the edge shards' missing neighbour's rows
    valid_hi = m + right if c == 0 else lb
    ok = ((b_first[rows] + origin == first[rows + origin])
          & (b_last[rows] + origin == last[rows + origin])
          & (b_first[rows] >= valid_lo) & (b_last[rows] < valid_hi))
    if not ok.all():
      return None, (f"shard {c} of {m} rows is too short for kernel_size {k} * dilation {d} "
                    f"(is_causal {causal}): its windows cannot be formed from the "
                    f"neighbours' halo")
  return plan, None


def largest_kernel_size(n: int, dilation: int, is_causal: bool, num_shards: int) -> int:
  """The largest kernel_size (at ``dilation``) whose windows ``num_shards`` shards of an
  axis of ``n`` rows can form from their neighbours' halo (0 if not even 1 can)."""
  d, C = dilation, num_shards
  if n % C or d > n:
    return 0
  if C == 1:
    return n // d
  m = n // C
  # The halos grow with the kernel (a window contains the smaller ones): bisect on the
  # halo bound, then step down to the first kernel whose buffers also reproduce the windows.
  lo, hi = 1, n // d
  while lo < hi:
    mid = (lo + hi + 1) // 2
    left, right = _halos(n, mid, d, is_causal, C)[:2]
    lo, hi = (mid, hi) if max(left, right) <= m else (lo, mid - 1)
  for k in range(lo, 0, -1):
    if _plan(n, k, d, is_causal, C)[0] is not None:
      return k
  return 0


@functools.lru_cache(maxsize=256)
def halo_plan(n: int, kernel_size: int, dilation: int, is_causal: bool,
              num_shards: int, axis_name: str = "axis") -> HaloPlan:
  """The halo of an axis of ``n`` rows split in ``num_shards`` (NATTEN window rule).

  Raises ValueError naming ``axis_name`` when n is not divisible, when a halo
  is longer than a shard (it would need rows from beyond the neighbours), or
  when the window on a shard's buffer would differ from the global window;
  the message gives the largest kernel_size the split allows.
  """
  k, d, C = kernel_size, dilation, num_shards
  if n % C:
    raise ValueError(f"{axis_name}: spatial extent {n} is not divisible by the context axis "
                     f"size {C}.")
  plan, why = _plan(n, k, d, is_causal, C)
  if plan is None:
    kmax = largest_kernel_size(n, d, is_causal, C)
    raise ValueError(
        f"{axis_name}: {why}. With dilation {d} (is_causal {is_causal}) and {C} shards of "
        f"{n // C} rows the largest kernel_size is {kmax} (kernel_size * dilation = "
        f"{kmax * d}); use a smaller kernel or fewer shards on this axis.")
  return plan


def _is_index(a) -> bool:
  return isinstance(a, (int, np.integer)) and not isinstance(a, bool)


def _splits(spatial_axis, context_axis, D: int, mesh: Mesh) -> Tuple[Tuple[int, str], ...]:
  """``((spatial axis, mesh axis), ...)`` of a call; ValueError naming the argument."""
  if _is_index(spatial_axis):
    if not 0 <= spatial_axis < D:
      raise ValueError(f"spatial_axis must be an int in [0, {D}) for {D} spatial "
                       f"dimension(s), got {spatial_axis!r}.")
    if not isinstance(context_axis, str):
      raise ValueError(f"context_axis must be one mesh axis name (str) when spatial_axis is "
                       f"an int, got {context_axis!r}.")
    return ((int(spatial_axis), context_axis),)
  if not isinstance(spatial_axis, (tuple, list)) or not spatial_axis or \
     not all(_is_index(a) and 0 <= a < D for a in spatial_axis):
    raise ValueError(f"spatial_axis must be an int or a non-empty tuple of ints in [0, {D}) "
                     f"for {D} spatial dimension(s), got {spatial_axis!r}.")
  if len(set(spatial_axis)) != len(spatial_axis):
    raise ValueError(f"spatial_axis={tuple(spatial_axis)} names a spatial axis twice.")
  if isinstance(context_axis, str) or not isinstance(context_axis, (tuple, list)) or \
     len(context_axis) != len(spatial_axis) or \
     not all(isinstance(c, str) for c in context_axis):
    raise ValueError(f"context_axis must name one mesh axis per split spatial axis "
                     f"(spatial_axis={tuple(spatial_axis)}: a tuple of "
                     f"{len(spatial_axis)} names), got {context_axis!r}.")
  pairs = tuple((int(a), c) for a, c in zip(spatial_axis, context_axis))
  for i, (a, c) in enumerate(pairs):
    if c not in mesh.axis_names:
      raise ValueError(f"context_axis[{i}]={c!r} (for spatial axis {a}) is not an axis of "
                       f"the mesh {tuple(mesh.axis_names)}.")
    for b, c2 in pairs[:i]:
      if c2 == c:
        raise ValueError(f"spatial axes {b} and {a} are both mapped to the mesh axis {c!r}; "
                         "each split spatial axis needs its own mesh axis.")
  return pairs


def _axis_label(a: int, mesh_axis: str, several: bool) -> str:
  return f"spatial axis {a} (mesh axis {mesh_axis!r})" if several else f"spatial axis {a}"


def context_parallel_neighborhood_attention(query, key, value, mesh: Mesh, *, kernel_size,
                                            dilation=1, is_causal=False,
                                            spatial_axis: Union[int, Sequence[int]] = 0,
                                            rpb=None, scale=None,
                                            additional_keys=None, additional_values=None,
                                            return_lse: bool = False,
                                            implementation: Optional[str] = None,
                                            tile_shape=None,
                                            data_axis: Optional[str] = "data",
                                            heads_axis: Optional[str] = "heads",
                                            context_axis: Union[str, Sequence[str]] = "context"):
  """:func:`attnjax.neighborhood_attention` with spatial axes split over mesh axes.

  Args:
    query: [B, *spatial, N, H]; key: [B, *spatial, K, H]; value:
      [B, *spatial, K, Hv] (global arrays; sharded here with each split
      spatial axis over its mesh axis, batch over ``data_axis`` and heads over
      ``heads_axis`` where the mesh has them).
    mesh: a Mesh with the ``context_axis`` axis (or axes).
    spatial_axis: which spatial dimension is split (0 = the first, X), or a
      tuple of them, e.g. ``(0, 1)`` to split X and Y of a 2D image over a 2-D
      grid of devices.
    context_axis: the mesh axis that splits ``spatial_axis``; with a tuple of
      spatial axes, a tuple of as many distinct mesh axes (``spatial_axis[i]``
      is split over ``context_axis[i]``).
    kernel_size, dilation, is_causal, rpb, scale, additional_keys,
      additional_values, return_lse, implementation, tile_shape: as
      :func:`attnjax.neighborhood_attention` (``implementation`` and
      ``tile_shape`` apply to each device's buffer).

  Returns:
    out [B, *spatial, N, Hv] (and lse [B, *spatial, N]), equal to the
    unsharded :func:`attnjax.neighborhood_attention`.

  Raises:
    ValueError naming the argument: a split extent not divisible by its mesh
    axis size, a halo longer than a shard (with the largest kernel_size the
    split allows), two spatial axes on one mesh axis, an unknown mesh axis.
  """
  query, key, value, rpb, additional_keys, additional_values = V.as_arrays(
      query, key, value, rpb, additional_keys, additional_values)
  for name, x in (("query", query), ("key", key), ("value", value)):
    if getattr(x, "ndim", 0) < 4:
      raise ValueError(f"{name} must have shape [B, *spatial, heads, head_dim], got "
                       f"{getattr(x, 'shape', None)}.")
  D = query.ndim - 3
  splits = _splits(spatial_axis, context_axis, D, mesh)
  spatial, ks, ds, cs = check_neighborhood_args(tuple(query.shape[1:1 + D]), kernel_size,
                                                dilation, is_causal)
  B, N, K = query.shape[0], query.shape[-2], key.shape[-2]
  several = len(splits) > 1
  axes = []    # (array axis, mesh axis, C, plan) per split spatial axis
  for a, name in splits:
    dax, hax, C, _ = check_context_mesh(mesh, batch=B, num_heads=N, num_kv_heads=K,
                                        context_axis=name, data_axis=data_axis,
                                        heads_axis=heads_axis)
    plan = halo_plan(spatial[a], ks[a], ds[a], cs[a], C, _axis_label(a, name, several))
    axes.append((1 + a, name, C, plan))
  options = dict(kernel_size=ks, dilation=ds, is_causal=cs, scale=scale, return_lse=True,
                 implementation=implementation, tile_shape=tile_shape)

  def rows(x, ax, start, size):
    return jax.lax.slice_in_dim(x, start, start + size, axis=ax)

  def pad(x, ax, before, after):
    widths = [(0, 0)] * x.ndim
    widths[ax] = (before, after)
    return jnp.pad(x, widths)

  def halo(x, ax, name, C, plan, shift):
    """x extended along ``ax`` by the neighbours' rows, then placed by ``shift``."""
    parts = []
    if plan.left:
      parts.append(jax.lax.ppermute(rows(x, ax, plan.shard_len - plan.left, plan.left), name,
                                    [(i, i + 1) for i in range(C - 1)]))
    parts.append(x)
    if plan.right:
      parts.append(jax.lax.ppermute(rows(x, ax, 0, plan.right), name,
                                    [(i + 1, i) for i in range(C - 1)]))
    return jnp.roll(jnp.concatenate(parts, axis=ax), shift, axis=ax)

  def local_fn(q, k, v, *extra):
    starts = []
    for ax, name, C, plan in axes:   # one axis after the other: the corners come along
      if C == 1:
        starts.append((ax, 0, plan.shard_len))
        continue
      left, right = plan.left, plan.right
      c = jax.lax.axis_index(name)
      shift = jnp.where(c == 0, -left, jnp.where(c == C - 1, right, 0))
      q = jnp.roll(pad(q, ax, left, right), shift, axis=ax)
      k, v = halo(k, ax, name, C, plan, shift), halo(v, ax, name, C, plan, shift)
      starts.append((ax, left + shift, plan.shard_len))
    out, lse = neighborhood_attention(q, k, v, **options, **dict(zip(extra_names, extra)))
    for ax, start, m in starts:
      out = jax.lax.dynamic_slice_in_dim(out, start, m, axis=ax)
      lse = jax.lax.dynamic_slice_in_dim(lse, start, m, axis=ax)
    return (out, lse) if return_lse else out

  spatial_spec = [None] * D
  for ax, name, _, _ in axes:
    spatial_spec[ax - 1] = name
  spec = P(dax, *spatial_spec, hax, None)
  extra_specs = {"rpb": P(hax, *([None] * D)), "additional_keys": P(dax, None, hax, None),
                 "additional_values": P(dax, None, hax, None)}
  extras = {"rpb": rpb, "additional_keys": additional_keys,
            "additional_values": additional_values}
  extra_names = tuple(name for name, x in extras.items() if x is not None)
  out_specs = (spec, P(dax, *spatial_spec, hax)) if return_lse else spec
  fn = jax.shard_map(local_fn, mesh=mesh,
                     in_specs=(spec, spec, spec) + tuple(extra_specs[n] for n in extra_names),
                     out_specs=out_specs, check_vma=False)
  return fn(query, key, value, *(extras[n] for n in extra_names))


def neighborhood_communication_bytes(spatial_shape, *, kernel_size, dilation=1,
                                     is_causal=False,
                                     spatial_axis: Union[int, Sequence[int]] = 0, batch: int,
                                     num_kv_heads: int, head_dim: int,
                                     value_dim: Optional[int] = None,
                                     num_shards: Union[int, Sequence[int]],
                                     head_shards: int = 1,
                                     itemsize: int = 2) -> Dict[str, float]:
  """Key/value bytes one device receives: the halo vs an all-gather of K/V.

  ``spatial_axis`` and ``num_shards``: one split axis and its shard count, or
  tuples of them (e.g. ``(0, 1)`` and ``(2, 4)`` for an image on a 2 x 4
  grid). The halo is what a device with neighbours on both sides of every
  split axis receives (the ``ppermute`` shapes): along the first split axis
  ``left + right`` rows of its tile, along each next one ``left + right`` rows
  of the tile already extended along the previous axes (corners included),
  i.e. ``prod(left + m + right) - prod(m)`` tokens times the unsplit extents.
  The all-gather receives the ``prod(C) - 1`` other tiles. ``batch`` and
  ``num_kv_heads / head_shards`` are what one device holds.

  Returns ``halo_rows`` (``left + right``; a tuple per split axis with
  tuples), ``halo_tokens``, ``halo_bytes``, ``allgather_bytes``, ``ratio``
  (halo / all-gather) and ``max_received_bytes``: what the busiest device of
  this split actually receives (less than ``halo_bytes`` when an axis has 2
  shards, so that no device has neighbours on both of its sides).
  """
  spatial, ks, ds, cs = check_neighborhood_args(tuple(spatial_shape), kernel_size, dilation,
                                                is_causal)
  several = not _is_index(spatial_axis)
  as_tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x,)
  axes, shards = as_tuple(spatial_axis), as_tuple(num_shards)
  if several == _is_index(num_shards) or len(shards) != len(axes) or not axes or \
     len(set(axes)) != len(axes) or not all(_is_index(c) and c >= 1 for c in shards) or \
     not all(_is_index(a) and 0 <= a < len(spatial) for a in axes):
    raise ValueError(f"spatial_axis={spatial_axis!r} and num_shards={num_shards!r} must be "
                     f"an int each or tuples of equal length (distinct axes in "
                     f"[0, {len(spatial)})).")
  plans = [halo_plan(spatial[a], ks[a], ds[a], cs[a], C, f"spatial axis {a}")
           for a, C in zip(axes, shards)]
  value_dim = head_dim if value_dim is None else value_dim
  token = batch * (num_kv_heads // head_shards) * (head_dim + value_dim) * itemsize
  other = math.prod(n for i, n in enumerate(spatial) if i not in axes)
  tile = math.prod(p.shard_len for p in plans) * other
  halo_tokens = math.prod(p.buffer_len for p in plans) * other - tile
  halo = halo_tokens * token
  allgather = (math.prod(shards) - 1) * tile * token
  halo_rows = tuple(p.left + p.right for p in plans)
  # The busiest device: along an axis of 2 shards each device has one neighbour (it receives
  # max(left, right) rows), of 3 or more an interior one has both; later axes send the tile
  # already extended (padded) along the earlier ones.
  busiest = 0
  for i, (p, C) in enumerate(zip(plans, shards)):
    rows = 0 if C == 1 else (max(p.left, p.right) if C == 2 else p.left + p.right)
    busiest += rows * math.prod(q.buffer_len for q in plans[:i]) * math.prod(
        q.shard_len for q in plans[i + 1:]) * other
  return {"halo_rows": halo_rows if several else halo_rows[0], "halo_tokens": halo_tokens,
          "halo_bytes": float(halo), "allgather_bytes": float(allgather),
          "ratio": float(halo / allgather) if allgather else 0.0,
          "max_received_bytes": float(busiest * token)}
