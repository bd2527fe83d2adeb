"""LongLoRA shifted sparse attention (S2-Attn, arXiv:2309.12307) and SinkLoRA's variant (arXiv:2406.05678).

"LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models" and
"SinkLoRA: Enhanced Efficiency and Chat Capabilities for Long-Context Large
Language Models".

Heads ``[0, H//2)``: the sequence of length ``L`` is cut into groups of
``G`` consecutive tokens; causal attention inside each group. Heads
``[H//2, H)``: the same after rolling tokens by ``-G//2`` (LongLoRA rolls q, k,
v, attends per group, rolls back). With ``p(i) = (i - G//2) mod L`` a shifted
head lets ``i`` see ``j`` iff ``p(i)//G == p(j)//G`` and ``p(j) <= p(i)``: the
wrap-around group holds ``[L - G//2, L)`` then ``[0, G//2)``, so the first
``G//2`` tokens see the last ``G//2`` (LongLoRA's cyclic leak, ``wrap="cyclic"``).

SinkLoRA's SF-Attn (paper description; not in the released code, so this is
our reading): ``wrap="none"`` returns the shifted groups to their un-shifted
positions, i.e. the wrap-around group is split into ``[0, G//2)`` and
``[L - G//2, L)``, each causal on its own (no leak); ``num_sink`` sink tokens
(positions ``< num_sink``) are visible, causally, to every query of every head.
"""
from __future__ import annotations

import dataclasses

from attnjax.masks.base import Causal, Composite, Mask, check_int, check_position_range
from attnjax.masks.patterns import PerHead
from attnjax.masks.primitives import KeyRange, QueryRange, SameBlock


@dataclasses.dataclass(frozen=True)
class ShiftedGroups(Composite):
  """Per-head shifted group attention over absolute positions ``[0, seq_len)``.

  Args:
    group_size: G (LongLoRA: ``seq_len // 4``); must divide ``seq_len``.
    seq_len: L, the training length the groups tile.
    num_heads: H; heads ``>= H // 2`` are shifted by ``G // 2``.
    wrap: "cyclic" (LongLoRA, with the wrap-around leak) or "none" (SinkLoRA).
    num_sink: sink tokens visible to every query (causally); 0 for LongLoRA.
  """
  group_size: int
  seq_len: int
  num_heads: int
  wrap: str = "cyclic"
  num_sink: int = 0

  def __post_init__(self):
    check_int("ShiftedGroups", "group_size", self.group_size, 1)
    check_int("ShiftedGroups", "seq_len", self.seq_len, 1)
    check_int("ShiftedGroups", "num_heads", self.num_heads, 1)
    check_int("ShiftedGroups", "num_sink", self.num_sink, 0)
    if self.seq_len % self.group_size:
      raise ValueError(f"ShiftedGroups group_size={self.group_size} does not divide "
                       f"seq_len={self.seq_len}.")
    if self.wrap not in ("cyclic", "none"):
      raise ValueError(f"ShiftedGroups wrap must be 'cyclic' or 'none', got {self.wrap!r}.")
    if self.num_sink > self.seq_len:
      raise ValueError(f"ShiftedGroups num_sink={self.num_sink} exceeds seq_len={self.seq_len}.")

  @property
  def shift(self) -> int:
    return self.group_size // 2

  def check_positions(self, q_pos, k_pos):
    check_position_range(f"ShiftedGroups(seq_len={self.seq_len})", self.seq_len, q_pos, k_pos)

  def expand(self) -> Mask:
    G, L, s = self.group_size, self.seq_len, self.shift
    plain = SameBlock(G) & Causal()
    shifted = SameBlock(G, s) & Causal()
    if self.wrap == "cyclic" and s:
      shifted = shifted | (QueryRange(0, s) & KeyRange(L - s, L))
    if self.num_sink:
      sinks = KeyRange(0, self.num_sink) & Causal()
      plain, shifted = plain | sinks, shifted | sinks
    half = self.num_heads // 2
    return PerHead((plain,) * half + (shifted,) * (self.num_heads - half))
