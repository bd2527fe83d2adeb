"""Neighborhood attention, NATTEN semantics in 1D/2D/3D (Hassani et al.; arXiv:2403.04690).

"Faster Neighborhood Attention: Reducing the O(n^2) Cost of Self Attention at the
Threadblock Level".

Public entry points: :func:`neighborhood_attention` (any spatial rank) and
:func:`na1d`, :func:`na2d`, :func:`na3d`.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from attnjax.block_sparse.api import run_attention
from attnjax.core import precision
from attnjax.core import dispatch
from attnjax.core import placement
from attnjax.core import validation as V
from attnjax.core.merge import merge_attention
from attnjax.core.reference import reference_attention
from attnjax.masks.neighborhood import (Neighborhood, check_neighborhood_args,
                                        normalize_per_dim, unravel)
from attnjax.plan.neighborhood import default_tile_shape, pallas_tile_shape
from attnjax.neighborhood.xla import na_xla
from pallas_kernels.neighborhood.ops import na_pallas



def _pallas_supports(call: dispatch.Call, explicit: bool):
  if not explicit and not call["kernel_default"]:
    return ("the neighborhood kernels are opt-in (implementation='pallas') until they have "
            "run on hardware")
  return None


#: The neighborhood op's backends, fastest first (the XLA path covers every call).
NEIGHBORHOOD_BACKENDS = (dispatch.Backend("pallas", _pallas_supports),
                         dispatch.Backend("xla", lambda call, explicit: None))


def _pick_implementation(implementation, query, key, value) -> str:
  """The backend of a neighborhood call (``attnjax.core.dispatch``)."""
  facts = dict(kernel_default=placement.default_kernel_implementation(
      "neighborhood", query, key, value) == "pallas")
  call = dispatch.Call("neighborhood", placement.target_platform(query, key, value),
                       placement.compile_target(query, key, value), facts)
  return dispatch.resolve(call, NEIGHBORHOOD_BACKENDS, implementation).backend


def _check_inputs(query, key, value, rank):
  for name, x in (("query", query), ("key", key), ("value", value)):
    if getattr(x, "ndim", 0) < 4:
      raise ValueError(
          f"{name} must have shape [B, *spatial, heads, head_dim] with at least one "
          f"spatial dimension, got {getattr(x, 'shape', None)}.")
  D = query.ndim - 3
  if rank is not None and D != rank:
    raise ValueError(
        f"query must have {rank} spatial dimension(s) [B, {', '.join('XYZ'[:rank])}, N, H] "
        f"for na{rank}d, got shape {query.shape} ({D} spatial dims).")
  for name, x in (("key", key), ("value", value)):
    if x.ndim != query.ndim or x.shape[1:1 + D] != query.shape[1:1 + D]:
      raise ValueError(
          f"{name} spatial shape {x.shape[1:x.ndim - 2]} must equal the query's "
          f"{query.shape[1:1 + D]} (spatial rank mismatch or different extents); "
          f"got query {query.shape}, {name} {x.shape}.")
  flat = lambda x: x.reshape((x.shape[0], -1) + x.shape[-2:])
  d = V.check_qkv(flat(query), flat(key), flat(value))
  return D, d


def _check_rpb(rpb, N, kernel_size):
  if rpb is None:
    return None
  expected = (N,) + tuple(2 * k - 1 for k in kernel_size)
  if tuple(np.shape(rpb)) != expected:
    raise ValueError(
        f"rpb must have shape [N, 2*k1-1, ...] = {expected} for kernel_size "
        f"{kernel_size} and N={N} query heads, got {tuple(np.shape(rpb))}.")
  return rpb


def dense_rpb(rpb, spatial_shape, kernel_size, dilation):
  """rpb [N, 2k1-1, ...] -> dense bias [N, L, L] with entry ``y' - x' + k - 1``.

  Offsets are in within-dilation-group coordinates (only same-group pairs are
  ever visible); out-of-window pairs get a clipped, irrelevant entry.
  """
  L = math.prod(spatial_shape)
  flat = np.arange(L)
  qc, kc = unravel(flat, spatial_shape), unravel(flat, spatial_shape)
  idx = []
  for x, y, k, d in zip(qc, kc, kernel_size, dilation):
    off = (y[None, :] // d) - (x[:, None] // d) + k - 1
    idx.append(jnp.asarray(np.clip(off, 0, 2 * k - 2)))
  return jnp.asarray(rpb)[(slice(None),) + tuple(idx)]


def _check_additional(additional_keys, additional_values, d):
  if additional_keys is None and additional_values is None:
    return False
  if additional_keys is None or additional_values is None:
    raise ValueError("additional_keys and additional_values must be given together "
                     f"(got keys {additional_keys is not None}, values "
                     f"{additional_values is not None}).")
  ak, av = additional_keys, additional_values
  if ak.ndim != 4 or ak.shape[0] != d.B or ak.shape[2:] != (d.K, d.H):
    raise ValueError(f"additional_keys must have shape [B, S_add, K, H] = "
                     f"[{d.B}, S_add, {d.K}, {d.H}], got {ak.shape}.")
  if av.ndim != 4 or av.shape[:3] != ak.shape[:3] or av.shape[3] != d.Hv:
    raise ValueError(f"additional_values must have shape [B, S_add, K, Hv] = "
                     f"[{d.B}, {ak.shape[1]}, {d.K}, {d.Hv}], got {av.shape}.")
  return True


def neighborhood_attention(query, key, value, *, kernel_size, dilation=1, is_causal=False,
                           rpb=None, scale=None, additional_keys=None,
                           additional_values=None, return_lse=False,
                           implementation=None, tile_shape=None):
  """Neighborhood attention over a D-dimensional token grid (NATTEN semantics).

  Every query attends to a ``kernel_size`` box of keys around it (per
  dimension: dilation groups; non-causal windows shift inward at borders so
  every query sees ``prod(kernel_size)`` keys; causal windows ``[x-k+1, x]``
  do not shift). See :mod:`attnjax.masks.neighborhood` for the exact rule.

  Args:
    query: [B, *spatial, N, H].
    key: [B, *spatial, K, H], N % K == 0 (GQA/MQA).
    value: [B, *spatial, K, Hv].
    kernel_size: int or per-dimension tuple (odd or even), ``k * d <= extent``.
    dilation: int or per-dimension tuple, >= 1.
    is_causal: bool or per-dimension tuple.
    rpb: optional relative position bias [N, 2*k1-1, ..., 2*kD-1], indexed by
      the within-group offset ``y' - x' + k - 1`` per dimension (NATTEN's
      indexing for odd kernels; used unchanged for even kernels and causal
      dimensions, which NATTEN's RPB does not support). Differentiable.
    scale: logit scale, default H ** -0.5.
    additional_keys: optional [B, S_add, K, H] keys every query attends to in
      addition to its neighborhood (registers, cross-attention tokens; never
      causally masked), merged through the log-sum-exp.
    additional_values: [B, S_add, K, Hv], with ``additional_keys``.
    return_lse: also return lse [B, *spatial, N] float32.
    implementation: "reference" (dense oracle, O(n^2)), "xla" (tiled, linear
      in tokens), "pallas" (fused kernel; interpret mode on CPU) or None
      ("xla" on every platform: the fused kernels have been checked in
      interpret mode and for lowering only, never run on a GPU or TPU, so they
      are opt-in until they are).
    tile_shape: per-dimension query tile of the xla/pallas paths (default: a
      cost model, :func:`attnjax.plan.neighborhood.default_tile_shape`, for
      xla; power-of-two tiles of 128 queries,
      :func:`attnjax.plan.neighborhood.pallas_tile_shape`, for pallas).

  Returns:
    out [B, *spatial, N, Hv] in the query dtype (and lse if ``return_lse``).
    The xla and pallas paths accumulate in float32 also for float64 inputs
    (float32-level error, with a ``Float32AccumulationWarning``); the
    reference computes float64 inputs in float64.
  """
  query, key, value, rpb, additional_keys, additional_values = V.as_arrays(
      query, key, value, rpb, additional_keys, additional_values)
  D, d = _check_inputs(query, key, value, None)
  spatial = tuple(query.shape[1:1 + D])
  spatial, ks, ds, cs = check_neighborhood_args(spatial, kernel_size, dilation, is_causal)
  rpb = _check_rpb(rpb, d.N, ks)
  has_add = _check_additional(additional_keys, additional_values, d)
  scale = V.check_scale(scale, d.H)
  implementation = _pick_implementation(implementation, query, key, value)
  if tile_shape is None:
    tile_shape = (pallas_tile_shape(spatial, ks, ds) if implementation == "pallas"
                  else default_tile_shape(spatial, ks, ds))
  tile_shape = normalize_per_dim("tile_shape", tile_shape, D)
  if any(t < 1 for t in tile_shape):
    raise ValueError(f"tile_shape entries must be >= 1, got {tile_shape}.")

  if implementation == "reference":
    flat = lambda x: x.reshape((x.shape[0], -1) + x.shape[-2:])
    bias = None if rpb is None else dense_rpb(rpb, spatial, ks, ds)[None]
    out, lse = reference_attention(
        flat(query), flat(key), flat(value), mask=Neighborhood(spatial, ks, ds, cs),
        bias=bias, scale=scale, return_lse=True)
    out = out.reshape(query.shape[:-1] + (d.Hv,))
    lse = lse.reshape(query.shape[:-1])
  elif implementation == "xla":
    precision.warn_float32_accumulation("neighborhood attention (implementation='xla')",
                                        query, key, value)
    out, lse = na_xla(query, key, value, kernel_size=ks, dilation=ds, is_causal=cs,
                      scale=scale, rpb=rpb, tile_shape=tile_shape)
  else:
    precision.warn_float32_accumulation("neighborhood attention (implementation='pallas')",
                                        query, key, value)
    out, lse = na_pallas(query, key, value, kernel_size=ks, dilation=ds, is_causal=cs,
                         scale=scale, tile_shape=tile_shape, rpb=rpb)

  if has_add:
    # The extra keys are seen by every query: plain attention over S_add keys, on the
    # reference when it was asked for, else on the block-sparse XLA engine (any S_add;
    # also under implementation="pallas", whose kernels want block multiples).
    flat = lambda x: x.reshape((x.shape[0], -1) + x.shape[-2:])
    if implementation == "reference":
      o2, lse2 = reference_attention(flat(query), additional_keys, additional_values,
                                     scale=scale, return_lse=True)
    else:
      o2, lse2 = run_attention(flat(query), additional_keys, additional_values, scale=scale,
                               return_lse=True, backend="xla")
    o, l = merge_attention(flat(out), lse.reshape(lse.shape[0], -1, lse.shape[-1]), o2, lse2)
    out, lse = o.reshape(out.shape), l.reshape(lse.shape)
  return (out, lse) if return_lse else out


def _fixed_rank(rank):
  def fn(query, key, value, *, kernel_size, dilation=1, is_causal=False, rpb=None,
         scale=None, additional_keys=None, additional_values=None, return_lse=False,
         implementation=None, tile_shape=None):
    query, key, value = V.as_arrays(query, key, value)
    _check_inputs(query, key, value, rank)
    return neighborhood_attention(
        query, key, value, kernel_size=kernel_size, dilation=dilation,
        is_causal=is_causal, rpb=rpb, scale=scale, additional_keys=additional_keys,
        additional_values=additional_values, return_lse=return_lse,
        implementation=implementation, tile_shape=tile_shape)
  letters = {1: "L", 2: "X, Y", 3: "X, Y, Z"}[rank]
  fn.__name__ = f"na{rank}d"
  fn.__doc__ = (f"{rank}D neighborhood attention on [B, {letters}, N, H] inputs.\n\n"
                "Same arguments and result as :func:`neighborhood_attention`.")
  return fn


na1d = _fixed_rank(1)
na2d = _fixed_rank(2)
na3d = _fixed_rank(3)
