"""BlockLayout: the one compiled block plan of the block-sparse backends.

A static mask compiled for one shape and block size, or block lists chosen at
run time (``attnjax.plan.from_lists``), give the same frozen pytree: block
sizes, offsets, the per-head block kinds and the Mask are static (aux data),
the forward and backward lists are its leaves (so run-time lists are traced
leaves of the same type). The XLA engine and both Pallas kernels read it,
forward and backward.

For every head and q-block the layout lists the k-blocks that are *partial*
(the element mask must be applied) or *full* (no element mask needed), as
padded CSR lists for the forward pass; the transposed CSC lists (per k-block,
the q-blocks that visit it) drive the dK/dV backward pass. Empty blocks are
never listed, so cost follows the visited blocks.

Padding convention: row ``r`` of ``fwd_indices`` holds ``fwd_counts[r]``
valid entries followed by copies of the last valid entry (or 0 for an empty
row), so a kernel may always gather a valid block and skip by count.
Head-independent masks give read-only arrays broadcast over heads.

A layout is built once per (mask, shape, blocks, heads) and cached. The closed
forms cost O(1) per block; most of the build time is spent on the padded lists
(intersections such as ``Causal() & SlidingWindow(w)`` also re-evaluate their
diagonal blocks element-wise, see below). Measured build times are in
docs/build_costs.md.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2


#: The list leaves of a BlockLayout (forward CSR, backward CSC).
LIST_FIELDS = ("fwd_indices", "fwd_full", "fwd_counts", "bwd_indices", "bwd_full", "bwd_counts")
_STATIC_FIELDS = ("q_len", "kv_len", "block_q", "block_kv", "num_heads", "q_offset",
                  "k_offset", "block_mask", "mask", "batched", "list_kind")


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout:
  """Per-head block kinds and index lists: the plan every block-sparse backend runs.

  Attributes:
    q_len, kv_len, block_q, block_kv, num_heads: what the layout was built for.
    q_offset, k_offset: positions of the first query / key.
    block_mask: int8 [num_heads, nq, nk]: 0 empty, 1 partial, 2 full (None
      for run-time lists, whose kinds are not known at trace time).
    fwd_indices: int32 [(B,) num_heads, nq, max_kb]: visited k-blocks per q-block.
    fwd_full: bool [num_heads, nq, max_kb]: whether each listed block is full
      (None for run-time lists: every block is of kind ``list_kind``).
    fwd_counts: int32 [(B,) num_heads, nq].
    bwd_indices: int32 [(B,) num_heads, nk, max_qb]: q-blocks visiting each k-block.
    bwd_full: bool [num_heads, nk, max_qb] (None for run-time lists).
    bwd_counts: int32 [(B,) num_heads, nk].
    mask: the Mask it was built from (None for a layout given as an array).
    batched: the lists have a leading batch axis B (run-time lists, NumPy or traced).
    list_kind: PARTIAL or FULL, the kind of every listed block of run-time lists.
  """
  q_len: int
  kv_len: int
  block_q: int
  block_kv: int
  num_heads: int
  q_offset: int
  k_offset: int
  block_mask: Optional[np.ndarray]
  fwd_indices: object
  fwd_full: object
  fwd_counts: object
  bwd_indices: object
  bwd_full: object
  bwd_counts: object
  mask: Optional[object] = None
  batched: bool = False
  list_kind: Optional[int] = None

  def tree_flatten(self):
    static = tuple(_Static(self.block_mask) if f == "block_mask" else getattr(self, f)
                   for f in _STATIC_FIELDS)
    return tuple(getattr(self, f) for f in LIST_FIELDS), static

  @classmethod
  def tree_unflatten(cls, static, leaves):
    kw = dict(zip(_STATIC_FIELDS, static), **dict(zip(LIST_FIELDS, leaves)))
    kw["block_mask"] = kw["block_mask"].value
    return cls(**kw)

  @property
  def num_q_blocks(self) -> int:
    return self.q_len // self.block_q

  @property
  def num_kv_blocks(self) -> int:
    return self.kv_len // self.block_kv

  @property
  def max_kb(self) -> int:
    """Width of the forward lists."""
    return self.fwd_indices.shape[-1]

  @property
  def max_qb(self) -> int:
    """Width of the backward lists."""
    return self.bwd_indices.shape[-1]

  @functools.cached_property
  def any_partial(self) -> bool:
    """Some listed block needs the element mask."""
    if self.block_mask is None:
      return self.list_kind == PARTIAL
    return bool((self.block_mask == PARTIAL).any())

  @functools.cached_property
  def any_full(self) -> bool:
    """Some listed block is full."""
    if self.block_mask is None:
      return self.list_kind == FULL
    return bool((self.block_mask == FULL).any())

  def skeleton(self) -> "BlockLayout":
    """This plan with its lists as ``jax.ShapeDtypeStruct`` (static facts only)."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self)

  @property
  def num_visited(self) -> int:
    """Number of (head, q-block, k-block) triples that are partial or full."""
    return int(np.count_nonzero(self.block_mask))

  @property
  def num_full(self) -> int:
    return int(np.count_nonzero(self.block_mask == FULL))

  @property
  def density(self) -> float:
    """Visited blocks / all blocks."""
    return self.num_visited / self.block_mask.size

  def __hash__(self):
    return id(self)

  def __repr__(self):
    if self.block_mask is None:
      return (f"BlockLayout(q_len={self.q_len}, kv_len={self.kv_len}, "
              f"block=({self.block_q}, {self.block_kv}), heads={self.num_heads}, "
              f"run-time lists of width {self.max_kb})")
    return (f"BlockLayout(q_len={self.q_len}, kv_len={self.kv_len}, "
            f"block=({self.block_q}, {self.block_kv}), heads={self.num_heads}, "
            f"visited={self.num_visited}/{self.block_mask.size}, "
            f"full={self.num_full})")


class _Static:
  """The block kinds as pytree aux data: compared and hashed by value."""

  def __init__(self, value):
    self.value = value

  def _key(self):
    v = self.value
    return None if v is None else (v.shape, np.ascontiguousarray(v).tobytes())

  def __eq__(self, other):
    return isinstance(other, _Static) and (
        self.value is other.value or self._key() == other._key())

  def __hash__(self):
    return hash(self._key())


def _lists(block_mask: np.ndarray):
  """CSR-style padded lists along the last axis of [H, R, C] block classes (O(nnz))."""
  H, R, C = block_mask.shape
  flat = block_mask.reshape(H * R, C)
  rows, cols = np.nonzero(flat != EMPTY)  # row-major: columns increase within a row
  counts = np.bincount(rows, minlength=H * R).astype(np.int32)
  width = max(int(counts.max()) if counts.size else 0, 1)
  starts = np.cumsum(counts) - counts
  rank = np.arange(len(rows)) - starts[rows]
  indices = np.zeros((H * R, width), np.int32)
  full = np.zeros((H * R, width), bool)
  indices[rows, rank] = cols
  full[rows, rank] = flat[rows, cols] == FULL
  # padding: copies of the last valid entry (0 for an empty row)
  last = indices[np.arange(H * R), np.maximum(counts - 1, 0)]
  pad = np.arange(width)[None, :] >= counts[:, None]
  indices = np.where(pad, last[:, None], indices)
  return (indices.reshape(H, R, width), full.reshape(H, R, width), counts.reshape(H, R))


def layout_from_block_mask(block_mask, q_len: int, kv_len: int, block_q: int,
                           block_kv: int, *, q_offset: Optional[int] = None,
                           k_offset: int = 0, mask=None) -> BlockLayout:
  """Builds a BlockLayout from int8 classes [H, nq, nk] (0 empty, 1 partial, 2 full).

  A boolean array is accepted too: True blocks become *full* blocks.
  """
  bm = np.asarray(block_mask)
  if bm.dtype == bool:
    bm = np.where(bm, FULL, EMPTY)
  bm = bm.astype(np.int8)
  _check_blocks(q_len, kv_len, block_q, block_kv)
  nq, nk = q_len // block_q, kv_len // block_kv
  if bm.ndim != 3 or bm.shape[1:] != (nq, nk):
    raise ValueError(
        f"block_mask must have shape [num_heads, {nq}, {nk}] for q_len={q_len}, "
        f"kv_len={kv_len}, blocks=({block_q}, {block_kv}); got {bm.shape}.")
  fi, ff, fc = _lists(bm)
  bi, bf, bc = _lists(np.swapaxes(bm, 1, 2))
  return BlockLayout(q_len, kv_len, block_q, block_kv, bm.shape[0],
                     kv_len - q_len if q_offset is None else int(q_offset),
                     int(k_offset), bm, fi, ff, fc, bi, bf, bc, mask)


#: Most block entries (layout heads x q-blocks x k-blocks) a layout may hold. A
#: layout with its CSR/CSC lists, and the schedules built from it, take tens of
#: bytes per entry on the host (plus O(T + S) position arrays), so 2**28
#: entries is already several GiB; larger shapes must use larger blocks.
MAX_BLOCK_ENTRIES = 2 ** 28


def check_block_entries(nq: int, nk: int, heads: int = 1, shape: str = "") -> None:
  """ValueError, before anything is allocated, when heads * nq * nk > MAX_BLOCK_ENTRIES.

  ``shape`` describes the call in the message (lengths and block sizes).
  """
  entries = heads * nq * nk
  if entries > MAX_BLOCK_ENTRIES:
    raise ValueError(
        f"a block layout of {heads} head(s) x {nq} q-blocks x {nk} k-blocks = {entries} "
        f"entries{shape} is more than MAX_BLOCK_ENTRIES = 2**28 ({MAX_BLOCK_ENTRIES}), "
        "the most that is built on the host; use larger blocks or shorter sequences.")


def _check_blocks(q_len, kv_len, block_q, block_kv):
  for name, b, L, lname in (("block_q", block_q, q_len, "q_len"),
                            ("block_kv", block_kv, kv_len, "kv_len")):
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
      raise ValueError(f"{name} must be a positive integer, got {b!r}.")
    if L % b:
      raise ValueError(f"{name}={b} does not divide {lname}={L}.")


def evaluate_blocks(mask, head, q_pos, k_pos, block_q, block_kv):
  """Exact (any, all) bool [T/block_q, S/block_kv] per block of ``head`` at positions
  q_pos [T], k_pos [S], by evaluating the predicate (T x S work, in chunks of rows)."""
  nq, nk = len(q_pos) // block_q, len(k_pos) // block_kv
  any_ = np.zeros((nq, nk), bool)
  all_ = np.zeros((nq, nk), bool)
  rows = max(1, (1 << 22) // max(len(k_pos), 1) // block_q)  # ~4M elements a chunk
  for start in range(0, nq, rows):
    stop = min(nq, start + rows)
    qp = q_pos[start * block_q: stop * block_q, None]
    m = np.asarray(mask.predicate(head, qp, k_pos[None, :]), bool)
    m = np.broadcast_to(m, (len(qp), len(k_pos)))
    m = m.reshape(stop - start, block_q, nk, block_kv)
    any_[start:stop] = m.any(axis=(1, 3))
    all_[start:stop] = m.all(axis=(1, 3))
  return any_, all_


def _refine_blocks(mask, head, qi, ki, q_lo, k_lo, block_q, block_kv):
  """Exact (any, all) of the listed blocks (q-block qi[n], k-block ki[n])."""
  n = len(qi)
  any_ = np.zeros(n, bool)
  all_ = np.zeros(n, bool)
  step = max(1, (1 << 22) // (block_q * block_kv))
  dq, dk = np.arange(block_q), np.arange(block_kv)
  for s in range(0, n, step):
    e = min(n, s + step)
    qp = (q_lo[qi[s:e]][:, None, None] + dq[None, :, None])
    kp = (k_lo[ki[s:e]][:, None, None] + dk[None, None, :])
    m = np.broadcast_to(np.asarray(mask.predicate(head, qp, kp), bool),
                        (e - s, block_q, block_kv))
    any_[s:e] = m.any(axis=(1, 2))
    all_[s:e] = m.all(axis=(1, 2))
  return any_, all_


def _classify_head(mask, h, q_pos, k_pos, q_lo, k_lo, block_q, block_kv):
  nq, nk = len(q_lo), len(k_lo)
  c = mask.block_bounds(h, q_lo[:, None], q_lo[:, None] + block_q,
                        k_lo[None, :], k_lo[None, :] + block_kv)
  if c is None:
    if mask.needs_segments:
      raise ValueError(
          f"{mask!r} reads run-time segment ids and has no block bound; combine "
          "it with a mask that has one or pass it to the dense reference.")
    return evaluate_blocks(mask, h, q_pos, k_pos, block_q, block_kv)
  any_ = np.broadcast_to(np.asarray(c[0], bool), (nq, nk)).copy()
  all_ = np.broadcast_to(np.asarray(c[1], bool), (nq, nk)).copy()
  loose = np.broadcast_to(np.asarray(c[2], bool), (nq, nk)) & any_ & ~all_
  if not mask.needs_segments and loose.any():
    qi, ki = np.nonzero(loose)
    a, b = _refine_blocks(mask, h, qi, ki, q_lo, k_lo, block_q, block_kv)
    any_[qi, ki], all_[qi, ki] = a, b
  return any_, all_


def resolve_num_heads(mask, num_heads) -> int:
  """``num_heads``, or the mask's own head count (1 when it has none), validated."""
  if num_heads is None:
    num_heads = mask.num_heads if mask.num_heads is not None else 1
  if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)) or num_heads < 1:
    raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}.")
  return int(num_heads)


@functools.lru_cache(maxsize=256)
def build_block_layout(mask, q_len: int, kv_len: int, block_q: int, block_kv: int,
                       num_heads: Optional[int] = None, *, q_offset: Optional[int] = None,
                       k_offset: int = 0) -> BlockLayout:
  """Compiles ``mask`` into a BlockLayout; cached per (mask, shape, blocks, heads).

  Blocks are classified with the mask's closed form (``block_bounds``) when
  it has one, else by evaluating the predicate on every element. Blocks that
  a combinator can only bound loosely (e.g. both sides of an ``|`` partial)
  are re-evaluated element-wise, so layouts of static masks are exact: a block
  is full iff every pair is allowed, empty iff none is. Masks that read
  run-time segment ids can only be bounded: their blocks are at best partial,
  and the kernel applies the segment test element-wise. ``num_heads``
  defaults to the mask's own head count (1 for head-independent masks).
  """
  _check_blocks(q_len, kv_len, block_q, block_kv)
  num_heads = resolve_num_heads(mask, num_heads)
  check_block_entries(q_len // block_q, kv_len // block_kv,
                      num_heads if mask.head_dependent else 1,
                      f" (q_len={q_len}, kv_len={kv_len}, blocks {block_q} x {block_kv})")
  q_off = kv_len - q_len if q_offset is None else int(q_offset)
  nq, nk = q_len // block_q, kv_len // block_kv
  q_lo = q_off + np.arange(nq) * block_q
  k_lo = k_offset + np.arange(nk) * block_kv
  q_pos = q_off + np.arange(q_len)
  k_pos = k_offset + np.arange(kv_len)
  mask.validate(num_heads, q_pos, k_pos)
  heads = range(num_heads) if mask.head_dependent else range(1)
  classes = []
  for h in heads:
    any_, all_ = _classify_head(mask, h, q_pos, k_pos, q_lo, k_lo, block_q, block_kv)
    classes.append(np.where(all_, FULL, np.where(any_, PARTIAL, EMPTY)).astype(np.int8))
  lay = layout_from_block_mask(np.stack(classes), q_len, kv_len, block_q, block_kv,
                               q_offset=q_off, k_offset=k_offset, mask=mask)
  if lay.num_heads != num_heads:  # head-independent: one head's lists, broadcast (read-only)
    arrays = {f: np.broadcast_to(getattr(lay, f), (num_heads,) + getattr(lay, f).shape[1:])
              for f in ("block_mask", "fwd_indices", "fwd_full", "fwd_counts", "bwd_indices",
                        "bwd_full", "bwd_counts")}
    lay = dataclasses.replace(lay, num_heads=num_heads, **arrays)
  return lay
