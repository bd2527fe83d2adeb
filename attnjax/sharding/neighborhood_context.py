"""Spatially sharded neighborhood attention with a halo exchange (NATTEN semantics; arXiv:2403.04690).

"Faster Neighborhood Attention: Reducing the O(n^2) Cost of Self Attention at the
Threadblock Level".

One spatial axis of length ``n`` is split into ``C`` shards of ``m = n / C``
rows over the mesh's ``context`` axis (heads optionally over ``heads``,
batch over ``data``); the other spatial axes stay whole. The halo is read
off the global window rule (:func:`attnjax.masks.neighborhood.window_bounds`):
``left`` / ``right`` are the most rows any shard's queries need before /
after the shard (``dilation * (k // 2)`` and ``dilation * (k // 2 + k % 2 - 1)``
for a non-causal window away from the borders, ``dilation * (k - 1)`` and 0
for a causal one). Each device receives exactly those key/value rows: the
last ``left`` rows of its predecessor and the first ``right`` rows of its
successor (two ``ppermute`` calls per array; queries never travel).

The local neighborhood attention then runs on a buffer of
``left + m + right`` rows whose borders are placed so that the window rule
on the buffer equals the global one for the shard's queries: interior shards
use [left halo, shard, right halo]; the first shard's buffer starts at the
global row 0 ([shard, right halo, unused]) and the last shard's ends at the
global row n ([unused, left halo, shard]), so NATTEN's inward shift at the
global borders is reproduced exactly. :func:`halo_plan` checks this for every
shard on the host and raises when a shard is too short for the window.
Autodiff through ``shard_map`` gives the backward.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional

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


@functools.lru_cache(maxsize=256)
def halo_plan(n: int, kernel_size: int, dilation: int, is_causal: bool,
              num_shards: int, axis_name: str = "axis") -> HaloPlan:
  """The halo of an axis of ``n`` rows split in ``num_shards`` (NATTEN window rule).

  Raises ValueError naming ``axis_name`` when n is not divisible, when a halo
  is longer than a shard (it would need rows from beyond the neighbours), or
  when the window on a shard's buffer would differ from the global window.
  """
  k, d, C = kernel_size, dilation, num_shards
  if n % C:
    raise ValueError(f"{axis_name}: spatial extent {n} is not divisible by the context axis "
                     f"size {C}.")
  m = n // C
  if C == 1:
    return HaloPlan(m, 0, 0)
  x = np.arange(n)
  first, last = _key_range(x, n, k, d, is_causal)
  start = (x // m) * m
  left = int(max(0, (start - first).max()))
  right = int(max(0, (last - (start + m - 1)).max()))
  for side, h in (("left", left), ("right", right)):
    if h > m:
      raise ValueError(
          f"{axis_name}: the {side} halo of {h} rows (kernel_size {k}, dilation {d}, "
          f"is_causal {is_causal}) is larger than the local shard of {m} rows "
          f"({n} rows / {C} shards); use fewer shards on this axis.")
  plan = HaloPlan(m, left, right)
  lb = plan.buffer_len
  if k * d > lb:
    raise ValueError(f"{axis_name}: kernel_size {k} * dilation {d} exceeds the local buffer of "
                     f"{lb} rows (shard {m} + halo {left} + {right}); use fewer shards.")
  p = np.arange(lb)
  b_first, b_last = _key_range(p, lb, k, d, is_causal)
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
      raise ValueError(
          f"{axis_name}: shard {c} of {m} rows is too short for kernel_size {k} * dilation "
          f"{d} (is_causal {is_causal}): its windows cannot be formed from the neighbours' "
          f"halo; use fewer shards on this axis.")
  return plan


def context_parallel_neighborhood_attention(query, key, value, mesh: Mesh, *, kernel_size,
                                            dilation=1, is_causal=False,
                                            spatial_axis: int = 0, rpb=None, scale=None,
                                            additional_keys=None, additional_values=None,
                                            return_lse: bool = False,
                                            implementation: Optional[str] = None,
                                            tile_shape=None,
                                            data_axis: Optional[str] = "data",
                                            heads_axis: Optional[str] = "heads",
                                            context_axis: str = "context"):
  """:func:`attnjax.neighborhood_attention` with one spatial axis split over ``context_axis``.

  Args:
    query: [B, *spatial, N, H]; key: [B, *spatial, K, H]; value:
      [B, *spatial, K, Hv] (global arrays; sharded here with spatial axis
      ``spatial_axis`` over ``context_axis``, batch over ``data_axis`` and
      heads over ``heads_axis`` where the mesh has them).
    mesh: a Mesh with ``context_axis``.
    spatial_axis: which spatial dimension is split (0 = the first, X).
    kernel_size, dilation, is_causal, rpb, scale, additional_keys,
      additional_values, return_lse, implementation, tile_shape: as
      :func:`attnjax.neighborhood_attention` (``implementation`` and
      ``tile_shape`` apply to each device's buffer).

  Returns:
    out [B, *spatial, N, Hv] (and lse [B, *spatial, N]), equal to the
    unsharded :func:`attnjax.neighborhood_attention`.
  """
  query, key, value, rpb, additional_keys, additional_values = V.as_arrays(
      query, key, value, rpb, additional_keys, additional_values)
  for name, x in (("query", query), ("key", key), ("value", value)):
    if getattr(x, "ndim", 0) < 4:
      raise ValueError(f"{name} must have shape [B, *spatial, heads, head_dim], got "
                       f"{getattr(x, 'shape', None)}.")
  D = query.ndim - 3
  if isinstance(spatial_axis, bool) or not isinstance(spatial_axis, (int, np.integer)) or \
     not 0 <= spatial_axis < D:
    raise ValueError(f"spatial_axis must be an int in [0, {D}) for {D} spatial dimension(s), "
                     f"got {spatial_axis!r}.")
  spatial, ks, ds, cs = check_neighborhood_args(tuple(query.shape[1:1 + D]), kernel_size,
                                                dilation, is_causal)
  B, N, K = query.shape[0], query.shape[-2], key.shape[-2]
  dax, hax, C, _ = check_context_mesh(mesh, batch=B, num_heads=N, num_kv_heads=K,
                                      context_axis=context_axis, data_axis=data_axis,
                                      heads_axis=heads_axis)
  a = int(spatial_axis)
  plan = halo_plan(spatial[a], ks[a], ds[a], cs[a], C, f"spatial axis {a}")
  left, right, m = plan.left, plan.right, plan.shard_len
  ax = 1 + a    # array axis of the split dimension
  options = dict(kernel_size=ks, dilation=ds, is_causal=cs, scale=scale, return_lse=True,
                 implementation=implementation, tile_shape=tile_shape)

  def rows(x, start, size):
    return jax.lax.slice_in_dim(x, start, start + size, axis=ax)

  def pad(x, before, after):
    widths = [(0, 0)] * x.ndim
    widths[ax] = (before, after)
    return jnp.pad(x, widths)

  def local_fn(q, k, v, *extra):
    if C == 1:
      buf_q, buf_k, buf_v, start = q, k, v, 0
    else:
      c = jax.lax.axis_index(context_axis)
      shift = jnp.where(c == 0, -left, jnp.where(c == C - 1, right, 0))

      def halo(x):
        parts = []
        if left:
          parts.append(jax.lax.ppermute(rows(x, m - left, left), context_axis,
                                        [(i, i + 1) for i in range(C - 1)]))
        parts.append(x)
        if right:
          parts.append(jax.lax.ppermute(rows(x, 0, right), context_axis,
                                        [(i + 1, i) for i in range(C - 1)]))
        return jnp.roll(jnp.concatenate(parts, axis=ax), shift, axis=ax)

      buf_q = jnp.roll(pad(q, left, right), shift, axis=ax)
      buf_k, buf_v = halo(k), halo(v)
      start = left + shift
    out, lse = neighborhood_attention(buf_q, buf_k, buf_v, **options,
                                      **dict(zip(extra_names, extra)))
    out = jax.lax.dynamic_slice_in_dim(out, start, m, axis=ax)
    lse = jax.lax.dynamic_slice_in_dim(lse, start, m, axis=ax)
    return (out, lse) if return_lse else out

  spatial_spec = [None] * D
  spatial_spec[a] = context_axis
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
                                     is_causal=False, spatial_axis: int = 0, batch: int,
                                     num_kv_heads: int, head_dim: int,
                                     value_dim: Optional[int] = None, num_shards: int,
                                     head_shards: int = 1,
                                     itemsize: int = 2) -> Dict[str, float]:
  """Key/value bytes one device receives: the halo vs an all-gather of K/V."""
  spatial, ks, ds, cs = check_neighborhood_args(tuple(spatial_shape), kernel_size, dilation,
                                                is_causal)
  a = spatial_axis
  plan = halo_plan(spatial[a], ks[a], ds[a], cs[a], num_shards, f"spatial axis {a}")
  value_dim = head_dim if value_dim is None else value_dim
  row = (batch * int(np.prod(spatial)) // spatial[a] * (num_kv_heads // head_shards)
         * (head_dim + value_dim) * itemsize)
  halo = (plan.left + plan.right) * row
  allgather = (num_shards - 1) * plan.shard_len * row
  return {"halo_rows": plan.left + plan.right, "halo_bytes": float(halo),
          "allgather_bytes": float(allgather),
          "ratio": float(halo / allgather) if allgather else 0.0}
