"""Chunked causal linear-attention engine with a custom VJP (Lightning Attention-2, arXiv:2401.04658).

Layout inside the engine (the public wrappers transpose from BTNH):
  q [B, N, T, F], k [B, K, T, F], v [B, K, T, E] float32 (float64 for float64
  inputs on the xla backend) with N % K == 0,
  g [B, N, T] per-position log-decay (<= 0; ignored when has_decay is False),
  s0 [B, N, F, E] initial state, T a multiple of the chunk size.

`causal_core` returns (o [B, N, T, E], final state [B, N, F, E]). Its backward
recomputes the states chunk by chunk (a forward loop for dq and a reverse loop
for dk, dv), so memory stays linear in T and no T x T array is formed. The
gradient of the log-decays comes from the outputs by the identity
  dL/dg_p = sum_{t >= p} do_t . o_t - sum_{j >= p} k_j . dk_j
(every (query t, key j) pair whose weight contains lambda_p has j < p <= t).
Backends ("xla": attnjax.linear.xla_chunked; "pallas": registered by
pallas_kernels.linear) supply fwd(q, k, v, g, s0, chunk, has_decay) -> (o,
s_final) and bwd(q, k, v, g, s0, do, ds_final, chunk, has_decay) -> (dq, dk
and dv per query head [B, N, T, F|E], ds0), the signatures of
`xla_chunked.forward` and `xla_chunked.backward`.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, NamedTuple

import jax
import jax.numpy as jnp

import pallas_kernels.linear as pallas_linear
from attnjax.linear import xla_chunked


class Backend(NamedTuple):
  fwd: Callable
  bwd: Callable


BACKENDS: Dict[str, Backend] = {}


BACKENDS["xla"] = Backend(xla_chunked.forward, xla_chunked.backward)
BACKENDS["pallas"] = Backend(pallas_linear.forward, pallas_linear.backward)


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
  grouped = lambda x: x.reshape((x.shape[0], kh, x.shape[1] // kh) + x.shape[2:])
  ungrouped = lambda x: x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])
  state = grouped(s0) + kv[:, :, None]
  o = jnp.einsum("bkgtf,bkgfe->bkgte", grouped(q), state)
  return ungrouped(o), ungrouped(state)
