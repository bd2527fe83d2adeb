"""Block-sparse attention on an explicit layout or mask, and on run-time block lists.

``block_sparse_attention`` takes a static :class:`~attnjax.masks.BlockLayout`
(or a ``Mask``, compiled into one); ``block_sparse_attention_indices`` takes
per-(batch, head, q-block) lists of k-blocks computed under ``jit`` (e.g. by
a top-k of block scores: Routing, BiFormer, SeerAttention, HiP, ...), which
become a plan of the same type (``attnjax.plan.from_lists``). Both visit only
the listed blocks, forward and backward, on the XLA engine or the kernels.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from attnjax import plan as PL
from attnjax.block_sparse import api as A
from attnjax.core import validation as V
from attnjax.core.reference import dense_visibility, reference_attention
from attnjax.masks import layout as LY
from attnjax.masks.base import Mask
from pallas_kernels.block_sparse import resources

#: q-block merging of small layout blocks ("Merge-Q"): merged rows reach this size.
MERGE_Q_ROWS = 256


def _check_layout(layout: LY.BlockLayout, d: V.Dims):
  if layout.q_len != d.T or layout.kv_len != d.S:
    raise ValueError(
        f"layout was built for q_len={layout.q_len}, kv_len={layout.kv_len}; the inputs "
        f"have T={d.T} (query {d.B, d.T, d.N, d.H}) and S={d.S}.")
  if layout.num_heads not in (1, d.K, d.N):
    raise ValueError(
        f"layout has num_heads={layout.num_heads}; expected 1, the query heads N={d.N} or "
        f"the KV heads K={d.K}.")
  if (layout.num_heads == d.K and d.K not in (1, d.N) and layout.mask is not None
      and layout.mask.head_dependent):
    raise ValueError(
        f"layout has one head per KV head (K={d.K}) but its mask depends on the head: build "
        f"it for the N={d.N} query heads (e.g. S2(num_heads=N, num_kv_heads=K)).")
  if layout.mask is None and (layout.block_mask == LY.PARTIAL).any():
    raise ValueError(
        "layout has partial blocks but no mask to evaluate inside them (layout.mask is None); "
        "build it with Mask.block_layout or give only full/empty blocks.")


def _merge_factor(layout: LY.BlockLayout) -> int:
  if layout.mask is None:
    return 1
  f = 1
  while (layout.block_q * f * 2 <= MERGE_Q_ROWS and layout.num_q_blocks % (f * 2) == 0):
    f *= 2
  return f


def block_sparse_attention(query, key, value, layout_or_mask, *, score=None, scale=None,
                           segment_ids=None, return_lse=False, implementation=None):
  """Attention restricted to the blocks of a static layout (or mask).

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv].
    layout_or_mask: a ``BlockLayout`` for (T, S) with 1, K or N heads (its
      ``q_offset``/``k_offset`` give the positions the mask is evaluated on),
      or a ``Mask`` (default bottom-right aligned positions).
    score, scale, segment_ids, return_lse: as ``attnjax.attention``.
    implementation: "xla", "pallas" or None (the kernels on a TPU/GPU target they
      compile for, see ``pallas_kernels.targets.support``; "xla" elsewhere).

  Returns:
    out [B, T, N, Hv] (and lse [B, T, N] float32).
  """
  query, key, value = V.as_arrays(query, key, value)
  d = V.check_qkv(query, key, value)
  if isinstance(layout_or_mask, Mask):
    call = A.attention_call(query, key, value, mask=layout_or_mask, score=score, scale=scale)
    implementation = A.check_impl(implementation, call)
    kwargs = dict(mask=layout_or_mask, score=score, scale=scale, segment_ids=segment_ids,
                  return_lse=return_lse)
    if implementation == "reference":
      return reference_attention(query, key, value, **kwargs)
    return A.run_attention(query, key, value, backend=implementation, **kwargs)
  if not isinstance(layout_or_mask, LY.BlockLayout):
    raise TypeError(f"layout_or_mask must be a BlockLayout or a Mask, got "
                    f"{type(layout_or_mask).__name__}.")
  layout = layout_or_mask
  _check_layout(layout, d)
  call = A.attention_call(query, key, value, score=score, scale=scale, layout=layout)
  implementation = A.check_impl(implementation, call)
  if implementation == "reference":
    return _layout_reference(query, key, value, layout, score=score, scale=scale,
                             segment_ids=segment_ids, return_lse=return_lse)
  segs = V.check_segment_ids(segment_ids, d)
  if layout.mask is not None and layout.mask.needs_segments and segs is None:
    raise ValueError(f"layout mask {layout.mask!r} reads segment ids: pass segment_ids.")
  if implementation == "pallas":
    layout = _kernel_layout(layout, d, query, key, value)
    return A.run_pallas(query, key, value, layout, score=score, scale=scale,
                     segment_ids=segment_ids, return_lse=return_lse)
  q_pos = layout.q_offset + jnp.arange(d.T, dtype=jnp.int32)
  k_pos = layout.k_offset + jnp.arange(d.S, dtype=jnp.int32)
  layout = PL.at_blocks(layout, layout.block_q * _merge_factor(layout), layout.block_kv)
  return A.run_engine(query, key, value, layout, score=score, scale=scale, q_pos=q_pos,
                      k_pos=k_pos, segs=segs, return_lse=return_lse)


def _layout_reference(query, key, value, layout, **kwargs):
  """The dense oracle on a layout's visibility at its positions.

  A layout built from a Mask lists every block that mask touches, so its
  visibility is the mask's; a layout given as a block array sees its listed
  blocks whole.
  """
  d = V.check_qkv(query, key, value)
  q_pos = layout.q_offset + np.arange(d.T, dtype=np.int32)
  k_pos = layout.k_offset + np.arange(d.S, dtype=np.int32)
  mask = layout.mask
  if mask is None:
    bm = np.asarray(layout.block_mask) != LY.EMPTY                    # [Nl, nq, nk]
    vis = np.repeat(np.repeat(bm, layout.block_q, 1), layout.block_kv, 2)[:, :d.T, :d.S]
    if layout.num_heads not in (1, d.N):
      vis = np.repeat(vis, d.N // layout.num_heads, 0)                # per KV head -> query heads
    mask = jnp.asarray(vis)[None]
  return reference_attention(query, key, value, mask=mask, q_positions=q_pos,
                             k_positions=k_pos, **kwargs)


def _kernel_layout(layout: LY.BlockLayout, d: V.Dims, *arrays) -> LY.BlockLayout:
  """The layout at blocks a placed TPU's kernels accept (``resources.tpu_aligned_blocks``).

  A layout on finer blocks (S2-Attention's 64-token blocks) is re-blocked at
  the least multiples of its blocks that qualify (``attnjax.plan.at_blocks``,
  exact: its mask is evaluated in the merged partial blocks), for the N query
  heads unless it has one head. Other targets, qualifying blocks and layouts
  without a mask are returned unchanged (the kernels then check the blocks
  themselves).
  """
  if A.kernel_platform(*arrays) != "tpu" or layout.mask is None:
    return layout
  bq, bk = resources.tpu_aligned_blocks(layout.block_q, layout.block_kv)
  if (bq, bk) == (layout.block_q, layout.block_kv) or d.T % bq or d.S % bk:
    return layout
  return PL.at_blocks(layout, bq, bk, 1 if layout.num_heads == 1 else d.N)


def block_sparse_attention_indices(query, key, value, kv_block_indices, kv_block_counts=None,
                                   *, block_q: int, block_kv: int, mask=None, score=None,
                                   scale=None, q_positions=None, k_positions=None,
                                   segment_ids=None, return_lse=False, implementation=None,
                                   dropout_rate=0.0, dropout_rng=None):
  """Attention over k-block lists computed at run time (content-based sparsity).

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv].
    kv_block_indices: int [B, N or K, T // block_q, k] (k static): the k-blocks
      each q-block visits (per query head, or shared by the query heads of a
      KV head). Entries past the count are ignored; the first ``count``
      entries of a row must be distinct.
    kv_block_counts: int [B, N or K, T // block_q] valid entries per row
      (default: all k).
    block_q, block_kv: block sizes; must divide T and S.
    mask: optional ``Mask`` applied element-wise inside the visited blocks
      (e.g. ``Causal()``); positions and segment ids as ``attnjax.attention``.
    implementation: "xla" (default), None, "pallas" (the TPU/GPU kernels of
      ``pallas_kernels.block_sparse``, scalar-prefetched lists; interpret mode
      off their platform), or "reference" (the dense oracle on the visibility
      the lists define; O(T * S) memory).
    dropout_rate, dropout_rng: attention dropout as ``attnjax.attention`` (the
      same keep mask on every implementation).

  Returns:
    out [B, T, N, Hv] (and lse [B, T, N] float32). Gradients flow to q, k, v
    (the indices are integers).
  """
  if implementation == "reference":
    return _indices_reference(query, key, value, kv_block_indices, kv_block_counts,
                              block_q=block_q, block_kv=block_kv, mask=mask, score=score,
                              scale=scale, q_positions=q_positions, k_positions=k_positions,
                              segment_ids=segment_ids, return_lse=return_lse,
                              dropout_rate=dropout_rate, dropout_rng=dropout_rng)
  query, key, value = V.as_arrays(query, key, value)
  call = A.attention_call(query, key, value, score=score, scale=scale, layout=True)
  implementation = A.check_impl(implementation, call)
  d = V.check_qkv(query, key, value)
  if mask is not None and not isinstance(mask, Mask):
    raise TypeError(f"mask must be an attnjax Mask or None, got {type(mask).__name__}.")
  layout = PL.from_lists(kv_block_indices, kv_block_counts, d, block_q, block_kv, mask=mask)
  if implementation == "pallas":
    return A.run_pallas(query, key, value, layout, score=score, scale=scale,
                     q_positions=q_positions, k_positions=k_positions,
                     segment_ids=segment_ids, return_lse=return_lse,
                     dropout_rate=dropout_rate, dropout_rng=dropout_rng)
  q_pos, k_pos = V.check_positions(q_positions, k_positions, d)
  segs = V.check_segment_ids(segment_ids, d)
  if mask is not None and mask.needs_segments and segs is None:
    raise ValueError(f"mask {mask!r} reads segment ids: pass segment_ids.")
  return A.run_engine(query, key, value, layout, score=score, scale=scale, q_pos=q_pos,
                      k_pos=k_pos, segs=segs, return_lse=return_lse,
                      dropout_rate=dropout_rate, dropout_rng=dropout_rng)


def _indices_reference(query, key, value, indices, counts, *, block_q, block_kv, mask, score,
                       scale, q_positions, k_positions, segment_ids, return_lse,
                       dropout_rate=0.0, dropout_rng=None):
  """Dense oracle for ``block_sparse_attention_indices`` (the lists as a [B, N, T, S] mask)."""
  d = V.check_qkv(query, key, value)
  nk = d.S // block_kv
  idx = jnp.asarray(indices, jnp.int32)
  k = idx.shape[-1]
  cnt = jnp.full(idx.shape[:3], k, jnp.int32) if counts is None else jnp.asarray(counts)
  valid = jnp.arange(k) < cnt[..., None]
  blocks = ((idx[..., None] == jnp.arange(nk)) & valid[..., None]).any(-2)   # [B, Hi, nq, nk]
  vis = jnp.repeat(jnp.repeat(blocks, block_q, 2), block_kv, 3)
  vis = jnp.repeat(vis, d.N // vis.shape[1], 1)
  if mask is not None:
    q_pos, k_pos = V.check_positions(q_positions, k_positions, d)
    vis = vis & dense_visibility(mask, d, q_pos, k_pos, V.check_segment_ids(segment_ids, d))
  return reference_attention(query, key, value, mask=vis, score=score, scale=scale,
                             q_positions=q_positions, k_positions=k_positions,
                             segment_ids=segment_ids, return_lse=return_lse,
                             dropout_rate=dropout_rate, dropout_rng=dropout_rng)
