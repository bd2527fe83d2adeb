"""One chunk of causal linear attention, forward and backward (Lightning Attention-2, arXiv:2401.04658).

Single-head, single-chunk pure functions on float32 arrays: the arithmetic
the Pallas kernels run on loaded tiles. The XLA backend
(attnjax.linear.xla_chunked) evaluates the same equations for all heads of a
chunk at once; tests/test_linear_pallas.py checks the kernels against it.
Notation for a chunk of C positions:

  q [C, F], k [C, F], v [C, E]: feature-mapped queries/keys and values;
  b [C, 1]: inclusive cumulative sum of the per-position log-decays inside the
    chunk (b_r = sum_{i<=r} g_i, g_i = log lambda_i <= 0) as a column, or
    None for no decay;
  state [F, E]: sum_{j < chunk start} (prod of lambdas from j+1 to the chunk
    start - 1) k_j v_j^T, the state "as seen at the last position before the
    chunk".

Forward: o_r = sum_{c<=r} exp(b_r - b_c) (q_r . k_c) v_c + exp(b_r) q_r state.

Every operation is one both kernel compilers accept: no value slicing or
gathers (Triton lowers neither; TPU v4 has no sublane gather). The row form
of b and its last entry come from masked reductions over an iota mask, which
are exact (a sum of one value and zeros). The state-like operands may be
column or row slabs of the full state (the value or feature axis split into
blocks): every formula is separable along F and along E except where a
function says otherwise.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

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


def _iotas(c: int) -> Tuple[jax.Array, jax.Array]:
  return lax.broadcasted_iota(jnp.int32, (c, c), 0), lax.broadcasted_iota(jnp.int32, (c, c), 1)


def as_row(col: jax.Array) -> jax.Array:
  """[C, 1] -> [1, C] without a transpose or gather (masked sum down the sublanes)."""
  rows, cols = _iotas(col.shape[0])
  return jnp.sum(jnp.where(rows == cols, col, 0.0), axis=0, keepdims=True)


def last_of(col: jax.Array) -> jax.Array:
  """The last entry of a column [C, 1] as a [1, 1] array (masked sum)."""
  c = col.shape[0]
  rows = lax.broadcasted_iota(jnp.int32, (c, 1), 0)
  return jnp.sum(jnp.where(rows == c - 1, col, 0.0), axis=0, keepdims=True)


def decay_matrix(b: Optional[jax.Array], c: int, transpose: bool = False) -> jax.Array:
  """[C, C]: exp(b_r - b_c) at (r, c) for r >= c, 0 above the diagonal; ones if b is None.

  With transpose=True the transposed matrix, built directly (entry (c, r)).
  """
  rows, cols = _iotas(c)
  keep = rows <= cols if transpose else rows >= cols
  if b is None:
    return keep.astype(jnp.float32)
  row = as_row(b)
  diff = row - b if transpose else b - row
  return jnp.where(keep, jnp.exp(jnp.where(keep, diff, 0.0)), 0.0)


class Weights(NamedTuple):
  """Per-chunk decay factors: to_start = exp(b) [C, 1], to_end = exp(b_last - b) [C, 1], whole = exp(b_last) [1, 1]."""
  to_start: jax.Array
  to_end: jax.Array
  whole: jax.Array


def weights(b: Optional[jax.Array]) -> Optional[Weights]:
  """The Weights of a column b [C, 1] (None without decay)."""
  if b is None:
    return None
  last = last_of(b)
  return Weights(jnp.exp(b), jnp.exp(last - b), jnp.exp(last))


def _advance(state, x, y, w: Optional[Weights], x_scale: str) -> jax.Array:
  """state carried over one chunk: whole * state + (x * w.<x_scale>)^T y."""
  if w is None:
    return state + t_mm(x, y)
  return w.whole * state + t_mm(x * getattr(w, x_scale), y)


def chunk_forward(q, k, v, state, b=None) -> Tuple[jax.Array, jax.Array]:
  """Output [C, E] of one chunk and the state [F, E] after it (separable along E)."""
  w = weights(b)
  scores = mm_t(q, k) * decay_matrix(b, q.shape[0])
  inter = mm(q, state)
  if w is not None:
    inter = w.to_start * inter
  return mm(scores, v) + inter, _advance(state, k, v, w, "to_end")


def chunk_grad_q(do, k, v, state, b=None) -> Tuple[jax.Array, jax.Array]:
  """dq [C, F] given do [C, E] and the state [F, E] before the chunk; also the next state.

  Separable along F (k and state may be column / row slabs [C, Fb], [Fb, E]).
  """
  w = weights(b)
  dscores = mm_t(do, v) * decay_matrix(b, do.shape[0])
  inter = mm_t(do, state)
  if w is not None:
    inter = w.to_start * inter
  return mm(dscores, k) + inter, _advance(state, k, v, w, "to_end")


def _grad_k(q, v, do, dstate, b, w):
  dk_inter = mm_t(v, dstate)
  if w is not None:
    dk_inter = w.to_end * dk_inter
  return mm(mm_t(v, do) * decay_matrix(b, q.shape[0], transpose=True), q) + dk_inter


def _grad_v(q, k, do, dstate, b, w):
  dv_inter = mm(k, dstate)
  if w is not None:
    dv_inter = w.to_end * dv_inter
  return mm(mm_t(k, q) * decay_matrix(b, q.shape[0], transpose=True), do) + dv_inter


def chunk_grad_k(q, v, do, dstate, b=None) -> Tuple[jax.Array, jax.Array]:
  """(dk [C, F], dstate before the chunk [F, E]); separable along F (q [C, Fb], dstate [Fb, E]).

  dstate is the cotangent of the state at the chunk's last position coming
  from later chunks (and from the final state's cotangent).
  """
  w = weights(b)
  return _grad_k(q, v, do, dstate, b, w), _advance(dstate, q, do, w, "to_start")


def chunk_grad_v(q, k, do, dstate, b=None) -> Tuple[jax.Array, jax.Array]:
  """(dv [C, E], dstate before the chunk [F, E]); separable along E (do [C, Eb], dstate [F, Eb])."""
  w = weights(b)
  return _grad_v(q, k, do, dstate, b, w), _advance(dstate, q, do, w, "to_start")


def chunk_grad_kv(q, k, v, do, dstate, b=None) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """(dk [C, F], dv [C, E], dstate before the chunk [F, E]) of one chunk (full state only)."""
  w = weights(b)
  dk = _grad_k(q, v, do, dstate, b, w)
  dv = _grad_v(q, k, do, dstate, b, w)
  return dk, dv, _advance(dstate, q, do, w, "to_start")
