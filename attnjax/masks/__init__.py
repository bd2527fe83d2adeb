"""Masks as data: composable predicates compiled into block layouts."""
from attnjax.masks.base import And, Causal, Full, Mask, Not, Or, SlidingWindow
from attnjax.masks.layout import BlockLayout, build_block_layout, layout_from_block_mask
