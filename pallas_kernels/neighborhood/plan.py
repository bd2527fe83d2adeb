"""Block lists of the fused neighborhood kernels (NATTEN FNA tiling; arXiv:2403.04690).

Tokens are permuted into tile-contiguous order (see
:mod:`attnjax.plan.neighborhood`): block ``b`` holds the ``tq = prod(t)``
tokens of one multi-dimensional tile of one dilation group. Key blocks use the
same tiling. A query block visits only the key blocks that intersect the union
of its members' windows (CSR lists, forward and dq); a key block is visited by
the query blocks listing it (CSC lists, dk/dv). The fine mask is rebuilt inside
the kernel from per-token window bounds, so no mask is stored.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import numpy as np

from attnjax.masks.neighborhood import group_length
from attnjax.plan.neighborhood import DimPlan, plans

#: within-group coordinate given to padded keys: outside every window.
PAD_COORD = 1 << 30


@dataclasses.dataclass(frozen=True, eq=False)
class BlockPlan:
  """Static schedule of the fused kernels.

  Attributes:
    num_blocks: G, tiles (query blocks = key blocks).
    block: tq, tokens per block.
    kv_list: int32 [G, max_kv] key blocks of each query block (padded by
      repeating the last entry); kv_count: int32 [G].
    q_list: int32 [G, max_q] query blocks visiting each key block; q_count [G].
    q_lo, q_hi: int32 [G * tq, D] per-query window, within-group coordinates
      (empty for padding).
    k_coord: int32 [D, G * tq] per-key within-group coordinate (PAD_COORD for
      padding).
  """
  num_blocks: int
  block: int
  kv_list: np.ndarray
  kv_count: np.ndarray
  q_list: np.ndarray
  q_count: np.ndarray
  q_lo: np.ndarray
  q_hi: np.ndarray
  k_coord: np.ndarray

  @property
  def visited_blocks(self) -> int:
    return int(self.kv_count.sum())


def _dim_boxes(p: DimPlan):
  """For each (g, j): the range of key tiles j' its queries' windows touch."""
  boxes = np.zeros((p.d, p.nt, 2), np.int64)
  for g in range(p.d):
    for j in range(p.nt):
      valid = p.q_hi[g, j] > p.q_lo[g, j]
      if not valid.any():
        boxes[g, j] = (0, 0)  # empty tile: no key block
        continue
      lo = p.q_lo[g, j][valid].min()
      hi = p.q_hi[g, j][valid].max()
      boxes[g, j] = (lo // p.t, (hi - 1) // p.t + 1)
  return boxes


def _per_token(ps, arrays):
  """Per-dim [d, nt, t] arrays -> [G * tq, D] in tiled token order."""
  D = len(ps)
  full = []
  for p in ps:
    full += [p.d, p.nt]
  full += [p.t for p in ps]
  cols = []
  for i, (p, a) in enumerate(zip(ps, arrays)):
    shape = [1] * (3 * D)
    shape[2 * i], shape[2 * i + 1], shape[2 * D + i] = p.d, p.nt, p.t
    cols.append(np.broadcast_to(a.reshape(shape), full).reshape(-1))
  return np.stack(cols, axis=-1).astype(np.int32)


@functools.lru_cache(maxsize=64)
def block_plan(spatial_shape, kernel_size, dilation, is_causal, tile_shape) -> BlockPlan:
  """Builds the :class:`BlockPlan` for a static problem (cached)."""
  ps = plans(spatial_shape, kernel_size, dilation, is_causal, tile_shape)
  boxes = [_dim_boxes(p) for p in ps]
  dims = []
  for p in ps:
    dims += [p.d, p.nt]
  G = math.prod(dims)
  tq = math.prod(p.t for p in ps)
  rows = []
  for flat in range(G):
    idx = np.unravel_index(flat, dims)
    ranges = []
    for i, p in enumerate(ps):
      g, j = idx[2 * i], idx[2 * i + 1]
      lo, hi = boxes[i][g, j]
      ranges.append([(g, jj) for jj in range(lo, hi)])
    row = []
    for combo in itertools.product(*ranges):
      coords = [c for gj in combo for c in gj]
      row.append(int(np.ravel_multi_index(coords, dims)))
    rows.append(row)
  cols = [[] for _ in range(G)]
  for qb, row in enumerate(rows):
    for kb in row:
      cols[kb].append(qb)
  kv_list, kv_count = _pad_lists(rows)
  q_list, q_count = _pad_lists(cols)
  q_lo = _per_token(ps, [p.q_lo for p in ps])
  q_hi = _per_token(ps, [p.q_hi for p in ps])
  coords = []
  for p in ps:
    yg = np.arange(p.nt)[:, None] * p.t + np.arange(p.t)[None, :]
    ng = group_length(p.n, p.d, np.arange(p.d))[:, None, None]
    coords.append(np.where(yg[None] < ng, yg[None], PAD_COORD))
  k_coord = _per_token(ps, coords).T.copy()
  return BlockPlan(G, tq, kv_list, kv_count, q_list, q_count, q_lo, q_hi, k_coord)


def _pad_lists(lists):
  width = max(1, max(len(r) for r in lists))
  out = np.zeros((len(lists), width), np.int32)
  count = np.zeros((len(lists),), np.int32)
  for i, r in enumerate(lists):
    count[i] = len(r)
    if r:
      out[i, :len(r)] = r
      out[i, len(r):] = r[-1]
  return out, count
