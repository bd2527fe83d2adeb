"""GPU (Triton) Pallas kernels for chunked causal linear attention (Lightning Attention-2, arXiv:2401.04658).

Shapes follow attnjax.linear.engine: q [B, N, T, F], k [B, K, T, F],
v [B, K, T, E], the in-chunk cumulative log-decay as a column b [B, N, T, 1],
states [B, N, F, E]. Each program owns one (batch, query head) and one slab
of the state: a block of Eb value columns [F, Eb] (forward, dv) or of Fb
feature rows [Fb, E] (dq, dk), kept in registers while it walks the chunks of
its sequence in a fori_loop (forwards, or backwards for dk and dv) and loads
each chunk with `pl.ds` ref indexing. The grid is (B, N, E / Eb) or
(B, N, F / Fb). Splitting the state bounds the registers a program holds and
gives B * N * blocks programs instead of B * N; the price is that the
[C, C] score tile of a chunk is recomputed once per slab.

Four kernels: forward (o, final state), dq, dk (with ds0) and dv; every
formula is separable along the split axis (attnjax.core.chunk_math).
Compiled use needs power-of-two C, F, E >= 16 (the wrapper pads F and E);
`resources` checks the shared memory a configuration needs first.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attnjax.core import chunk_math
from pallas_kernels.linear import resources

try:  # the Triton dialect is importable on CPU builds too; guard anyway.
  from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - depends on the jaxlib build
  plgpu = None


def _slice(i, chunk):
  return pl.ds(pl.multiple_of(i * chunk, chunk), chunk)


def _walk(nc, chunk, reverse, step, init):
  """fori_loop over the chunks; step(slice, carry) -> carry."""
  def body(i, carry):
    return step(_slice(nc - 1 - i if reverse else i, chunk), carry)
  return lax.fori_loop(0, nc, body, init)


def _split(refs, n_in, has_decay):
  """(tensor refs, decay ref or None, state ref, output refs) of a kernel's refs."""
  refs = list(refs)
  ins, rest = refs[:n_in], refs[n_in:]
  b_ref = rest.pop(0) if has_decay else None
  return ins, b_ref, rest[0], rest[1:]


def _fwd_kernel(*refs, chunk, nc, has_decay):
  (q_ref, k_ref, v_ref), b_ref, s0_ref, (o_ref, sf_ref) = _split(refs, 3, has_decay)

  def step(sl, state):
    b = b_ref[sl, :] if has_decay else None
    o, state = chunk_math.chunk_forward(q_ref[sl, :], k_ref[sl, :], v_ref[sl, :], state, b)
    o_ref[sl, :] = o.astype(o_ref.dtype)
    return state

  sf_ref[...] = _walk(nc, chunk, False, step, s0_ref[...].astype(jnp.float32))


def _dq_kernel(*refs, chunk, nc, has_decay):
  (do_ref, k_ref, v_ref), b_ref, s0_ref, (dq_ref,) = _split(refs, 3, has_decay)

  def step(sl, state):
    b = b_ref[sl, :] if has_decay else None
    dq, state = chunk_math.chunk_grad_q(do_ref[sl, :], k_ref[sl, :], v_ref[sl, :], state, b)
    dq_ref[sl, :] = dq.astype(dq_ref.dtype)
    return state

  _walk(nc, chunk, False, step, s0_ref[...].astype(jnp.float32))


def _dk_kernel(*refs, chunk, nc, has_decay):
  (q_ref, v_ref, do_ref), b_ref, dsf_ref, (dk_ref, ds0_ref) = _split(refs, 3, has_decay)

  def step(sl, dstate):
    b = b_ref[sl, :] if has_decay else None
    dk, dstate = chunk_math.chunk_grad_k(q_ref[sl, :], v_ref[sl, :], do_ref[sl, :], dstate, b)
    dk_ref[sl, :] = dk.astype(dk_ref.dtype)
    return dstate

  ds0_ref[...] = _walk(nc, chunk, True, step, dsf_ref[...].astype(jnp.float32))


def _dv_kernel(*refs, chunk, nc, has_decay):
  (q_ref, k_ref, do_ref), b_ref, dsf_ref, (dv_ref,) = _split(refs, 3, has_decay)

  def step(sl, dstate):
    b = b_ref[sl, :] if has_decay else None
    dv, dstate = chunk_math.chunk_grad_v(q_ref[sl, :], k_ref[sl, :], do_ref[sl, :], dstate, b)
    dv_ref[sl, :] = dv.astype(dv_ref.dtype)
    return dstate

  _walk(nc, chunk, True, step, dsf_ref[...].astype(jnp.float32))


class _Specs:
  """BlockSpecs over the grid (B, N, slab) for a state split along `axis` ("f" or "e")."""

  def __init__(self, t, f, e, grp, axis, block):
    self.t, self.f, self.e, self.grp, self.axis, self.block = t, f, e, grp, axis, block

  def width(self, name):
    """Block width of a [.., T, F] ("f") or [.., T, E] ("e") tensor."""
    full = self.f if name == "f" else self.e
    return self.block if name == self.axis else full

  def _col(self, name, j):
    return j if name == self.axis else 0

  def per_q(self, name):
    return pl.BlockSpec((None, None, self.t, self.width(name)),
                        lambda b, n, j: (b, n, 0, self._col(name, j)))

  def per_kv(self, name):
    return pl.BlockSpec((None, None, self.t, self.width(name)),
                        lambda b, n, j: (b, n // self.grp, 0, self._col(name, j)))

  def decay(self):
    return pl.BlockSpec((None, None, self.t, 1), lambda b, n, j: (b, n, 0, 0))

  def state(self):
    return pl.BlockSpec((None, None, self.width("f"), self.width("e")),
                        lambda b, n, j: (b, n, self._col("f", j), self._col("e", j)))

  def grid(self, b, n):
    full = self.f if self.axis == "f" else self.e
    return (b, n, full // self.block)


def _params(plan, interpret):
  if interpret or plgpu is None:
    return None
  return plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages)


def _call(kernel, specs, b, n, in_specs, out_specs, out_shape, plan, interpret, name):
  return pl.pallas_call(
      kernel, grid=specs.grid(b, n), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, compiler_params=_params(plan, interpret),
      interpret=interpret, name=name)


def _decay_args(specs, bcum, has_decay):
  return ([specs.decay()], (bcum[..., None],)) if has_decay else ([], ())


def forward(q, k, v, bcum, s0, *, chunk, has_decay, interpret, target=None):
  """(o [B, N, T, E], final state [B, N, F, E]); grid (B, N, E / Eb)."""
  b, n, t, f = q.shape
  e = v.shape[-1]
  plan = resources.gpu_plan("forward", chunk, f, e, target, interpret)
  sp = _Specs(t, f, e, n // k.shape[1], "e", plan.block)
  dec_spec, dec = _decay_args(sp, bcum, has_decay)
  kernel = functools.partial(_fwd_kernel, chunk=chunk, nc=t // chunk, has_decay=has_decay)
  return _call(
      kernel, sp, b, n, [sp.per_q("f"), sp.per_kv("f"), sp.per_kv("e")] + dec_spec + [sp.state()],
      [sp.per_q("e"), sp.state()],
      [jax.ShapeDtypeStruct((b, n, t, e), jnp.float32),
       jax.ShapeDtypeStruct((b, n, f, e), jnp.float32)],
      plan, interpret, "linear_attention_fwd")(q, k, v, *dec, s0)


def _backward_call(kind, kernel, ins, in_names, outs, out_names, bcum, state_in, *, grp,
                   chunk, has_decay, interpret, target):
  """One backward pallas_call: in_names/out_names give each tensor's grid ("q"/"kv") and width."""
  b, n, t = outs[0][:3]
  f, e = state_in.shape[-2:]
  plan = resources.gpu_plan(kind, chunk, f, e, target, interpret)
  sp = _Specs(t, f, e, grp, "f" if kind in ("dq", "dk") else "e", plan.block)
  spec = lambda where, width: sp.per_q(width) if where == "q" else sp.per_kv(width)
  dec_spec, dec = _decay_args(sp, bcum, has_decay)
  out_specs = [spec("q", w) for w in out_names]
  out_shape = [jax.ShapeDtypeStruct(s, jnp.float32) for s in outs]
  if kind == "dk":
    out_specs.append(sp.state())
    out_shape.append(jax.ShapeDtypeStruct(state_in.shape, jnp.float32))
  fn = functools.partial(kernel, chunk=chunk, nc=t // chunk, has_decay=has_decay)
  return _call(fn, sp, b, n, [spec(*x) for x in in_names] + dec_spec + [sp.state()],
               out_specs, out_shape, plan, interpret, f"linear_attention_{kind}")(
                   *ins, *dec, state_in)


def backward(q, k, v, bcum, s0, do, ds_final, *, chunk, has_decay, interpret, target=None):
  """(dq [B,N,T,F], dk and dv per query head [B,N,T,F|E], ds0 [B,N,F,E]); four kernels."""
  b, n, t, f = q.shape
  e = v.shape[-1]
  kw = dict(grp=n // k.shape[1], chunk=chunk, has_decay=has_decay, interpret=interpret,
            target=target)
  (dq,) = _backward_call("dq", _dq_kernel, (do, k, v), [("q", "e"), ("kv", "f"), ("kv", "e")],
                         [(b, n, t, f)], ["f"], bcum, s0, **kw)
  dk, ds0 = _backward_call("dk", _dk_kernel, (q, v, do), [("q", "f"), ("kv", "e"), ("q", "e")],
                           [(b, n, t, f)], ["f"], bcum, ds_final, **kw)
  (dv,) = _backward_call("dv", _dv_kernel, (q, k, do), [("q", "f"), ("kv", "f"), ("q", "e")],
                         [(b, n, t, e)], ["e"], bcum, ds_final, **kw)
  return dq, dk, dv, ds0
