"""GPU (Triton) fused neighborhood attention kernels, forward and backward (spec P2-23).

One program per (batch, head, query block); it loops over the key blocks of
its CSR list only (the union of its queries' windows), rebuilding the fine
mask from per-token window bounds. dk/dv programs loop over the CSC list and
over the query heads of their KV head (GQA without repeating K/V).

Relative position bias (optional): the programs add the [tq, tq] block
``table[n, class(pair)]`` (:mod:`pallas_kernels.neighborhood.bias`) to the
logits; the dq programs also write every visited pair's dS block, the bias
gradient. Without a bias the kernels take no bias inputs at all.

Compiled use (Triton lowering) needs power-of-two tiles of at least 16
queries and power-of-two head dims of at least 16.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.neighborhood import common as C

try:  # the Triton dialect is importable on CPU builds too; guard anyway.
  from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - depends on the jaxlib build
  plgpu = None


def _bounds(lo_ref, hi_ref, D, rows):
  """Window bounds of the queries ``rows`` as length-D lists of [tq, 1]."""
  return ([lo_ref[d, rows][:, None] for d in range(D)],
          [hi_ref[d, rows][:, None] for d in range(D)])


def _keys(kc_ref, D, cols):
  return [kc_ref[d, cols][None, :] for d in range(D)]


def _bias(bias_ref, c, tq, *head):
  """Class ``c``'s [tq, tq] block of a [(heads,) C * tq, tq] table ref."""
  return bias_ref[head + (pl.ds(pl.multiple_of(c * tq, tq), tq), slice(None))]


def _fwd_kernel(*refs, scale, tq, D, rpb):
  lst_ref, cnt_ref, qlo_ref, qhi_ref, kc_ref, q_ref, k_ref, v_ref = refs[:8]
  cls_ref, bias_ref = refs[8:10] if rpb else (None, None)
  o_ref, lse_ref = refs[-2:]
  i = pl.program_id(2)
  q = q_ref[...]
  lo, hi = _bounds(qlo_ref, qhi_ref, D, slice(None))

  def body(s, carry):
    start = pl.multiple_of(lst_ref[i, s] * tq, tq)
    k = k_ref[pl.ds(start, tq), :]
    v = v_ref[pl.ds(start, tq), :]
    mask = C.fine_mask(lo, hi, _keys(kc_ref, D, pl.ds(start, tq)))
    bias = _bias(bias_ref, cls_ref[i, s], tq) if rpb else None
    return C.online_update(*carry, C.masked_logits(q, k, mask, scale, bias), v)

  init = (jnp.full((tq, 1), C.NEG_INF, jnp.float32), jnp.zeros((tq, 1), jnp.float32),
          jnp.zeros((tq, v_ref.shape[-1]), jnp.float32))
  out, lse = C.finalize(*jax.lax.fori_loop(0, cnt_ref[i], body, init))
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


def _dq_kernel(*refs, scale, tq, D, rpb):
  (lst_ref, cnt_ref, qlo_ref, qhi_ref, kc_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
   delta_ref) = refs[:11]
  if rpb:
    cls_ref, slot_ref, bias_ref, dq_ref, ds_ref = refs[11:]
  else:
    (dq_ref,) = refs[11:]
  i = pl.program_id(2)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  lo, hi = _bounds(qlo_ref, qhi_ref, D, slice(None))

  def body(s, dq):
    start = pl.multiple_of(lst_ref[i, s] * tq, tq)
    k = k_ref[pl.ds(start, tq), :]
    v = v_ref[pl.ds(start, tq), :]
    mask = C.fine_mask(lo, hi, _keys(kc_ref, D, pl.ds(start, tq)))
    bias = _bias(bias_ref, cls_ref[i, s], tq) if rpb else None
    p = C.probs_from_lse(C.masked_logits(q, k, mask, scale, bias), lse)
    ds = p * (C.dot_nt(do, v) - delta)
    if rpb:  # the logits' gradient is the bias gradient of this pair
      ds_ref[pl.ds(pl.multiple_of(slot_ref[i, s] * tq, tq), tq), :] = ds
    return dq + C.dot_nn(ds.astype(k.dtype), k)

  dq = jax.lax.fori_loop(0, cnt_ref[i], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, scale, tq, D, groups, rpb):
  (lst_ref, cnt_ref, qlo_ref, qhi_ref, kc_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
   delta_ref) = refs[:11]
  cls_ref, bias_ref = refs[11:13] if rpb else (None, None)
  dk_ref, dv_ref = refs[-2:]
  j = pl.program_id(2)
  k, v = k_ref[...], v_ref[...]
  kc = _keys(kc_ref, D, slice(None))

  def body(s, carry, g):
    dk, dv = carry
    start = pl.multiple_of(lst_ref[j, s] * tq, tq)
    rows = pl.ds(start, tq)
    q = q_ref[g, rows, :]
    do = do_ref[g, rows, :]
    lse = lse_ref[g, rows][:, None]
    delta = delta_ref[g, rows][:, None]
    mask = C.fine_mask(*_bounds(qlo_ref, qhi_ref, D, rows), kc)
    bias = _bias(bias_ref, cls_ref[j, s], tq, g) if rpb else None
    p = C.probs_from_lse(C.masked_logits(q, k, mask, scale, bias), lse)
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


def _pow2(n):
  return n >= 16 and n & (n - 1) == 0


def _params(interpret, tq, H, Hv):
  """Triton compiler parameters (None in interpret mode); checks compiled shapes."""
  if interpret:
    return None
  if plgpu is None:  # pragma: no cover - depends on the jaxlib build
    raise ValueError("the compiled GPU neighborhood kernels need the Pallas Triton "
                     "lowering, which this jaxlib lacks; use interpret=True.")
  if not (_pow2(tq) and _pow2(H) and _pow2(Hv)):
    raise ValueError(
        f"the compiled GPU neighborhood kernels need power-of-two tiles and head dims "
        f">= 16, got {tq} queries per tile (tile_shape product) and head dims "
        f"H={H}, Hv={Hv}.")
  return plgpu.CompilerParams(num_warps=8 if tq * max(H, Hv) >= 128 * 64 else 4,
                              num_stages=2)


def _meta(plan):
  """Window bounds [D, L] (query-major rows for Triton loads) and key coordinates."""
  return (jnp.asarray(plan.q_lo.T.copy()), jnp.asarray(plan.q_hi.T.copy()),
          jnp.asarray(plan.k_coord))


def forward(q, k, v, plan, *, scale, interpret, bias=None):
  """q [B, N, L, H], k/v [B, K, L, H|Hv] in tiled order -> (o [B,N,L,Hv], lse [B,N,L]).

  ``bias``: None or (table float32 [N, C, tq, tq], BiasPlan).
  """
  B, N, L, H = q.shape
  K, Hv = k.shape[1], v.shape[-1]
  G, tq, D = plan.num_blocks, plan.block, plan.k_coord.shape[0]
  Gq = N // K
  rpb = bias is not None
  extra, specs = [], []
  if rpb:
    table, bplan = bias
    extra = [jnp.asarray(bplan.kv_class), table.reshape(N, -1, tq)]
    specs = [_full(bplan.kv_class.shape),
             pl.BlockSpec((None, table.shape[1] * tq, tq), lambda b, n, i: (n, 0, 0))]
  return pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, tq=tq, D=D, rpb=rpb), grid=(B, N, G),
      in_specs=[_full(plan.kv_list.shape), _full(plan.kv_count.shape),
                pl.BlockSpec((D, tq), lambda b, n, i: (0, i)),
                pl.BlockSpec((D, tq), lambda b, n, i: (0, i)), _full((D, L)),
                pl.BlockSpec((None, None, tq, H), lambda b, n, i: (b, n, i, 0)),
                pl.BlockSpec((None, None, L, H), lambda b, n, i: (b, n // Gq, 0, 0)),
                pl.BlockSpec((None, None, L, Hv), lambda b, n, i: (b, n // Gq, 0, 0))]
      + specs,
      out_specs=[pl.BlockSpec((None, None, tq, Hv), lambda b, n, i: (b, n, i, 0)),
                 pl.BlockSpec((None, None, tq), lambda b, n, i: (b, n, i))],
      out_shape=[jax.ShapeDtypeStruct((B, N, L, Hv), q.dtype),
                 jax.ShapeDtypeStruct((B, N, L), jnp.float32)],
      compiler_params=_params(interpret, tq, H, Hv), interpret=interpret,
      name="na_fwd_gpu",
  )(jnp.asarray(plan.kv_list), jnp.asarray(plan.kv_count), *_meta(plan), q, k, v, *extra)


def backward(q, k, v, do, lse, delta, plan, *, scale, interpret, bias=None):
  """Gradients (dq, dk, dv, ds) given do [B,N,L,Hv], lse and delta [B,N,L] float32.

  With ``bias`` = (table [N, C, tq, tq], BiasPlan), ``ds`` is the float32
  per-pair logits gradient [B, N, num_slots, tq, tq] (CSR pair order; slots
  past num_pairs are unused); without it, None.
  """
  B, N, L, H = q.shape
  K, Hv = k.shape[1], v.shape[-1]
  G, tq, D = plan.num_blocks, plan.block, plan.k_coord.shape[0]
  Gq = N // K
  rpb = bias is not None
  params = _params(interpret, tq, H, Hv)
  meta = _meta(plan)
  dq_extra, dq_specs, dkv_extra, dkv_specs = [], [], [], []
  out_specs = pl.BlockSpec((None, None, tq, H), lambda b, n, i: (b, n, i, 0))
  out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
  if rpb:
    table, bplan = bias
    C_ = table.shape[1]
    flat = table.reshape(N, C_ * tq, tq)
    slots = bplan.num_slots * tq
    dq_extra = [jnp.asarray(bplan.kv_class), jnp.asarray(bplan.pair_slot), flat]
    dq_specs = [_full(bplan.kv_class.shape), _full(bplan.pair_slot.shape),
                pl.BlockSpec((None, C_ * tq, tq), lambda b, n, i: (n, 0, 0))]
    out_specs = [out_specs, pl.BlockSpec((None, None, slots, tq), lambda b, n, i: (b, n, 0, 0))]
    out_shape = [out_shape, jax.ShapeDtypeStruct((B, N, slots, tq), jnp.float32)]
    dkv_extra = [jnp.asarray(bplan.q_class), flat]
    dkv_specs = [_full(bplan.q_class.shape),
                 pl.BlockSpec((Gq, C_ * tq, tq), lambda b, h, j: (h, 0, 0))]
  res = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, tq=tq, D=D, rpb=rpb), grid=(B, N, G),
      in_specs=[_full(plan.kv_list.shape), _full(plan.kv_count.shape),
                pl.BlockSpec((D, tq), lambda b, n, i: (0, i)),
                pl.BlockSpec((D, tq), lambda b, n, i: (0, i)), _full((D, L)),
                pl.BlockSpec((None, None, tq, H), lambda b, n, i: (b, n, i, 0)),
                pl.BlockSpec((None, None, L, H), lambda b, n, i: (b, n // Gq, 0, 0)),
                pl.BlockSpec((None, None, L, Hv), lambda b, n, i: (b, n // Gq, 0, 0)),
                pl.BlockSpec((None, None, tq, Hv), lambda b, n, i: (b, n, i, 0)),
                pl.BlockSpec((None, None, tq), lambda b, n, i: (b, n, i)),
                pl.BlockSpec((None, None, tq), lambda b, n, i: (b, n, i))] + dq_specs,
      out_specs=out_specs, out_shape=out_shape, compiler_params=params,
      interpret=interpret, name="na_dq_gpu",
  )(jnp.asarray(plan.kv_list), jnp.asarray(plan.kv_count), *meta, q, k, v, do, lse, delta,
    *dq_extra)
  dq, ds = (res[0], res[1].reshape(B, N, -1, tq, tq)) if rpb else (res, None)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, tq=tq, D=D, groups=Gq, rpb=rpb),
      grid=(B, K, G),
      in_specs=[_full(plan.q_list.shape), _full(plan.q_count.shape),
                _full((D, L)), _full((D, L)),
                pl.BlockSpec((D, tq), lambda b, h, j: (0, j)),
                pl.BlockSpec((None, Gq, L, H), lambda b, h, j: (b, h, 0, 0)),
                pl.BlockSpec((None, None, tq, H), lambda b, h, j: (b, h, j, 0)),
                pl.BlockSpec((None, None, tq, Hv), lambda b, h, j: (b, h, j, 0)),
                pl.BlockSpec((None, Gq, L, Hv), lambda b, h, j: (b, h, 0, 0)),
                pl.BlockSpec((None, Gq, L), lambda b, h, j: (b, h, 0)),
                pl.BlockSpec((None, Gq, L), lambda b, h, j: (b, h, 0))] + dkv_specs,
      out_specs=[pl.BlockSpec((None, None, tq, H), lambda b, h, j: (b, h, j, 0)),
                 pl.BlockSpec((None, None, tq, Hv), lambda b, h, j: (b, h, j, 0))],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=interpret, name="na_dkv_gpu",
  )(jnp.asarray(plan.q_list), jnp.asarray(plan.q_count), *meta, q, k, v, do, lse, delta,
    *dkv_extra)
  return dq, dk, dv, ds
