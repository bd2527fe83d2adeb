"""Pallas block-sparse flash attention (TPU Mosaic and GPU Triton kernels).

Drives any ``attnjax.masks.BlockLayout`` (causal, windows, S2-Attention's
per-head strided layouts, documents, ...): only listed blocks are computed,
full blocks skip the element mask. See ``api.block_sparse_pallas``; block
lists computed at run time (content-based sparsity) run the same kernels
through ``runtime.block_sparse_pallas_indices``.
"""
from pallas_kernels.block_sparse.api import BACKENDS, block_sparse_pallas
from pallas_kernels.block_sparse.runtime import block_sparse_pallas_indices

__all__ = ["BACKENDS", "block_sparse_pallas", "block_sparse_pallas_indices"]
