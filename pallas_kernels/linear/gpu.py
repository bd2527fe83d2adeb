"""GPU (Triton) Pallas kernels for chunked causal linear attention (Lightning Attention-2 #25, papers_1).

One program per (batch, query head); it walks the chunks of its sequence in a
fori_loop with the [F, E] state in registers, so the grid is (B, N). Shapes
follow attnjax.linear.engine: q [B, N, T, F], k [B, K, T, F], v [B, K, T, E],
b [B, N, T] (in-chunk cumulative log-decay), states [B, N, F, E].
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attnjax.linear import chunk_math


def _slice(i, chunk):
  return pl.ds(pl.multiple_of(i * chunk, chunk), chunk)


def _fwd_kernel(*refs, chunk, nc, has_decay):
  if has_decay:
    q_ref, k_ref, v_ref, b_ref, s0_ref, o_ref, sf_ref = refs
  else:
    (q_ref, k_ref, v_ref, s0_ref, o_ref, sf_ref), b_ref = refs, None

  def body(i, state):
    sl = _slice(i, chunk)
    b = b_ref[sl] if has_decay else None
    o, state = chunk_math.chunk_forward(q_ref[sl, :], k_ref[sl, :], v_ref[sl, :], state, b)
    o_ref[sl, :] = o.astype(o_ref.dtype)
    return state

  sf_ref[...] = lax.fori_loop(0, nc, body, s0_ref[...].astype(jnp.float32))


def _dq_kernel(*refs, chunk, nc, has_decay):
  if has_decay:
    do_ref, k_ref, v_ref, b_ref, s0_ref, dq_ref = refs
  else:
    (do_ref, k_ref, v_ref, s0_ref, dq_ref), b_ref = refs, None

  def body(i, state):
    sl = _slice(i, chunk)
    b = b_ref[sl] if has_decay else None
    dq, state = chunk_math.chunk_grad_q(do_ref[sl, :], k_ref[sl, :], v_ref[sl, :], state, b)
    dq_ref[sl, :] = dq.astype(dq_ref.dtype)
    return state

  lax.fori_loop(0, nc, body, s0_ref[...].astype(jnp.float32))


def _dkv_kernel(*refs, chunk, nc, has_decay):
  if has_decay:
    q_ref, k_ref, v_ref, do_ref, b_ref, dsf_ref, dk_ref, dv_ref, ds0_ref = refs
  else:
    (q_ref, k_ref, v_ref, do_ref, dsf_ref, dk_ref, dv_ref, ds0_ref), b_ref = refs, None

  def body(i, dstate):
    sl = _slice(nc - 1 - i, chunk)
    b = b_ref[sl] if has_decay else None
    dk, dv, dstate = chunk_math.chunk_grad_kv(
        q_ref[sl, :], k_ref[sl, :], v_ref[sl, :], do_ref[sl, :], dstate, b)
    dk_ref[sl, :] = dk.astype(dk_ref.dtype)
    dv_ref[sl, :] = dv.astype(dv_ref.dtype)
    return dstate

  ds0_ref[...] = lax.fori_loop(0, nc, body, dsf_ref[...].astype(jnp.float32))


def _specs(q, k, has_decay):
  """BlockSpecs: per-query-head tensors, per-KV-head tensors, log-decays, states."""
  t, f = q.shape[2:]
  grp = q.shape[1] // k.shape[1]
  per_q = lambda d: pl.BlockSpec((None, None, t, d), lambda b, n: (b, n, 0, 0))
  per_kv = lambda d: pl.BlockSpec((None, None, t, d), lambda b, n: (b, n // grp, 0, 0))
  dec = [pl.BlockSpec((None, None, t), lambda b, n: (b, n, 0))] if has_decay else []
  state = lambda e: pl.BlockSpec((None, None, f, e), lambda b, n: (b, n, 0, 0))
  return per_q, per_kv, dec, state


def forward(q, k, v, bcum, s0, *, chunk, has_decay, interpret):
  """(o [B, N, T, E], final state [B, N, F, E])."""
  b, n, t, f = q.shape
  e = v.shape[-1]
  per_q, per_kv, dec, state = _specs(q, k, has_decay)
  kernel = functools.partial(_fwd_kernel, chunk=chunk, nc=t // chunk, has_decay=has_decay)
  args = (q, k, v) + ((bcum,) if has_decay else ()) + (s0,)
  return pl.pallas_call(
      kernel, grid=(b, n),
      in_specs=[per_q(f), per_kv(f), per_kv(e)] + dec + [state(e)],
      out_specs=[per_q(e), state(e)],
      out_shape=[jax.ShapeDtypeStruct((b, n, t, e), jnp.float32),
                 jax.ShapeDtypeStruct((b, n, f, e), jnp.float32)],
      interpret=interpret, name="linear_attention_fwd")(*args)


def backward(q, k, v, bcum, s0, do, ds_final, *, chunk, has_decay, interpret):
  """(dq [B,N,T,F], dk and dv per query head [B,N,T,F|E], ds0 [B,N,F,E])."""
  b, n, t, f = q.shape
  e = v.shape[-1]
  nc = t // chunk
  per_q, per_kv, dec, state = _specs(q, k, has_decay)
  dk_dec = (bcum,) if has_decay else ()
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, chunk=chunk, nc=nc, has_decay=has_decay), grid=(b, n),
      in_specs=[per_q(e), per_kv(f), per_kv(e)] + dec + [state(e)],
      out_specs=per_q(f), out_shape=jax.ShapeDtypeStruct((b, n, t, f), jnp.float32),
      interpret=interpret, name="linear_attention_dq")(do, k, v, *dk_dec, s0)
  dk, dv, ds0 = pl.pallas_call(
      functools.partial(_dkv_kernel, chunk=chunk, nc=nc, has_decay=has_decay), grid=(b, n),
      in_specs=[per_q(f), per_kv(f), per_kv(e), per_q(e)] + dec + [state(e)],
      out_specs=[per_q(f), per_q(e), state(e)],
      out_shape=[jax.ShapeDtypeStruct((b, n, t, f), jnp.float32),
                 jax.ShapeDtypeStruct((b, n, t, e), jnp.float32),
                 jax.ShapeDtypeStruct((b, n, f, e), jnp.float32)],
      interpret=interpret, name="linear_attention_dkv")(q, k, v, do, *dk_dec, ds_final)
  return dq, dk, dv, ds0
