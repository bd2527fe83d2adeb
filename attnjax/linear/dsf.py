"""Dynamical Systems Framework utilities (Sieber et al., NeurIPS 2024; arXiv:2405.15731).

"Understanding the differences in Foundation Models: Attention, State Space Models,
and Recurrent Neural Networks".

Every layer here is a time-varying linear system h_i = Lambda_i h_{i-1} + B_i u_i,
y_i = C_i h_i + D_i u_i, hence y = Phi u with Phi_ij = C_i Lambda_i ... Lambda_{j+1} B_j.
`materialize_mixing_matrix` recovers Phi of any op that is linear in its
values; `dsf_scan` is the reference recurrence; `linear_attention_dsf` writes
decayed linear attention as that recurrence with a diagonal Lambda.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax


def materialize_mixing_matrix(fn: Callable, query, key, value_length: Optional[int] = None,
                              num_kv_heads: Optional[int] = None):
  """Phi [B, N, T, S] of an op y = fn(query, key, value) that is linear in value.

  fn maps q [B, T, N, H], k [B, S, K, H], v [B, S, K, 1] to [B, T, N, 1]; Phi
  is read off by feeding one-hot value sequences (one column per key
  position, all KV heads at once), so y[b, t, n] = sum_s Phi[b, n, t, s] v[b, s].
  """
  b, s = key.shape[0], value_length or key.shape[1]
  kh = num_kv_heads or key.shape[2]
  eye = jnp.eye(s, dtype=jnp.float32)
  values = jnp.broadcast_to(eye[:, None, :, None, None], (s, b, s, kh, 1)).astype(query.dtype)
  cols = jax.vmap(lambda v: fn(query, key, v))(values)  # [S, B, T, N, 1]
  return jnp.transpose(cols[..., 0], (1, 3, 2, 0)).astype(jnp.float32)


def dsf_scan(lam, b, c, u, d=None, h0=None):
  """Reference recurrence h_i = Lambda_i h_{i-1} + B_i u_i, y_i = C_i h_i (+ D_i u_i).

  Args:
    lam: [T, n] (diagonal Lambda) or [T, n, n]; b: [T, n, m]; c: [T, p, n];
    u: [T, m]; d: optional [T, p, m]; h0: optional [n].
  Returns:
    y [T, p] (float32).
  """
  n = b.shape[1]
  h0 = jnp.zeros((n,), jnp.float32) if h0 is None else h0.astype(jnp.float32)

  def body(h, xs):
    lam_i, b_i, c_i, u_i = xs
    h = (lam_i * h if lam_i.ndim == 1 else lam_i @ h) + b_i @ u_i
    return h, c_i @ h

  _, y = lax.scan(body, h0, tuple(x.astype(jnp.float32) for x in (lam, b, c, u)))
  if d is not None:
    y = y + jnp.einsum("tpm,tm->tp", d.astype(jnp.float32), u.astype(jnp.float32))
  return y


def linear_attention_mixing_matrix(qf, kf, slope: Optional[float] = None):
  """Explicit Phi [T, T] of causal linear attention for one head: (q_i . k_j) lambda^(i-j), j <= i."""
  t = qf.shape[0]
  phi = jnp.tril(qf.astype(jnp.float32) @ kf.astype(jnp.float32).T)
  if slope is not None:
    dist = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]
    phi = phi * jnp.where(dist >= 0, jnp.exp(-slope * jnp.maximum(dist, 0)), 0.0)
  return phi


def linear_attention_dsf(qf, kf, v, slope: Optional[float] = None):
  """One head of decayed linear attention as a DSF scan with diagonal Lambda = lambda I.

  The state is vec(S) with S [F, E]: Lambda_i = lambda, B_i u_i = vec(k_i v_i^T)
  (u_i = v_i), C_i h = S^T q_i. qf, kf [T, F], v [T, E] -> y [T, E].
  """
  t, f = qf.shape
  e = v.shape[-1]
  eye = jnp.eye(e, dtype=jnp.float32)
  lam = jnp.full((t, f * e), 1.0 if slope is None else jnp.exp(-slope), jnp.float32)
  b = jnp.einsum("tf,eg->tfeg", kf.astype(jnp.float32), eye).reshape(t, f * e, e)
  c = jnp.einsum("tf,eg->tgfe", qf.astype(jnp.float32), eye).reshape(t, e, f * e)
  return dsf_scan(lam, b, c, v)
