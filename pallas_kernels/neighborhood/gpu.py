"""GPU (Triton) fused neighborhood attention kernels, forward and backward (NATTEN FNA, arXiv:2403.04690).

One program per (batch, head, query sub-block of ``bq`` rows of a tile); it
loops over the key tiles of its tile's CSR list only (the union of its
queries' windows), ``bk`` keys per step, rebuilding the fine mask from
per-token window bounds. dk/dv programs own ``bk`` key rows of a tile and loop
over the CSC list in ``bq``-query steps, and over the query heads of their KV
head (GQA without repeating K/V). ``bq`` and ``bk`` divide the plan's tile
``tq`` and are chosen per kernel by the resource model
(:mod:`pallas_kernels.neighborhood.resources`) to fit the target's shared
memory, so the plan's tile (how many keys a query block visits) and the
program's block (what one Triton program holds) are independent.

Relative position bias (optional): the programs add the [bq, bk] part of the
[tq, tq] block ``table[n, class(pair)]`` (:mod:`pallas_kernels.neighborhood.bias`)
to the logits; the dq programs also write the same part of every visited
pair's dS block, the bias gradient. Without a bias the kernels take no bias
inputs at all.

Compiled use (Triton lowering) needs power-of-two blocks of at least 16;
head dims that are not powers of two (or below 16) are zero-padded (zeros add
nothing to q k^T, and the padded output columns are dropped).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from attnjax.core import flash as F
from pallas_kernels.neighborhood import common as C
from pallas_kernels.neighborhood import resources as R

try:  # the Triton dialect is importable on CPU builds too; guard anyway.
  from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - depends on the jaxlib build
  plgpu = None


def _bounds(lo_ref, hi_ref, D, rows):
  """Window bounds of the queries ``rows`` as length-D lists of [bq, 1]."""
  return ([lo_ref[d, rows][:, None] for d in range(D)],
          [hi_ref[d, rows][:, None] for d in range(D)])


def _keys(kc_ref, D, cols):
  return [kc_ref[d, cols][None, :] for d in range(D)]


def _divmod(x, n):
  """(x // n, x % n) of a non-negative int32 scalar (lax ops: jnp's sign fix-ups
  do not lower to Triton)."""
  n = jnp.int32(n)
  return jax.lax.div(x, n), jax.lax.rem(x, n)


def _at(start, size):
  return pl.ds(pl.multiple_of(start, size), size)


def _bias(bias_ref, c, r, kc, tq, bq, bk, *head):
  """Rows ``r * bq`` and columns ``kc * bk`` of class ``c``'s [tq, tq] block -> [bq, bk].

  ``bias_ref`` is a [(heads,) C * tq, tq] table ref.
  """
  return bias_ref[head + (_at(c * tq + r * bq, bq), _at(kc * bk, bk))]


def _fwd_kernel(*refs, scale, tq, bq, bk, D, rpb):
  lst_ref, cnt_ref, qlo_ref, qhi_ref, kc_ref, q_ref, k_ref, v_ref = refs[:8]
  cls_ref, bias_ref = refs[8:10] if rpb else (None, None)
  o_ref, lse_ref = refs[-2:]
  nq, nk = tq // bq, tq // bk
  i, r = _divmod(pl.program_id(2), nq)
  q = q_ref[...]
  lo, hi = _bounds(qlo_ref, qhi_ref, D, slice(None))

  def body(u, carry):
    s, c = _divmod(u, nk)
    cols = _at(lst_ref[i, s] * tq + c * bk, bk)
    mask = C.fine_mask(lo, hi, _keys(kc_ref, D, cols))
    bias = _bias(bias_ref, cls_ref[i, s], r, c, tq, bq, bk) if rpb else None
    logits = C.masked_logits(q, k_ref[cols, :], mask, scale, bias)
    return F.online_update(*carry, logits, v_ref[cols, :])

  init = F.init_state((bq,), v_ref.shape[-1])
  out, lse = F.finalize(*jax.lax.fori_loop(0, cnt_ref[i] * nk, body, init))
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


def _dq_kernel(*refs, scale, tq, bq, bk, D, rpb):
  (lst_ref, cnt_ref, qlo_ref, qhi_ref, kc_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
   delta_ref) = refs[:11]
  if rpb:
    cls_ref, slot_ref, bias_ref, dq_ref, ds_ref = refs[11:]
  else:
    (dq_ref,) = refs[11:]
  nq, nk = tq // bq, tq // bk
  i, r = _divmod(pl.program_id(2), nq)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  lo, hi = _bounds(qlo_ref, qhi_ref, D, slice(None))

  def body(u, dq):
    s, c = _divmod(u, nk)
    cols = _at(lst_ref[i, s] * tq + c * bk, bk)
    k = k_ref[cols, :]
    mask = C.fine_mask(lo, hi, _keys(kc_ref, D, cols))
    bias = _bias(bias_ref, cls_ref[i, s], r, c, tq, bq, bk) if rpb else None
    p = F.probs_from_lse(C.masked_logits(q, k, mask, scale, bias), lse, mask)
    ds = F.logits_grad(p, F.dot_nt(do, v_ref[cols, :]), delta)
    if rpb:  # the logits' gradient is the bias gradient of this pair
      ds_ref[_at(slot_ref[i, s] * tq + r * bq, bq), _at(c * bk, bk)] = ds
    return dq + F.dot_nn(ds.astype(k.dtype), k)

  dq = jax.lax.fori_loop(0, cnt_ref[i] * nk, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, scale, tq, bq, bk, D, groups, rpb):
  (lst_ref, cnt_ref, qlo_ref, qhi_ref, kc_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
   delta_ref) = refs[:11]
  cls_ref, bias_ref = refs[11:13] if rpb else (None, None)
  dk_ref, dv_ref = refs[-2:]
  nq, nk = tq // bq, tq // bk
  j, c = _divmod(pl.program_id(2), nk)
  k, v = k_ref[...], v_ref[...]
  kc = _keys(kc_ref, D, slice(None))

  def body(u, carry, g):
    dk, dv = carry
    s, r = _divmod(u, nq)
    rows = _at(lst_ref[j, s] * tq + r * bq, bq)
    q = q_ref[g, rows, :]
    do = do_ref[g, rows, :]
    lse = lse_ref[g, rows][:, None]
    delta = delta_ref[g, rows][:, None]
    mask = C.fine_mask(*_bounds(qlo_ref, qhi_ref, D, rows), kc)
    bias = _bias(bias_ref, cls_ref[j, s], r, c, tq, bq, bk, g) if rpb else None
    p = F.probs_from_lse(C.masked_logits(q, k, mask, scale, bias), lse, mask)
    dv = dv + F.dot_tn(p.astype(do.dtype), do)
    ds = F.logits_grad(p, F.dot_nt(do, v), delta)
    dk = dk + F.dot_tn(ds.astype(q.dtype), q)
    return dk, dv

  carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  for g in range(groups):
    carry = jax.lax.fori_loop(0, cnt_ref[j] * nq, functools.partial(body, g=g), carry)
  dk_ref[...] = (carry[0] * scale).astype(dk_ref.dtype)
  dv_ref[...] = carry[1].astype(dv_ref.dtype)


def _full(shape):
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _params(interpret, blocks):
  """Triton compiler parameters of a :class:`GpuBlocks` (None in interpret mode)."""
  if interpret:
    return None
  if plgpu is None:  # pragma: no cover - depends on the jaxlib build
    raise ValueError("the compiled GPU neighborhood kernels need the Pallas Triton "
                     "lowering, which this jaxlib lacks; use interpret=True.")
  return plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _meta(plan):
  """Window bounds [D, L] (query-major rows for Triton loads) and key coordinates."""
  return (jnp.asarray(plan.q_lo.T.copy()), jnp.asarray(plan.q_hi.T.copy()),
          jnp.asarray(plan.k_coord))


def _pad_heads(x, width):
  """Zero-pads the head dim of [B, N, L, H] to ``width`` (zeros change no dot product)."""
  extra = width - x.shape[-1]
  return x if extra == 0 else jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, extra),))


def _blocks(blocks, tq):
  """The given :class:`GpuBlocks`, or whole tiles (interpret mode default)."""
  return blocks if blocks is not None else R.GpuBlocks(tq, tq)


def forward(q, k, v, plan, *, scale, interpret, bias=None, blocks=None):
  """q [B, N, L, H], k/v [B, K, L, H|Hv] in tiled order -> (o [B,N,L,Hv], lse [B,N,L]).

  ``bias``: None or (table float32 [N, C, tq, tq], BiasPlan). ``blocks``: the
  kernel's :class:`GpuBlocks` (query rows per program, keys per step, Triton
  parameters, padded head dims); default: whole tiles, unpadded.
  """
  B, N, L, H = q.shape
  K, Hv = k.shape[1], v.shape[-1]
  G, tq, D = plan.num_blocks, plan.block, plan.k_coord.shape[0]
  cfg = _blocks(blocks, tq)
  Hp, Hvp = cfg.head_dims(H, Hv)
  q, k, v = _pad_heads(q, Hp), _pad_heads(k, Hp), _pad_heads(v, Hvp)
  bq, Gq = cfg.block_q, N // K
  rpb = bias is not None
  extra, specs = [], []
  if rpb:
    table, bplan = bias
    extra = [jnp.asarray(bplan.kv_class), table.reshape(N, -1, tq)]
    specs = [_full(bplan.kv_class.shape),
             pl.BlockSpec((None, table.shape[1] * tq, tq), lambda b, n, p: (n, 0, 0))]
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, tq=tq, bq=bq, bk=cfg.block_k, D=D,
                        rpb=rpb),
      grid=(B, N, G * (tq // bq)),
      in_specs=[_full(plan.kv_list.shape), _full(plan.kv_count.shape),
                pl.BlockSpec((D, bq), lambda b, n, p: (0, p)),
                pl.BlockSpec((D, bq), lambda b, n, p: (0, p)), _full((D, L)),
                pl.BlockSpec((None, None, bq, Hp), lambda b, n, p: (b, n, p, 0)),
                pl.BlockSpec((None, None, L, Hp), lambda b, n, p: (b, n // Gq, 0, 0)),
                pl.BlockSpec((None, None, L, Hvp), lambda b, n, p: (b, n // Gq, 0, 0))]
      + specs,
      out_specs=[pl.BlockSpec((None, None, bq, Hvp), lambda b, n, p: (b, n, p, 0)),
                 pl.BlockSpec((None, None, bq), lambda b, n, p: (b, n, p))],
      out_shape=[jax.ShapeDtypeStruct((B, N, L, Hvp), q.dtype),
                 jax.ShapeDtypeStruct((B, N, L), jnp.float32)],
      compiler_params=_params(interpret, cfg), interpret=interpret,
      name="na_fwd_gpu",
  )(jnp.asarray(plan.kv_list), jnp.asarray(plan.kv_count), *_meta(plan), q, k, v, *extra)
  return out[..., :Hv], lse


def backward(q, k, v, do, lse, delta, plan, *, scale, interpret, bias=None, blocks=None):
  """Gradients (dq, dk, dv, ds) given do [B,N,L,Hv], lse and delta [B,N,L] float32.

  With ``bias`` = (table [N, C, tq, tq], BiasPlan), ``ds`` is the float32
  per-pair logits gradient [B, N, num_slots, tq, tq] (CSR pair order; slots
  past num_pairs are unused); without it, None. ``blocks``: None (whole tiles)
  or the (dq, dkv) kernels' :class:`GpuBlocks`.
  """
  B, N, L, H = q.shape
  K, Hv = k.shape[1], v.shape[-1]
  G, tq, D = plan.num_blocks, plan.block, plan.k_coord.shape[0]
  qcfg, kcfg = (None, None) if blocks is None else blocks
  qcfg, kcfg = _blocks(qcfg, tq), _blocks(kcfg, tq)
  Hp, Hvp = qcfg.head_dims(H, Hv)
  q, k, v, do = _pad_heads(q, Hp), _pad_heads(k, Hp), _pad_heads(v, Hvp), _pad_heads(do, Hvp)
  dq, ds = _dq(q, k, v, do, lse, delta, plan, scale, interpret, bias, qcfg)
  dk, dv = _dkv(q, k, v, do, lse, delta, plan, scale, interpret, bias, kcfg)
  return dq[..., :H], dk[..., :H], dv[..., :Hv], ds


def _dq(q, k, v, do, lse, delta, plan, scale, interpret, bias, cfg):
  """dq [B, N, L, H] and the per-pair dS (rpb) of the CSR grid: one program per query sub-block."""
  B, N, L, H = q.shape
  K, Hv = k.shape[1], v.shape[-1]
  G, tq, D = plan.num_blocks, plan.block, plan.k_coord.shape[0]
  bq, Gq = cfg.block_q, N // K
  row = lambda b, n, p: (b, n, p, 0)
  specs, extra = [], []
  out_specs = pl.BlockSpec((None, None, bq, H), row)
  out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
  if bias is not None:
    table, bplan = bias
    C_ = table.shape[1]
    slots = bplan.num_slots * tq
    extra = [jnp.asarray(bplan.kv_class), jnp.asarray(bplan.pair_slot),
             table.reshape(N, C_ * tq, tq)]
    specs = [_full(bplan.kv_class.shape), _full(bplan.pair_slot.shape),
             pl.BlockSpec((None, C_ * tq, tq), lambda b, n, p: (n, 0, 0))]
    out_specs = [out_specs, pl.BlockSpec((None, None, slots, tq), lambda b, n, p: (b, n, 0, 0))]
    out_shape = [out_shape, jax.ShapeDtypeStruct((B, N, slots, tq), jnp.float32)]
  res = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, tq=tq, bq=bq, bk=cfg.block_k, D=D,
                        rpb=bias is not None),
      grid=(B, N, G * (tq // bq)),
      in_specs=[_full(plan.kv_list.shape), _full(plan.kv_count.shape),
                pl.BlockSpec((D, bq), lambda b, n, p: (0, p)),
                pl.BlockSpec((D, bq), lambda b, n, p: (0, p)), _full((D, L)),
                pl.BlockSpec((None, None, bq, H), row),
                pl.BlockSpec((None, None, L, H), lambda b, n, p: (b, n // Gq, 0, 0)),
                pl.BlockSpec((None, None, L, Hv), lambda b, n, p: (b, n // Gq, 0, 0)),
                pl.BlockSpec((None, None, bq, Hv), row),
                pl.BlockSpec((None, None, bq), lambda b, n, p: (b, n, p)),
                pl.BlockSpec((None, None, bq), lambda b, n, p: (b, n, p))] + specs,
      out_specs=out_specs, out_shape=out_shape, compiler_params=_params(interpret, cfg),
      interpret=interpret, name="na_dq_gpu",
  )(jnp.asarray(plan.kv_list), jnp.asarray(plan.kv_count), *_meta(plan), q, k, v, do, lse,
    delta, *extra)
  if bias is None:
    return res, None
  return res[0], res[1].reshape(B, N, -1, tq, tq)


def _dkv(q, k, v, do, lse, delta, plan, scale, interpret, bias, cfg):
  """(dk, dv) of the CSC grid: one program per key sub-block, looping over the query heads."""
  B, N, L, H = q.shape
  K, Hv = k.shape[1], v.shape[-1]
  G, tq, D = plan.num_blocks, plan.block, plan.k_coord.shape[0]
  bk, Gq = cfg.block_k, N // K
  row = lambda b, h, p: (b, h, p, 0)
  specs, extra = [], []
  if bias is not None:
    table, bplan = bias
    C_ = table.shape[1]
    extra = [jnp.asarray(bplan.q_class), table.reshape(N, C_ * tq, tq)]
    specs = [_full(bplan.q_class.shape),
             pl.BlockSpec((Gq, C_ * tq, tq), lambda b, h, p: (h, 0, 0))]
  return pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, tq=tq, bq=cfg.block_q, bk=bk, D=D,
                        groups=Gq, rpb=bias is not None),
      grid=(B, K, G * (tq // bk)),
      in_specs=[_full(plan.q_list.shape), _full(plan.q_count.shape),
                _full((D, L)), _full((D, L)),
                pl.BlockSpec((D, bk), lambda b, h, p: (0, p)),
                pl.BlockSpec((None, Gq, L, H), lambda b, h, p: (b, h, 0, 0)),
                pl.BlockSpec((None, None, bk, H), row),
                pl.BlockSpec((None, None, bk, Hv), row),
                pl.BlockSpec((None, Gq, L, Hv), lambda b, h, p: (b, h, 0, 0)),
                pl.BlockSpec((None, Gq, L), lambda b, h, p: (b, h, 0)),
                pl.BlockSpec((None, Gq, L), lambda b, h, p: (b, h, 0))] + specs,
      out_specs=[pl.BlockSpec((None, None, bk, H), row),
                 pl.BlockSpec((None, None, bk, Hv), row)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(interpret, cfg), interpret=interpret, name="na_dkv_gpu",
  )(jnp.asarray(plan.q_list), jnp.asarray(plan.q_count), *_meta(plan), q, k, v, do, lse,
    delta, *extra)
