"""Static sparse patterns: Longformer global tokens, Sparse-Transformer strides,
StreamingLLM/DuoAttention sink+window (arXiv:2410.10819), EE-MLLM composite modality
mask (arXiv:2408.11795), BigBird random blocks (Clinical-BigBird, arXiv:2201.11838) and
per-head masks.

Every pattern is a combination of the exact primitives in
:mod:`attnjax.masks.primitives`, so block layouts are exact and cheap.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Tuple

import numpy as np

from attnjax.masks.base import (POSITION_MAX, Causal, Composite, Mask, SlidingWindow, check_ids,
                                check_int, check_position_range, lookup)
from attnjax.masks.primitives import (DiagonalStride, KeyIn, KeyRange, KeyStride, QueryIn,
                                      SameBlock, grid_bounds, summed_area)


@dataclasses.dataclass(frozen=True)
class GlobalTokens(Composite):
  """Longformer global attention: the given positions attend everywhere and are
  attended by every query (``q in G or k in G``).

  Longformer = ``SlidingWindow(w, w) | GlobalTokens(G)`` (non-causal; add
  ``& Causal()`` for a causal variant). Longformer's separate global Q/K/V
  projections belong to the layer, not the mask.
  """
  positions: Tuple[int, ...]

  def __post_init__(self):
    object.__setattr__(self, "positions", KeyIn(self.positions).positions)

  def expand(self) -> Mask:
    return QueryIn(self.positions) | KeyIn(self.positions)


@dataclasses.dataclass(frozen=True)
class SinkWindow(Composite):
  """StreamingLLM / DuoAttention streaming heads (the Lambda mask).

  ``M[i, j] = j <= i and (j < num_sink or i - j < window)`` on positions:
  ``num_sink`` first tokens plus the ``window`` most recent ones (the query
  included). ``num_sink + window >= L`` gives full causal attention.
  """
  num_sink: int
  window: int

  def __post_init__(self):
    check_int("SinkWindow", "num_sink", self.num_sink, 0, POSITION_MAX)
    check_int("SinkWindow", "window", self.window, 0, POSITION_MAX)

  def expand(self) -> Mask:
    sinks = KeyRange(0, self.num_sink)
    if self.window == 0:
      return Causal() & sinks
    return Causal() & (sinks | SlidingWindow(self.window - 1, 0))


@dataclasses.dataclass(frozen=True)
class Strided(Composite):
  """Sparse Transformer factorized patterns (Child et al., 2019), both parts in one head.

  ``mode="strided"``: ``i - j < stride`` (local) or ``(i - j) % stride == 0``.
  ``mode="fixed"``: same block of ``stride`` tokens (``i // stride == j // stride``)
  or ``j`` is one of the last ``num_summary`` positions of its block
  (``j % stride >= stride - num_summary``). ``causal`` adds ``j <= i``; the
  non-causal local part of "strided" is ``|i - j| < stride``. To give each part
  its own head (the paper's factorised heads), use :class:`PerHead`.
  """
  stride: int
  mode: str = "fixed"
  num_summary: int = 1
  causal: bool = True

  def __post_init__(self):
    check_int("Strided", "stride", self.stride, 1)
    check_int("Strided", "num_summary", self.num_summary, 0)
    if self.num_summary > self.stride:
      raise ValueError(f"Strided num_summary={self.num_summary} exceeds stride={self.stride}.")
    if self.mode not in ("fixed", "strided"):
      raise ValueError(f"Strided mode must be 'fixed' or 'strided', got {self.mode!r}.")

  def expand(self) -> Mask:
    s = self.stride
    if self.mode == "strided":
      m = SlidingWindow(s - 1, 0 if self.causal else s - 1) | DiagonalStride(s)
    else:
      m = SameBlock(s) | KeyStride(s, s - self.num_summary, s)
    return Causal() & m if self.causal else m


@dataclasses.dataclass(frozen=True)
class Modality(Composite):
  """EE-MLLM composite attention (arXiv:2408.11795) from per-position modality ids.

  Text queries (``modality_ids[i] == text_id``) attend causally to every key
  (visual and text); any other query (a visual token) attends only to itself
  (``j == i``): no attention among visual tokens, and visual tokens never see
  text. For the paper's layout ``[visual; text]`` use
  :meth:`vision_then_text`.
  """
  modality_ids: Tuple[int, ...]
  text_id: int = 0

  def __post_init__(self):
    object.__setattr__(self, "modality_ids", check_ids("Modality", "modality_ids",
                                                     self.modality_ids))
    check_int("Modality", "text_id", self.text_id, 0)

  @classmethod
  def vision_then_text(cls, num_visual: int, num_text: int) -> "Modality":
    check_int("Modality", "num_visual", num_visual, 0)
    check_int("Modality", "num_text", num_text, 0)
    return cls((1,) * num_visual + (0,) * num_text, text_id=0)

  def __repr__(self):
    return f"Modality(<{len(self.modality_ids)} ids>, text_id={self.text_id})"

  def check_positions(self, q_pos, k_pos):
    check_position_range("Modality(modality_ids)", len(self.modality_ids), q_pos, k_pos)

  def expand(self) -> Mask:
    ids = np.asarray(self.modality_ids)
    text = tuple(int(p) for p in np.nonzero(ids == self.text_id)[0])
    other = tuple(int(p) for p in np.nonzero(ids != self.text_id)[0])
    return (QueryIn(text) & Causal()) | (QueryIn(other) & SlidingWindow(0, 0))


@dataclasses.dataclass(frozen=True)
class PerHead(Mask):
  """A different mask per head: head ``h`` uses ``masks[h]``.

  Heads sharing the same mask are evaluated together, so ``PerHead`` of two
  distinct masks costs two predicate evaluations whatever the head count.
  """
  masks: Tuple[Mask, ...]

  def __post_init__(self):
    ms = tuple(self.masks)
    if not ms or not all(isinstance(m, Mask) for m in ms):
      raise ValueError(f"PerHead masks must be a non-empty sequence of Masks, got {self.masks!r}.")
    object.__setattr__(self, "masks", ms)

  @property
  def num_heads(self):  # type: ignore[override]
    return len(self.masks)

  @property
  def head_dependent(self):
    return True

  @property
  def needs_segments(self):  # type: ignore[override]
    return any(m.needs_segments for m in self.masks)

  def validate(self, num_heads, q_pos, k_pos):
    Mask.validate(self, num_heads, q_pos, k_pos)
    for m in dict.fromkeys(self.masks):
      m.validate(1 if m.num_heads is None else m.num_heads, q_pos, k_pos)

  def check_positions(self, q_pos, k_pos):
    for m in dict.fromkeys(self.masks):
      m.check_positions(q_pos, k_pos)

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    out = None
    for m, heads in _groups(self.masks):
      sel = head != head
      for h in heads:
        sel = sel | (head == h)
      term = sel & m.predicate(head, q_pos, k_pos, q_seg, k_seg)
      out = term if out is None else out | term
    return out

  def block_bounds(self, head, q_lo, q_hi, k_lo, k_hi):
    return self.masks[head].block_bounds(head, q_lo, q_hi, k_lo, k_hi)

  def classify_block(self, head, q_lo, q_hi, k_lo, k_hi):
    return self.masks[head].classify_block(head, q_lo, q_hi, k_lo, k_hi)


@functools.lru_cache(maxsize=64)
def _groups(masks):
  order = {}
  for h, m in enumerate(masks):
    order.setdefault(m, []).append(h)
  return tuple((m, tuple(hs)) for m, hs in order.items())


@dataclasses.dataclass(frozen=True)
class RandomBlocks(Mask):
  """BigBird random attention: ``num_random`` random key blocks per query block and head.

  Defined on a grid of ``block_size`` tokens over ``[0, seq_len)``. For every
  head ``h < num_heads`` and query block, the key blocks are drawn without
  replacement with ``np.random.default_rng((seed, h))`` among the candidates:
  all key blocks (``kb <= qb`` when ``causal``), minus those with
  ``|kb - qb| < exclude_window`` (2 excludes BigBird's 3-block window) and the first/last
  ``exclude_global`` blocks (so that with BigBird's window and global blocks
  each row has exactly ``num_random`` extra blocks). Rows with fewer
  candidates take them all. Deterministic for a fixed seed.
  BigBird-ITC = ``SlidingWindow`` blocks | global blocks | ``RandomBlocks``.
  """
  block_size: int
  num_random: int
  seq_len: int
  seed: int = 0
  num_heads: int = 1
  causal: bool = False
  exclude_window: int = 0
  exclude_global: int = 0

  def __post_init__(self):
    check_int("RandomBlocks", "block_size", self.block_size, 1)
    check_int("RandomBlocks", "num_random", self.num_random, 0)
    check_int("RandomBlocks", "seq_len", self.seq_len, 1)
    check_int("RandomBlocks", "seed", self.seed, 0)
    check_int("RandomBlocks", "num_heads", self.num_heads, 1)
    check_int("RandomBlocks", "exclude_window", self.exclude_window, 0)
    check_int("RandomBlocks", "exclude_global", self.exclude_global, 0)
    if self.seq_len % self.block_size:
      raise ValueError(f"RandomBlocks block_size={self.block_size} does not divide "
                       f"seq_len={self.seq_len}.")

  @property
  def head_dependent(self):
    return self.num_heads > 1

  def table(self) -> np.ndarray:
    """bool [num_heads, nb, nb]: the random blocks of every head and query block."""
    return _random_table(self)

  def validate(self, num_heads, q_pos, k_pos):
    if self.num_heads > 1:
      Mask.validate(self, num_heads, q_pos, k_pos)

  def check_positions(self, q_pos, k_pos):
    check_position_range(f"RandomBlocks(seq_len={self.seq_len})", self.seq_len, q_pos, k_pos)

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    b = self.block_size
    h = head if self.num_heads > 1 else head * 0
    val, ok = lookup(self.table(), h, q_pos // b, k_pos // b)
    return val & ok & (q_pos >= 0) & (k_pos >= 0)

  exact_bounds = True

  def classify_block(self, head, q_lo, q_hi, k_lo, k_hi):
    sat = _random_sat(self, head if self.num_heads > 1 else 0)
    return grid_bounds(sat, self.block_size, q_lo, q_hi, k_lo, k_hi)


@functools.lru_cache(maxsize=16)
def _random_table(m: RandomBlocks) -> np.ndarray:
  nb = m.seq_len // m.block_size
  out = np.zeros((m.num_heads, nb, nb), bool)
  kb = np.arange(nb)
  for h in range(m.num_heads):
    rng = np.random.default_rng((m.seed, h))
    for qb in range(nb):
      ok = np.abs(kb - qb) >= m.exclude_window
      ok &= (kb >= m.exclude_global) & (kb < nb - m.exclude_global)
      if m.causal:
        ok &= kb <= qb
      cand = kb[ok]
      pick = cand if len(cand) <= m.num_random else rng.choice(cand, m.num_random, replace=False)
      out[h, qb, pick] = True
  return out


@functools.lru_cache(maxsize=16)
def _random_sat(m: RandomBlocks, head: int) -> np.ndarray:
  return summed_area(_random_table(m)[head])

