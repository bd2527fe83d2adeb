"""Element math shared by the GPU and TPU neighborhood kernels (NATTEN FNA, arXiv:2403.04690)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")


def fine_mask(q_lo, q_hi, k_coord):
  """Per-dimension window bounds and key coordinates -> bool [tq, tk].

  ``q_lo``, ``q_hi``: length-D lists of int32 [tq, 1] (the query's half-open
  window); ``k_coord``: length-D list of int32 [1, tk] key coordinates, all in
  within-group coordinates. A key is visible iff it lies in the window in
  every dimension (blocks never mix dilation groups). Lists rather than
  [tq, D] arrays: the Triton lowering cannot slice values.
  """
  mask = None
  for lo, hi, c in zip(q_lo, q_hi, k_coord):
    m = (c >= lo) & (c < hi)
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


def masked_logits(q, k, mask, scale, bias=None):
  """Scaled q k^T (+ bias [tq, tk] float32) with invisible pairs at -inf."""
  s = dot_nt(q, k) * scale
  if bias is not None:
    s = s + bias
  return jnp.where(mask, s, NEG_INF)


def probs_from_lse(s, lse):
  """exp(s - lse): masked logits (-inf) and empty rows (lse = -inf) give zeros; a NaN
  logit or lse stays NaN (it must reach the gradients, as in the reference)."""
  safe = jnp.where(lse == NEG_INF, 0.0, lse)
  return jnp.where(s == NEG_INF, 0.0, jnp.exp(s - safe))


def online_update(m, l, acc, s, v):
  """One online-softmax step: running max m [tq, 1], sum l [tq, 1], acc [tq, Hv]."""
  m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
  m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
  p = jnp.exp(s - m_safe)
  alpha = jnp.exp(m - m_safe)
  l = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
  acc = alpha * acc + dot_nn(p.astype(v.dtype), v)
  return m_new, l, acc


def finalize(m, l, acc):
  """(out [tq, Hv], lse [tq, 1]) from the running statistics; empty rows (l == 0) -> 0,
  -inf; a NaN sum (a NaN logit) propagates."""
  ok = l != 0
  out = acc / jnp.where(ok, l, 1.0)
  lse = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), NEG_INF)
  return out, lse
