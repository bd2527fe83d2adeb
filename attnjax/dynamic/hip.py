"""HiP Attention: training-free hierarchical top-k key-block pruning (Lee et al., 2024; arXiv:2406.09827).

"HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning".

For each block of ``block_size_q`` queries, the causal key range (in key
blocks of ``block_size_k`` tokens) is split into ``m = top_k / block_size_k``
equal nodes. Each round splits every node in two, scores each child by its
*representative* key block (the first block of its span) as
``max over strided block queries and the block's keys of q . k``, and keeps
the best ``m`` children. After ``ceil(log2(n_blocks / m))`` rounds every node
is one key block; their first blocks form the layout, sorted. Attention then
runs on the selected blocks (block-sparse, causal inside the blocks).

Causality: no output reads a future key or value, but the key blocks of a
query block are scored with the block's own (strided) queries, so a query's
selection depends on up to ``block_size_q - 1`` later queries of its block.
That is HiP's design (prefill and decoding, where all queries of a block are
known together); a causal model trained through this function can see that
far ahead through the selection, which CAB's causal-self check reports
(tests/test_catalog_region_fia_cab_selective.py). ``block_size_q=1`` removes it.

Everything has static shapes (fixed ``m`` and round count), so the mask is
built under ``jit``. Defaults as in HiP's v1 code: top_k 512,
block_size_q 32, block_stride_q 2, block_size_k 2. Later releases add sink
tokens and a sliding window; those are not part of this function.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attnjax.core import validation as V
from attnjax.dynamic.gather import layout_attention
from attnjax.dynamic.select import normalize_positions, pad_block_lists

__all__ = ["hip_mask", "hip_attention"]


def hip_mask(query, key, *, top_k: int = 512, block_size_q: int = 32, block_stride_q: int = 2,
             block_size_k: int = 2, causal: bool = True, q_positions=None, k_positions=None):
  """Hierarchical top-k selection of key blocks per query block.

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; T % block_size_q == 0, S % block_size_k == 0.
    top_k: tokens kept per query block (a multiple of block_size_k).
    block_size_q: queries per block; block_stride_q: every this-th query of
      the block scores the children.
    block_size_k: key tokens per selected block.
    causal: only key blocks that hold a visible key (k_pos <= the block's
      last q_pos) are candidates. Positions are assumed increasing.

  Returns:
    (indices int32 [B, N, T/block_size_q, m], counts int32 [B, N, T/block_size_q])
    with m = top_k // block_size_k, in the padded-list convention.
  """
  d = V.check_qkv(query, key, key)
  for name, val in (("top_k", top_k), ("block_size_q", block_size_q),
                    ("block_stride_q", block_stride_q), ("block_size_k", block_size_k)):
    V.check_positive_int(name, val)
  if d.T % block_size_q or d.S % block_size_k:
    raise ValueError(f"block_size_q={block_size_q} must divide T={d.T} and block_size_k="
                     f"{block_size_k} must divide S={d.S}.")
  if top_k % block_size_k:
    raise ValueError(f"top_k={top_k} must be a multiple of block_size_k={block_size_k}.")
  nq, nk = d.T // block_size_q, d.S // block_size_k
  m = top_k // block_size_k
  if m > nk:
    raise ValueError(f"top_k={top_k} is more than the {d.S} keys (m={m} blocks > nk={nk}); "
                     f"use top_k <= S.")
  q_pos, k_pos = normalize_positions(q_positions, k_positions, d)
  if causal:
    qmax = q_pos.reshape(q_pos.shape[0], nq, block_size_q).max(-1)
    kmin = k_pos.reshape(k_pos.shape[0], nk, block_size_k).min(-1)
    n_valid = (kmin[:, None, :] <= qmax[:, :, None]).sum(-1)  # [B|1, nq]
  else:
    n_valid = jnp.full((1, nq), nk)
  n_valid = jnp.broadcast_to(n_valid[:, None, :], (d.B, d.N, nq)).astype(jnp.int32)

  g = d.N // d.K
  qs = query.reshape(d.B, nq, block_size_q, d.N, d.H)[:, :, ::block_stride_q].astype(jnp.float32)
  qs = jnp.transpose(qs, (0, 3, 1, 2, 4))  # [B, N, nq, r, H]
  kb = jnp.transpose(key.reshape(d.B, nk, block_size_k, d.K, d.H), (0, 3, 1, 2, 4))
  kb = kb.astype(jnp.float32)  # [B, K, nk, bk, H]
  bi = jnp.arange(d.B)[:, None, None, None]
  hi = (jnp.arange(d.N) // g)[None, :, None, None]

  def score(lo, size):
    rep = kb[bi, hi, jnp.clip(lo, 0, nk - 1)]  # [B, N, nq, c, bk, H]
    s = jnp.einsum("bnqrh,bnqckh->bnqcrk", qs, rep).max(axis=(-1, -2))
    return jnp.where(size > 0, s, -jnp.inf)

  j = jnp.arange(m)
  lo = (j * n_valid[..., None]) // m
  hi_ = ((j + 1) * n_valid[..., None]) // m
  rounds = max(0, math.ceil(math.log2(max(1, math.ceil(nk / m)))))
  for _ in range(rounds):
    mid = (lo + hi_ + 1) // 2
    c_lo = jnp.concatenate([lo, mid], -1)
    c_hi = jnp.concatenate([mid, hi_], -1)
    s = score(c_lo, c_hi - c_lo)
    _, keep = jax.lax.top_k(s, m)
    lo = jnp.take_along_axis(c_lo, keep, -1)
    hi_ = jnp.take_along_axis(c_hi, keep, -1)
  ok = hi_ > lo
  counts = ok.sum(-1).astype(jnp.int32)
  idx = jnp.sort(jnp.where(ok, lo, nk), axis=-1).astype(jnp.int32)
  return pad_block_lists(idx, counts), counts


def hip_attention(query, key, value, *, top_k: int = 512, block_size_q: int = 32,
                  block_stride_q: int = 2, block_size_k: int = 2, causal: bool = True,
                  q_positions=None, k_positions=None, scale=None, return_lse: bool = False,
                  return_indices: bool = False, implementation=None):
  """HiP attention: :func:`hip_mask` then block-sparse attention on the chosen blocks.

  Shapes as ``attnjax.attention``. With ``top_k >= S`` every key is chosen
  and the result equals dense (causal) attention. Selection carries no
  gradient (it is a discrete choice); q/k/v get the attention's gradients.
  Causality: the ``block_size_q`` queries of a block share one selection
  scored with their queries, later ones included, so with causal=True an
  output depends on later tokens through the choice of key blocks (never
  through their keys or values; ``attnjax.analysis.causality.
  check_causal_cross`` fails). Scores that must not see the future (a
  language model's perplexity, teacher-forced accuracy) need
  ``block_size_q=1, block_stride_q=1``; decoding one token per call is
  unaffected.
  A query length that ``block_size_q`` does not divide (a prompt of any
  length) is padded with copies of the last query (same position, so the
  last block's selection and causality are those of its real queries) and
  the copies' rows are dropped from the result; the returned indices cover
  the padded blocks.
  """
  d = V.check_qkv(query, key, value)
  V.check_positive_int("block_size_q", block_size_q)
  pad = -d.T % block_size_q
  if pad:
    q_pos, k_pos = normalize_positions(q_positions, k_positions, d)
    edge = lambda x, axis: jnp.concatenate(
        [x, jnp.repeat(jax.lax.slice_in_dim(x, x.shape[axis] - 1, None, axis=axis), pad, axis)],
        axis)
    res = hip_attention(edge(jnp.asarray(query), 1), key, value, top_k=top_k,
                        block_size_q=block_size_q, block_stride_q=block_stride_q,
                        block_size_k=block_size_k, causal=causal, q_positions=edge(q_pos, 1),
                        k_positions=k_pos, scale=scale, return_lse=return_lse,
                        return_indices=return_indices, implementation=implementation)
    if not (return_lse or return_indices):
      return res[:, :d.T]
    res = list(res)
    res[0] = res[0][:, :d.T]
    if return_lse:
      res[1] = res[1][:, :d.T]
    return tuple(res)
  idx, cnt = hip_mask(jax.lax.stop_gradient(query), jax.lax.stop_gradient(key), top_k=top_k,
                      block_size_q=block_size_q, block_stride_q=block_stride_q,
                      block_size_k=block_size_k, causal=causal, q_positions=q_positions,
                      k_positions=k_positions)
  res = layout_attention(query, key, value, idx, cnt, block_q=block_size_q,
                         block_kv=block_size_k, causal=causal, q_positions=q_positions,
                         k_positions=k_positions, scale=scale, return_lse=return_lse,
                         implementation=implementation)
  if return_indices:
    return (res, (idx, cnt)) if not return_lse else res + ((idx, cnt),)
  return res
