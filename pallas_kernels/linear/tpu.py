"""TPU (Mosaic) Pallas kernels for chunked causal linear attention (Lightning Attention-2, arXiv:2401.04658).

Grid (B, N, T / C): the chunk axis is sequential ("arbitrary") and the [F, E]
state lives in a VMEM scratch buffer carried across it; the reverse pass for
dk, dv walks the chunks backwards through its index maps. Shapes follow
attnjax.linear.engine; the in-chunk cumulative log-decay comes as a column
b [B, N, T, 1] so that its tile is (C, 1); chunk_math builds the [C, C] decay
matrix from it without a sublane gather, which TPU v4 does not have. The
wrapper checks the VMEM a configuration needs first (`resources`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attnjax.core import chunk_math

_SEMANTICS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _unpack(refs, n_base, has_decay, decay_pos):
  """Splits kernel refs into (inputs without the decay, decay ref or None, outputs + scratch)."""
  refs = list(refs)
  b_ref = refs.pop(decay_pos) if has_decay else None
  return refs[:n_base], b_ref, refs[n_base:]


def _fwd_kernel(*refs, nc, has_decay):
  (q_ref, k_ref, v_ref, s0_ref), b_ref, (o_ref, sf_ref, st_ref) = _unpack(refs, 4, has_decay, 3)
  i = pl.program_id(2)

  @pl.when(i == 0)
  def _():
    st_ref[...] = s0_ref[...]

  b = b_ref[...] if has_decay else None
  o, state = chunk_math.chunk_forward(q_ref[...], k_ref[...], v_ref[...], st_ref[...], b)
  o_ref[...] = o.astype(o_ref.dtype)
  st_ref[...] = state

  @pl.when(i == nc - 1)
  def _():
    sf_ref[...] = state


def _dq_kernel(*refs, nc, has_decay):
  del nc
  (do_ref, k_ref, v_ref, s0_ref), b_ref, (dq_ref, st_ref) = _unpack(refs, 4, has_decay, 3)

  @pl.when(pl.program_id(2) == 0)
  def _():
    st_ref[...] = s0_ref[...]

  b = b_ref[...] if has_decay else None
  dq, state = chunk_math.chunk_grad_q(do_ref[...], k_ref[...], v_ref[...], st_ref[...], b)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  st_ref[...] = state


def _dkv_kernel(*refs, nc, has_decay):
  (q_ref, k_ref, v_ref, do_ref, dsf_ref), b_ref, (dk_ref, dv_ref, ds0_ref, st_ref) = _unpack(
      refs, 5, has_decay, 4)
  i = pl.program_id(2)

  @pl.when(i == 0)
  def _():
    st_ref[...] = dsf_ref[...]

  b = b_ref[...] if has_decay else None
  dk, dv, dstate = chunk_math.chunk_grad_kv(
      q_ref[...], k_ref[...], v_ref[...], do_ref[...], st_ref[...], b)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  st_ref[...] = dstate

  @pl.when(i == nc - 1)
  def _():
    ds0_ref[...] = dstate


def _specs(q, k, chunk, reverse):
  f = q.shape[-1]
  nc = q.shape[2] // chunk
  grp = q.shape[1] // k.shape[1]
  c_of = (lambda i: nc - 1 - i) if reverse else (lambda i: i)
  per_q = lambda d: pl.BlockSpec((None, None, chunk, d), lambda b, n, i: (b, n, c_of(i), 0))
  per_kv = lambda d: pl.BlockSpec((None, None, chunk, d),
                                  lambda b, n, i: (b, n // grp, c_of(i), 0))
  state = lambda e: pl.BlockSpec((None, None, f, e), lambda b, n, i: (b, n, 0, 0))
  return per_q, per_kv, state, nc


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, interpret, name):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=scratch, compiler_params=_SEMANTICS,
      interpret=pltpu.InterpretParams() if interpret else False, name=name)


def forward(q, k, v, bcum, s0, *, chunk, has_decay, interpret, target=None):
  """(o [B, N, T, E], final state [B, N, F, E]); the wrapper checked VMEM for `target`."""
  del target
  b, n, t, f = q.shape
  e = v.shape[-1]
  per_q, per_kv, state, nc = _specs(q, k, chunk, False)
  dec_spec = [per_q(1)] if has_decay else []
  dec = (bcum[..., None],) if has_decay else ()
  return _call(
      functools.partial(_fwd_kernel, nc=nc, has_decay=has_decay), (b, n, nc),
      [per_q(f), per_kv(f), per_kv(e)] + dec_spec + [state(e)],
      [per_q(e), state(e)],
      [jax.ShapeDtypeStruct((b, n, t, e), jnp.float32),
       jax.ShapeDtypeStruct((b, n, f, e), jnp.float32)],
      [pltpu.VMEM((f, e), jnp.float32)], interpret, "linear_attention_fwd")(
          q, k, v, *dec, s0)


def backward(q, k, v, bcum, s0, do, ds_final, *, chunk, has_decay, interpret, target=None):
  """(dq [B,N,T,F], dk and dv per query head [B,N,T,F|E], ds0 [B,N,F,E])."""
  del target
  b, n, t, f = q.shape
  e = v.shape[-1]
  dec = (bcum[..., None],) if has_decay else ()
  per_q, per_kv, state, nc = _specs(q, k, chunk, False)
  dq = _call(
      functools.partial(_dq_kernel, nc=nc, has_decay=has_decay), (b, n, nc),
      [per_q(e), per_kv(f), per_kv(e)] + ([per_q(1)] if has_decay else []) + [state(e)],
      per_q(f), jax.ShapeDtypeStruct((b, n, t, f), jnp.float32),
      [pltpu.VMEM((f, e), jnp.float32)], interpret, "linear_attention_dq")(
          do, k, v, *dec, s0)
  per_q, per_kv, state, nc = _specs(q, k, chunk, True)
  dk, dv, ds0 = _call(
      functools.partial(_dkv_kernel, nc=nc, has_decay=has_decay), (b, n, nc),
      [per_q(f), per_kv(f), per_kv(e), per_q(e)] + ([per_q(1)] if has_decay else [])
      + [state(e)],
      [per_q(f), per_q(e), state(e)],
      [jax.ShapeDtypeStruct((b, n, t, f), jnp.float32),
       jax.ShapeDtypeStruct((b, n, t, e), jnp.float32),
       jax.ShapeDtypeStruct((b, n, f, e), jnp.float32)],
      [pltpu.VMEM((f, e), jnp.float32)], interpret, "linear_attention_dkv")(
          q, k, v, do, *dec, ds_final)
  return dq, dk, dv, ds0
