"""Merge-Q: coarsen a layout's query blocks (S2-Attention / DKernel, arXiv:2407.17678).

A fine layout (e.g. 64-token blocks, as S2-Attention defines its pattern) gives
small kernel tiles. Merging ``factor`` consecutive q-blocks into one row that
visits the union of their k-blocks raises the arithmetic intensity of each
tile; a merged block is *full* only when every merged block was full, else
*partial*, and the kernel then applies the mask predicate element-wise (so the
mask must describe the pattern at element level, not only the layout).
"""
from __future__ import annotations

import numpy as np

from attnjax.masks.layout import EMPTY, FULL, PARTIAL, layout_from_block_mask


def merge_q_blocks(layout, factor: int, mask=None):
  """BlockLayout with ``block_q * factor`` query blocks and the same k-blocks.

  Args:
    layout: a ``BlockLayout`` whose number of q-blocks is a multiple of ``factor``.
    factor: q-blocks merged into one (>= 1).
    mask: the element mask of the merged layout (default ``layout.mask``).
  """
  if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
    raise ValueError(f"factor must be a positive integer, got {factor!r}.")
  nq = layout.num_q_blocks
  if nq % factor:
    raise ValueError(f"factor={factor} must divide the number of q-blocks ({nq}).")
  bm = np.asarray(layout.block_mask).reshape(layout.num_heads, nq // factor, factor, -1)
  any_ = (bm != EMPTY).any(axis=2)
  all_full = (bm == FULL).all(axis=2)
  merged = np.where(all_full, FULL, np.where(any_, PARTIAL, EMPTY)).astype(np.int8)
  return layout_from_block_mask(
      merged, layout.q_len, layout.kv_len, layout.block_q * factor, layout.block_kv,
      q_offset=layout.q_offset, k_offset=layout.k_offset,
      mask=layout.mask if mask is None else mask)
