"""Static exchange plans of ``context_parallel_block_sparse`` (NumPy, on the host).

For a static mask, shapes and a mesh: which K/V blocks every device sends in
each ``ppermute`` round, the buffer slots they land in, every device's work
items for the block-sparse engine (and the same work as block lists), and the
bytes received compared with an all-gather.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional, Tuple

import numpy as np

from attnjax.block_sparse import plan as BP
from attnjax.block_sparse import schedule as SC
from attnjax.core import validation as V
from attnjax.masks import layout as LY
from attnjax.masks.base import Mask

ASSIGNMENTS = ("contiguous", "zigzag")
SEQUENCE_ORDERS = ("natural", "assignment")


def _chunks(num_shards: int, assignment: str) -> np.ndarray:
  """int [P, c]: chunk ids of each device, in its local order (c = 1 or 2 chunks)."""
  if assignment not in ASSIGNMENTS:
    raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got {assignment!r}.")
  d = np.arange(num_shards)
  if assignment == "contiguous":
    return d[:, None]
  return np.stack([d, 2 * num_shards - 1 - d], 1)


def sequence_permutation(seq_len: int, num_shards: int,
                         assignment: str = "zigzag") -> np.ndarray:
  """int [T]: token position held at each place of the sharded sequence.

  ``x[:, perm]`` puts a natural-order sequence in the order whose contiguous
  split over ``num_shards`` devices is the assignment; ``np.argsort(perm)``
  undoes it. Identity for ``"contiguous"``.
  """
  chunks = _chunks(num_shards, assignment)
  n = chunks.size
  V.check_positive_int("seq_len", seq_len)
  if seq_len % n:
    raise ValueError(f"sequence length {seq_len} is not divisible by the {n} chunks of the "
                     f"{assignment!r} assignment over {num_shards} context shards.")
  c = seq_len // n
  return (chunks.reshape(-1)[:, None] * c + np.arange(c)).reshape(-1)


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSparseContextPlan:
  """Static plan of one (mask, shape, mesh) for ``context_parallel_block_sparse``.

  Every device keeps a key buffer of ``buffer_blocks`` slots per local KV
  head: its own ``local_blocks`` blocks, then the blocks received in each
  ppermute round (``send[i].shape[2]`` slots each, padded). Inside the
  engine call the KV heads are laid side by side along the key axis (slot
  ``g * buffer_blocks + j``), so each layout head visits only its KV head's
  slots.

  Attributes:
    num_shards: P (context axis size); head_shards: X (head axis size).
    seq_len, block_size, assignment; local_blocks: blocks per device (nbl);
    buffer_blocks: nbuf; kv_heads_local: Kl = K / X; group: G = N / K.
    layout_heads, fold: the engine's layout heads Hl and folded heads R
      (Hl = Kl, R = G when the query heads of a KV head visit the same
      blocks on every device, else Hl = N / X, R = 1).
    positions: int32 [P, T/P] global token index of each local token.
    q_positions: int32 [P, T/P] position of each local query (where the mask is
      evaluated; equal to ``positions`` by default); k_positions: int32 [T]
      position of each key, in token order.
    send: per ppermute round, int32 [P, X, M, Kl]: local block index that
      device (c, x) sends in that round, per local KV head (padding 0).
    pairs: per round, its ((src, dst), ...): one device distance s (dst = src
      + s), or the distances r and r - P together when both move M blocks.
    slot_blocks: int32 [P, X, Kl, nbuf] global block of each slot (-1 padding).
    kinds: per schedule, (partial, slot groups, ragged) as the engine takes them.
    schedules: per kind, a tuple (qb, kb, slot, valid, kval) of arrays
      [P, X, Hl, lanes, steps(, g)]: the work items of every device.
    needed_blocks: int [P, X] remote key blocks each device needs (x KV heads);
      received_blocks: int [P, X] blocks it receives (padded per distance).
    visited_blocks: int [P, X] (query head, q-block, k-block) triples each
      device needs; ``executed_blocks``: those the schedules run on every
      device (the maximum over devices, plus padding of the items).
    lists, list_counts: int32 [P, X, Hl, nbl, k], [P, X, Hl, nbl]: the same
      work as run-time block lists (slots on the side-by-side key axis), for
      the list engine (``implementation="pallas"``).
  """
  num_shards: int
  head_shards: int
  seq_len: int
  block_size: int
  assignment: str
  local_blocks: int
  buffer_blocks: int
  kv_heads_local: int
  group: int
  layout_heads: int
  fold: int
  positions: np.ndarray
  q_positions: np.ndarray
  k_positions: np.ndarray
  send: Tuple[np.ndarray, ...]
  pairs: Tuple[Tuple[Tuple[int, int], ...], ...]
  slot_blocks: np.ndarray
  kinds: Tuple[Tuple[bool, int, bool], ...]
  schedules: Tuple[Tuple[np.ndarray, ...], ...]
  needed_blocks: np.ndarray
  received_blocks: np.ndarray
  visited_blocks: np.ndarray
  executed_blocks: int
  lists: np.ndarray
  list_counts: np.ndarray

  def transferred_blocks(self) -> int:
    """Blocks (x local KV heads) in the receive buffers of a device, padding included."""
    return int(sum(s.shape[2] * s.shape[3] for s in self.send))

  def imbalance(self) -> float:
    """max / mean of ``visited_blocks`` over devices (1.0 = balanced)."""
    v = self.visited_blocks.astype(np.float64)
    return float(v.max() / v.mean()) if v.mean() else 1.0


def check_mask(mask):
  if not isinstance(mask, Mask):
    raise TypeError(f"mask must be an attnjax Mask, got {type(mask).__name__}.")
  if mask.needs_segments:
    raise NotImplementedError(
        f"mask {mask!r} reads segment ids, which context_parallel_block_sparse does not take.")


def default_block_size(mask, chunk_len: int) -> int:
  """The mask's own ``block_size`` when it divides ``chunk_len``, else the largest power
  of two <= 512 (and >= 16) dividing it, else ``chunk_len``."""
  bs = int(getattr(mask, "block_size", 0) or 0)
  if bs > 0 and chunk_len % bs == 0:
    return bs
  b = SC.choose_block(chunk_len, 512, minimum=16)
  return b if b > 0 else chunk_len


def _is_arange(pos: np.ndarray) -> bool:
  return bool(np.array_equal(pos, pos[0] + np.arange(len(pos))))


def position_classes(mask, q_pos: np.ndarray, k_pos: np.ndarray, block_size: int,
                     num_heads: int) -> np.ndarray:
  """int8 [N or 1, T/bs, S/bs]: EMPTY/PARTIAL/FULL of every block at the given positions.

  Positions that are ``arange + offset`` use the mask's ``BlockLayout`` (closed
  forms); any other order evaluates the predicate on every (query, key) pair
  of a head (T x S work per head, in chunks of rows).
  """
  if _is_arange(q_pos) and _is_arange(k_pos):
    return np.asarray(mask.block_layout(len(q_pos), len(k_pos), block_size, block_size,
                                        num_heads, q_offset=int(q_pos[0]),
                                        k_offset=int(k_pos[0])).block_mask)
  mask.validate(num_heads, q_pos, k_pos)
  mask.check_positions(q_pos, k_pos)
  out = np.zeros((num_heads if mask.head_dependent else 1, len(q_pos) // block_size,
                  len(k_pos) // block_size), np.int8)
  for h in range(out.shape[0]):
    any_, all_ = LY.evaluate_blocks(mask, h, q_pos, k_pos, block_size, block_size)
    out[h] = np.where(all_, LY.FULL, np.where(any_, LY.PARTIAL, LY.EMPTY))
  return out


@functools.lru_cache(maxsize=32)
def block_sparse_context_plan(mask, seq_len: int, num_heads: int, num_kv_heads: int,
                              num_shards: int, head_shards: int = 1,
                              block_size: Optional[int] = None, assignment: str = "contiguous",
                              batch: int = 1, segments: bool = False,
                              q_positions: Optional[Tuple[int, ...]] = None,
                              k_positions: Optional[Tuple[int, ...]] = None
                              ) -> BlockSparseContextPlan:
  """The plan of ``mask`` for ``num_shards`` context and ``head_shards`` head shards (cached).

  ``batch`` (per device) only sizes the engine's scan steps. ``segments``:
  segment ids will be given, so no block is full (a document boundary may
  cut any block; the exchange is the mask's, a superset). ``q_positions`` /
  ``k_positions``: the position of every token, in token order (default
  ``arange(T)``); the block classes, hence the exchange, are read off the
  mask at those positions (``position_classes``), so any concrete positions
  give an exact plan. Raises ValueError naming the field when the sequence,
  the heads or the block size do not divide.
  """
  check_mask(mask)
  chunks = _chunks(num_shards, assignment)
  perm = sequence_permutation(seq_len, num_shards, assignment)
  chunk = seq_len // chunks.size
  bs = default_block_size(mask, chunk) if block_size is None else block_size
  V.check_positive_int("block_size", bs)
  if chunk % bs:
    raise ValueError(f"block_size={bs} must divide the chunk length {chunk} (sequence length "
                     f"{seq_len} in {chunks.size} chunks of the {assignment!r} assignment).")
  for name, n in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
    V.check_positive_int(name, n)
    if n % head_shards:
      raise ValueError(f"{name}={n} is not divisible by the head axis size {head_shards}.")
  if num_heads % num_kv_heads:
    raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}.")
  nb, cb = seq_len // bs, chunk // bs
  G, Kl = num_heads // num_kv_heads, num_kv_heads // head_shards
  own = (chunks[..., None] * cb + np.arange(cb)).reshape(num_shards, -1)   # [P, nbl]
  nbl = own.shape[1]
  owner = np.empty(nb, np.int64)
  local = np.empty(nb, np.int64)
  owner[own] = np.arange(num_shards)[:, None]
  local[own] = np.arange(nbl)[None, :]
  qv, kv = (np.arange(seq_len) if p is None else np.asarray(p, np.int64)
            for p in (q_positions, k_positions))
  for name, p in (("q_positions", qv), ("k_positions", kv)):
    if p.shape != (seq_len,):
      raise ValueError(f"{name} must have shape ({seq_len},), got {p.shape}.")
  cls = position_classes(mask, qv, kv, bs, num_heads)
  cls = np.broadcast_to(cls, (num_heads,) + cls.shape[1:])
  if segments:
    cls = np.where(cls == LY.FULL, LY.PARTIAL, cls)

  # -- remote blocks each (device, head shard, local KV head) needs, by distance -------
  devices = [(d, x) for d in range(num_shards) for x in range(head_shards)]
  recv = {}                                   # s -> {(d, x, g): blocks from device d - s}
  needed = np.zeros((num_shards, head_shards), np.int64)
  for d, x in devices:
    for g in range(Kl):
      gk = x * Kl + g
      need = (cls[gk * G:(gk + 1) * G][:, own[d]] != LY.EMPTY).any((0, 1))
      need[own[d]] = False
      for b in np.nonzero(need)[0]:
        recv.setdefault(d - int(owner[b]), {}).setdefault((d, x, g), []).append(int(b))
      needed[d, x] += int(need.sum())
  # one ppermute per distance; distances r and r - P (disjoint destinations) share one
  # cyclic ppermute when they move the same number of blocks (fewer, smaller buffers)
  rounds = []
  for r in range(1, num_shards):
    a, b = recv.get(r), recv.get(r - num_shards)
    if a and b and _width(a) == _width(b):
      rounds.append({**a, **b})
    else:
      rounds += [x for x in (a, b) if x]
  send, pairs, received = [], [], np.zeros_like(needed)
  slot_blocks = np.full((num_shards, head_shards, Kl, nbl + sum(map(_width, rounds))), -1,
                        np.int32)
  slot_blocks[..., :nbl] = own[:, None, None, :]
  off = nbl
  for rnd in rounds:
    w = _width(rnd)
    snd = np.zeros((num_shards, head_shards, w, Kl), np.int32)
    links = set()
    for (d, x, g), blocks in rnd.items():
      src = int(owner[blocks[0]])
      snd[src, x, :len(blocks), g] = local[blocks]
      slot_blocks[d, x, g, off:off + len(blocks)] = blocks
      links.add((src, d))
    send.append(snd)
    pairs.append(tuple(sorted(links)))
    received[sorted({d for _, d in links})] += w * Kl
    off += w
  nbuf = off

  # -- every device's exact block classes on its slots -> work items -------------------
  def classes(d, x):                                                # int8 [Kl, G, nbl, nbuf]
    sb = slot_blocks[d, x]
    heads = (x * Kl + np.arange(Kl))[:, None] * G + np.arange(G)
    c = cls[heads[:, :, None, None], own[d][None, None, :, None],
            np.maximum(sb, 0)[:, None, None, :]]
    return np.where(sb[:, None, None, :] >= 0, c, LY.EMPTY)

  visited = np.zeros((num_shards, head_shards), np.int64)
  shared = True
  for d, x in devices:
    c = classes(d, x)
    visited[d, x] = np.count_nonzero(c)
    shared = shared and bool((c == c[:, :1]).all())
  Hl, R = (Kl, G) if shared else (Kl * G, 1)
  items = {LY.PARTIAL: {}, LY.FULL: {}}      # kind -> (d, x) -> ([Hl] items, counts [Hl, nbl])
  for d, x in devices:
    c = classes(d, x)
    c = (c[:, :1] if shared else c).reshape(Hl, nbl, nbuf)
    for kind, per_dev in items.items():
      sel = c == kind
      # layout head hl reads KV head hl // (Hl // Kl), whose slots start at g * nbuf
      per_dev[d, x] = ([np.stack([r, k + (h // (Hl // Kl)) * nbuf], -1).astype(np.int32)
                        for h, (r, k) in enumerate(map(np.nonzero, sel))], sel.sum(-1))
  kinds, schedules, executed = [], [], 0
  for kind in (LY.PARTIAL, LY.FULL):
    sched = _device_schedules(items[kind], (num_shards, head_shards, Hl), nbl, bs, R,
                              batch * Hl * R * bs * bs)
    if sched is not None:
      arrays, groups, ragged, blocks = sched
      kinds.append((kind == LY.PARTIAL, groups, ragged))
      schedules.append(arrays)
      executed += blocks * R
  positions = perm.reshape(num_shards, -1).astype(np.int32)
  lists, counts = _lists(items, (num_shards, head_shards, Hl), nbl)
  return BlockSparseContextPlan(num_shards, head_shards, seq_len, bs, assignment, nbl, nbuf, Kl,
                                G, Hl, R, positions, qv[positions].astype(np.int32),
                                kv.astype(np.int32), tuple(send), tuple(pairs), slot_blocks,
                                tuple(kinds),
                                tuple(schedules), needed, received, visited, executed, lists,
                                counts)


def _lists(items, shape, nq):
  """Partial and full work items of every device as padded sorted block lists per row."""
  rows = {}
  for per_dev in items.values():
    for (d, x), (its, _) in per_dev.items():
      for h, it in enumerate(its):
        for r, k in it:
          rows.setdefault((d, x, h, int(r)), []).append(int(k))
  width = max([len(v) for v in rows.values()] + [1])
  lists = np.zeros(tuple(shape) + (nq, width), np.int32)
  counts = np.zeros(tuple(shape) + (nq,), np.int32)
  for (d, x, h, r), ks in rows.items():
    ks = sorted(ks)
    lists[d, x, h, r, :len(ks)] = ks
    lists[d, x, h, r, len(ks):] = ks[-1]
    counts[d, x, h, r] = len(ks)
  return lists, counts


def _width(round_lists) -> int:
  return max(len(v) for v in round_lists.values())


def _device_schedules(items, shape, nq, bs, R, per_block):
  """Engine schedules of one block kind for every device, padded to one shape.

  ``items[(d, x)]``: (per layout head, int32 [n, 2] (q-block, k-block) sorted
  by row; block counts per row [Hl, nq]); ``shape`` = (P, X, Hl). Returns
  ((qb, kb, slot, valid, kval) arrays [P, X, Hl, lanes, steps(, g)], slot
  groups, ragged, blocks run per device), or None when no device has such a block.
  """
  counts = np.stack([c for _, c in items.values()])
  if not counts.any():
    return None
  g = BP.choose_group(counts, bs, R * bs)
  most = int((-(-counts // g)).sum(-1).max())      # grouped items of the busiest head
  lanes = SC.choose_lanes(most, per_block * g, BP.STEP_BUDGET)
  steps = -(-most // lanes)
  full = tuple(shape) + (lanes, steps)
  qb = np.zeros(full, np.int32)
  kb = np.zeros(full + (g,), np.int32)
  slot = np.zeros(full, np.int32)
  valid = np.zeros(full, bool)
  kval = np.zeros(full + (g,), bool)
  groups, ragged = 1, False
  for (d, x), (its, _) in items.items():
    s = SC.build_schedule(its, nq, lanes, steps, group=g)
    if s is None:
      continue
    n = s.qb.shape[2]                                # lanes (fewer when few items)
    qb[d, x, :, :n], kb[d, x, :, :n], slot[d, x, :, :n] = s.qb[0], s.kb[0], s.slot[0]
    valid[d, x, :, :n], kval[d, x, :, :n] = s.valid[0], s.kval[0]
    groups, ragged = max(groups, s.num_slot_groups), ragged or s.ragged
  return (qb, kb, slot, valid, kval), groups, ragged, shape[2] * lanes * steps * g


def communication_report(plan: BlockSparseContextPlan, *, batch: int, head_dim: int,
                         value_dim: Optional[int] = None, itemsize: int = 2) -> Dict[str, float]:
  """Bytes of K/V each device receives with ``plan`` vs an all-gather, and work balance.

  Keys: ``allgather_bytes`` ((P-1)/P of the local heads' K/V), ``needed_bytes_max``
  / ``_mean`` (valid blocks), ``transferred_bytes`` (receive buffers with
  padding, what the compiled collective-permutes move), their ratios to the
  all-gather, ``imbalance`` (max / mean visited blocks) and
  ``executed_over_mean`` (union blocks run per device / mean visited).
  """
  value_dim = head_dim if value_dim is None else value_dim
  per_block = batch * plan.block_size * (head_dim + value_dim) * itemsize
  allgather = (plan.num_shards - 1) * plan.local_blocks * plan.kv_heads_local * per_block
  need = plan.needed_blocks * per_block
  moved = plan.transferred_blocks() * per_block
  ratio = lambda b: float(b / allgather) if allgather else 0.0
  got = plan.received_blocks * per_block
  mean_visit = float(plan.visited_blocks.mean())
  return {"allgather_bytes": float(allgather), "needed_bytes_max": float(need.max()),
          "needed_bytes_mean": float(need.mean()), "received_bytes_max": float(got.max()),
          "received_bytes_mean": float(got.mean()), "transferred_bytes": float(moved),
          "needed_ratio_max": ratio(need.max()), "received_ratio_max": ratio(got.max()),
          "transferred_ratio": ratio(moved),
          "imbalance": plan.imbalance(),
          "executed_over_mean": plan.executed_blocks / mean_visit if mean_visit else 1.0}
