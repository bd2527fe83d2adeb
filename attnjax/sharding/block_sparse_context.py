"""Context parallelism for the block-sparse engine with any static mask.

The sequence of a self-attention call is split over a mesh axis (context
parallelism, as Ring Attention, Liu et al., arXiv:2310.01889) and, optionally,
the heads over another. Instead of passing every K/V block around the ring,
the plan reads the static mask's ``BlockLayout`` at trace time and computes,
for every device and KV head, exactly which key blocks of other devices its
query rows visit; those blocks, and only those, are exchanged with one
``ppermute`` per device distance that has something to send (distances with
nothing needed are skipped). Each device then runs the block-sparse XLA
engine once, over its queries and a key buffer [own blocks, received blocks]:
a query's attention to its own and to remote keys is one online softmax, so
there are no partial results to merge inside the call (``return_lse=True``
gives the lse, to merge with other key sets through
``attnjax.merge_attention``). Causality is by global positions: the engine
evaluates the mask on the global positions of the local queries and of every
buffered key. Forward and backward (the engine's custom VJP; the transpose of
a ``ppermute`` is the reverse ``ppermute``) run only the visited blocks.

Assignments of the sequence to the context axis (P devices):

* ``"contiguous"``: device d holds tokens [d T/P, (d+1) T/P).
* ``"zigzag"`` (the causal load balance of Llama 3's context parallelism,
  arXiv:2407.21783): the sequence is cut into 2P chunks and device d holds
  chunks d and 2P-1-d, so under a causal mask every device visits the same
  number of blocks.

``sequence_permutation`` returns the order in which the sharded arrays hold
the tokens. With ``sequence_order="natural"`` (default) the function takes
and returns arrays in natural token order and permutes them itself (for
zig-zag this reshards q/k/v and the output); with
``sequence_order="assignment"`` the caller passes and receives arrays already
in that order (``x[:, perm]``), e.g. a whole model kept in zig-zag order
(positional encodings then take ``perm`` as the positions).

SPMD execution: every device runs the same program on its own static work
list. The plan builds, for every device, the engine's work items (q-block,
k-blocks) from its exact block classes and pads the lists to the longest, so
a device runs ``executed_blocks`` = the busiest device's blocks (plus the
engine's item padding): balanced assignments cost no more than their mean.
The ``"xla"`` engine runs inside ``shard_map``; Pallas kernels are not used
here.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from attnjax.block_sparse import block_sparse_attention_indices
from attnjax.block_sparse import engine as E
from attnjax.block_sparse import plan as BP
from attnjax.block_sparse import schedule as SC
from attnjax.block_sparse import tiles as Tl
from attnjax.core import precision
from attnjax.core import scoring
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
    positions: int32 [P, T/P] global position of each local token.
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


def _check_mask(mask):
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


@functools.lru_cache(maxsize=32)
def block_sparse_context_plan(mask, seq_len: int, num_heads: int, num_kv_heads: int,
                              num_shards: int, head_shards: int = 1,
                              block_size: Optional[int] = None, assignment: str = "contiguous",
                              batch: int = 1, segments: bool = False) -> BlockSparseContextPlan:
  """The plan of ``mask`` for ``num_shards`` context and ``head_shards`` head shards (cached).

  ``batch`` (per device) only sizes the engine's scan steps. ``segments``:
  segment ids will be given, so no block is full (a document boundary may
  cut any block; the exchange is the mask's, a superset). Raises
  ValueError naming the field when the sequence, the heads or the block size
  do not divide.
  """
  _check_mask(mask)
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
  cls = np.asarray(mask.block_layout(seq_len, seq_len, bs, bs, num_heads).block_mask)
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
                                G, Hl, R, positions, tuple(send), tuple(pairs), slot_blocks,
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


@dataclasses.dataclass(frozen=True)
class _HeadOffset(Mask):
  """``inner`` on global heads (and documents): the engine's segment ids carry both.

  Inside the device function a segment id is ``document * heads + x * N / X``
  (``heads`` = N, the first global query head of the device's head shard);
  the predicate adds the second part to the engine's local head and, when
  ``documents``, requires the same document .
  """
  inner: Mask
  heads: int
  documents: bool
  needs_segments = True

  @property
  def head_dependent(self):
    return True

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    qd, kd = q_seg // self.heads, k_seg // self.heads
    vis = jnp.asarray(self.inner.predicate(q_seg % self.heads + head, q_pos, k_pos), bool)
    return vis & (qd == kd) if self.documents else vis


def _take_blocks(blocks, idx):
  """blocks [B, n, bs, Kl, D] at idx int [M, Kl] (per KV head) -> [B, M, bs, Kl, D]."""
  i = jnp.moveaxis(idx, 0, 1)[None, :, :, None, None]                  # [1, Kl, M, 1, 1]
  g = jnp.take_along_axis(jnp.moveaxis(blocks, 3, 1), i, axis=2)      # [B, Kl, M, bs, D]
  return jnp.moveaxis(g, 1, 3)


def _mesh_axis(mesh: Mesh, name, field):
  if name is None:
    return None, 1
  if name not in mesh.axis_names:
    raise ValueError(f"{field}={name!r} is not an axis of the mesh {mesh.axis_names}.")
  return name, int(mesh.shape[name])


def context_parallel_block_sparse(query, key, value, *, mask, mesh: Mesh, axis: str = "context",
                                  head_axis: Optional[str] = None,
                                  data_axis: Optional[str] = None,
                                  assignment: str = "contiguous",
                                  sequence_order: str = "natural",
                                  block_size: Optional[int] = None, scale=None,
                                  segment_ids=None, return_lse: bool = False,
                                  implementation: Optional[str] = None):
  """Self-attention with any static mask, the sequence split over the mesh axis ``axis``.

  Args:
    query: [B, T, N, H]; key: [B, T, K, H]; value: [B, T, K, Hv] (global
      arrays, sharded here as P(data_axis, axis, head_axis, None)).
    mask: a static ``attnjax.masks.Mask`` (causal, sliding window, Longformer,
      BigBird, S2, ...), evaluated on global positions ``arange(T)``.
    mesh: a ``jax.sharding.Mesh``; ``axis`` splits the sequence (P devices),
      ``head_axis`` (optional) the heads (X devices: N and K divisible by X),
      ``data_axis`` (optional) the batch.
    assignment: "contiguous" or "zigzag" (device d holds chunks d and 2P-1-d
      of 2P: balanced work under causal masks).
    sequence_order: "natural" (arrays in token order; permuted inside when the
      assignment is not contiguous) or "assignment" (arrays already in
      ``sequence_permutation(T, P, assignment)`` order; the output too).
    block_size: exchange and engine block (default ``default_block_size``);
      must divide T / P (T / 2P for zigzag).
    scale: logit scale, default 1/sqrt(H).
    segment_ids: optional int [B, T] document ids (packed sequences): a query
      sees only keys of its document; they travel with the K/V blocks.
    return_lse: also return the lse [B, T, N] float32.
    implementation: None or "xla" (the engine's static schedules) or "pallas"
      (the plan's work as run-time block lists to the Pallas kernels; interpret
      mode off TPU/GPU; head-dependent masks with a head axis are not
      supported there).

  Returns:
    out [B, T, N, Hv] (and lse), equal to ``attnjax.attention(q, k, v,
    mask=mask)``, in the order of the inputs.
  """
  _check_mask(mask)
  query, key, value = V.as_arrays(query, key, value)
  d = V.check_qkv(query, key, value)
  if d.T != d.S:
    raise ValueError(f"context parallelism here is for self-attention: query {query.shape} and "
                     f"key {key.shape} must have the same length.")
  if sequence_order not in SEQUENCE_ORDERS:
    raise ValueError(f"sequence_order must be one of {SEQUENCE_ORDERS}, got {sequence_order!r}.")
  if axis is None or axis not in mesh.axis_names:
    raise ValueError(f"axis={axis!r} is not an axis of the mesh {mesh.axis_names}.")
  hax, X = _mesh_axis(mesh, head_axis, "head_axis")
  dax, D = _mesh_axis(mesh, data_axis, "data_axis")
  named = [a for a in (axis, hax, dax) if a is not None]
  if len(set(named)) != len(named):
    raise ValueError(f"axis, head_axis and data_axis must differ, got {axis!r}, {head_axis!r}, "
                     f"{data_axis!r}.")
  Pn = int(mesh.shape[axis])
  if d.B % D:
    raise ValueError(f"batch {d.B} is not divisible by the data axis {dax!r} size {D}.")
  if d.T % (Pn * (2 if assignment == "zigzag" else 1)):
    raise ValueError(f"sequence length T={d.T} is not divisible by the context axis {axis!r} "
                     f"size {Pn}" + (" x 2 chunks (zigzag)." if assignment == "zigzag" else "."))
  if d.N % X:
    raise ValueError(f"num_heads N={d.N} is not divisible by the head axis {hax!r} size {X}.")
  if d.K % X:
    raise ValueError(f"num_kv_heads K={d.K} is not divisible by the head axis {hax!r} size {X}.")
  if implementation not in (None, "xla", "pallas"):
    raise ValueError(f"implementation must be None, 'xla' or 'pallas', got {implementation!r}.")
  segs = None
  if segment_ids is not None:
    segs = jnp.asarray(segment_ids)
    if segs.shape != (d.B, d.T) or not jnp.issubdtype(segs.dtype, jnp.integer):
      raise ValueError(f"segment_ids must be an int array [B, T] = [{d.B}, {d.T}], got "
                       f"{segs.dtype} {segs.shape}.")
    segs = segs.astype(jnp.int32)
  plan = block_sparse_context_plan(mask, d.T, d.N, d.K, Pn, X, block_size, assignment,
                                   d.B // D, segs is not None)
  scale = float(V.check_scale(scale, d.H))
  precision.warn_float32_accumulation("context_parallel_block_sparse (the block-sparse XLA "
                                      "engine)", query, key, value)
  bs, nbl, nbuf, Kl = plan.block_size, plan.local_blocks, plan.buffer_blocks, plan.kv_heads_local
  Nl, Hl, R = d.N // X, plan.layout_heads, plan.fold
  head_offset = hax is not None and mask.head_dependent
  pallas = implementation == "pallas"
  if pallas and head_offset:
    raise NotImplementedError(
        f"implementation='pallas' with head_axis={hax!r}: mask {mask!r} depends on the head and "
        "the kernels see local head numbers; use implementation='xla' or split no heads.")
  wrap = head_offset or (segs is not None and pallas is False)
  local_mask = _HeadOffset(mask, d.N, segs is not None) if wrap else mask
  cfg = Tl.Cfg(B=d.B // D, N=Nl, K=1, H=d.H, Hv=d.Hv, bq=bs, bk=bs, nq=nbl, nk=Kl * nbuf, Hl=Hl,
               R=R, kvh=(0,) * Hl, kv_len=Kl * nbuf * bs, scale=scale, norm="softmax",
               mask=local_mask, segments=wrap, pair_shape=None, bias_shape=None,
               plain_softmax=True)
  score = E.as_pytree(scoring.resolve_score(None))

  def local_fn(q, k, v, *seg):
    c = jax.lax.axis_index(axis)
    x = jax.lax.axis_index(hax) if hax else 0
    Bl, Tl_ = q.shape[:2]
    kb = k.reshape(Bl, nbl, bs, Kl, d.H)
    vb = v.reshape(Bl, nbl, bs, Kl, d.Hv)
    ks, vs = [kb], [vb]
    sb_ = (jnp.broadcast_to(seg[0].reshape(Bl, nbl, bs, 1, 1), (Bl, nbl, bs, Kl, 1))
           if seg else None)
    ss = [sb_]
    for snd, links in zip(plan.send, plan.pairs):
      idx = jnp.asarray(snd)[c, x]
      ks.append(jax.lax.ppermute(_take_blocks(kb, idx), axis, links))
      vs.append(jax.lax.ppermute(_take_blocks(vb, idx), axis, links))
      if seg:    # document ids travel with their blocks
        ss.append(jax.lax.ppermute(_take_blocks(sb_, idx), axis, links))
    # KV heads side by side along the key axis: [Bl, Kl * nbuf, bs, 1, D]
    k_r = jnp.moveaxis(jnp.concatenate(ks, 1), 3, 1).reshape(Bl, Kl * nbuf, bs, 1, d.H)
    v_r = jnp.moveaxis(jnp.concatenate(vs, 1), 3, 1).reshape(Bl, Kl * nbuf, bs, 1, d.Hv)
    q_r = q.reshape(Bl, nbl, bs, Hl, R * d.H)
    sb = jnp.asarray(plan.slot_blocks)[c, x].reshape(1, Kl * nbuf, 1)
    k_pos = jnp.maximum(sb, 0) * bs + jnp.arange(bs, dtype=jnp.int32)
    q_pos = jnp.asarray(plan.positions)[c].reshape(1, nbl, bs)
    q_seg = k_seg = None
    if seg:
      q_seg = seg[0].reshape(Bl, nbl, bs)
      k_seg = jnp.moveaxis(jnp.concatenate(ss, 1)[..., 0], 3, 1).reshape(Bl, Kl * nbuf, bs)
    if pallas:
      return _list_engine(plan, c, x, q, k_r, v_r, q_pos, k_pos, q_seg, k_seg, mask, scale, Nl)
    if wrap:
      q_seg = (0 if q_seg is None else q_seg * d.N) + jnp.full((1, nbl, bs), x * Nl, jnp.int32)
      k_seg = (0 if k_seg is None else k_seg * d.N) + jnp.full((1, Kl * nbuf, bs), x * Nl,
                                                               jnp.int32)
    scheds = tuple(E.Sched(*(jnp.asarray(a)[c, x][None] for a in arrays))
                   for arrays in plan.schedules)
    out, lse = E.attend(cfg, plan.kinds, q_r, k_r, v_r, None, score,
                        Tl.Aux(q_pos, k_pos, q_seg, k_seg, None), scheds, None)
    out = out.reshape(Bl, Hl, nbl, R, bs, d.Hv).transpose(0, 2, 4, 1, 3, 5)
    lse = lse.reshape(Bl, Hl, nbl, R, bs).transpose(0, 2, 4, 1, 3)
    return out.reshape(Bl, Tl_, Nl, d.Hv).astype(q.dtype), lse.reshape(Bl, Tl_, Nl)

  spec = P(dax, axis, hax, None)
  extra = () if segs is None else (segs,)
  fn = jax.shard_map(local_fn, mesh=mesh, in_specs=(spec, spec, spec) + (P(dax, axis),) * len(
      extra), out_specs=(spec, P(dax, axis, hax)), check_vma=False)
  if pallas:     # the kernels' custom VJP traces inside shard_map only under jit
    fn = jax.jit(fn)
  permute = sequence_order == "natural" and assignment != "contiguous"
  if permute:
    perm = jnp.asarray(plan.positions.reshape(-1))
    query, key, value = query[:, perm], key[:, perm], value[:, perm]
    extra = tuple(e[:, perm] for e in extra)
  out, lse = fn(query, key, value, *extra)
  if permute:
    inv = jnp.asarray(np.argsort(plan.positions.reshape(-1)))
    out, lse = out[:, inv], lse[:, inv]
  return (out, lse) if return_lse else out


def _list_engine(plan, c, x, q, k_r, v_r, q_pos, k_pos, q_seg, k_seg, mask, scale, Nl):
  """The device's work as run-time lists on the Pallas kernels: (out, lse) [Bl, T/P, Nl(, Hv)]."""
  Bl, Tl_ = q.shape[:2]
  lists = jnp.asarray(plan.lists)[c, x]                          # [Hl, nbl, k]
  counts = jnp.asarray(plan.list_counts)[c, x]
  if lists.shape[0] not in (1, Nl):                              # per KV head: per query head
    lists, counts = (jnp.repeat(a, plan.group, axis=0) for a in (lists, counts))
  lists = jnp.broadcast_to(lists[None], (Bl,) + lists.shape)
  counts = jnp.broadcast_to(counts[None], (Bl,) + counts.shape)
  segment_ids = None
  if q_seg is not None:
    segment_ids = (q_seg.reshape(Bl, Tl_), k_seg.reshape(Bl, -1))
  return block_sparse_attention_indices(
      q, k_r[:, :, :, 0].reshape(Bl, -1, 1, k_r.shape[-1]),
      v_r[:, :, :, 0].reshape(Bl, -1, 1, v_r.shape[-1]), lists, counts, block_q=plan.block_size,
      block_kv=plan.block_size, mask=mask, scale=scale, q_positions=q_pos.reshape(-1),
      k_positions=k_pos.reshape(-1), segment_ids=segment_ids, return_lse=True,
      implementation="pallas")


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
