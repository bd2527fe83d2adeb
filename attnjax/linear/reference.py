"""Dense and recurrent oracles for linear attention (Lightning Attention-2, arXiv:2401.04658; BASED, arXiv:2402.18668).

Both take feature-mapped inputs in BTNH layout: qf [B, T, N, F], kf [B, S, K, F],
v [B, S, K, E], per-head slopes [N] (or None) and an optional initial state
s0 [B, N, F, E] standing for keys at positions < 0. They return the
unnormalised output [B, T, N, E] and the state after the last key [B, N, F, E].
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from attnjax.core.validation import default_positions, repeat_kv


def _oracle_dtype(x):
  return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def dense_linear_attention(qf, kf, v, *, slopes=None, causal=True, s0=None,
                           q_positions=None, k_positions=None, segment_ids=None):
  """Quadratic masked form: o_i = sum_j [k_pos_j <= q_pos_i] lambda^(q_pos_i - k_pos_j) (q_i.k_j) v_j.

  The initial state reaches query i with weight lambda^max(q_pos_i + 1, 0).
  segment_ids restrict each query to keys of its own segment: a pair
  ([B, T], [B, S]) matches equal ids; a single [B, T] array (self attention)
  gives packed documents, each a run of equal ids along T (a change of id
  starts a new document), the initial state belonging to the first document
  and the returned state to the last one. T x S memory: a test oracle only.
  """
  dt = _oracle_dtype(qf)
  qf, kf, v = qf.astype(dt), kf.astype(dt), v.astype(dt)
  n = qf.shape[2]
  t, s = qf.shape[1], kf.shape[1]
  kf, v = repeat_kv(kf, n), repeat_kv(v, n)
  dq_pos, dk_pos = default_positions(t, s)
  q_pos = dq_pos if q_positions is None else jnp.asarray(q_positions, jnp.int32)
  k_pos = dk_pos if k_positions is None else jnp.asarray(k_positions, jnp.int32)
  w = jnp.einsum("btnf,bsnf->bnts", qf, kf)
  dist = (q_pos[:, None] - k_pos[None, :]).astype(dt)
  visible = jnp.ones((t, s), bool)
  if causal:
    visible = dist >= 0
  if slopes is not None:
    sl = jnp.asarray(slopes, dt)[:, None, None]
    w = w * jnp.where(visible, jnp.exp(-sl * jnp.where(visible, dist, 0.0)), 0.0)
  w = jnp.where(visible, w, 0.0)
  first_doc = last_doc = None
  if isinstance(segment_ids, (tuple, list)):
    q_seg, k_seg = segment_ids
    w = jnp.where((q_seg[:, :, None] == k_seg[:, None, :])[:, None], w, 0.0)
  elif segment_ids is not None:
    run = document_index(segment_ids)
    w = jnp.where((run[:, :, None] == run[:, None, :])[:, None], w, 0.0)
    first_doc, last_doc = run == 0, run == run[:, -1:]
  o = jnp.einsum("bnts,bsne->btne", w, v)
  kv_end = jnp.einsum("bsnf,bsne->bsnfe", kf, v)
  if last_doc is not None:
    kv_end = jnp.where(last_doc[:, :, None, None, None], kv_end, 0.0)
  if slopes is not None:
    last = jnp.max(k_pos)
    wk = jnp.exp(-jnp.asarray(slopes, dt)[None, :] * (last - k_pos)[:, None].astype(dt))
    state = jnp.einsum("sn,bsnfe->bnfe", wk, kv_end)
  else:
    state = kv_end.sum(1)
  if s0 is not None:
    s0 = s0.astype(dt)
    q_init = jnp.einsum("btnf,bnfe->btne", qf, s0)
    if slopes is not None:
      sl = jnp.asarray(slopes, dt)
      steps = jnp.maximum(q_pos + 1, 0).astype(dt) if causal else jnp.zeros((t,), dt)
      q_init = q_init * jnp.exp(-sl[None, :] * steps[:, None])[None, :, :, None]
      s0 = s0 * jnp.exp(-sl * (jnp.max(k_pos) + 1).astype(dt))[None, :, None, None]
    if first_doc is not None:
      q_init = jnp.where(first_doc[:, :, None, None], q_init, 0.0)
      s0 = jnp.where(last_doc[:, 0, None, None, None], s0, 0.0)
    o = o + q_init
    state = state + s0
  return o, state


def document_index(segment_ids):
  """[B, T] int32: how many changes of id precede each token (0 for the first document)."""
  seg = jnp.asarray(segment_ids)
  change = (seg[:, 1:] != seg[:, :-1]).astype(jnp.int32)
  return jnp.concatenate([jnp.zeros_like(change[:, :1]), jnp.cumsum(change, axis=1)], axis=1)


def recurrent_step(state, qf_t, kf_t, v_t, slopes=None):
  """One token of the recurrence S_t = lambda S_{t-1} + k_t v_t^T, o_t = q_t S_t.

  state [B, N, F, E], qf_t [B, N, F], kf_t [B, K, F], v_t [B, K, E].
  Returns (o_t [B, N, E], new state).
  """
  n, kh = qf_t.shape[1], kf_t.shape[1]
  kf_t = jnp.repeat(kf_t, n // kh, axis=1)
  v_t = jnp.repeat(v_t, n // kh, axis=1)
  if slopes is not None:
    state = state * jnp.exp(-jnp.asarray(slopes, state.dtype))[None, :, None, None]
  state = state + kf_t[..., :, None] * v_t[..., None, :]
  return jnp.einsum("bnf,bnfe->bne", qf_t, state), state


def recurrent_linear_attention(qf, kf, v, *, slopes=None, s0=None):
  """Causal self attention (T == S) as a token-by-token scan of `recurrent_step`."""
  dt = _oracle_dtype(qf)
  b, t, n, f = qf.shape
  e = v.shape[-1]
  if s0 is None:
    s0 = jnp.zeros((b, n, f, e), dt)

  def body(state, xs):
    o, state = recurrent_step(state, *xs, slopes=slopes)
    return state, o

  xs = tuple(jnp.moveaxis(x.astype(dt), 1, 0) for x in (qf, kf, v))
  state, o = lax.scan(body, s0.astype(dt), xs)
  return jnp.moveaxis(o, 0, 1), state
