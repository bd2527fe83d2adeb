"""Landmark Attention: grouped softmax with landmark tokens, top-k block retrieval at inference (Mohtashami & Jaggi, 2023; arXiv:2305.16300).

"Landmark Attention: Random-Access Infinite Context Length for Transformers".

The sequence holds a landmark token after every ``block_size`` tokens
(period ``P = block_size + 1``; position p is a landmark iff
``p % P == block_size``). For a query in block c the *current group* holds
the earlier tokens of block c (not its landmark) and the landmarks of all
earlier blocks; one softmax over it gives weights ``a_t`` (current tokens)
and ``g_b`` (landmark of block b). Inside each earlier block b a softmax
gives ``beta_t``; token t of block b gets ``g_b * beta_t``. Landmarks carry
no value. At inference each query keeps only its ``top_k`` blocks by
landmark score ``q . k_landmark`` and applies the same formula to them;
with ``top_k`` = every block it equals the training formula. Defaults:
block 50 (``mem_freq``), top_k 4 (the paper's tables use 2 or 4; not
confirmed which is the release default). The retrieved blocks keep the
key positions (RoPE) the caller gave them; the paper's "mem jump" position
remapping is not applied here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.core import validation as V
from attnjax.dynamic.select import topk_blocks

__all__ = ["insert_landmarks", "landmark_grouped_attention", "landmark_retrieval_attention"]

_HI = jax.lax.Precision.HIGHEST


def insert_landmarks(x, block_size: int, landmark):
  """Inserts ``landmark`` after every ``block_size`` items along axis 1.

  x: [B, L, ...]; landmark: broadcastable to x[:, 0] (a token id or an
  embedding). Returns [B, L + L // block_size, ...].
  """
  V.check_positive_int("block_size", block_size)
  B, L = x.shape[:2]
  n = L // block_size
  body = x[:, :n * block_size].reshape((B, n, block_size) + x.shape[2:])
  lm = jnp.broadcast_to(jnp.asarray(landmark, x.dtype), (B, n, 1) + x.shape[2:])
  out = jnp.concatenate([body, lm], axis=2).reshape((B, n * (block_size + 1)) + x.shape[2:])
  return jnp.concatenate([out, x[:, n * block_size:]], axis=1)


def _heads(x, N):
  return jnp.repeat(x, N // x.shape[2], axis=2)


def landmark_grouped_attention(query, key, value, *, block_size: int = 50, scale=None):
  """Training-time grouped softmax over a sequence with landmarks (dense, O(T^2)).

  Args:
    query, key: [B, T, N, H] / [B, T, K, H]; value: [B, T, K, Hv]; self
      attention on a sequence laid out by :func:`insert_landmarks` (causal).
    block_size: tokens per block (the landmark is the next position).

  Returns:
    out [B, T, N, Hv]. Every query's weights sum to 1 (the first token of
    the sequence sees only itself).
  """
  d = V.check_qkv(query, key, value)
  if d.T != d.S:
    raise NotImplementedError(f"landmark_grouped_attention is defined for self-attention only "
                              f"(its pattern has no cross-attention form): T={d.T} != S={d.S}.")
  V.check_positive_int("block_size", block_size)
  scale = V.check_scale(scale, d.H)
  P = block_size + 1
  pos = jnp.arange(d.T)
  blk, is_lm = pos // P, pos % P == block_size
  q = query.astype(jnp.float32)
  k, v = _heads(key, d.N).astype(jnp.float32), _heads(value, d.N).astype(jnp.float32)
  logits = jnp.einsum("btnh,bsnh->bnts", q, k, precision=_HI) * scale
  cur = (blk[:, None] == blk[None, :]) & (pos[None, :] <= pos[:, None]) & ~is_lm[None, :]
  lms = is_lm[None, :] & (blk[None, :] < blk[:, None])
  group = jnp.where(cur | lms, logits, -jnp.inf)
  p_star = jax.nn.softmax(group, axis=-1)
  p_star = jnp.where(cur | lms, p_star, 0.0)
  # Softmax inside each earlier block (tokens only), via padding to whole blocks.
  nb = -(-d.T // P)
  pad = nb * P - d.T
  inner_ok = (blk[None, :] < blk[:, None]) & ~is_lm[None, :]
  inner = jnp.where(inner_ok, logits, -jnp.inf)
  inner = jnp.pad(inner, ((0, 0), (0, 0), (0, 0), (0, pad)), constant_values=-jnp.inf)
  inner = inner.reshape(d.B, d.N, d.T, nb, P)
  m = jax.lax.stop_gradient(jnp.max(inner, -1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(inner - m)
  beta = e / jnp.maximum(e.sum(-1, keepdims=True), 1e-30)
  lm_raw = jnp.arange(nb) * P + block_size
  g = jnp.where(lm_raw < d.T, p_star[..., jnp.minimum(lm_raw, d.T - 1)], 0.0)  # [B, N, T, nb]
  w_prev = (g[..., None] * beta).reshape(d.B, d.N, d.T, nb * P)[..., :d.T]
  w = jnp.where(cur, p_star, 0.0) + jnp.where(inner_ok, w_prev, 0.0)
  out = jnp.einsum("bnts,bsnh->btnh", w, v, precision=_HI)
  return out.astype(query.dtype)


def landmark_retrieval_attention(query, key, value, *, block_size: int = 50, top_k: int = 4,
                                 scale=None, return_blocks: bool = False):
  """Inference: each query and head retrieves its top-k earlier blocks by landmark score.

  Args:
    query: [B, T, N, H], the last T positions of the cache (bottom-right
      aligned: query i sits at position S - T + i).
    key: [B, S, K, H]; value: [B, S, K, Hv]: the cache, laid out with a
      landmark after every ``block_size`` tokens.
    top_k: blocks retrieved per query and head (<= complete blocks S // P;
      rows with fewer earlier blocks keep all of them).

  Returns:
    out [B, T, N, Hv] (and (indices [B, N, T, top_k], counts [B, N, T])).
    Cost O(T * (top_k + 1) * P) per head.
  """
  d = V.check_qkv(query, key, value)
  if d.S < d.T:
    raise ValueError(f"the cache must hold the queries: S={d.S} < T={d.T}.")
  V.check_positive_int("block_size", block_size)
  scale = V.check_scale(scale, d.H)
  P = block_size + 1
  nb = d.S // P
  if nb < 1:
    raise ValueError(f"the cache of S={d.S} tokens holds no complete block of {P} "
                     f"(block_size={block_size} + landmark).")
  V.check_positive_int("top_k", top_k)
  if top_k > nb:
    raise ValueError(f"top_k={top_k} is more than the {nb} complete blocks of the cache "
                     f"(S={d.S}, block period {P}).")
  qpos = jnp.arange(d.T) + d.S - d.T
  qblk = qpos // P
  k, v = _heads(key, d.N), _heads(value, d.N)  # [B, S, N, .]
  qf = query.astype(jnp.float32)
  lm_keys = k[:, jnp.arange(nb) * P + block_size].astype(jnp.float32)  # [B, nb, N, H]
  scores = jnp.einsum("btnh,bcnh->bntc", qf, lm_keys, precision=_HI)
  valid = (jnp.arange(nb)[None, :] < qblk[:, None])[None, None]
  idx, cnt = topk_blocks(jax.lax.stop_gradient(scores), top_k, valid=valid)  # [B, N, T, k]
  # Retrieved blocks: tokens and landmark.
  pad = nb * P
  kb = jnp.transpose(k[:, :pad].reshape(d.B, nb, P, d.N, d.H), (0, 3, 1, 2, 4))
  vb = jnp.transpose(v[:, :pad].reshape(d.B, nb, P, d.N, d.Hv), (0, 3, 1, 2, 4))
  bi, hi = jnp.arange(d.B)[:, None, None, None], jnp.arange(d.N)[None, :, None, None]
  ks, vs = kb[bi, hi, idx], vb[bi, hi, idx]  # [B, N, T, k, P, .]
  qt = jnp.transpose(qf, (0, 2, 1, 3))  # [B, N, T, H]
  l_sel = jnp.einsum("bnth,bntcph->bntcp", qt, ks.astype(jnp.float32), precision=_HI) * scale
  slot_ok = (jnp.arange(top_k) < cnt[..., None])  # [B, N, T, k]
  # Current block: positions qblk*P .. qblk*P + P - 1 (clipped to the cache).
  cur_pos = qblk[:, None] * P + jnp.arange(P)[None, :]  # [T, P]
  cur_ok = (cur_pos <= qpos[:, None]) & (cur_pos % P != block_size)
  cur_pos = jnp.minimum(cur_pos, d.S - 1)
  kc = jnp.transpose(k[:, cur_pos], (0, 3, 1, 2, 4)).astype(jnp.float32)  # [B, N, T, P, H]
  vc = jnp.transpose(v[:, cur_pos], (0, 3, 1, 2, 4)).astype(jnp.float32)
  l_cur = jnp.einsum("bnth,bntph->bntp", qt, kc, precision=_HI) * scale
  group = jnp.concatenate([jnp.where(cur_ok, l_cur, -jnp.inf),
                           jnp.where(slot_ok, l_sel[..., block_size], -jnp.inf)], -1)
  p_star = jax.nn.softmax(group, -1)
  a, g = p_star[..., :P], jnp.where(slot_ok, p_star[..., P:], 0.0)
  beta = jax.nn.softmax(l_sel[..., :block_size], -1)  # [B, N, T, k, block_size]
  out = (jnp.einsum("bntp,bntph->bnth", jnp.where(cur_ok, a, 0.0), vc, precision=_HI)
         + jnp.einsum("bntc,bntcp,bntcph->bnth", g, beta,
                      vs[..., :block_size, :].astype(jnp.float32), precision=_HI))
  out = jnp.transpose(out, (0, 2, 1, 3)).astype(query.dtype)
  return (out, (idx, cnt)) if return_blocks else out
