"""Block-sparse flash engine: one engine for every static or run-time block mask.

Entry points: ``fast_attention`` (the "xla"/"pallas" paths of
``attnjax.attention``), ``block_sparse_attention`` (a static layout or mask),
``block_sparse_attention_indices`` (k-block lists computed at run time), the
static families and ``FAMILIES`` (config names for the Flax layer). The cost
of building a layout at T = 128k is documented in ``attnjax.block_sparse.api``.
"""
from attnjax.block_sparse.api import fast_attention
from attnjax.block_sparse.families import (LayerSpec, anchor_attention, bigbird_attention,
                                           bigbird_mask, block_local_attention,
                                           composite_attention, longformer_attention,
                                           masformer_layer_specs, sliding_window_attention,
                                           streaming_attention)
from attnjax.block_sparse.registry import FAMILIES
from attnjax.block_sparse.sparse import block_sparse_attention, block_sparse_attention_indices
from attnjax.block_sparse.strided import (s2_attention, s2_block_layout, s2_mask,
                                          shifted_group_attention)

__all__ = [
    "FAMILIES", "LayerSpec", "anchor_attention", "bigbird_attention", "bigbird_mask",
    "block_local_attention", "block_sparse_attention", "block_sparse_attention_indices",
    "composite_attention", "fast_attention", "longformer_attention", "masformer_layer_specs",
    "s2_attention", "s2_block_layout", "s2_mask", "shifted_group_attention",
    "sliding_window_attention", "streaming_attention",
]
