"""Packed-document masks: Documents (static or run-time segment ids) and the
AnchorAttention shared-anchor mask ("When Precision Meets Position: BFloat16 Breaks
Down RoPE in Long-Context Training", arXiv:2411.13476).

``Documents(ids)`` with static ids (a tuple or 1-D array indexed by position)
has an exact block layout; ``Documents()`` reads run-time segment ids
(``q_seg``/``k_seg``, e.g. ``segment_ids=`` of the attention call) and can only
be bounded per block: every block it does not rule out is partial.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import numpy as np

from attnjax.masks.base import (Causal, Composite, Mask, check_ids, check_position_range,
                                  lookup)
from attnjax.masks.primitives import KeyIn


@functools.lru_cache(maxsize=64)
def _runs(ids: Tuple[int, ...]):
  """Run-length view: (table, run index per position, id per run, contiguous)."""
  a = np.asarray(ids, np.int64)
  starts = np.concatenate([[True], a[1:] != a[:-1]])
  run_of = np.cumsum(starts) - 1
  run_id = a[starts]
  contiguous = len(np.unique(run_id)) == len(run_id)
  return a, run_of, run_id, contiguous


def _presence(run_of, run_id, lo, hi, num_ids):
  """bool [n_blocks, num_ids]: which ids (compressed) occur in each block."""
  ra, rz = run_of[lo], run_of[hi - 1]
  lengths = rz - ra + 1
  block = np.repeat(np.arange(len(lo)), lengths)
  starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
  runs = np.repeat(ra, lengths) + np.arange(lengths.sum()) - starts
  pres = np.zeros((len(lo), num_ids), bool)
  pres[block, run_id[runs]] = True
  return pres, lengths == 1


def same_id_bounds(ids: Tuple[int, ...], q_lo, q_hi, k_lo, k_hi):
  """Exact (any, all) of ``ids[q] == ids[k]`` over blocks (positions in range)."""
  a, run_of, run_id, contiguous = _runs(ids)
  n = len(a)
  ql, qh = np.clip(q_lo, 0, n - 1), np.clip(q_hi, 1, n)
  kl, kh = np.clip(k_lo, 0, n - 1), np.clip(k_hi, 1, n)
  qa, qz, ka, kz = run_of[ql], run_of[qh - 1], run_of[kl], run_of[kh - 1]
  if contiguous:
    any_ = np.maximum(qa, ka) <= np.minimum(qz, kz)
  else:
    uniq, comp = np.unique(run_id, return_inverse=True)
    pq, _ = _presence(run_of, comp, ql.reshape(-1), qh.reshape(-1), len(uniq))
    pk, _ = _presence(run_of, comp, kl.reshape(-1), kh.reshape(-1), len(uniq))
    hits = pq.astype(np.float32) @ pk.astype(np.float32).T
    any_ = (hits > 0).reshape(np.broadcast(q_lo, k_lo).shape)
  all_ = (qa == qz) & (ka == kz) & (run_id[qa] == run_id[ka])
  inside = (q_lo >= 0) & (q_hi <= n) & (k_lo >= 0) & (k_hi <= n)
  overlap = (q_lo < n) & (q_hi > 0) & (k_lo < n) & (k_hi > 0)
  return any_ & overlap, all_ & inside


@dataclasses.dataclass(frozen=True)
class Documents(Mask):
  """Attention within a document only: ``seg[q] == seg[k]``.

  ``Documents(segment_ids)``: static ids, one per position (a tuple or 1-D
  integer array; positions index it, so cross-attention uses the same
  table); exact block layout. ``Documents()``: reads the run-time segment ids
  passed to the attention call; block layouts can only be conservative.
  Combine with ``Causal()`` for causal packing.
  """
  segment_ids: Optional[Tuple[int, ...]] = None

  def __post_init__(self):
    if self.segment_ids is not None:
      object.__setattr__(self, "segment_ids",
                         check_ids("Documents", "segment_ids", self.segment_ids))

  @property
  def needs_segments(self):  # type: ignore[override]
    return self.segment_ids is None

  @property
  def exact_bounds(self):  # type: ignore[override]
    return self.segment_ids is not None

  def __repr__(self):
    if self.segment_ids is None:
      return "Documents()"
    return f"Documents(<{len(self.segment_ids)} static ids>)"

  def check_positions(self, q_pos, k_pos):
    if self.segment_ids is not None:
      check_position_range("Documents(segment_ids)", len(self.segment_ids), q_pos, k_pos)

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    if self.segment_ids is None:
      if q_seg is None or k_seg is None:
        raise ValueError("Documents() reads run-time segment ids: pass q_seg and k_seg.")
      return (q_seg == k_seg) & (head == head) & (q_pos == q_pos) & (k_pos == k_pos)
    table = _runs(self.segment_ids)[0]
    sq, okq = lookup(table, q_pos)
    sk, okk = lookup(table, k_pos)
    return (sq == sk) & okq & okk & (head == head)

  def classify_block(self, head, q_lo, q_hi, k_lo, k_hi):
    if self.segment_ids is None:
      return np.True_, np.False_  # run-time ids: nothing is known per block
    return same_id_bounds(self.segment_ids, q_lo, q_hi, k_lo, k_hi)


@dataclasses.dataclass(frozen=True)
class _AnchorSegments(Mask):
  """Run-time part of AnchorDocuments: same segment, or the key is an anchor."""
  anchor_id: int = 0
  needs_segments = True

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    if q_seg is None or k_seg is None:
      raise ValueError("AnchorDocuments() reads run-time segment ids: pass q_seg and k_seg.")
    return ((q_seg == k_seg) | (k_seg == self.anchor_id)) & (head == head) \
        & (q_pos == q_pos) & (k_pos == k_pos)

  def classify_block(self, head, q_lo, q_hi, k_lo, k_hi):
    return np.True_, np.False_


@dataclasses.dataclass(frozen=True)
class AnchorDocuments(Composite):
  """AnchorAttention: intra-document causal attention plus a shared anchor.

  ``M[i, j] = (j <= i) and (doc[i] == doc[j] or doc[j] == anchor_id)``
  (positions for ``i <= j``; ``anchor_id`` 0 marks the anchor token, the BOS
  of the packed window; documents are numbered 1, 2, ...). Position ids are
  not reset per document. ``doc_ids`` static (tuple / 1-D array) gives an
  exact layout; ``AnchorDocuments()`` reads the run-time segment ids.
  """
  doc_ids: Optional[Tuple[int, ...]] = None
  anchor_id: int = 0

  def __post_init__(self):
    if self.doc_ids is not None:
      object.__setattr__(self, "doc_ids", check_ids("AnchorDocuments", "doc_ids", self.doc_ids))
    if not isinstance(self.anchor_id, (int, np.integer)) or isinstance(self.anchor_id, bool):
      raise ValueError(f"AnchorDocuments anchor_id must be an integer, got {self.anchor_id!r}.")

  def __repr__(self):
    ids = "" if self.doc_ids is None else f"<{len(self.doc_ids)} static ids>, "
    return f"AnchorDocuments({ids}anchor_id={self.anchor_id})"

  def expand(self) -> Mask:
    if self.doc_ids is None:
      return Causal() & _AnchorSegments(int(self.anchor_id))
    ids = np.asarray(self.doc_ids)
    anchors = KeyIn(tuple(int(p) for p in np.nonzero(ids == self.anchor_id)[0]))
    return Causal() & (Documents(self.doc_ids) | anchors)
