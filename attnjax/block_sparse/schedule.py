"""Static work schedules for the block-sparse XLA path (NumPy, built at trace time).

A *work item* is one q-block of one layout head with a *group* of ``g``
k-blocks of the same row (consecutive in the row's sorted list, not
necessarily adjacent in the sequence): its keys are gathered into one tile
``g * bk`` wide, because wide tiles make much faster matmuls on CPU than
many narrow ones. The last group of a row is padded with invalid sub-blocks
(``kval`` False, masked out). The XLA path runs a ``lax.scan`` whose every
step processes ``lanes`` items at once as one batched matmul, so the items
of a head are laid out as ``[lanes, steps]``: the row-major item list is cut
into ``lanes`` contiguous pieces of ``steps`` items. Cost is the number of
visited blocks (plus the padding of each row's last group and less than
``lanes`` padding items per head), never ``nq * nk``.

The forward keeps online-softmax accumulators per *slot*: a slot is a
(q-block, piece) pair, so the lanes of one step always write distinct slots
even when a long row is split between two lanes; slots of one q-block are
merged through their log-sum-exp at the end. Padding items write a dummy slot.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np



class Schedule(NamedTuple):
  """Items of one scan (Bi = 1 if static).

  qb, slot, valid: int32/bool [Bi, Hl, lanes, steps]; kb, kval: int32/bool
  [Bi, Hl, lanes, steps, g] (the k-blocks of each item and which are real).
  """
  qb: np.ndarray
  kb: np.ndarray
  slot: np.ndarray
  valid: np.ndarray
  kval: np.ndarray
  num_slot_groups: int  # slots are q_block + nq * group, group < num_slot_groups
  ragged: bool          # some item has padding sub-blocks (kval not all True where valid)


def group_items(items: np.ndarray, g: int):
  """Groups a row-sorted item list [n, 2] of (q_block, k_block) by ``g`` k-blocks per row.

  Returns (qb [m], kb [m, g], kval [m, g]): consecutive k-blocks of one
  q-block row, the row's last group padded with its own first k-block
  marked invalid.
  """
  n = len(items)
  if n == 0:
    return (np.zeros(0, np.int32), np.zeros((0, g), np.int32), np.zeros((0, g), bool))
  rows = items[:, 0]
  starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
  row_len = np.diff(np.r_[starts, n])
  pos = np.arange(n) - np.repeat(starts, row_len)
  per_row = -(-row_len // g)
  first_item = np.r_[0, np.cumsum(per_row)[:-1]]
  item = np.repeat(first_item, row_len) + pos // g
  m = int(per_row.sum())
  qb = np.zeros(m, np.int32)
  qb[item] = rows
  kb = np.zeros((m, g), np.int32)
  kval = np.zeros((m, g), bool)
  kb[item, pos % g] = items[:, 1]
  kval[item, pos % g] = True
  kb = np.where(kval, kb, kb[:, :1])
  return qb, kb, kval


def _piece_groups(row_of_item: np.ndarray, lanes: int, steps: int) -> np.ndarray:
  """Slot group of every item: which piece of its row (0 for the first lane it is in)."""
  lane = np.arange(row_of_item.size) // steps
  first_lane = np.full(row_of_item.max() + 1 if row_of_item.size else 1, lanes, np.int64)
  np.minimum.at(first_lane, row_of_item, lane)
  return lane - first_lane[row_of_item]


def build_schedule(items_per_head, nq: int, lanes: int, steps: Optional[int] = None,
                   group: int = 1) -> Optional[Schedule]:
  """Lays out per-head item lists as a [1, Hl, lanes, steps] schedule.

  Args:
    items_per_head: list over layout heads of int arrays [n_h, 2] of
      (q_block, k_block), sorted by q_block then k_block.
    nq: number of q-blocks (slot ids are q_block + nq * group).
    lanes: items processed per scan step and head.
    steps: scan length; default ceil(max items per head / lanes).
    group: k-blocks per item (``group_items``).

  Returns:
    A Schedule, or None when no head has an item.
  """
  grouped = [group_items(it, group) for it in items_per_head]
  most = max((len(q) for q, _, _ in grouped), default=0)
  if most == 0:
    return None
  lanes = max(1, min(lanes, most))
  if steps is None:
    steps = -(-most // lanes)
  Hl = len(items_per_head)
  size = lanes * steps
  qb = np.zeros((Hl, size), np.int32)
  kb = np.zeros((Hl, size, group), np.int32)
  kval = np.zeros((Hl, size, group), bool)
  piece = np.zeros((Hl, size), np.int64)
  valid = np.zeros((Hl, size), bool)
  for h, (q, k, kv) in enumerate(grouped):
    n = len(q)
    if n:
      qb[h, :n], kb[h, :n], kval[h, :n] = q, k, kv
      piece[h, :n] = _piece_groups(q, lanes, steps)
      valid[h, :n] = True
  groups = int(piece[valid].max()) + 1 if valid.any() else 1
  slot = np.where(valid, qb + nq * piece, nq * groups).astype(np.int32)  # dummy last
  shape = (1, Hl, lanes, steps)
  ragged = bool((valid[..., None] & ~kval).any())
  return Schedule(qb.reshape(shape), kb.reshape(shape + (group,)), slot.reshape(shape),
                  valid.reshape(shape), kval.reshape(shape + (group,)), groups, ragged)


def items_from_block_mask(block_mask: np.ndarray, kind: int):
  """Per head, the (q_block, k_block) pairs of class ``kind`` ([H, nq, nk] int8)."""
  out = []
  for h in range(block_mask.shape[0]):
    r, c = np.nonzero(block_mask[h] == kind)
    out.append(np.stack([r, c], -1).astype(np.int32))
  return out


def choose_lanes(items: int, tile_elems: int, budget: int = 1 << 22) -> int:
  """Lanes per scan step so that one step's logits hold about ``budget`` floats."""
  return int(max(1, min(items, budget // max(tile_elems, 1))))


def choose_block(length: int, target: int = 512, minimum: int = 64) -> int:
  """A block size dividing ``length``: the largest power of two <= target, else length.

  Lengths up to ``2 * target`` without such a divisor are one block; longer
  ones return 0 (the caller pads the sequence to a multiple of ``target``).
  """
  b = target
  while b >= minimum:
    if length % b == 0:
      return b
    b //= 2
  if length <= 2 * target:
    return length
  return 0
