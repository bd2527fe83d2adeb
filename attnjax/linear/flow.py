"""Flowformer: Linearizing Transformers with Conservation Flows (Wu et al., ICML 2022; arXiv:2202.06258).

Linear attention with flow-conservation normalisers.

phi = sigmoid on q [B, T, N, D] and k [B, S, K, D]; eps sits inside both
factors of every dot product, as in the reference code. Non-causal:
  I_i = 1 / ((phi q_i + eps) . (sum_j phi k_j + eps))      incoming flow
  O_j = 1 / ((phi k_j + eps) . (sum_i phi q_i + eps))      outgoing flow
  Ihat_i = (phi q_i + eps) . (sum_j phi k_j O_j + eps)     conserved incoming
  Ohat_j = (phi k_j + eps) . (sum_i phi q_i I_i + eps)     conserved outgoing
  a_i = sigmoid(Ihat_i * T / S), c_j = softmax_j(Ohat_j) * S
  y_i = a_i I_i (phi q_i)^T sum_j phi k_j (c_j v_j)^T.
Causal (T == S): sums become prefix sums, I_i and O_i are multiplied by
n_i = i + 1 and the conserved terms divided by it, a_i = sigmoid(Ihat_i),
c_j = exp(Ohat_j) / sum_{j'<=j} exp(Ohat_j') * n_j and y_i uses I_i / n_i.
A clip of Ohat to [-1, 1] (in some write-ups of the method) is not in the public copies of the
reference code we could read; it is off by default (clip_outgoing=True adds it).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.core.validation import check_qkv
from attnjax.linear.api import linear_attention


def _rep(x, n):
  return jnp.repeat(x, n // x.shape[2], axis=2) if x.shape[2] != n else x


def flow_attention(query, key, value, *, causal: bool = False, eps: float = 1e-6,
                   feature_map: Callable = jax.nn.sigmoid, clip_outgoing: bool = False,
                   chunk_size: int = 64, implementation: Optional[str] = None):
  """Flow attention, non-causal (self or cross) or causal self.

  Args:
    query: [B, T, N, D]; key: [B, S, K, D]; value: [B, S, K, Dv].
  Returns:
    [B, T, N, Dv] in query.dtype.
  """
  d = check_qkv(query, key, value)
  if causal and d.T != d.S:
    raise NotImplementedError(
        "causal flow attention needs T == S: its conservation terms are prefix sums over "
        f"queries and keys together (got T={d.T}, S={d.S}).")
  q = feature_map(query.astype(jnp.float32))
  k = _rep(feature_map(key.astype(jnp.float32)), d.N)  # flow terms are per query head
  v = value.astype(jnp.float32)
  if not causal:
    incoming = 1.0 / jnp.einsum("btnd,bnd->btn", q + eps, k.sum(1) + eps)
    outgoing = 1.0 / jnp.einsum("bsnd,bnd->bsn", k + eps, q.sum(1) + eps)
    inc_hat = jnp.einsum("btnd,bnd->btn", q + eps, (k * outgoing[..., None]).sum(1) + eps)
    out_hat = jnp.einsum("bsnd,bnd->bsn", k + eps, (q * incoming[..., None]).sum(1) + eps)
    if clip_outgoing:
      out_hat = jnp.clip(out_hat, -1.0, 1.0)
    alloc = jax.nn.sigmoid(inc_hat * (d.T / d.S))
    compete = jax.nn.softmax(out_hat, axis=1) * d.S
    kv = jnp.einsum("bsnd,bsne->bnde", k, _rep(v, d.N) * compete[..., None])
    y = jnp.einsum("btnd,bnde->btne", q, kv) * (incoming * alloc)[..., None]
    return y.astype(query.dtype)
  n = jnp.arange(1, d.T + 1, dtype=jnp.float32)[None, :, None]
  incoming = n / jnp.einsum("btnd,btnd->btn", q + eps, jnp.cumsum(k, 1) + eps)
  outgoing = n / jnp.einsum("btnd,btnd->btn", k + eps, jnp.cumsum(q, 1) + eps)
  inc_hat = jnp.einsum("btnd,btnd->btn", q + eps,
                       jnp.cumsum(k * outgoing[..., None], 1) + eps) / n
  out_hat = jnp.einsum("btnd,btnd->btn", k + eps,
                       jnp.cumsum(q * incoming[..., None], 1) + eps) / n
  if clip_outgoing:
    out_hat = jnp.clip(out_hat, -1.0, 1.0)
  alloc = jax.nn.sigmoid(inc_hat)
  compete = jnp.exp(out_hat - lax.cumlogsumexp(out_hat, axis=1)) * n
  # The remaining product is causal linear attention on reweighted inputs.
  y = linear_attention((q * (incoming / n)[..., None]), k, _rep(v, d.N) * compete[..., None],
                       causal=True, chunk_size=chunk_size, implementation=implementation)
  return (y * alloc[..., None]).astype(query.dtype)


def flow_attention_quadratic(query, key, value, *, causal: bool = False, eps: float = 1e-6,
                             feature_map: Callable = jax.nn.sigmoid):
  """T x S oracle: y = a * (diag(I) W diag(c) V) with W = phi(Q) phi(K)^T (lower-triangular if causal)."""
  d = check_qkv(query, key, value)
  q = feature_map(query.astype(jnp.float32))
  k = _rep(feature_map(key.astype(jnp.float32)), d.N)
  v = _rep(value.astype(jnp.float32), d.N)
  w = jnp.einsum("btnd,bsnd->bnts", q, k)
  if causal:
    w = jnp.where(jnp.tril(jnp.ones((d.T, d.S), bool)), w, 0.0)
    n = jnp.arange(1, d.T + 1, dtype=jnp.float32)
    tri = jnp.tril(jnp.ones((d.T, d.T), jnp.float32))
    csum = lambda x: jnp.einsum("ts,bsnd->btnd", tri, x)
    incoming = n[None, :, None] / jnp.einsum("btnd,btnd->btn", q + eps, csum(k) + eps)
    outgoing = n[None, :, None] / jnp.einsum("btnd,btnd->btn", k + eps, csum(q) + eps)
    inc_hat = jnp.einsum("btnd,btnd->btn", q + eps, csum(k * outgoing[..., None]) + eps) / n[None, :, None]
    out_hat = jnp.einsum("btnd,btnd->btn", k + eps, csum(q * incoming[..., None]) + eps) / n[None, :, None]
    alloc = jax.nn.sigmoid(inc_hat)
    e = jnp.exp(out_hat - jnp.max(out_hat, axis=1, keepdims=True))
    compete = e / jnp.einsum("ts,bsn->btn", tri, e) * n[None, :, None]
    scale_i = incoming / n[None, :, None]
  else:
    incoming = 1.0 / jnp.einsum("btnd,bnd->btn", q + eps, k.sum(1) + eps)
    outgoing = 1.0 / jnp.einsum("bsnd,bnd->bsn", k + eps, q.sum(1) + eps)
    inc_hat = jnp.einsum("btnd,bnd->btn", q + eps, (k * outgoing[..., None]).sum(1) + eps)
    out_hat = jnp.einsum("bsnd,bnd->bsn", k + eps, (q * incoming[..., None]).sum(1) + eps)
    alloc = jax.nn.sigmoid(inc_hat * (d.T / d.S))
    compete = jax.nn.softmax(out_hat, axis=1) * d.S
    scale_i = incoming
  y = jnp.einsum("bnts,bsne->btne", w, v * compete[..., None]) * (scale_i * alloc)[..., None]
  return y.astype(query.dtype)
