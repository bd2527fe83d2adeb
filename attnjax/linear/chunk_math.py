"""One chunk of causal linear attention, forward and backward (Lightning Attention-2 #25, papers_1).

Single-head, single-chunk pure functions on float32 arrays: the arithmetic
the Pallas kernels run on loaded tiles. The XLA backend
(attnjax.linear.xla_chunked) evaluates the same equations for all heads of a
chunk at once; tests/test_linear_pallas.py checks the kernels against it.
Notation for a chunk of C positions:

  q [C, F], k [C, F], v [C, E]: feature-mapped queries/keys and values;
  b [C]: inclusive cumulative sum of the per-position log-decays inside the
    chunk (b_r = sum_{i<=r} g_i, g_i = log lambda_i <= 0), or None for no decay;
  state [F, E]: sum_{j < chunk start} (prod of lambdas from j+1 to the chunk
    start - 1) k_j v_j^T, the state "as seen at the last position before the
    chunk".

Forward: o_r = sum_{c<=r} exp(b_r - b_c) (q_r . k_c) v_c + exp(b_r) q_r state.
"""
from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax


def mm(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b for 2-D a [m, k], b [k, n]."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def mm_t(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b^T for a [m, k], b [n, k]."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def t_mm(a: jax.Array, b: jax.Array) -> jax.Array:
  """a^T @ b for a [k, m], b [k, n]."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _lower(c: int) -> jax.Array:
  rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
  cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
  return rows >= cols


def decay_matrix(b: Optional[jax.Array], c: int) -> jax.Array:
  """[C, C] with exp(b_r - b_c) for r >= c and 0 above the diagonal (ones if b is None)."""
  lower = _lower(c)
  if b is None:
    return lower.astype(jnp.float32)
  diff = b[:, None] - b[None, :]
  return jnp.where(lower, jnp.exp(jnp.where(lower, diff, 0.0)), 0.0)


def chunk_forward(q, k, v, state, b=None) -> Tuple[jax.Array, jax.Array]:
  """Output [C, E] of one chunk and the state [F, E] after it."""
  d = decay_matrix(b, q.shape[0])
  scores = mm_t(q, k) * d
  inter = mm(q, state)
  if b is None:
    return mm(scores, v) + inter, state + t_mm(k, v)
  last = b[-1]
  o = mm(scores, v) + jnp.exp(b)[:, None] * inter
  k_end = k * jnp.exp(last - b)[:, None]
  return o, jnp.exp(last) * state + t_mm(k_end, v)


def chunk_grad_q(do, k, v, state, b=None) -> Tuple[jax.Array, jax.Array]:
  """dq [C, F] of one chunk given do [C, E] and the state before it; returns the next state too."""
  d = decay_matrix(b, do.shape[0])
  dscores = mm_t(do, v) * d
  inter = mm_t(do, state)
  if b is None:
    return mm(dscores, k) + inter, state + t_mm(k, v)
  last = b[-1]
  dq = mm(dscores, k) + jnp.exp(b)[:, None] * inter
  k_end = k * jnp.exp(last - b)[:, None]
  return dq, jnp.exp(last) * state + t_mm(k_end, v)


def chunk_grad_kv(q, k, v, do, dstate, b=None) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """(dk [C, F], dv [C, E], dstate before the chunk [F, E]) of one chunk.

  dstate is the cotangent of the state at the chunk's last position coming
  from later chunks (and from the final state's cotangent).
  """
  d_t = decay_matrix(b, q.shape[0]).T
  if b is None:
    dk = mm(mm_t(v, do) * d_t, q) + mm_t(v, dstate)
    dv = mm(mm_t(k, q) * d_t, do) + mm(k, dstate)
    return dk, dv, dstate + t_mm(q, do)
  last = b[-1]
  w_end = jnp.exp(last - b)[:, None]
  dk = mm(mm_t(v, do) * d_t, q) + w_end * mm_t(v, dstate)
  dv = mm(mm_t(k, q) * d_t, do) + w_end * mm(k, dstate)
  q_start = q * jnp.exp(b)[:, None]
  return dk, dv, jnp.exp(last) * dstate + t_mm(q_start, do)
