"""GPU (Triton) fused neighborhood attention kernels, forward and backward (spec P2-23).

One program per (batch, head, query block); it loops over the key blocks of
its CSR list only (the union of its queries' windows), rebuilding the fine
mask from per-token window bounds. dk/dv programs loop over the CSC list and
over the query heads of their KV head (GQA without repeating K/V).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.neighborhood import common as C


def _fwd_kernel(lst_ref, cnt_ref, qlo_ref, qhi_ref, kc_ref, q_ref, k_ref, v_ref,
                o_ref, lse_ref, *, scale, tq):
  i = pl.program_id(2)
  q = q_ref[...]
  qlo, qhi = qlo_ref[...], qhi_ref[...]

  def body(s, carry):
    start = pl.multiple_of(lst_ref[i, s] * tq, tq)
    k = k_ref[pl.ds(start, tq), :]
    v = v_ref[pl.ds(start, tq), :]
    mask = C.fine_mask(qlo, qhi, kc_ref[:, pl.ds(start, tq)])
    return C.online_update(*carry, C.masked_logits(q, k, mask, scale), v)

  init = (jnp.full((tq, 1), C.NEG_INF, jnp.float32), jnp.zeros((tq, 1), jnp.float32),
          jnp.zeros((tq, v_ref.shape[-1]), jnp.float32))
  out, lse = C.finalize(*jax.lax.fori_loop(0, cnt_ref[i], body, init))
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


def _dq_kernel(lst_ref, cnt_ref, qlo_ref, qhi_ref, kc_ref, q_ref, k_ref, v_ref,
               do_ref, lse_ref, delta_ref, dq_ref, *, scale, tq):
  i = pl.program_id(2)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  qlo, qhi = qlo_ref[...], qhi_ref[...]

  def body(s, dq):
    start = pl.multiple_of(lst_ref[i, s] * tq, tq)
    k = k_ref[pl.ds(start, tq), :]
    v = v_ref[pl.ds(start, tq), :]
    mask = C.fine_mask(qlo, qhi, kc_ref[:, pl.ds(start, tq)])
    p = C.probs_from_lse(C.masked_logits(q, k, mask, scale), lse)
    ds = p * (C.dot_nt(do, v) - delta)
    return dq + C.dot_nn(ds.astype(k.dtype), k)

  dq = jax.lax.fori_loop(0, cnt_ref[i], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(lst_ref, cnt_ref, qlo_ref, qhi_ref, kc_ref, q_ref, k_ref, v_ref,
                do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, scale, tq, groups):
  j = pl.program_id(2)
  k, v = k_ref[...], v_ref[...]
  kc = kc_ref[...]

  def body(s, carry, g):
    dk, dv = carry
    start = pl.multiple_of(lst_ref[j, s] * tq, tq)
    q = q_ref[g, pl.ds(start, tq), :]
    do = do_ref[g, pl.ds(start, tq), :]
    lse = lse_ref[g, pl.ds(start, tq)][:, None]
    delta = delta_ref[g, pl.ds(start, tq)][:, None]
    mask = C.fine_mask(qlo_ref[pl.ds(start, tq), :], qhi_ref[pl.ds(start, tq), :], kc)
    p = C.probs_from_lse(C.masked_logits(q, k, mask, scale), lse)
    dv = dv + C.dot_tn(p.astype(do.dtype), do)
    ds = p * (C.dot_nt(do, v) - delta)
    dk = dk + C.dot_tn(ds.astype(q.dtype), q)
    return dk, dv

  carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  for g in range(groups):
    carry = jax.lax.fori_loop(0, cnt_ref[j], functools.partial(body, g=g), carry)
  dk_ref[...] = (carry[0] * scale).astype(dk_ref.dtype)
  dv_ref[...] = carry[1].astype(dv_ref.dtype)


def _full(shape):
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def forward(q, k, v, plan, *, scale, interpret):
  """q [B, N, L, H], k/v [B, K, L, H|Hv] in tiled order -> (o [B,N,L,Hv], lse [B,N,L])."""
  B, N, L, H = q.shape
  K, Hv = k.shape[1], v.shape[-1]
  G, tq, D = plan.num_blocks, plan.block, plan.k_coord.shape[0]
  Gq = N // K
  kernel = functools.partial(_fwd_kernel, scale=scale, tq=tq)
  return pl.pallas_call(
      kernel, grid=(B, N, G),
      in_specs=[_full(plan.kv_list.shape), _full(plan.kv_count.shape),
                pl.BlockSpec((tq, D), lambda b, n, i: (i, 0)),
                pl.BlockSpec((tq, D), lambda b, n, i: (i, 0)), _full((D, L)),
                pl.BlockSpec((None, None, tq, H), lambda b, n, i: (b, n, i, 0)),
                pl.BlockSpec((None, None, L, H), lambda b, n, i: (b, n // Gq, 0, 0)),
                pl.BlockSpec((None, None, L, Hv), lambda b, n, i: (b, n // Gq, 0, 0))],
      out_specs=[pl.BlockSpec((None, None, tq, Hv), lambda b, n, i: (b, n, i, 0)),
                 pl.BlockSpec((None, None, tq), lambda b, n, i: (b, n, i))],
      out_shape=[jax.ShapeDtypeStruct((B, N, L, Hv), q.dtype),
                 jax.ShapeDtypeStruct((B, N, L), jnp.float32)],
      interpret=interpret, name="na_fwd_gpu",
  )(jnp.asarray(plan.kv_list), jnp.asarray(plan.kv_count), jnp.asarray(plan.q_lo),
    jnp.asarray(plan.q_hi), jnp.asarray(plan.k_coord), q, k, v)


def backward(q, k, v, do, lse, delta, plan, *, scale, interpret):
  """Gradients (dq, dk, dv) given do [B,N,L,Hv], lse and delta [B,N,L] float32."""
  B, N, L, H = q.shape
  K, Hv = k.shape[1], v.shape[-1]
  G, tq, D = plan.num_blocks, plan.block, plan.k_coord.shape[0]
  Gq = N // K
  meta = [jnp.asarray(plan.q_lo), jnp.asarray(plan.q_hi), jnp.asarray(plan.k_coord)]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, tq=tq), grid=(B, N, G),
      in_specs=[_full(plan.kv_list.shape), _full(plan.kv_count.shape),
                pl.BlockSpec((tq, D), lambda b, n, i: (i, 0)),
                pl.BlockSpec((tq, D), lambda b, n, i: (i, 0)), _full((D, L)),
                pl.BlockSpec((None, None, tq, H), lambda b, n, i: (b, n, i, 0)),
                pl.BlockSpec((None, None, L, H), lambda b, n, i: (b, n // Gq, 0, 0)),
                pl.BlockSpec((None, None, L, Hv), lambda b, n, i: (b, n // Gq, 0, 0)),
                pl.BlockSpec((None, None, tq, Hv), lambda b, n, i: (b, n, i, 0)),
                pl.BlockSpec((None, None, tq), lambda b, n, i: (b, n, i)),
                pl.BlockSpec((None, None, tq), lambda b, n, i: (b, n, i))],
      out_specs=pl.BlockSpec((None, None, tq, H), lambda b, n, i: (b, n, i, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=interpret, name="na_dq_gpu",
  )(jnp.asarray(plan.kv_list), jnp.asarray(plan.kv_count), *meta, q, k, v, do, lse, delta)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, tq=tq, groups=Gq), grid=(B, K, G),
      in_specs=[_full(plan.q_list.shape), _full(plan.q_count.shape),
                _full((L, D)), _full((L, D)),
                pl.BlockSpec((D, tq), lambda b, h, j: (0, j)),
                pl.BlockSpec((None, Gq, L, H), lambda b, h, j: (b, h, 0, 0)),
                pl.BlockSpec((None, None, tq, H), lambda b, h, j: (b, h, j, 0)),
                pl.BlockSpec((None, None, tq, Hv), lambda b, h, j: (b, h, j, 0)),
                pl.BlockSpec((None, Gq, L, Hv), lambda b, h, j: (b, h, 0, 0)),
                pl.BlockSpec((None, Gq, L), lambda b, h, j: (b, h, 0)),
                pl.BlockSpec((None, Gq, L), lambda b, h, j: (b, h, 0))],
      out_specs=[pl.BlockSpec((None, None, tq, H), lambda b, h, j: (b, h, j, 0)),
                 pl.BlockSpec((None, None, tq, Hv), lambda b, h, j: (b, h, j, 0))],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      interpret=interpret, name="na_dkv_gpu",
  )(jnp.asarray(plan.q_list), jnp.asarray(plan.q_count), *meta, q, k, v, do, lse, delta)
  return dq, dk, dv
