"""Chunked causal linear-attention engine with a custom VJP (Lightning Attention-2 #25, papers_1).

Layout inside the engine (the public wrappers transpose from BTNH):
  q [B, N, T, F], k [B, K, T, F], v [B, K, T, E] float32 with N % K == 0,
  g [B, N, T] per-position log-decay (<= 0; ignored when has_decay is False),
  s0 [B, N, F, E] initial state, T a multiple of the chunk size.

`causal_core` returns (o [B, N, T, E], final state [B, N, F, E]). Its backward
recomputes the states chunk by chunk (a forward scan for dq and a reverse scan
for dk, dv), so memory stays linear in T and no T x T array is formed. The
gradient of the log-decays comes from the outputs by the identity
  dL/dg_p = sum_{t >= p} do_t . o_t - sum_{j >= p} k_j . dk_j
(every (query t, key j) pair whose weight contains lambda_p has j < p <= t).
Backends ("xla" here, "pallas" registered by pallas_kernels.linear) supply
fwd and bwd with the signatures of `_xla_fwd` and `_xla_bwd`.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.linear import chunk_math


class Backend(NamedTuple):
  fwd: Callable
  bwd: Callable


BACKENDS: Dict[str, Backend] = {}


def _kv_chunks(x: jax.Array, chunk: int) -> jax.Array:
  """[B, K, T, D] -> [T / chunk, B, K, chunk, D]."""
  b, h, t = x.shape[:3]
  return jnp.moveaxis(x.reshape((b, h, t // chunk, chunk) + x.shape[3:]), 2, 0)


def _q_chunks(x: jax.Array, kh: int, chunk: int) -> jax.Array:
  """Per-query-head [B, N, T, ...] -> [T / chunk, B, K, G, chunk, ...]."""
  b, n, t = x.shape[:3]
  x = x.reshape((b, kh, n // kh, t // chunk, chunk) + x.shape[3:])
  return jnp.moveaxis(x, 3, 0)


def _q_unchunk(x: jax.Array) -> jax.Array:
  """[nC, B, K, G, C, D] -> [B, N, nC * C, D]."""
  nc, b, kh, grp, c = x.shape[:5]
  x = jnp.moveaxis(x, 0, 3)
  return x.reshape((b, kh * grp, nc * c) + x.shape[5:])


def _grouped(x: jax.Array, kh: int) -> jax.Array:
  """Per-query-head [B, N, ...] -> [B, K, G, ...]."""
  return x.reshape((x.shape[0], kh, x.shape[1] // kh) + x.shape[2:])


def _ungroup(x: jax.Array) -> jax.Array:
  return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])


def _per_head(fn: Callable, shared: tuple) -> Callable:
  """vmaps a single-head function over [B, K, G, ...]; `shared` args have no G axis."""
  g_axes = tuple(None if s else 0 for s in shared)
  return jax.vmap(jax.vmap(jax.vmap(fn, in_axes=g_axes)))


def _decay_chunks(g, kh, chunk, has_decay):
  """Per-chunk inclusive cumsum of log-decays, as a 1-tuple [nC, B, K, G, C] (or ())."""
  if not has_decay:
    return ()
  return (jnp.cumsum(_q_chunks(g, kh, chunk), axis=-1),)


def _xla_fwd(q, k, v, g, s0, chunk, has_decay):
  kh = k.shape[1]
  bc = _decay_chunks(g, kh, chunk, has_decay)
  step = _per_head(chunk_math.chunk_forward, (False, True, True, False) + (False,) * len(bc))

  def body(state, x):
    o, state = step(x[0], x[1], x[2], state, *x[3:])
    return state, o

  xs = (_q_chunks(q, kh, chunk), _kv_chunks(k, chunk), _kv_chunks(v, chunk)) + bc
  s_final, o = lax.scan(body, _grouped(s0, kh), xs)
  return _q_unchunk(o), _ungroup(s_final)


def _xla_bwd(q, k, v, g, s0, do, ds_final, chunk, has_decay):
  """Returns dq [B,N,T,F], dk and dv per query head [B,N,T,F|E], ds0 [B,N,F,E]."""
  kh = k.shape[1]
  qc, doc = _q_chunks(q, kh, chunk), _q_chunks(do, kh, chunk)
  kc, vc = _kv_chunks(k, chunk), _kv_chunks(v, chunk)
  bc = _decay_chunks(g, kh, chunk, has_decay)
  dec = (False,) * len(bc)
  step_q = _per_head(chunk_math.chunk_grad_q, (False, True, True, False) + dec)
  step_kv = _per_head(chunk_math.chunk_grad_kv, (False, True, True, False, False) + dec)

  def fwd_body(state, x):
    dq, state = step_q(x[0], x[1], x[2], state, *x[3:])
    return state, dq

  _, dq = lax.scan(fwd_body, _grouped(s0, kh), (doc, kc, vc) + bc)

  def rev_body(dstate, x):
    dk, dv, dstate = step_kv(x[0], x[1], x[2], x[3], dstate, *x[4:])
    return dstate, (dk, dv)

  ds0, (dk, dv) = lax.scan(rev_body, _grouped(ds_final, kh), (qc, kc, vc, doc) + bc,
                           reverse=True)
  return _q_unchunk(dq), _q_unchunk(dk), _q_unchunk(dv), _ungroup(ds0)


BACKENDS["xla"] = Backend(_xla_fwd, _xla_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def causal_core(q, k, v, g, s0, chunk: int, backend: str, has_decay: bool):
  """Chunked causal linear attention; see the module docstring for shapes."""
  return BACKENDS[backend].fwd(q, k, v, g, s0, chunk, has_decay)


def _core_fwd(q, k, v, g, s0, chunk, backend, has_decay):
  o, s_final = BACKENDS[backend].fwd(q, k, v, g, s0, chunk, has_decay)
  return (o, s_final), (q, k, v, g, s0, o, s_final)


def _reverse_cumsum(x):
  return jnp.flip(jnp.cumsum(jnp.flip(x, -1), axis=-1), -1)


def _core_bwd(chunk, backend, has_decay, res, cts):
  q, k, v, g, s0, o, s_final = res
  do, ds_final = cts
  dq, dk_h, dv_h, ds0 = BACKENDS[backend].bwd(q, k, v, g, s0, do, ds_final, chunk, has_decay)
  b, n, t = q.shape[:3]
  kh = k.shape[1]
  dk = dk_h.reshape(b, kh, n // kh, t, -1).sum(2)
  dv = dv_h.reshape(b, kh, n // kh, t, -1).sum(2)
  if has_decay:
    a = jnp.sum(do * o, axis=-1)
    a = a.at[..., -1].add(jnp.sum(ds_final * s_final, axis=(-2, -1)))
    kdk = jnp.einsum("bkgtf,bktf->bkgt", dk_h.reshape(b, kh, n // kh, t, -1), k)
    dg = _reverse_cumsum(a - kdk.reshape(b, n, t))
  else:
    dg = jnp.zeros_like(g)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), dg, ds0


causal_core.defvjp(_core_fwd, _core_bwd)


def noncausal_core(q, k, v, s0):
  """Non-causal linear attention: o = q (s0 + sum_j k_j v_j^T); same layout, any T and S."""
  kv = jnp.einsum("bksf,bkse->bkfe", k, v)
  kh = k.shape[1]
  state = _grouped(s0, kh) + kv[:, :, None]
  o = jnp.einsum("bkgtf,bkgfe->bkgte", _grouped(q, kh), state)
  return _ungroup(o), _ungroup(state)
