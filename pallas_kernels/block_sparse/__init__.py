"""Pallas block-sparse flash attention (TPU Mosaic and GPU Triton kernels).

Drives any ``attnjax.masks.BlockLayout`` (causal, windows, S2-Attention's
per-head strided layouts, documents, ...): only listed blocks are computed,
full blocks skip the element mask. See ``api.block_sparse_pallas``.
"""
from pallas_kernels.block_sparse.api import BACKENDS, block_sparse_pallas

__all__ = ["BACKENDS", "block_sparse_pallas"]
