"""Block-sparse flash engine: one engine for every static or run-time block mask."""
from attnjax.block_sparse.api import fast_attention
from attnjax.block_sparse.sparse import block_sparse_attention, block_sparse_attention_indices
