"""Block-sparse flash engine: one engine for every static or run-time block mask."""
from attnjax.block_sparse.api import fast_attention, run_engine
