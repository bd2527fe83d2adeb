"""Pallas block-sparse kernels on block lists computed at run time (under jit).

Content-based sparse attention (Routing Transformer, BiFormer, SeerAttention,
HiP, ...) picks each q-block's k-blocks from the data, so its lists are traced
arrays. They become the same plan type as a static mask (a batched
``BlockLayout`` with traced list leaves, ``attnjax.plan.from_lists``), and
``block_sparse_pallas_indices`` runs ``block_sparse_pallas`` on it, i.e. the
same forward, dQ and dK/dV kernels:

- lists carry a batch axis (``KernelConfig.lists_batched``) and one list set
  per query head or per KV head (the kernels map query head h to list head
  ``h // G``; nothing is repeated);
- the backward's per-k-block lists of visiting q-blocks (CSC) are derived
  under jit (``attnjax.plan.csc_from_csr``); their static width is nq;
- every block is "full" when there is neither a mask nor segment ids, else
  "partial" (the mask predicate runs inside every visited block; segment ids
  alone are tested on "full" blocks, which is the same computation).

All shapes depend only on (B, heads, nq, nk, k): changing the list contents
never retraces or recompiles. TPU note: the lists are scalar-prefetched into
SMEM; forward lists hold B * Hl * nq * k entries and backward lists
B * Hl * nk * nq, which must fit in SMEM on real chips.
"""
from __future__ import annotations

from attnjax import plan as PL
from attnjax.core import validation as V
from attnjax.masks.base import Mask
from pallas_kernels.block_sparse import api as A


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
  A.resolve_backend(backend, interpret, query, key, value)
  if mask is not None and not isinstance(mask, Mask):
    raise ValueError(f"mask must be an attnjax Mask or None, got {type(mask).__name__}.")
  plan = PL.from_lists(kv_block_indices, kv_block_counts, V.check_qkv(query, key, value),
                       block_q, block_kv, mask=mask)
  return A.block_sparse_pallas(query, key, value, plan, score=score, scale=scale,
                               q_positions=q_positions, k_positions=k_positions,
                               segment_ids=segment_ids, return_lse=return_lse,
                               interpret=interpret, backend=backend, tiles=tiles)
