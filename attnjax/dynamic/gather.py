"""Attention over data-chosen keys: token-level gather and block-list paths.

The kernels of TokenSelect (arXiv:2411.02886), SeerAttention (arXiv:2410.13276),
TidalDecode (arXiv:2410.05076) and Sparsifiner (arXiv:2303.13755).

- :func:`gather_attention`: each (query, head) attends to its own list of
  key indices ``[B, T, N, k]`` (TokenSelect, TidalDecode, Sparsifiner).
- :func:`layout_attention`: each (head, q-block) attends to a list of key
  blocks ``[B, N|K, nq, k]``. It runs on ``attnjax.block_sparse``'s
  ``block_sparse_attention_indices``, or (``implementation="gather"``, or
  where the engine has no kernel for the platform) on
  :func:`block_gather_attention`, a pure-JAX gather whose cost grows with the
  ``k`` listed blocks (never with T * S).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax import plan as PL
from attnjax.block_sparse import block_sparse_attention_indices
from attnjax.core import validation as V
from attnjax.dynamic.select import expand_block_heads, normalize_positions
from attnjax.masks import Causal

__all__ = ["gather_attention", "block_gather_attention", "layout_attention",
           "masked_softmax_attend"]

_HI = jax.lax.Precision.HIGHEST


def masked_softmax_attend(q, k, v, valid, scale):
  """Softmax attention of q [..., R, H] over k [..., L, H], v [..., L, Hv] with valid [..., R, L].

  Float32 accumulation; rows with no valid key give zeros and lse = -inf.
  Returns (out float32 [..., R, Hv], lse float32 [..., R]).
  """
  logits = jnp.einsum("...rh,...lh->...rl", q.astype(jnp.float32), k.astype(jnp.float32),
                      precision=_HI) * scale
  masked = jnp.where(valid, logits, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(masked, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(masked - m)
  l = p.sum(-1, keepdims=True)
  out = jnp.einsum("...rl,...lh->...rh", p, v.astype(jnp.float32), precision=_HI)
  out = out / jnp.where(l > 0, l, 1.0)
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)[..., 0]
  return out, lse


def gather_attention(query, key, value, indices, *, valid=None, scale=None, return_lse=False):
  """Token-level sparse attention: query (b, t, n) attends to keys ``indices[b, t, n, :]``.

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv]; N % K == 0.
    indices: int [B, T, N, k], entries in [0, S); query head n reads KV head
      n // (N / K). Duplicated entries count twice: pass distinct ones.
    valid: optional bool [B, T, N, k]; False entries are ignored (padding).
      Causality is the caller's choice of indices/valid.
    scale: logit scale, default 1/sqrt(H).
    return_lse: also return lse [B, T, N] float32.

  Returns:
    out [B, T, N, Hv] in the query dtype (zeros where no entry is valid).
    Cost and memory are O(B T N k H).
  """
  d = V.check_qkv(query, key, value)
  scale = V.check_scale(scale, d.H)
  indices = jnp.asarray(indices)
  if indices.ndim != 4 or indices.shape[:3] != (d.B, d.T, d.N):
    raise ValueError(f"indices must have shape [B, T, N, k]=({d.B}, {d.T}, {d.N}, k), "
                     f"got {indices.shape}.")
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise TypeError(f"indices must be an integer array, got dtype {indices.dtype}.")
  ok = jnp.ones(indices.shape, bool) if valid is None else jnp.asarray(valid, bool)
  if ok.shape != indices.shape:
    V.check_broadcastable("valid", ok, indices.shape, "[B, T, N, k]")
    ok = jnp.broadcast_to(ok, indices.shape)
  idx = jnp.clip(indices, 0, d.S - 1)
  bi = jnp.arange(d.B)[:, None, None, None]
  hi = (jnp.arange(d.N) // (d.N // d.K))[None, None, :, None]
  kg = key[bi, idx, hi]  # [B, T, N, k, H]
  vg = value[bi, idx, hi]
  out, lse = masked_softmax_attend(query[:, :, :, None, :], kg, vg, ok[:, :, :, None, :], scale)
  out = out[:, :, :, 0].astype(query.dtype)
  return (out, lse[..., 0]) if return_lse else out


def block_gather_attention(query, key, value, kv_block_indices, kv_block_counts, *,
                           block_q: int, block_kv: int, causal: bool = False,
                           q_positions=None, k_positions=None, scale=None,
                           return_lse=False):
  """Block-list sparse attention by gathering the listed key blocks (pure JAX).

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv].
    kv_block_indices: int [B, N or K, T/block_q, k]: key blocks per q-block.
    kv_block_counts: int [B, N or K, T/block_q]: how many entries are valid.
    block_q, block_kv: block sizes dividing T and S.
    causal: also apply ``k_pos <= q_pos`` inside the listed blocks.
    q_positions, k_positions: as in ``attnjax.attention``.
    scale: default 1/sqrt(H). return_lse: also return lse [B, T, N].

  Returns:
    out [B, T, N, Hv]. Memory O(B N T k block_kv H / block_q).
  """
  d = V.check_qkv(query, key, value)
  scale = V.check_scale(scale, d.H)
  q_pos, k_pos = normalize_positions(q_positions, k_positions, d)
  idx, cnt = _check_lists(kv_block_indices, kv_block_counts, d, block_q, block_kv)
  nq, nk = d.T // block_q, d.S // block_kv
  kb = idx.shape[-1]
  g = d.N // d.K
  qr = jnp.transpose(query.reshape(d.B, nq, block_q, d.N, d.H), (0, 3, 1, 2, 4))
  kr = jnp.transpose(key.reshape(d.B, nk, block_kv, d.K, d.H), (0, 3, 1, 2, 4))
  vr = jnp.transpose(value.reshape(d.B, nk, block_kv, d.K, d.Hv), (0, 3, 1, 2, 4))
  bi = jnp.arange(d.B)[:, None, None, None]
  hi = (jnp.arange(d.N) // g)[None, :, None, None]
  kg = kr[bi, hi, idx].reshape(d.B, d.N, nq, kb * block_kv, d.H)
  vg = vr[bi, hi, idx].reshape(d.B, d.N, nq, kb * block_kv, d.Hv)
  slot_ok = jnp.arange(kb) < cnt[..., None]  # [B, N, nq, kb]
  valid = jnp.repeat(slot_ok, block_kv, axis=-1)[:, :, :, None, :]  # [B, N, nq, 1, kb*bkv]
  if causal:
    kpos_b = jnp.broadcast_to(k_pos, (d.B, d.S)).reshape(d.B, nk, block_kv)
    kp = kpos_b[jnp.arange(d.B)[:, None, None, None], idx].reshape(d.B, d.N, nq, 1, kb * block_kv)
    qp = jnp.broadcast_to(q_pos, (d.B, d.T)).reshape(d.B, 1, nq, block_q, 1)
    valid = valid & (kp <= qp)
  out, lse = masked_softmax_attend(qr, kg, vg, valid, scale)
  out = jnp.transpose(out, (0, 2, 3, 1, 4)).reshape(d.B, d.T, d.N, d.Hv).astype(query.dtype)
  lse = jnp.transpose(lse, (0, 2, 3, 1)).reshape(d.B, d.T, d.N)
  return (out, lse) if return_lse else out


def _check_lists(indices, counts, d, block_q, block_kv):
  """Validated lists (the plan's forward lists, ``attnjax.plan.from_lists``) with one list
  set per query head: [B, N, nq, k] and [B, N, nq]."""
  plan = PL.from_lists(indices, counts, d, block_q, block_kv)
  return expand_block_heads(plan.fwd_indices, d.N), expand_block_heads(plan.fwd_counts, d.N)


def layout_attention(query, key, value, kv_block_indices, kv_block_counts, *, block_q: int,
                     block_kv: int, causal: bool = False, q_positions=None, k_positions=None,
                     scale=None, return_lse=False, implementation=None):
  """Block-list attention on the best available path.

  ``implementation``: None (the block-sparse engine, falling back to the
  gather path where the engine has no kernel for the platform), "gather"
  (always :func:`block_gather_attention`), or "xla"/"pallas"/"reference"
  (the engine's own). Arguments as in
  :func:`block_gather_attention`.
  """
  kwargs = dict(block_q=block_q, block_kv=block_kv, scale=scale, q_positions=q_positions,
                k_positions=k_positions, return_lse=return_lse)
  if implementation == "gather":
    return block_gather_attention(query, key, value, kv_block_indices, kv_block_counts,
                                  causal=causal, **kwargs)
  try:
    return block_sparse_attention_indices(
        query, key, value, kv_block_indices, kv_block_counts,
        mask=Causal() if causal else None, implementation=implementation, **kwargs)
  except NotImplementedError:
    if implementation is not None:
      raise
    return block_gather_attention(query, key, value, kv_block_indices, kv_block_counts,
                                  causal=causal, **kwargs)
