"""From a block plan (``BlockLayout``) to the engine's schedules: blocks, head grouping.

Static plans are scheduled at trace time on NumPy, cached per block kinds, so
a jitted call pays it once; run-time lists (a batched plan) are scheduled
under jit (``runtime_plan``).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.block_sparse import engine as E
from attnjax.block_sparse import schedule as SC
from attnjax.masks import layout as LY
from attnjax.plan import blocks as PB

#: floats of one scan step's logits tile (all lanes, heads and batch together).
STEP_BUDGET = 1 << 20
#: keys per work item: k-blocks of a row are grouped into tiles about this wide.
TILE_KEYS = 512


class Plan(NamedTuple):
  """The engine's schedules of one block plan."""
  Hl: int
  R: int
  kvh: Tuple[int, ...]
  kinds: Tuple[Tuple[bool, int, bool], ...]  # (partial, slot groups, ragged) per schedule
  scheds: tuple                         # numpy SC.Schedule [1, Hl, lanes, steps] (static
                                        # plans) or one E.Sched [B, Hl, lanes, steps]
  visited: int                          # visited blocks over all query heads
  density: float


def group_heads(block_mask: np.ndarray, N: int, K: int):
  """Chooses layout heads: (bm [Hl, nq, nk], Hl, R, kvh).

  A layout shared by the query heads of each KV head folds those heads into
  the rows (R = N // K); otherwise each query head is its own layout head
  reading KV head n // (N // K).
  """
  G = N // K
  Nl = block_mask.shape[0]
  if Nl == 1:
    return np.broadcast_to(block_mask, (K,) + block_mask.shape[1:]), K, G, tuple(range(K))
  if Nl == K and K != N:
    return block_mask, K, G, tuple(range(K))
  if Nl != N:
    raise ValueError(
        f"layout has {Nl} heads; expected 1, the query heads N={N} or the KV heads K={K}.")
  grouped = block_mask.reshape(K, G, *block_mask.shape[1:])
  if G == 1 or (grouped == grouped[:, :1]).all():
    return np.ascontiguousarray(grouped[:, 0]), K, G, tuple(range(K))
  return block_mask, N, 1, tuple(int(n) // G for n in range(N))


@functools.lru_cache(maxsize=128)
def _cached_plan(bm_bytes, bm_shape, N, K, tile, B, budgets):
  del budgets  # cache key only (STEP_BUDGET, TILE_KEYS): _make_plan reads the module values
  bm = np.frombuffer(bm_bytes, np.int8).reshape(bm_shape)
  return _make_plan(bm, N, K, tile, B)


def make_plan(block_mask: np.ndarray, N: int, K: int, bq: int, bk: int, B: int) -> Plan:
  """Schedules for a block classification [Nl, nq, nk] (int8 EMPTY/PARTIAL/FULL)."""
  bm = np.ascontiguousarray(block_mask, np.int8)
  return _cached_plan(bm.tobytes(), bm.shape, N, K, (bq, bk), B, (STEP_BUDGET, TILE_KEYS))


def layout_plan(layout: LY.BlockLayout, N: int, K: int, B: int, segments: bool) -> Plan:
  """Schedules of a block plan: its block kinds (static) or its run-time lists.

  ``segments``: segment ids are given, so no block is full.
  """
  if layout.batched:
    return runtime_plan(layout, N, K, B, layout.any_partial or segments)
  bm = force_partial(layout.block_mask) if segments else layout.block_mask
  return make_plan(bm, N, K, layout.block_q, layout.block_kv, B)


def runtime_plan(layout: LY.BlockLayout, N: int, K: int, B: int, partial: bool) -> Plan:
  """One schedule of run-time lists ([B, N or K, nq, k], built under jit).

  Rows are cut into items of ``choose_group`` k-blocks, rows split over
  lanes so one step's tile fits ``STEP_BUDGET``; ``partial``: evaluate the
  element mask in every block.
  """
  idx = jax.lax.stop_gradient(layout.fwd_indices)
  counts = jax.lax.stop_gradient(layout.fwd_counts)
  bq, bk = layout.block_q, layout.block_kv
  nq, k = idx.shape[2], idx.shape[3]
  G = N // K
  if idx.shape[1] == K:
    Hl, R, kvh = K, G, tuple(range(K))
  else:
    Hl, R, kvh = N, 1, tuple(n // G for n in range(N))
  g = choose_group(np.array(k), bk, R * bq)
  lanes = int(max(1, min(nq, STEP_BUDGET // (B * Hl * R * bq * bk * g))))
  sched = runtime_schedule(idx, counts, nq, lanes, g)
  ragged = k % g != 0 or not _all_listed(counts, k)
  return Plan(Hl, R, kvh, ((partial, 1, ragged),), (sched,), 0, 1.0)


def _all_listed(counts, k: int) -> bool:
  """Whether concrete ``counts`` are all ``k`` (False when traced)."""
  if isinstance(counts, jax.core.Tracer):
    return False
  return bool(np.all(np.asarray(counts) == k))


def runtime_schedule(indices, counts, nq: int, lanes: int, group: int) -> E.Sched:
  """Schedule from lists [B, Hl, nq, k]: rows cut into items of ``group`` k-blocks
  (the last one padded), rows split over lanes -> [B, Hl, lanes, steps(, group)]."""
  B, Hl, _, k = indices.shape
  valid = jnp.arange(k, dtype=jnp.int32) < counts[..., None]
  k_pad = -(-k // group) * group - k
  if k_pad:
    widths = ((0, 0), (0, 0), (0, 0), (0, k_pad))
    indices = jnp.pad(indices, widths, mode="edge")
    valid = jnp.pad(valid, widths)
  per_row = (k + k_pad) // group
  kb = indices.reshape(B, Hl, nq, per_row, group)
  kval = valid.reshape(B, Hl, nq, per_row, group)
  rows = -(-nq // lanes)
  pad = rows * lanes - nq
  if pad:
    widths = ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0))
    kb = jnp.pad(kb, widths)
    kval = jnp.pad(kval, widths)
  rows_q = jnp.arange(rows * lanes, dtype=jnp.int32)
  qb = jnp.broadcast_to(jnp.where(rows_q < nq, rows_q, 0)[:, None], (B, Hl, rows * lanes, per_row))
  item_valid = kval.any(-1)
  shape = (B, Hl, lanes, rows * per_row)
  qb, item_valid = qb.reshape(shape), item_valid.reshape(shape)
  kb, kval = kb.reshape(shape + (group,)), kval.reshape(shape + (group,))
  slot = jnp.where(item_valid, qb, nq)
  return E.Sched(qb, kb, slot, item_valid, kval)


def _make_plan(bm, N, K, tile, B) -> Plan:
  bq, bk = tile
  bm, Hl, R, kvh = group_heads(bm, N, K)
  nq = bm.shape[1]
  per_item = B * Hl * R * bq * bk
  kinds, scheds = [], []
  for kind in (LY.PARTIAL, LY.FULL):
    items = SC.items_from_block_mask(bm, kind)
    g = choose_group((bm == kind).sum(-1), bk, R * bq)
    most = max(-(-len(i) // g) for i in items)
    lanes = SC.choose_lanes(most, per_item * g, STEP_BUDGET)
    s = SC.build_schedule(items, nq, lanes, group=g)
    if s is not None:
      kinds.append((kind == LY.PARTIAL, s.num_slot_groups, s.ragged))
      scheds.append(s)
  visited = int(np.count_nonzero(bm)) * R
  return Plan(Hl, R, tuple(kvh), tuple(kinds), tuple(scheds), visited,
              float(np.count_nonzero(bm)) / max(bm.size, 1))


# Tiles of at least this many rows run their matmuls much faster at the full
# TILE_KEYS width (measured on a 2-core x86 CPU with XLA's default matmul path:
# [256, 64] x [64, W] at ~100 GFLOP/s for W <= 448 and ~140 for W = 512).
WIDE_TILE_ROWS = 256
WIDE_TILE_PADDING = 1.25


def choose_group(row_counts: np.ndarray, bk: int, rows: int = 0) -> int:
  """k-blocks per work item: tiles at most ``TILE_KEYS`` wide, the longest row
  (``row_counts``: blocks of one class per row, any shape) cut into equal groups
  (13 blocks of 64 -> 2 groups of 7, not 8 + 5). Tiles of ``rows >=
  WIDE_TILE_ROWS`` rows take the full width instead when that pads the work by
  at most ``WIDE_TILE_PADDING`` x (see above)."""
  counts = np.asarray(row_counts)
  longest = int(np.max(counts, initial=0))
  widest = max(1, TILE_KEYS // bk)
  if longest <= 1:
    return 1
  g = -(-longest // -(-longest // widest))
  if rows >= WIDE_TILE_ROWS and g < widest:
    padded = lambda w: float((-(-counts // w)).sum() * w)
    if padded(widest) <= WIDE_TILE_PADDING * padded(g):
      return widest
  return g


def dense_block_mask(nq: int, nk: int, kind: int = LY.FULL) -> np.ndarray:
  """[1, nq, nk] int8 of one block class (ValueError past ``LY.MAX_BLOCK_ENTRIES``)."""
  LY.check_block_entries(nq, nk)
  return np.full((1, nq, nk), kind, np.int8)


def force_partial(bm: np.ndarray, cols=None) -> np.ndarray:
  """FULL -> PARTIAL everywhere, or only in the given k-block columns."""
  bm = np.array(bm, np.int8)
  if cols is None:
    bm[bm == LY.FULL] = LY.PARTIAL
  else:
    sub = bm[..., cols]
    sub[sub == LY.FULL] = LY.PARTIAL
    bm[..., cols] = sub
  return bm


def classify_array(mask: np.ndarray, bq: int, bk: int) -> np.ndarray:
  """Block classes [Nm, nq, nk] of a concrete boolean mask [Bm, Nm, T, S]."""
  Bm, Nm, T, S = mask.shape
  m = mask.reshape(Bm, Nm, T // bq, bq, S // bk, bk)
  any_ = m.any(axis=(0, 3, 5))
  all_ = m.all(axis=(0, 3, 5))
  return np.where(all_, LY.FULL, np.where(any_, LY.PARTIAL, LY.EMPTY)).astype(np.int8)


def choose_blocks(T: int, S: int, target: int = 512) -> Tuple[int, int, int, int]:
  """(bq, bk, Tp, Sp): block sizes and the padded lengths they divide."""
  out = []
  for L in (T, S):
    b = SC.choose_block(L, target)
    if b == 0:
      b = target
    out.append((b, -(-L // b) * b))
  (bq, Tp), (bk, Sp) = out
  return bq, bk, Tp, Sp


def mask_block_mask(mask, Tp: int, Sp: int, bq: int, bk: int, N: int,
                    q_offset: int, k_offset: int) -> np.ndarray:
  """Block classes of a Mask for contiguous positions (via its cached layout)."""
  lay = mask.block_layout(Tp, Sp, bq, bk, N, q_offset=q_offset, k_offset=k_offset)
  return lay.block_mask


def layout_offsets(q_pos, k_pos) -> Optional[Tuple[int, int]]:
  """(q_offset, k_offset) when concrete 1-D positions are contiguous ranges, else None."""
  try:
    qp = np.asarray(q_pos)
    kp = np.asarray(k_pos)
  except Exception:  # pylint: disable=broad-except  (tracers)
    return None
  if qp.ndim != 1 or kp.ndim != 1:
    return None
  if qp.size and not np.array_equal(qp, qp[0] + np.arange(qp.size)):
    return None
  if kp.size and not np.array_equal(kp, kp[0] + np.arange(kp.size)):
    return None
  return int(qp[0]), int(kp[0])


#: (block_q, block_kv) tried for masks on long sequences, cheapest estimate wins.
CANDIDATE_BLOCKS = ((512, 512), (256, 256), (256, 128), (512, 128), (256, 64), (512, 64))


def estimated_cost(bm: np.ndarray, bq: int, bk: int) -> float:
  """Relative time of a block classification as the engine groups it: elements of the
  grouped tiles (padding included), with a penalty for partial blocks (element mask)
  and for narrow or short tiles (less efficient matmuls)."""
  cost = 0.0
  for kind, weight in ((LY.FULL, 1.0), (LY.PARTIAL, 1.35)):
    counts = (bm == kind).sum(-1)
    g = choose_group(counts, bk, bq)
    items = int((-(-counts // g)).sum())
    cost += weight * items * g * bq * bk * (1.0 + 32.0 / (g * bk) + 32.0 / bq)
  return cost


def pick_blocks(mask, T: int, S: int, N: int, q_offset: int, k_offset: int):
  """(bq, bk, block classes) for a Mask at contiguous positions.

  Short sequences use ``choose_blocks``; long ones try ``CANDIDATE_BLOCKS``
  that divide both lengths and keep the cheapest estimate.
  """
  bq, bk, Tp, Sp = choose_blocks(T, S)
  cands = [(cq, ck) for cq, ck in CANDIDATE_BLOCKS if T % cq == 0 and S % ck == 0]
  fq = min((c[0] for c in cands), default=bq)
  fk = min((c[1] for c in cands), default=bk)
  too_fine = (N if mask.head_dependent else 1) * (T // fq) * (S // fk) > LY.MAX_BLOCK_ENTRIES
  if T * S < (1 << 22) or Tp != T or Sp != S or not cands or too_fine:
    return bq, bk, mask_block_mask(mask, Tp, Sp, bq, bk, N, q_offset, k_offset)
  # One layout on the finest grid; every candidate is an exact coarsening of it.
  fine = mask_block_mask(mask, T, S, fq, fk, N, q_offset, k_offset)
  if bq % fq == 0 and bk % fk == 0:
    base = PB.coarsen_block_mask(fine, bq // fq, bk // fk)
  else:
    base = mask_block_mask(mask, T, S, bq, bk, N, q_offset, k_offset)
  best, best_cost = (bq, bk, base), estimated_cost(base, bq, bk)
  for cq, ck in cands:
    if (cq, ck) == (bq, bk) or cq % fq or ck % fk:
      continue
    bm = PB.coarsen_block_mask(fine, cq // fq, ck // fk)
    c = estimated_cost(bm, cq, ck)
    if c < best_cost:
      best, best_cost = (cq, ck, bm), c
  return best
