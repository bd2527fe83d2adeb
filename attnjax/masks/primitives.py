"""Building-block masks with exact O(1) block bounds.

Each mask here is a predicate on positions with an exact ``classify_block``
(a block is reported partial only when it holds both allowed and masked
pairs). The paper patterns (GlobalTokens, Strided, SinkWindow, Modality,
ShiftedGroups, ...) are combinations of these with ``&``, ``|``, ``~``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Tuple

import numpy as np

from attnjax.masks.base import POSITION_MAX, Mask, check_int, is_int, lookup


def count_multiples(a, b, m):
  """Number of integers x in [a, b] with x % m == 0 (0 when b < a)."""
  return np.where(b >= a, b // m - (a - 1) // m, 0)


# -- one-sided masks: the predicate reads only the query or only the key position --
class _OneSided(Mask):
  side = "k"
  exact_bounds = True

  def _pick(self, q_pos, k_pos):
    return q_pos if self.side == "q" else k_pos

  def _range(self, q_lo, q_hi, k_lo, k_hi):
    return (q_lo, q_hi) if self.side == "q" else (k_lo, k_hi)


@dataclasses.dataclass(frozen=True)
class KeyRange(_OneSided):
  """Keys at positions ``lo <= k_pos < hi`` are visible (to every query)."""
  lo: int
  hi: int
  side = "k"

  def __post_init__(self):
    name = type(self).__name__
    if not is_int(self.lo) or not is_int(self.hi) or self.hi < self.lo:
      raise ValueError(f"{name} needs integers lo <= hi, got lo={self.lo!r}, hi={self.hi!r}.")
    if self.lo < -POSITION_MAX - 1 or self.hi > POSITION_MAX:
      raise ValueError(
          f"{name} lo={self.lo}, hi={self.hi} is out of range: positions are int32, so "
          f"both must lie in [-2**31, 2**31 - 1].")

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    p = self._pick(q_pos, k_pos)
    return (p >= self.lo) & (p < self.hi) & (head == head) & (q_pos == q_pos) & (k_pos == k_pos)

  def classify_block(self, head, q_lo, q_hi, k_lo, k_hi):
    lo, hi = self._range(q_lo, q_hi, k_lo, k_hi)
    return (np.maximum(lo, self.lo) < np.minimum(hi, self.hi),
            (lo >= self.lo) & (hi <= self.hi))


@dataclasses.dataclass(frozen=True)
class QueryRange(KeyRange):
  """Queries at positions ``lo <= q_pos < hi`` see every key."""
  side = "q"


@functools.lru_cache(maxsize=64)
def _membership(positions: Tuple[int, ...]):
  """(bool table over [0, max+1), prefix counts) of a sorted position tuple."""
  n = positions[-1] + 1 if positions else 0
  table = np.zeros(n, bool)
  table[list(positions)] = True
  return table, np.concatenate([[0], np.cumsum(table)])


@dataclasses.dataclass(frozen=True)
class KeyIn(_OneSided):
  """Keys whose position is in ``positions`` are visible (to every query).

  ``positions`` is any iterable of non-negative ints; it is stored sorted and
  de-duplicated. Positions not listed (including those past the largest one)
  are not members.
  """
  positions: Tuple[int, ...]
  side = "k"

  def __post_init__(self):
    raw = self.positions
    if isinstance(raw, (set, frozenset)):
      raw = sorted(raw)
    pos = np.asarray(raw).reshape(-1)
    if pos.size and (not np.issubdtype(pos.dtype, np.integer) or pos.min() < 0):
      raise ValueError(
          f"{type(self).__name__} positions must be non-negative integers, got "
          f"{self.positions!r}.")
    object.__setattr__(self, "positions", tuple(int(p) for p in np.unique(pos)))

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    p = self._pick(q_pos, k_pos)
    base = (head == head) & (q_pos == q_pos) & (k_pos == k_pos)
    if len(self.positions) <= 16:  # a few comparisons: no table (kernel friendly)
      hit = p != p
      for x in self.positions:
        hit = hit | (p == x)
      return base & hit
    val, ok = lookup(_membership(self.positions)[0], p)
    return base & val & ok

  def _count(self, lo, hi):
    if not self.positions:
      return np.zeros(np.broadcast(lo, hi).shape, np.int64)
    cum = _membership(self.positions)[1]
    n = len(cum) - 1
    return cum[np.clip(hi, 0, n)] - cum[np.clip(lo, 0, n)]

  def classify_block(self, head, q_lo, q_hi, k_lo, k_hi):
    lo, hi = self._range(q_lo, q_hi, k_lo, k_hi)
    c = self._count(lo, hi)
    return c > 0, c == hi - lo


@dataclasses.dataclass(frozen=True)
class QueryIn(KeyIn):
  """Queries whose position is in ``positions`` see every key."""
  side = "q"


@dataclasses.dataclass(frozen=True)
class KeyStride(_OneSided):
  """Keys with ``lo <= k_pos % period < hi`` are visible (periodic columns)."""
  period: int
  lo: int
  hi: int
  side = "k"

  def __post_init__(self):
    check_int("KeyStride", "period", self.period, 1)
    check_int("KeyStride", "lo", self.lo, 0)
    if not is_int(self.hi) or not self.lo <= self.hi <= self.period:
      raise ValueError(f"KeyStride needs 0 <= lo <= hi <= period, got {self!r}.")

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    r = k_pos % self.period
    return (r >= self.lo) & (r < self.hi) & (head == head) & (q_pos == q_pos)

  def _below(self, x):
    """Number of members in [0, x) (x may be negative: counts are differences)."""
    p = self.period
    return (x // p) * (self.hi - self.lo) + np.clip(x % p - self.lo, 0, self.hi - self.lo)

  def classify_block(self, head, q_lo, q_hi, k_lo, k_hi):
    c = self._below(k_hi) - self._below(k_lo)
    return c > 0, c == k_hi - k_lo


# -- two-sided masks ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SameBlock(Mask):
  """Query and key fall in the same tile: ``(q - offset) // size == (k - offset) // size``."""
  size: int
  offset: int = 0
  exact_bounds = True

  def __post_init__(self):
    check_int("SameBlock", "size", self.size, 1)
    if not is_int(self.offset):
      raise ValueError(f"SameBlock offset must be an integer, got {self.offset!r}.")

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    s, o = self.size, self.offset
    return ((q_pos - o) // s == (k_pos - o) // s) & (head == head)

  def classify_block(self, head, q_lo, q_hi, k_lo, k_hi):
    s, o = self.size, self.offset
    qa, qz = (q_lo - o) // s, (q_hi - 1 - o) // s
    ka, kz = (k_lo - o) // s, (k_hi - 1 - o) // s
    return (np.maximum(qa, ka) <= np.minimum(qz, kz)), (qa == qz) & (ka == kz) & (qa == ka)


@dataclasses.dataclass(frozen=True)
class DiagonalStride(Mask):
  """Pairs whose distance is a multiple of ``stride``: ``(q - k) % stride == 0``."""
  stride: int
  exact_bounds = True

  def __post_init__(self):
    check_int("DiagonalStride", "stride", self.stride, 1)

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    return ((q_pos - k_pos) % self.stride == 0) & (head == head)

  def classify_block(self, head, q_lo, q_hi, k_lo, k_hi):
    d_min, d_max = q_lo - (k_hi - 1), (q_hi - 1) - k_lo
    c = count_multiples(d_min, d_max, self.stride)
    return c > 0, c == d_max - d_min + 1


def summed_area(table: np.ndarray) -> np.ndarray:
  """Inclusive 2-D prefix sums with a zero border: [R+1, C+1] int64."""
  out = np.zeros((table.shape[0] + 1, table.shape[1] + 1), np.int64)
  out[1:, 1:] = np.cumsum(np.cumsum(table, 0, dtype=np.int64), 1)
  return out


def grid_bounds(sat: np.ndarray, grid: int, q_lo, q_hi, k_lo, k_hi):
  """Exact (any, all) of a mask that is ``table[q // grid, k // grid]`` (False
  outside the table), from its summed-area table ``sat`` [R+1, C+1]."""
  R, C = sat.shape[0] - 1, sat.shape[1] - 1
  qa, qz = np.clip(q_lo // grid, 0, R), np.clip((q_hi - 1) // grid + 1, 0, R)
  ka, kz = np.clip(k_lo // grid, 0, C), np.clip((k_hi - 1) // grid + 1, 0, C)
  cnt = sat[qz, kz] - sat[qa, kz] - sat[qz, ka] + sat[qa, ka]
  inside = (q_lo >= 0) & (q_hi <= R * grid) & (k_lo >= 0) & (k_hi <= C * grid)
  return cnt > 0, inside & (cnt == (qz - qa) * (kz - ka))
