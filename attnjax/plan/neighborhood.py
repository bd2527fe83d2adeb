"""Static multi-dimensional tiling of neighborhood attention (NATTEN FNA, arXiv:2403.04690).

Every spatial dimension is split into dilation groups, and each group into
tiles of ``t`` consecutive within-group coordinates. A query tile attends to
the union of its members' windows, a range of at most ``t + k - 1`` keys per
dimension, so a q-tile of ``prod(t)`` queries visits ``prod(t + k - 1)`` keys
instead of all ``n``. The plans are NumPy, computed once per static shape;
``to_tiles`` / ``from_tiles`` move arrays between the spatial and the tiled
token order (pad + reshape + transpose).

Token order "tiled": a dimension of length ``n`` is padded to ``nt * t * d``
and reshaped to ``(nt, t, d)``: element ``(j, p, g)`` is the coordinate
``x = (j * t + p) * d + g`` (tile ``j``, position ``p`` of dilation group
``g``); coordinates ``>= n`` are padding.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Tuple

import jax.numpy as jnp
import numpy as np

from attnjax.masks.neighborhood import group_length, window_bounds


@dataclasses.dataclass(frozen=True)
class DimPlan:
  """Tiling of one spatial dimension.

  Attributes (arrays indexed [g, j, p] for queries, [g, j, i] for union keys):
    n, k, d, causal, t: extent, kernel, dilation, causal flag, tile size.
    nt, u: tiles per group, union width (keys per dimension a tile visits).
    q_lo, q_hi: [d, nt, t] query window in within-group coordinates; padded
      queries get an empty window.
    key_start: [d, nt] first within-group key coordinate of each tile's union.
    key_index: [d, nt, u] original key coordinate of each union slot (0 where
      the slot is past the group's end).
    mask: [d, nt, t, u] bool, query p of tile j may attend union slot i.
    rpb_index: [d, nt, t, u] index ``y' - x' + k - 1`` into a (2k - 1) table.
  """
  n: int
  k: int
  d: int
  causal: bool
  t: int
  nt: int
  u: int
  q_lo: np.ndarray
  q_hi: np.ndarray
  key_start: np.ndarray
  key_index: np.ndarray
  mask: np.ndarray
  rpb_index: np.ndarray

  @property
  def padded(self) -> int:
    return self.nt * self.t * self.d


@functools.lru_cache(maxsize=256)
def dim_plan(n: int, k: int, d: int, causal: bool, t: int) -> DimPlan:
  """Builds the :class:`DimPlan` of one dimension (cached)."""
  m = -(-n // d)  # longest group
  t = max(1, min(t, m))
  nt = -(-m // t)
  u = min(t + k - 1, m)
  g = np.arange(d)[:, None, None]
  xg = np.arange(nt)[None, :, None] * t + np.arange(t)[None, None, :]  # [1, nt, t]
  ng = group_length(n, d, g)  # [d, 1, 1]
  valid_q = xg < ng
  x = np.where(valid_q, xg * d + g, g)
  _, lo, hi = window_bounds(x, n, k, d, causal)
  lo = np.where(valid_q, lo, 0)
  hi = np.where(valid_q, hi, 0)
  # union start: the first query's window start, kept inside the group
  start = np.minimum(lo[:, :, 0], np.maximum(ng[:, :, 0] - u, 0))  # [d, nt]
  yg = start[:, :, None] + np.arange(u)  # [d, nt, u]
  valid_k = yg < ng
  key_index = np.where(valid_k, yg * d + g, 0)
  assert np.all(np.where(valid_q, hi, 0) <= (start[:, :, None] + u))
  ys = yg[:, :, None, :]
  mask = (valid_q[..., None] & valid_k[:, :, None, :]
          & (ys >= lo[..., None]) & (ys < hi[..., None]))
  rpb_index = np.clip(ys - xg[..., None] + k - 1, 0, 2 * k - 2)
  return DimPlan(n, k, d, causal, t, nt, u, lo.astype(np.int32), hi.astype(np.int32),
                 start.astype(np.int32), key_index.astype(np.int32), mask,
                 rpb_index.astype(np.int32))


def default_tile_shape(spatial_shape, kernel_size, dilation) -> Tuple[int, ...]:
  """Tile per dimension minimising visited keys plus a per-tile overhead.

  Cost model (per query): ``prod(t_i + k_i - 1) * (1 + 64 / prod(t_i))``, the
  visited union plus a fixed cost of running one small tile; tiles are powers
  of two up to 64 per dimension and 256 queries in total.
  """
  cands = []
  for n, k, d in zip(spatial_shape, kernel_size, dilation):
    m = -(-n // d)
    opts = sorted({min(2 ** e, m) for e in range(0, 7)})
    cands.append([(t, min(t + k - 1, m)) for t in opts])
  best, best_cost = None, math.inf
  for combo in _product(cands):
    tq = math.prod(c[0] for c in combo)
    if tq > 256:
      continue
    uk = math.prod(c[1] for c in combo)
    cost = uk * (1.0 + 64.0 / tq)
    if cost < best_cost - 1e-9:
      best, best_cost = tuple(c[0] for c in combo), cost
  return best


def pallas_tile_shape(spatial_shape, kernel_size, dilation, target: int = 128
                      ) -> Tuple[int, ...]:
  """Power-of-two tile per dimension with ``target`` queries for the fused kernels.

  TPU blocks need 128 lanes on the key axis and Triton needs power-of-two
  blocks, so tiles are powers of two (padding absorbs the remainder); the
  smallest tile dimension is doubled first, never beyond the group length
  rounded up to a power of two.
  """
  caps = [1 << max(0, (-(-n // d) - 1).bit_length()) for n, d in zip(spatial_shape, dilation)]
  del kernel_size  # the union overhead does not change which power of two fits
  tile = [1] * len(caps)
  while math.prod(tile) < target:
    grow = [i for i in range(len(tile)) if tile[i] < caps[i]]
    if not grow:
      break
    i = min(grow, key=lambda j: (tile[j], -j))
    tile[i] *= 2
  return tuple(tile)


def _product(lists):
  if not lists:
    yield ()
    return
  for head in lists[0]:
    for rest in _product(lists[1:]):
      yield (head,) + rest


def plans(spatial_shape, kernel_size, dilation, is_causal, tile_shape):
  """The :class:`DimPlan` of every dimension."""
  return tuple(dim_plan(n, k, d, c, t) for n, k, d, c, t in
               zip(spatial_shape, kernel_size, dilation, is_causal, tile_shape))


def spread(per_dim_array, i: int, D: int):
  """Reshapes a per-dim array [d_i, nt_i, t_i, u_i] so that the arrays of all
  D dimensions broadcast to [d1, nt1, ..., dD, ntD, t1..tD, u1..uD]."""
  a = per_dim_array
  shape = [1] * (4 * D)
  shape[2 * i], shape[2 * i + 1] = a.shape[0], a.shape[1]
  shape[2 * D + i], shape[3 * D + i] = a.shape[2], a.shape[3]
  return a.reshape(shape)


def tile_counts(ps):
  """(G, tq, uk): number of tiles, queries per tile, union keys per tile."""
  G = math.prod(p.d * p.nt for p in ps)
  tq = math.prod(p.t for p in ps)
  uk = math.prod(p.u for p in ps)
  return G, tq, uk


def to_tiles(x, ps):
  """[B, *spatial, *rest] -> [B, G, tq, *rest] in tiled order (zero padding)."""
  D = len(ps)
  B, rest = x.shape[0], x.shape[1 + D:]
  pad = [(0, 0)] + [(0, p.padded - p.n) for p in ps] + [(0, 0)] * len(rest)
  if any(hi for _, hi in pad):
    x = jnp.pad(x, pad)
  shape = [B]
  for p in ps:
    shape += [p.nt, p.t, p.d]
  x = x.reshape(shape + list(rest))
  # axes: 1 + 3i -> nt_i, 2 + 3i -> t_i, 3 + 3i -> d_i
  perm = [0]
  for i in range(D):
    perm += [3 + 3 * i, 1 + 3 * i]
  perm += [2 + 3 * i for i in range(D)]
  perm += list(range(1 + 3 * D, 1 + 3 * D + len(rest)))
  G, tq, _ = tile_counts(ps)
  return x.transpose(perm).reshape([B, G, tq] + list(rest))


def from_tiles(y, ps):
  """Inverse of :func:`to_tiles`: [B, G, tq, *rest] -> [B, *spatial, *rest]."""
  D = len(ps)
  B, rest = y.shape[0], y.shape[3:]
  shape = [B]
  for p in ps:
    shape += [p.d, p.nt]
  shape += [p.t for p in ps]
  y = y.reshape(shape + list(rest))
  # axes: 1 + 2i -> d_i, 2 + 2i -> nt_i, 1 + 2D + i -> t_i
  perm = [0]
  for i in range(D):
    perm += [2 + 2 * i, 1 + 2 * D + i, 1 + 2 * i]
  perm += list(range(1 + 3 * D, 1 + 3 * D + len(rest)))
  y = y.transpose(perm).reshape([B] + [p.padded for p in ps] + list(rest))
  return y[(slice(None),) + tuple(slice(0, p.n) for p in ps)]
