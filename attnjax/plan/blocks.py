"""Re-blocking a static plan for a backend's block sizes."""
from __future__ import annotations

from typing import Optional

import numpy as np

from attnjax.masks import layout as LY


def coarsen_block_mask(block_mask: np.ndarray, factor_q: int, factor_k: int = 1) -> np.ndarray:
  """Merges ``factor_q`` x ``factor_k`` neighbouring blocks of [H, nq, nk] kinds: a merged
  block is full only when all its fine blocks are full, empty only when all are empty
  (exact when the fine kinds are)."""
  H, nq, nk = block_mask.shape
  if factor_q == 1 and factor_k == 1:
    return block_mask
  bm = block_mask.reshape(H, nq // factor_q, factor_q, nk // factor_k, factor_k)
  any_ = (bm != LY.EMPTY).any((2, 4))
  all_ = (bm == LY.FULL).all((2, 4))
  return np.where(all_, LY.FULL, np.where(any_, LY.PARTIAL, LY.EMPTY)).astype(np.int8)


def at_blocks(layout: LY.BlockLayout, block_q: int, block_kv: int,
              num_heads: Optional[int] = None) -> LY.BlockLayout:
  """The static plan ``layout`` at multiples (block_q, block_kv) of its blocks.

  Blocks merge exactly (``coarsen_block_mask``); ``num_heads`` (a multiple of
  the layout's heads) repeats each layout head over that many heads, e.g. a
  plan per KV head for the query heads. A layout without a mask cannot gain
  partial blocks (it has nothing to evaluate inside them): ValueError.
  """
  if layout.block_mask is None:
    raise ValueError("run-time block lists cannot be re-blocked; choose their blocks "
                     "when the lists are made.")
  heads = layout.num_heads if num_heads is None else int(num_heads)
  if (block_q, block_kv, heads) == (layout.block_q, layout.block_kv, layout.num_heads):
    return layout
  fq, fk = block_q // layout.block_q, block_kv // layout.block_kv
  if (block_q % layout.block_q or block_kv % layout.block_kv or layout.num_q_blocks % fq
      or layout.num_kv_blocks % fk or heads % layout.num_heads):
    raise ValueError(
        f"cannot re-block a layout of blocks ({layout.block_q}, {layout.block_kv}), "
        f"{layout.num_heads} head(s), lengths ({layout.q_len}, {layout.kv_len}) to blocks "
        f"({block_q}, {block_kv}), {heads} head(s): they must be multiples that divide "
        "the lengths.")
  bm = coarsen_block_mask(np.asarray(layout.block_mask), fq, fk)
  if layout.mask is None and (bm == LY.PARTIAL).any() and not (
      layout.block_mask == LY.PARTIAL).any():
    raise ValueError(
        f"blocks ({block_q}, {block_kv}) would merge empty and full blocks of a layout "
        "without a mask into partial ones, which have nothing to evaluate.")
  bm = np.repeat(bm, heads // layout.num_heads, 0)
  return LY.layout_from_block_mask(bm, layout.q_len, layout.kv_len, block_q, block_kv,
                                   q_offset=layout.q_offset, k_offset=layout.k_offset,
                                   mask=layout.mask)
