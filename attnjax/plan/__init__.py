"""The compiled block plan shared by the block-sparse backends.

``BlockLayout`` (``attnjax.masks.layout``) is the plan type: a static mask
compiles into one (``Mask.block_layout``), run-time block lists become one
(``from_lists``), and ``at_blocks`` re-blocks one for a backend's block sizes.
"""
from attnjax.masks.layout import BlockLayout
from attnjax.plan.blocks import at_blocks, coarsen_block_mask
from attnjax.plan.lists import csc_from_csr, from_lists, pad_rows

__all__ = ["BlockLayout", "at_blocks", "coarsen_block_mask", "csc_from_csr", "from_lists",
           "pad_rows"]
