"""Masks as data: composable predicates compiled into block layouts."""
from attnjax.masks.base import (And, Causal, Composite, Full, Mask, Not, Or, SlidingWindow)
from attnjax.masks.documents import AnchorDocuments, Documents
from attnjax.masks.layout import BlockLayout, build_block_layout, layout_from_block_mask
from attnjax.masks.patterns import (GlobalTokens, Modality, PerHead, RandomBlocks, SinkWindow,
                                    Strided)
from attnjax.masks.primitives import (DiagonalStride, KeyIn, KeyRange, KeyStride, QueryIn,
                                      QueryRange, SameBlock)
from attnjax.masks.s2 import S2, is_kv_cache_efficient, s2_block_mask
from attnjax.masks.shifted import ShiftedGroups
from attnjax.masks.neighborhood import Neighborhood
