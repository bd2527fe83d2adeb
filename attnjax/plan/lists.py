"""Run-time block lists (computed under jit) as a plan: forward and backward lists."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import validation as V
from attnjax.masks import layout as LY


def pad_rows(indices, counts):
  """Entries past a row's count repeat its last listed block (0 for empty rows).

  indices [..., k] int32, counts [...] int32 in [0, k]. On TPU a repeated
  block index issues no new copy, so padded grid steps cost nothing.
  """
  k = indices.shape[-1]
  last = jnp.take_along_axis(indices, jnp.maximum(counts - 1, 0)[..., None], -1)
  last = jnp.where(counts[..., None] > 0, last, 0)
  return jnp.where(jnp.arange(k, dtype=jnp.int32) < counts[..., None], indices, last)


def csc_from_csr(indices, counts, nq: int, nk: int):
  """Per k-block lists of the q-blocks that visit it, from per q-block lists.

  One sort of (k-block, q-block) keys per (batch, head) and a binary search of
  the k-block boundaries; the static width is nq.

  Args:
    indices: int32 [B, Hl, nq, k], entries in [0, nk); the first ``counts``
      entries of a row are distinct.
    counts: int32 [B, Hl, nq] in [0, k].

  Returns:
    (q_indices int32 [B, Hl, nk, nq] in ascending q-block order, entries past
     the count repeating the last one; q_counts int32 [B, Hl, nk]).
  """
  Bl, Hl, _, k = indices.shape
  valid = jnp.arange(k, dtype=jnp.int32) < counts[..., None]
  q_of = jnp.arange(nq, dtype=jnp.int32)[:, None]
  sentinel = nk * nq  # sorts after every real key
  keys = jnp.where(valid, indices * nq + q_of, sentinel).reshape(Bl, Hl, nq * k)
  keys = jnp.sort(keys, axis=-1)
  bounds = jnp.arange(nk + 1, dtype=jnp.int32) * nq
  find = lambda row: jnp.searchsorted(row, bounds, side="left").astype(jnp.int32)
  starts = jax.vmap(jax.vmap(find))(keys)                              # [B, Hl, nk + 1]
  q_counts = jnp.minimum(starts[..., 1:] - starts[..., :-1], nq)       # [B, Hl, nk]
  j = jnp.minimum(jnp.arange(nq, dtype=jnp.int32), jnp.maximum(q_counts - 1, 0)[..., None])
  pos = jnp.minimum(starts[..., :-1, None] + j, nq * k - 1).reshape(Bl, Hl, nk * nq)
  q_idx = (jnp.take_along_axis(keys, pos, -1) % nq).reshape(Bl, Hl, nk, nq)
  return jnp.where(q_counts[..., None] > 0, q_idx, 0), q_counts


def from_lists(kv_block_indices, kv_block_counts, d: V.Dims, block_q: int, block_kv: int, *,
               mask: Optional[object] = None) -> LY.BlockLayout:
  """The plan of run-time block lists (validated; may be traced).

  Args:
    kv_block_indices: int [B, N or K, T // block_q, k]: the k-blocks each
      q-block visits (per query head or shared by the query heads of a KV
      head); the first ``count`` entries of a row must be distinct. Indices
      are clipped to [0, S // block_kv), as every backend documents.
    kv_block_counts: int [B, N or K, T // block_q] listed entries per row, or
      None (all k).
    d: the call's sizes; block_q, block_kv: must divide T and S.
    mask: the Mask evaluated inside every listed block, or None.

  Returns:
    a batched BlockLayout (default bottom-right offsets) whose forward lists
    are the padded rows (``pad_rows``) and backward lists ``csc_from_csr`` of
    them; every listed block is partial with a mask, full without.
  """
  idx, counts = V.check_block_lists(kv_block_indices, kv_block_counts, d, block_q, block_kv)
  if kv_block_counts is None:   # static: every row full (no masking of padded entries)
    counts = np.full(idx.shape[:3], idx.shape[-1], np.int32)
  nq, nk = d.T // block_q, d.S // block_kv
  bwd_idx, bwd_counts = csc_from_csr(idx, counts, nq, nk)
  return LY.BlockLayout(d.T, d.S, block_q, block_kv, idx.shape[1], d.S - d.T, 0, None,
                        pad_rows(idx, counts), None, counts, bwd_idx, None, bwd_counts,
                        mask=mask, batched=True,
                        list_kind=LY.PARTIAL if mask is not None else LY.FULL)
