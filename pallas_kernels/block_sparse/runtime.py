"""Pallas block-sparse kernels on block lists computed at run time (under jit).

Content-based sparse attention (Routing Transformer, BiFormer, SeerAttention,
HiP, ...) picks each q-block's k-blocks from the data, so its lists are traced
arrays, not a static ``BlockLayout``. ``block_sparse_pallas_indices`` runs the
same forward, dQ and dK/dV kernels as ``block_sparse_pallas`` on such lists:

- lists carry a batch axis (``KernelConfig.lists_batched``) and one list set
  per query head or per KV head (the kernels map query head h to list head
  ``h // G``; nothing is repeated);
- the backward's per-k-block lists of visiting q-blocks (CSC) are derived
  under jit by one sort of (k-block, q-block) keys per (batch, head) and a
  binary search of the k-block boundaries; their static width is nq;
- every block is "full" when there is neither a mask nor segment ids, else
  "partial" (the mask predicate runs inside every visited block; segment ids
  alone are tested on "full" blocks, which is the same computation).

All shapes depend only on (B, heads, nq, nk, k): changing the list contents
never retraces or recompiles. TPU note: the lists are scalar-prefetched into
SMEM; forward lists hold B * Hl * nq * k entries and backward lists
B * Hl * nk * nq, which must fit in SMEM on real chips.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.core import validation as V
from pallas_kernels.block_sparse import api as A
from pallas_kernels.block_sparse import common as C
from attnjax.masks.base import Mask


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


def _prepare(query, key, value, list_heads, max_kb, *, block_q, block_kv, mask, score, scale,
             q_positions, k_positions, segment_ids, interpret, tiles, tiles_forced=False):
  """Validates the rest; returns (KernelConfig, aux arrays, sinks or None)."""
  d = V.check_qkv(query, key, value)
  score = A.check_score(score)
  scale = C.check_static_scale(V.check_scale(scale, d.H))
  if mask is not None and not isinstance(mask, Mask):
    raise ValueError(f"mask must be an attnjax Mask or None, got {type(mask).__name__}.")
  segs = V.check_segment_ids(segment_ids, d)
  if mask is not None and mask.needs_segments and segs is None:
    raise ValueError(f"mask {mask!r} reads segment ids: pass segment_ids.")
  q_pos, k_pos = A.position_arrays(q_positions, k_positions, d)
  if mask is not None:
    dq, dk = V.default_positions(d.T, d.S)
    mask.validate(d.N, dq if q_pos is None else q_pos, dk if k_pos is None else k_pos)
  partial = mask is not None
  sinks = C.sink_vector(score, d.N) if score.normalization == "softmax" else None
  reads_segments = mask is not None and mask.needs_segments
  cfg = C.KernelConfig(
      B=d.B, T=d.T, S=d.S, N=d.N, K=d.K, H=d.H, Hv=d.Hv,
      block_q=int(block_q), block_kv=int(block_kv), layout_heads=int(list_heads),
      max_kb=int(max_kb), max_qb=d.T // int(block_q),
      any_full=not partial, any_partial=partial, scale=scale, score=score, mask=mask,
      has_segments=segs is not None,
      segment_test_on_full=segs is not None and not reads_segments,
      q_offset=d.S - d.T, k_offset=0,
      has_q_pos=q_pos is not None, has_k_pos=k_pos is not None,
      pos_batched=(q_pos is not None and q_pos.shape[0] == d.B and d.B > 1,
                   k_pos is not None and k_pos.shape[0] == d.B and d.B > 1),
      out_dtype=jnp.float32 if sinks is not None else query.dtype,
      interpret=interpret, tiles=tiles, lists_batched=True)
  cfg = A.fit_config(cfg, query, key, value, tiles_forced)
  aux = C.Aux(q_pos, k_pos, *(segs if segs is not None else (None, None)))
  return cfg, aux, sinks


def _expander(cfg, module):
  """expand(lists, backward) for ``api.make_attention``: kernel lists under jit."""

  def expand(lists, backward):
    idx, counts = lists
    fwd = (pad_rows(idx, counts), counts)
    bwd = csc_from_csr(idx, counts, cfg.nq, cfg.nk) if backward else None
    return module.runtime_lists(cfg, fwd, bwd)

  return expand


def build(query, key, value, kv_block_indices, kv_block_counts, *, block_q, block_kv, mask,
          score, scale, q_positions, k_positions, segment_ids, interpret, backend, tiles):
  """(attend, cfg, args): ``attend(*args)`` -> (out [B,T,N,Hv], lse [B,N,T])."""
  backend, interpret = A.resolve_backend(backend, interpret, query, key, value)
  d = V.check_qkv(query, key, value)
  idx, counts = V.check_block_lists(kv_block_indices, kv_block_counts, d, block_q, block_kv)
  module = A._MODULES[backend]  # pylint: disable=protected-access
  kernel_tiles = ()
  if backend == "gpu":
    kernel_tiles = A._gpu_tiles(  # pylint: disable=protected-access
        tiles, block_q, block_kv, interpret)
  cfg, aux, sinks = _prepare(
      query, key, value, idx.shape[1], idx.shape[-1], block_q=block_q, block_kv=block_kv,
      mask=mask, score=score, scale=scale, q_positions=q_positions, k_positions=k_positions,
      segment_ids=segment_ids, interpret=interpret, tiles=kernel_tiles,
      tiles_forced=tiles is not None)
  attend = A.make_attention(cfg, module, _expander(cfg, module))
  return attend, cfg, (query, key, value, aux, sinks, (idx, counts))


def block_sparse_pallas_indices(query, key, value, kv_block_indices, kv_block_counts=None, *,
                                block_q: int, block_kv: int, mask=None, score=None, scale=None,
                                q_positions=None, k_positions=None, segment_ids=None,
                                return_lse=False, interpret=None, backend=None, tiles=None):
  """Block-sparse flash attention (Pallas TPU/GPU kernels) over run-time block lists.

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv]; N % K == 0.
    kv_block_indices: int [B, N or K, T // block_q, k] (k static): the k-blocks
      (of ``block_kv`` keys) each q-block visits, per query head or shared by
      the G = N // K query heads of a KV head. May be traced. Entries past a
      row's count are ignored; the first ``count`` entries of a row must be
      distinct (a repeated block would be summed twice). Indices outside
      [0, S // block_kv) are clipped, as on the XLA path.
    kv_block_counts: int [B, N or K, T // block_q] listed entries per row
      (clipped to [0, k]; default: all k).
    block_q, block_kv: block sizes (kernel tiles); must divide T and S. The
      compiled TPU kernels need block_q % 8 == 0 and block_kv % 128 == 0.
    mask: optional ``Mask`` evaluated element-wise inside every visited block
      (e.g. ``Causal()``); without a mask (and without segment ids) the blocks
      are computed whole.
    score, scale, q_positions, k_positions, segment_ids, return_lse, interpret,
      backend, tiles: as ``block_sparse_pallas`` (positions default to the
      bottom-right aligned iota).

  Returns:
    out [B, T, N, Hv] in the query dtype (and lse [B, T, N] float32). Rows with
    no visible key give zeros and lse = -inf. Gradients flow to q, k, v and
    the score's sink logits; the lists are integers (no gradient).
  """
  attend, cfg, args = build(
      query, key, value, kv_block_indices, kv_block_counts, block_q=block_q,
      block_kv=block_kv, mask=mask, score=score, scale=scale, q_positions=q_positions,
      k_positions=k_positions, segment_ids=segment_ids, interpret=interpret,
      backend=backend, tiles=tiles)
  if return_lse and cfg.normalization == "none":
    raise ValueError(
        "return_lse is undefined for unnormalised scores (normalization='none'): "
        "their outputs do not merge through a log-sum-exp.")
  out, lse = attend(*args)
  if return_lse:
    return out, jnp.swapaxes(lse, 1, 2)
  return out
