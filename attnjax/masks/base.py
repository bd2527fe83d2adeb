"""Masks as data: hashable predicates on (head, q_pos, k_pos[, segment ids]).

A ``Mask`` is a frozen dataclass. Its ``predicate`` works on broadcastable
integer arrays (NumPy at trace time to build block layouts, jax arrays inside
kernels and the reference), using only operators both libraries share. Masks
combine with ``&``, ``|`` and ``~`` and are compiled once per shape and block
size into a :class:`~attnjax.masks.layout.BlockLayout`.

Positions follow the attnjax contract: by default ``q_pos = arange(T) + S - T``
and ``k_pos = arange(S)`` (bottom-right aligned).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import numpy as np


class Mask:
  """Base class. Subclasses are ``@dataclasses.dataclass(frozen=True)``.

  Subclasses implement :meth:`predicate` and may implement
  :meth:`classify_block` (an exact O(1) answer for a rectangle of positions)
  so that block layouts at long lengths never evaluate every element.
  """

  #: True when the predicate reads segment ids (``q_seg``/``k_seg``).
  needs_segments: bool = False

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    """Boolean array: may query at ``q_pos`` attend to key at ``k_pos`` in ``head``.

    All arguments broadcast together; returns their broadcast shape.
    """
    raise NotImplementedError(
        f"{type(self).__name__} must implement predicate(head, q_pos, k_pos, ...).")

  def classify_block(self, head: int, q_lo, q_hi, k_lo, k_hi
                     ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Bounds on the predicate over blocks of positions, vectorised.

    ``q_lo``/``q_hi`` are int arrays [nq, 1] and ``k_lo``/``k_hi`` [1, nk]
    (half-open position ranges of each block); ``head`` is an int. Returns
    ``(may_any, surely_all)`` boolean arrays broadcastable to [nq, nk]:
    ``may_any`` is False only where no pair in the block is allowed, and
    ``surely_all`` is True only where every pair is allowed. Conservative
    answers are correct (the kernel then applies the element mask); exact
    ones give the tightest layout. Returns None when no closed form is
    known: the layout builder then evaluates the predicate on every element.
    """
    return None

  @property
  def head_dependent(self) -> bool:
    """True when the predicate differs between heads."""
    return False

  # -- combinators -----------------------------------------------------------
  def __and__(self, other: "Mask") -> "Mask":
    _check_mask("right operand of &", other)
    return And(self, other)

  def __or__(self, other: "Mask") -> "Mask":
    _check_mask("right operand of |", other)
    return Or(self, other)

  def __invert__(self) -> "Mask":
    return Not(self)

  # -- materialisation -------------------------------------------------------
  def to_dense(self, q_len: int, kv_len: int, num_heads: int = 1, *,
               q_positions=None, k_positions=None, q_segment_ids=None,
               kv_segment_ids=None) -> np.ndarray:
    """Dense boolean mask (NumPy).

    Returns [num_heads, q_len, kv_len], or [B, num_heads, q_len, kv_len] when
    segment ids ([B, q_len] / [B, kv_len]) are given.
    """
    q_pos, k_pos = _positions(q_len, kv_len, q_positions, k_positions)
    head = np.arange(num_heads)[:, None, None]
    qp, kp = q_pos[None, :, None], k_pos[None, None, :]
    if q_segment_ids is None and kv_segment_ids is None:
      if self.needs_segments:
        raise ValueError(
            f"{self!r} reads segment ids: pass q_segment_ids [B, {q_len}] and "
            f"kv_segment_ids [B, {kv_len}] to to_dense.")
      out = self.predicate(head, qp, kp)
      return np.broadcast_to(np.asarray(out, bool), (num_heads, q_len, kv_len)).copy()
    q_seg = np.asarray(q_segment_ids)
    k_seg = np.asarray(kv_segment_ids if kv_segment_ids is not None else q_segment_ids)
    out = self.predicate(head[None], qp[None], kp[None],
                         q_seg[:, None, :, None], k_seg[:, None, None, :])
    B = q_seg.shape[0]
    return np.broadcast_to(np.asarray(out, bool), (B, num_heads, q_len, kv_len)).copy()

  def block_layout(self, q_len: int, kv_len: int, block_q: int, block_kv: int,
                   num_heads: int = 1, *, q_offset: Optional[int] = None,
                   k_offset: int = 0):
    """Compiles the mask into a :class:`BlockLayout` (cached per arguments)."""
    from attnjax.masks.layout import build_block_layout  # pylint: disable=g-import-not-at-top
    return build_block_layout(self, q_len, kv_len, block_q, block_kv, num_heads,
                              q_offset=q_offset, k_offset=k_offset)


def _check_mask(name, m):
  if not isinstance(m, Mask):
    raise TypeError(f"{name} must be an attnjax Mask, got {type(m).__name__}.")


def _positions(q_len, kv_len, q_positions, k_positions):
  q_pos = (np.arange(q_len) + kv_len - q_len if q_positions is None
           else np.asarray(q_positions))
  k_pos = np.arange(kv_len) if k_positions is None else np.asarray(k_positions)
  if q_pos.shape != (q_len,):
    raise ValueError(f"q_positions must have shape ({q_len},), got {q_pos.shape}.")
  if k_pos.shape != (kv_len,):
    raise ValueError(f"k_positions must have shape ({kv_len},), got {k_pos.shape}.")
  return q_pos, k_pos


# -- combinators ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class And(Mask):
  """Both masks allow the pair."""
  left: Mask
  right: Mask

  @property
  def needs_segments(self):  # type: ignore[override]
    return self.left.needs_segments or self.right.needs_segments

  @property
  def head_dependent(self):
    return self.left.head_dependent or self.right.head_dependent

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    return (self.left.predicate(head, q_pos, k_pos, q_seg, k_seg)
            & self.right.predicate(head, q_pos, k_pos, q_seg, k_seg))

  def classify_block(self, head, q_lo, q_hi, k_lo, k_hi):
    a = self.left.classify_block(head, q_lo, q_hi, k_lo, k_hi)
    b = self.right.classify_block(head, q_lo, q_hi, k_lo, k_hi)
    if a is None or b is None:
      return None
    return (np.logical_and(a[0], b[0]), np.logical_and(a[1], b[1]))


@dataclasses.dataclass(frozen=True)
class Or(Mask):
  """Either mask allows the pair."""
  left: Mask
  right: Mask

  @property
  def needs_segments(self):  # type: ignore[override]
    return self.left.needs_segments or self.right.needs_segments

  @property
  def head_dependent(self):
    return self.left.head_dependent or self.right.head_dependent

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    return (self.left.predicate(head, q_pos, k_pos, q_seg, k_seg)
            | self.right.predicate(head, q_pos, k_pos, q_seg, k_seg))

  def classify_block(self, head, q_lo, q_hi, k_lo, k_hi):
    a = self.left.classify_block(head, q_lo, q_hi, k_lo, k_hi)
    b = self.right.classify_block(head, q_lo, q_hi, k_lo, k_hi)
    if a is None or b is None:
      return None
    # surely_all of a union may be True while neither side alone is full; the
    # conservative answer (the element mask decides inside the block) is kept.
    return (np.logical_or(a[0], b[0]), np.logical_or(a[1], b[1]))


@dataclasses.dataclass(frozen=True)
class Not(Mask):
  """The complement of a mask."""
  inner: Mask

  @property
  def needs_segments(self):  # type: ignore[override]
    return self.inner.needs_segments

  @property
  def head_dependent(self):
    return self.inner.head_dependent

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    return ~self.inner.predicate(head, q_pos, k_pos, q_seg, k_seg)

  def classify_block(self, head, q_lo, q_hi, k_lo, k_hi):
    c = self.inner.classify_block(head, q_lo, q_hi, k_lo, k_hi)
    if c is None:
      return None
    return (np.logical_not(c[1]), np.logical_not(c[0]))


# -- elementary masks ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Full(Mask):
  """Every query attends to every key."""

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    return (q_pos == q_pos) & (k_pos == k_pos) & (head == head)

  def classify_block(self, head, q_lo, q_hi, k_lo, k_hi):
    return (np.True_, np.True_)


@dataclasses.dataclass(frozen=True)
class Causal(Mask):
  """Key visible iff k_pos <= q_pos (causality by positions)."""

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    return (k_pos <= q_pos) & (head == head)

  def classify_block(self, head, q_lo, q_hi, k_lo, k_hi):
    # any: exists k <= q  <=>  k_lo <= q_hi - 1 ; all: k_hi - 1 <= q_lo
    return (k_lo <= q_hi - 1, k_hi - 1 <= q_lo)  # exact


@dataclasses.dataclass(frozen=True)
class SlidingWindow(Mask):
  """Key visible iff q_pos - left <= k_pos <= q_pos + right.

  ``SlidingWindow(left, 0)`` is a causal window of ``left + 1`` keys
  (the query itself and ``left`` before it).
  """
  left: int
  right: int = 0

  def __post_init__(self):
    for name in ("left", "right"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"SlidingWindow {name} must be an integer >= 0, got {v!r}.")

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    d = q_pos - k_pos
    return (d <= self.left) & (d >= -self.right) & (head == head)

  def classify_block(self, head, q_lo, q_hi, k_lo, k_hi):
    # d = q - k ranges over [q_lo - (k_hi-1), (q_hi-1) - k_lo]
    d_min, d_max = q_lo - (k_hi - 1), (q_hi - 1) - k_lo
    any_ = (d_max >= -self.right) & (d_min <= self.left)
    all_ = (d_min >= -self.right) & (d_max <= self.left)
    return (any_, all_)


