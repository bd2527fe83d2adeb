"""Titans' neural long-term memory, chunked (Behrouz, Zhong, Mirrokni, 2024; arXiv:2501.00663).

"Titans: Learning to Memorize at Test Time".

Per head, a memory M maps keys to values and is trained online on the loss
l(M; x_t) = ||M(k_t) - v_t||^2 with momentum and forgetting:
  S_t = eta_t S_{t-1} - theta_t grad l(M_{t-1}; x_t),  M_t = (1 - alpha_t) M_{t-1} + S_t,
  y_t = M_t(q_t).
Chunked ("parallel") training: inside a chunk every gradient is taken at the
memory of the chunk start M_0 (mini-batch gradient descent), so with
A_t = prod_{i<=t} (1 - alpha_i) and P_t = prod_{i<=t} eta_i,
  M_t = A_t M_0 + c_t S_0 - sum_{j<=t} W[t, j] theta_j G_j,
  W[t, j] = sum_{j<=i<=t} (A_t / A_i)(P_i / P_j),  c_t = sum_{i<=t} (A_t / A_i) P_i,
where every ratio is formed from log-space differences (<= 1, stable).
chunk_size = 1 is the token recurrence. For a matrix memory G_j = 2 (M_0 k_j -
v_j) k_j^T and the chunk is a few matmuls; an MLP memory takes per-token
jax.grad at M_0 inside a scan over chunks. Defaults and the paper's exact
gating are unconfirmed (no official code was available to us).

``short_causal_conv`` is the paper's 1D depthwise convolution after the
query, key and value projections (Section 4.4, following modern linear
recurrent models), causal so that decoding stays token by token.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.core.validation import check_positive_int

_LOG_FLOOR = -60.0  # log of a factor treated as zero (alpha = 1 or eta = 0)


def short_causal_conv(x, kernel, state=None):
  """Depthwise causal convolution y_t = sum_i kernel[i] x_{t - (W - 1) + i}.

  Args:
    x: [B, T, C].
    kernel: [W, C]; kernel[W - 1] weighs the current token (the layout of a
      depthwise ``flax.linen.Conv`` kernel [W, 1, C] with left padding W - 1).
    state: the W - 1 inputs before x, [B, W - 1, C]; zeros (a sequence start)
      when None.
  Returns:
    (y [B, T, C] in x.dtype, new state [B, W - 1, C]: the last W - 1 inputs),
    so running x in pieces with the state gives the same y as one call.
  """
  if getattr(x, "ndim", None) != 3 or getattr(kernel, "ndim", None) != 2:
    raise ValueError(f"short_causal_conv takes x [B, T, C] and kernel [W, C]; got x "
                     f"{getattr(x, 'shape', None)}, kernel {getattr(kernel, 'shape', None)}.")
  w, c = kernel.shape
  if x.shape[2] != c:
    raise ValueError(f"kernel has {c} channels but x has {x.shape[2]} (x {x.shape}).")
  b, t = x.shape[:2]
  if state is None:
    state = jnp.zeros((b, w - 1, c), x.dtype)
  if state.shape != (b, w - 1, c):
    raise ValueError(f"state must have shape [B, W - 1, C]={(b, w - 1, c)}, got {state.shape}.")
  xp = jnp.concatenate([state.astype(jnp.float32), x.astype(jnp.float32)], axis=1)
  k32 = kernel.astype(jnp.float32)
  y = sum(k32[i] * xp[:, i:i + t] for i in range(w))
  return y.astype(x.dtype), xp[:, t:].astype(x.dtype)


def _ratios(log_cum):
  """[C] inclusive cumulative logs -> [C, C] exp(L_t - L_i) for i <= t, else 0."""
  c = log_cum.shape[-1]
  lower = jnp.tril(jnp.ones((c, c), bool))
  diff = log_cum[:, None] - log_cum[None, :]
  return jnp.where(lower, jnp.exp(jnp.where(lower, diff, 0.0)), 0.0)


def chunk_weights(alpha, eta):
  """(A [C], P [C], c [C], W [C, C], D_P [C, C]) of one chunk from alpha, eta [C]."""
  log_a = jnp.cumsum(jnp.maximum(jnp.log1p(-alpha), _LOG_FLOOR))
  log_p = jnp.cumsum(jnp.maximum(jnp.log(eta), _LOG_FLOOR))
  d_a, d_p = _ratios(log_a), _ratios(log_p)
  p = jnp.exp(log_p)
  return jnp.exp(log_a), p, d_a @ p, d_a @ d_p, d_p


def _check_gates(name, x, shape):
  if x.shape != shape:
    raise ValueError(f"{name} must have shape [B, T, N]={shape}, got {x.shape}.")


def _prepare(q, k, v, alpha, theta, eta, chunk_size):
  """Checks shapes, pads T to a multiple of the chunk (no-op tokens), -> [nC, B, N, C, ...]."""
  for name, x in (("query", q), ("key", k), ("value", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must have rank 4 [B, T, N, D], got shape {getattr(x, 'shape', None)}.")
  b, t, n, _ = q.shape
  if k.shape != q.shape or v.shape[:3] != (b, t, n):
    raise ValueError(f"query {q.shape}, key {k.shape} and value {v.shape} must share [B, T, N] "
                     "and query/key their last dimension (one memory per head).")
  for name, x in (("alpha", alpha), ("theta", theta), ("eta", eta)):
    _check_gates(name, x, (b, t, n))
  c = check_positive_int("chunk_size", chunk_size)
  pad = -t % c
  padded = []
  for x, fill in ((q, 0.0), (k, 0.0), (v, 0.0), (alpha, 0.0), (theta, 0.0), (eta, 1.0)):
    x = x.astype(jnp.float32)
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    x = jnp.pad(x, widths, constant_values=fill)
    x = x.reshape((b, (t + pad) // c, c) + x.shape[2:])
    padded.append(jnp.moveaxis(jnp.moveaxis(x, 1, 0), 3, 2))  # [nC, B, N, C, ...]
  return padded, t


def _matrix_chunk(m0, s0, q, k, v, alpha, theta, eta):
  """One chunk, one head: m0, s0 [Dv, Dk]; q, k [C, Dk]; v [C, Dv]; gates [C]."""
  a, p, c, w, d_p = chunk_weights(alpha, eta)
  u = k @ m0.T - v
  y = a[:, None] * (q @ m0.T) + c[:, None] * (q @ s0.T) - 2.0 * ((w * (q @ k.T)) * theta[None]) @ u
  s_end = p[-1] * s0 - 2.0 * (u * (d_p[-1] * theta)[:, None]).T @ k
  m_end = a[-1] * m0 + c[-1] * s0 - 2.0 * (u * (w[-1] * theta)[:, None]).T @ k
  return y, m_end, s_end


def linear_memory(query, key, value, alpha, theta, eta, *, chunk_size: int = 64,
                  initial_state=None, return_state: bool = False):
  """Matrix memory (L_M = 1, no nonlinearity), chunked.

  Args:
    query, key: [B, T, N, Dk]; value: [B, T, N, Dv].
    alpha (forgetting), theta (step size), eta (momentum): [B, T, N] in [0, 1].
    initial_state: (M_0, S_0), each [B, N, Dv, Dk]; zeros by default.
  Returns:
    y [B, T, N, Dv] in query.dtype, and (M, S) after the last token if return_state.
  """
  (q, k, v, al, th, et), t = _prepare(query, key, value, alpha, theta, eta, chunk_size)
  b, n, dk, dv = query.shape[0], query.shape[2], query.shape[3], value.shape[3]
  if initial_state is None:
    initial_state = (jnp.zeros((b, n, dv, dk), jnp.float32),) * 2
  for name, x in zip(("M_0", "S_0"), initial_state):
    if x.shape != (b, n, dv, dk):
      raise ValueError(f"initial_state {name} must have shape [B, N, Dv, Dk]={(b, n, dv, dk)}, "
                       f"got {x.shape}.")
  step = jax.vmap(jax.vmap(_matrix_chunk))

  def body(carry, xs):
    y, m, s = step(carry[0], carry[1], *xs)
    return (m, s), y

  state, y = lax.scan(body, tuple(x.astype(jnp.float32) for x in initial_state),
                      (q, k, v, al, th, et))
  y = jnp.moveaxis(jnp.moveaxis(y, 0, 1), 3, 2)  # [B, nC, C, N, Dv]
  y = y.reshape(b, -1, n, dv)[:, :t].astype(query.dtype)
  return (y, state) if return_state else y


def memory_recurrence(query, key, value, alpha, theta, eta, *, memory_apply: Callable,
                      params0, initial_momentum=None):
  """Token-by-token oracle for any memory: gradient at M_{t-1}, per head.

  params0: a pytree whose leaves have a leading [N] axis (the same initial
  memory for every batch row); memory_apply(params_one_head, x [Dk]) -> [Dv].
  Returns y [B, T, N, Dv] float32.
  """
  def head(p0, q, k, v, al, th, et):
    loss = lambda p, kk, vv: jnp.sum((memory_apply(p, kk) - vv) ** 2)
    s0 = jax.tree.map(jnp.zeros_like, p0)

    def body(carry, xs):
      p, s = carry
      qq, kk, vv, a, th_, e = xs
      g = jax.grad(loss)(p, kk, vv)
      s = jax.tree.map(lambda s_, g_: e * s_ - th_ * g_, s, g)
      p = jax.tree.map(lambda p_, s_: (1 - a) * p_ + s_, p, s)
      return (p, s), memory_apply(p, qq)

    return lax.scan(body, (p0, s0), (q, k, v, al, th, et))[1]

  per_head = jax.vmap(head, in_axes=(0, 1, 1, 1, 1, 1, 1), out_axes=1)
  per_batch = jax.vmap(per_head, in_axes=(None, 0, 0, 0, 0, 0, 0))
  args = [x.astype(jnp.float32) for x in (query, key, value, alpha, theta, eta)]
  return per_batch(params0, *args)


def neural_memory(params0, query, key, value, alpha, theta, eta, *, memory_apply: Callable,
                  chunk_size: int = 64, return_state: bool = False):
  """Deep (e.g. MLP) memory trained by per-chunk gradient steps in a scan.

  Args:
    params0: pytree, leaves with a leading [N] axis (initial memory per head).
    query, key: [B, T, N, Dk]; value: [B, T, N, Dv]; gates [B, T, N].
    memory_apply: (params of one head, x [Dk]) -> [Dv].
  Returns:
    y [B, T, N, Dv] in query.dtype (and the final (params, momentum) with
    leaves [B, N, ...] if return_state).
  """
  (q, k, v, al, th, et), t = _prepare(query, key, value, alpha, theta, eta, chunk_size)
  b, n, dv = query.shape[0], query.shape[2], value.shape[3]
  loss = lambda p, kk, vv: jnp.sum((memory_apply(p, kk) - vv) ** 2)

  def chunk(m0, s0, q, k, v, alpha, theta, eta):
    a, p, c, w, d_p = chunk_weights(alpha, eta)
    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(m0, k, v)  # leaves [C, ...]
    mix = lambda coef, g: jnp.tensordot(coef * theta, g, axes=(0, 0))
    per_token = jax.tree.map(
        lambda m_, s_, g_: (jnp.einsum("t,...->t...", a, m_) + jnp.einsum("t,...->t...", c, s_)
                            - jnp.tensordot(w * theta[None], g_, axes=(1, 0))), m0, s0, grads)
    y = jax.vmap(memory_apply)(per_token, q)
    m_end = jax.tree.map(lambda m_, s_, g_: a[-1] * m_ + c[-1] * s_ - mix(w[-1], g_), m0, s0, grads)
    s_end = jax.tree.map(lambda s_, g_: p[-1] * s_ - mix(d_p[-1], g_), s0, grads)
    return y, m_end, s_end

  step = jax.vmap(jax.vmap(chunk))
  m0 = jax.tree.map(lambda x: jnp.broadcast_to(x.astype(jnp.float32), (b,) + x.shape), params0)
  s0 = jax.tree.map(jnp.zeros_like, m0)

  def body(carry, xs):
    y, m, s = step(carry[0], carry[1], *xs)
    return (m, s), y

  state, y = lax.scan(body, (m0, s0), (q, k, v, al, th, et))
  y = jnp.moveaxis(jnp.moveaxis(y, 0, 1), 3, 2).reshape(b, -1, n, dv)[:, :t]
  y = y.astype(query.dtype)
  return (y, state) if return_state else y
