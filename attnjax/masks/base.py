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
import functools
from typing import Optional, Tuple

import jax.numpy as jnp
import numpy as np

from attnjax.masks.layout import build_block_layout, resolve_num_heads


class Mask:
  """Base class. Subclasses are ``@dataclasses.dataclass(frozen=True)``.

  Subclasses implement :meth:`predicate` and may implement
  :meth:`classify_block` (an O(1) answer for a rectangle of positions)
  so that block layouts at long lengths never evaluate every element.
  """

  #: True when the predicate reads segment ids (``q_seg``/``k_seg``).
  needs_segments: bool = False
  #: True when ``classify_block`` is exact: a block is reported partial only
  #: when it really holds both allowed and masked pairs.
  exact_bounds: bool = False
  #: Heads the mask is defined for (None: any number of heads).
  num_heads: Optional[int] = None

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

  def block_bounds(self, head: int, q_lo, q_hi, k_lo, k_hi):
    """``(may_any, surely_all, loose)`` or None (no closed form).

    ``loose`` marks blocks whose *partial* answer may not be tight (the
    layout builder re-evaluates those blocks element-wise). Combinators
    propagate it; a mask with ``exact_bounds`` reports no loose block.
    """
    c = self.classify_block(head, q_lo, q_hi, k_lo, k_hi)
    if c is None:
      return None
    a, b = np.asarray(c[0], bool), np.asarray(c[1], bool)
    loose = np.zeros((), bool) if self.exact_bounds else (a & ~b)
    return a, b, loose

  def validate(self, num_heads: int, q_pos: np.ndarray, k_pos: np.ndarray) -> None:
    """Raises ValueError when the mask is not defined for these heads/positions."""
    if self.num_heads is not None and num_heads != self.num_heads:
      raise ValueError(
          f"num_heads={num_heads} does not match {type(self).__name__}, which is "
          f"defined for num_heads={self.num_heads}.")

  def check_positions(self, q_pos: np.ndarray, k_pos: np.ndarray) -> None:
    """Raises ValueError when positions fall outside a static table of the mask.

    Called by :meth:`to_dense`. Block layouts do not call it: kernels pad
    lengths, and positions past a static table are simply masked.
    """

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
  def to_dense(self, q_len: int, kv_len: int, num_heads: Optional[int] = None, *,
               q_positions=None, k_positions=None, q_segment_ids=None,
               kv_segment_ids=None) -> np.ndarray:
    """Dense boolean mask (NumPy).

    ``num_heads`` defaults to the mask's own head count (1 for masks that do
    not depend on the head). Returns [num_heads, q_len, kv_len], or
    [B, num_heads, q_len, kv_len] when segment ids ([B, q_len] / [B, kv_len])
    are given.
    """
    num_heads = resolve_num_heads(self, num_heads)
    q_pos, k_pos = _positions(q_len, kv_len, q_positions, k_positions)
    self.validate(num_heads, q_pos, k_pos)
    self.check_positions(q_pos, k_pos)
    head = np.arange(num_heads)[:, None, None]
    qp, kp = q_pos[None, :, None], k_pos[None, None, :]
    if q_segment_ids is None and kv_segment_ids is None:
      if self.needs_segments:
        raise ValueError(
            f"{self!r} reads segment ids: pass q_segment_ids [B, {q_len}] and "
            f"kv_segment_ids [B, {kv_len}] to to_dense.")
      out = self.predicate(head, qp, kp)
      return np.broadcast_to(np.asarray(out, bool), (num_heads, q_len, kv_len)).copy()
    q_seg = _segments("q_segment_ids", q_segment_ids, q_len)
    k_seg = (q_seg if kv_segment_ids is None and q_len == kv_len
             else _segments("kv_segment_ids", kv_segment_ids, kv_len))
    if k_seg.shape[0] != q_seg.shape[0]:
      raise ValueError(
          f"q_segment_ids {q_seg.shape} and kv_segment_ids {k_seg.shape} must have "
          "the same batch size.")
    out = self.predicate(head[None], qp[None], kp[None],
                         q_seg[:, None, :, None], k_seg[:, None, None, :])
    B = q_seg.shape[0]
    return np.broadcast_to(np.asarray(out, bool), (B, num_heads, q_len, kv_len)).copy()

  def block_layout(self, q_len: int, kv_len: int, block_q: int, block_kv: int,
                   num_heads: Optional[int] = None, *, q_offset: Optional[int] = None,
                   k_offset: int = 0):
    """Compiles the mask into a :class:`BlockLayout` (cached per arguments)."""
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


def _segments(name, seg, length):
  if seg is None:
    raise ValueError(f"{name} is required (shape [B, {length}]).")
  seg = np.asarray(seg)
  if seg.ndim != 2 or seg.shape[1] != length or not np.issubdtype(seg.dtype, np.integer):
    raise ValueError(
        f"{name} must be an integer array of shape [B, {length}], got "
        f"{seg.dtype} {seg.shape}.")
  return seg


# -- helpers shared by the mask modules ---------------------------------------------
def is_int(v) -> bool:
  return not isinstance(v, (bool, np.bool_)) and isinstance(v, (int, np.integer))


#: Largest position offset a mask may hold: positions are int32 (kernels and
#: the reference compare them in int32), so a window or range bound beyond
#: this could not be represented. Any bound >= the sequence length already
#: means "no limit" exactly, so nothing is lost by the cap.
POSITION_MAX = 2 ** 31 - 1


def check_ids(owner: str, name: str, ids) -> Tuple[int, ...]:
  """``ids`` (one integer id per position) as a tuple, else ValueError naming ``owner.name``."""
  arr = np.asarray(ids)
  if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(
        f"{owner} {name} must be a non-empty 1-D sequence of integers (one id per "
        f"position), got {arr.dtype} with shape {arr.shape}.")
  return tuple(int(x) for x in arr)


def check_position_range(owner: str, n: int, q_pos, k_pos) -> None:
  """ValueError unless every query/key position lies in [0, n) (a table of n ids)."""
  for name, p in (("query", q_pos), ("key", k_pos)):
    p = np.asarray(p)
    if p.size and (p.min() < 0 or p.max() >= n):
      raise ValueError(
          f"{owner} covers positions [0, {n}) but {name} positions span "
          f"[{p.min()}, {p.max()}]: give ids for every position.")


def check_int(owner: str, name: str, value, minimum: int = 0,
              maximum: Optional[int] = None) -> int:
  """``value`` as an int in [minimum, maximum], else ValueError naming ``owner.name``."""
  if not is_int(value) or value < minimum:
    raise ValueError(f"{owner} {name} must be an integer >= {minimum}, got {value!r}.")
  if maximum is not None and value > maximum:
    raise ValueError(
        f"{owner} {name}={value} is out of range: positions are int32, so it must be "
        f"<= {maximum} (2**31 - 1); any value >= the sequence length already sees every "
        "key on that side.")
  return int(value)


def _is_jax(x) -> bool:
  mod = type(x).__module__
  return mod.startswith("jax") or mod.startswith("jaxlib")


def lookup(table: np.ndarray, *index):
  """``table[index]`` for NumPy or jax index arrays, plus an in-range flag.

  Indices out of ``[0, table.shape[i])`` are clamped for the read and flagged
  False, so callers can mask them (a predicate never reads out of bounds).
  """
  xp = np
  if any(_is_jax(i) for i in index):
    xp = jnp
  ok = True
  clipped = []
  for axis, i in enumerate(index):
    n = table.shape[axis]
    i = xp.asarray(i)
    ok = ok & (i >= 0) & (i < n)
    clipped.append(xp.clip(i, 0, n - 1))
  return xp.asarray(table)[tuple(clipped)], ok


def and_bounds(a, b):
  """Bounds of the intersection of two masks' block bounds (see block_bounds)."""
  if a is None or b is None:
    return None
  any_, all_ = a[0] & b[0], a[1] & b[1]
  both = (a[0] & ~a[1]) & (b[0] & ~b[1])
  return any_, all_, any_ & ~all_ & (a[2] | b[2] | both)


def or_bounds(a, b):
  """Bounds of the union of two masks' block bounds (see block_bounds)."""
  if a is None or b is None:
    return None
  any_, all_ = a[0] | b[0], a[1] | b[1]
  both = (a[0] & ~a[1]) & (b[0] & ~b[1])
  return any_, all_, any_ & ~all_ & (a[2] | b[2] | both)


# -- combinators ---------------------------------------------------------------
class _Binary(Mask):
  """Shared properties of And/Or."""

  @property
  def needs_segments(self):  # type: ignore[override]
    return self.left.needs_segments or self.right.needs_segments

  @property
  def head_dependent(self):
    return self.left.head_dependent or self.right.head_dependent

  @property
  def num_heads(self):  # type: ignore[override]
    return self.left.num_heads if self.left.num_heads is not None else self.right.num_heads

  def validate(self, num_heads, q_pos, k_pos):
    self.left.validate(num_heads, q_pos, k_pos)
    self.right.validate(num_heads, q_pos, k_pos)

  def check_positions(self, q_pos, k_pos):
    self.left.check_positions(q_pos, k_pos)
    self.right.check_positions(q_pos, k_pos)


@dataclasses.dataclass(frozen=True)
class And(_Binary):
  """Both masks allow the pair."""
  left: Mask
  right: Mask

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    return (self.left.predicate(head, q_pos, k_pos, q_seg, k_seg)
            & self.right.predicate(head, q_pos, k_pos, q_seg, k_seg))

  def classify_block(self, head, q_lo, q_hi, k_lo, k_hi):
    c = self.block_bounds(head, q_lo, q_hi, k_lo, k_hi)
    return None if c is None else c[:2]

  def block_bounds(self, head, q_lo, q_hi, k_lo, k_hi):
    return and_bounds(self.left.block_bounds(head, q_lo, q_hi, k_lo, k_hi),
                      self.right.block_bounds(head, q_lo, q_hi, k_lo, k_hi))


@dataclasses.dataclass(frozen=True)
class Or(_Binary):
  """Either mask allows the pair."""
  left: Mask
  right: Mask

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    return (self.left.predicate(head, q_pos, k_pos, q_seg, k_seg)
            | self.right.predicate(head, q_pos, k_pos, q_seg, k_seg))

  def classify_block(self, head, q_lo, q_hi, k_lo, k_hi):
    # A union may be full while neither side alone is: such blocks come out
    # partial here and ``loose`` in block_bounds (the builder then refines).
    c = self.block_bounds(head, q_lo, q_hi, k_lo, k_hi)
    return None if c is None else c[:2]

  def block_bounds(self, head, q_lo, q_hi, k_lo, k_hi):
    return or_bounds(self.left.block_bounds(head, q_lo, q_hi, k_lo, k_hi),
                     self.right.block_bounds(head, q_lo, q_hi, k_lo, k_hi))


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

  @property
  def num_heads(self):  # type: ignore[override]
    return self.inner.num_heads

  def validate(self, num_heads, q_pos, k_pos):
    self.inner.validate(num_heads, q_pos, k_pos)

  def check_positions(self, q_pos, k_pos):
    self.inner.check_positions(q_pos, k_pos)

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    return ~self.inner.predicate(head, q_pos, k_pos, q_seg, k_seg)

  def classify_block(self, head, q_lo, q_hi, k_lo, k_hi):
    c = self.block_bounds(head, q_lo, q_hi, k_lo, k_hi)
    return None if c is None else c[:2]

  def block_bounds(self, head, q_lo, q_hi, k_lo, k_hi):
    c = self.inner.block_bounds(head, q_lo, q_hi, k_lo, k_hi)
    if c is None:
      return None
    return ~c[1], ~c[0], c[2]


class Composite(Mask):
  """A mask defined as a combination of simpler masks (``expand()``).

  Predicate, block bounds and flags are those of the expansion, which is
  computed once per mask value (masks are hashable).
  """

  def expand(self) -> Mask:
    raise NotImplementedError(f"{type(self).__name__} must implement expand().")

  @property
  def expanded(self) -> Mask:
    return _expand(self)

  @property
  def needs_segments(self):  # type: ignore[override]
    return self.expanded.needs_segments

  @property
  def head_dependent(self):
    return self.expanded.head_dependent

  def validate(self, num_heads, q_pos, k_pos):
    Mask.validate(self, num_heads, q_pos, k_pos)
    self.expanded.validate(num_heads, q_pos, k_pos)

  def check_positions(self, q_pos, k_pos):
    self.expanded.check_positions(q_pos, k_pos)

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    return self.expanded.predicate(head, q_pos, k_pos, q_seg, k_seg)

  def classify_block(self, head, q_lo, q_hi, k_lo, k_hi):
    return self.expanded.classify_block(head, q_lo, q_hi, k_lo, k_hi)

  def block_bounds(self, head, q_lo, q_hi, k_lo, k_hi):
    return self.expanded.block_bounds(head, q_lo, q_hi, k_lo, k_hi)


@functools.lru_cache(maxsize=512)
def _expand(mask: Composite) -> Mask:
  return mask.expand()


# -- elementary masks ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Full(Mask):
  """Every query attends to every key."""
  exact_bounds = True

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    return (q_pos == q_pos) & (k_pos == k_pos) & (head == head)

  def classify_block(self, head, q_lo, q_hi, k_lo, k_hi):
    return (np.True_, np.True_)


@dataclasses.dataclass(frozen=True)
class Causal(Mask):
  """Key visible iff k_pos <= q_pos (causality by positions)."""
  exact_bounds = True

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    return (k_pos <= q_pos) & (head == head)

  def classify_block(self, head, q_lo, q_hi, k_lo, k_hi):
    # any: exists k <= q  <=>  k_lo <= q_hi - 1 ; all: k_hi - 1 <= q_lo
    return (k_lo <= q_hi - 1, k_hi - 1 <= q_lo)  # exact


@dataclasses.dataclass(frozen=True)
class SlidingWindow(Mask):
  """Key visible iff q_pos - left <= k_pos <= q_pos + right.

  ``SlidingWindow(left, 0)`` is a causal window of ``left + 1`` keys
  (the query itself and ``left`` before it). ``left`` and ``right`` are
  integers in [0, 2**31 - 1] (positions are int32); a side wider than the
  sequence is exactly no limit on that side, not an error.
  """
  left: int
  right: int = 0
  exact_bounds = True

  def __post_init__(self):
    for name in ("left", "right"):
      check_int("SlidingWindow", name, getattr(self, name), 0, POSITION_MAX)

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    d = q_pos - k_pos
    return (d <= self.left) & (d >= -self.right) & (head == head)

  def classify_block(self, head, q_lo, q_hi, k_lo, k_hi):
    # d = q - k ranges over every integer of [q_lo - (k_hi-1), (q_hi-1) - k_lo]
    d_min, d_max = q_lo - (k_hi - 1), (q_hi - 1) - k_lo
    any_ = (d_max >= -self.right) & (d_min <= self.left)
    all_ = (d_min >= -self.right) & (d_max <= self.left)
    return (any_, all_)
