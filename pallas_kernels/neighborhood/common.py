"""Element math shared by the GPU and TPU neighborhood kernels (spec P2-23)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")


def fine_mask(q_lo, q_hi, k_coord):
  """[tq, D], [tq, D] window bounds and [D, tk] key coordinates -> bool [tq, tk].

  A key is visible iff, in every dimension, its within-group coordinate lies in
  the query's half-open window (blocks never mix dilation groups).
  """
  D = k_coord.shape[0]
  mask = None
  for d in range(D):
    c = k_coord[d:d + 1, :]
    m = (c >= q_lo[:, d:d + 1]) & (c < q_hi[:, d:d + 1])
    mask = m if mask is None else mask & m
  return mask


def dot_nt(a, b):
  """a [m, h] @ b[n, h]^T in float32."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)


def dot_tn(a, b):
  """a [m, n]^T @ b [m, h] in float32."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def dot_nn(a, b):
  """a [m, n] @ b [n, h] in float32."""
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def masked_logits(q, k, mask, scale):
  """Scaled q k^T with invisible pairs at -inf (float32 [tq, tk])."""
  return jnp.where(mask, dot_nt(q, k) * scale, NEG_INF)


def probs_from_lse(s, lse):
  """exp(s - lse) with -inf rows (padding queries) giving zeros."""
  safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  return jnp.where(jnp.isfinite(s), jnp.exp(s - safe), 0.0)


def online_update(m, l, acc, s, v):
  """One online-softmax step: running max m [tq, 1], sum l [tq, 1], acc [tq, Hv]."""
  m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
  m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
  p = jnp.exp(s - m_safe)
  alpha = jnp.exp(m - m_safe)
  l = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
  acc = alpha * acc + dot_nn(p.astype(v.dtype), v)
  return m_new, l, acc


def finalize(m, l, acc):
  """(out [tq, Hv], lse [tq, 1]) from the running statistics; empty rows -> 0, -inf."""
  ok = l > 0
  out = acc / jnp.where(ok, l, 1.0)
  lse = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), NEG_INF)
  return out, lse
