"""TPU (Mosaic) fused neighborhood attention kernels, forward and backward (NATTEN FNA, arXiv:2403.04690).

The grid's last axis walks a query block's CSR list of key blocks (forward,
dq) or a key block's CSC list of query blocks times the query heads of its KV
head (dk/dv); the lists are scalar-prefetched so the index maps DMA only the
visited blocks. Steps past a list's length repeat its last block (no new DMA)
and skip compute. Window bounds ride along as small int32 blocks; the fine mask
is rebuilt in VMEM.

Every operand is viewed with a tile axis ([B, N, G, tq, c], bounds [G, tq, D],
key coordinates [G, D, tq]) so that each block spans whole trailing dims:
Mosaic then accepts any tile size tq, not only multiples of (8, 128). Each
kernel is compiled with the scoped VMEM limit its resource model prices
(:mod:`pallas_kernels.neighborhood.resources`).

Relative position bias (optional): a scalar-prefetched class list selects the
[tq, tq] block ``table[n, class(pair)]`` (:mod:`pallas_kernels.neighborhood.bias`)
that the index maps DMA next to K/V; the dq kernel writes every visited
pair's dS block (the bias gradient) through a prefetched slot list. Without a
bias the grids prefetch and read nothing more than before.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attnjax.core import flash as F
from pallas_kernels.neighborhood import common as C

_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


def _mask(qlo_ref, qhi_ref, kc_ref):
  """Fine mask [tq, tk] from the bounds [tq, D] and key coordinates [D, tk] in VMEM."""
  D = kc_ref.shape[0]
  return C.fine_mask([qlo_ref[:, d:d + 1] for d in range(D)],
                     [qhi_ref[:, d:d + 1] for d in range(D)],
                     [kc_ref[d:d + 1, :] for d in range(D)])


def _split(refs, npf, nin):
  """(prefetch, inputs, outputs + scratch) refs of a kernel."""
  return refs[:npf], refs[npf:npf + nin], refs[npf + nin:]


def _fwd_kernel(*refs, scale, rpb):
  (_, cnt_ref, *_), ins, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = _split(
      refs, 3 if rpb else 2, 7 if rpb else 6)
  q_ref, k_ref, v_ref, qlo_ref, qhi_ref, kc_ref = ins[:6]
  i, s = pl.program_id(2), pl.program_id(3)

  @pl.when(s == 0)
  def _init():
    m_sc[...], l_sc[...], acc_sc[...] = F.init_state(m_sc.shape[:1], acc_sc.shape[-1])

  @pl.when(s < cnt_ref[i])
  def _step():
    bias = ins[6][...] if rpb else None
    logits = C.masked_logits(q_ref[...], k_ref[...], _mask(qlo_ref, qhi_ref, kc_ref),
                             scale, bias)
    m, l, acc = F.online_update(m_sc[...], l_sc[...], acc_sc[...], logits, v_ref[...])
    m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

  @pl.when(s == pl.num_programs(3) - 1)
  def _done():
    out, lse = F.finalize(m_sc[...], l_sc[...], acc_sc[...])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _dq_kernel(*refs, scale, rpb):
  (_, cnt_ref, *_), ins, outs = _split(refs, 4 if rpb else 2, 10 if rpb else 9)
  (q_ref, k_ref, v_ref, qlo_ref, qhi_ref, kc_ref, do_ref, lse_ref, delta_ref) = ins[:9]
  dq_ref, ds_ref, dq_sc = outs if rpb else (outs[0], None, outs[1])
  i, s = pl.program_id(2), pl.program_id(3)

  @pl.when(s == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(s < cnt_ref[i])
  def _step():
    k = k_ref[...]
    bias = ins[9][...] if rpb else None
    mask = _mask(qlo_ref, qhi_ref, kc_ref)
    p = F.probs_from_lse(C.masked_logits(q_ref[...], k, mask, scale, bias), lse_ref[...], mask)
    ds = F.logits_grad(p, F.dot_nt(do_ref[...], v_ref[...]), delta_ref[...])
    if rpb:  # the logits' gradient is the bias gradient of this pair
      ds_ref[...] = ds
    dq_sc[...] += F.dot_nn(ds.astype(k.dtype), k)

  @pl.when(s == pl.num_programs(3) - 1)
  def _done():
    dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, scale, width, rpb):
  (_, cnt_ref, *_), ins, (dk_ref, dv_ref, dk_sc, dv_sc) = _split(
      refs, 3 if rpb else 2, 10 if rpb else 9)
  (q_ref, k_ref, v_ref, qlo_ref, qhi_ref, kc_ref, do_ref, lse_ref, delta_ref) = ins[:9]
  j, t = pl.program_id(2), pl.program_id(3)

  @pl.when(t == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(t % width < cnt_ref[j])
  def _step():
    q, do = q_ref[...], do_ref[...]
    bias = ins[9][...] if rpb else None
    mask = _mask(qlo_ref, qhi_ref, kc_ref)
    p = F.probs_from_lse(C.masked_logits(q, k_ref[...], mask, scale, bias), lse_ref[...], mask)
    dv_sc[...] += F.dot_tn(p.astype(do.dtype), do)
    ds = F.logits_grad(p, F.dot_nt(do, v_ref[...]), delta_ref[...])
    dk_sc[...] += F.dot_tn(ds.astype(q.dtype), q)

  @pl.when(t == pl.num_programs(3) - 1)
  def _done():
    dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _tiles(x, G):
  """[B, N, L, c] -> [B, N, G, tq, c]: every block spans whole trailing dims (any tq)."""
  return x.reshape(x.shape[:2] + (G, -1) + x.shape[3:])


def _meta(plan):
  """Window bounds [G, tq, D] and key coordinates [G, D, tq] of a plan."""
  G, tq, D = plan.num_blocks, plan.block, plan.k_coord.shape[0]
  kc = plan.k_coord.reshape(D, G, tq).transpose(1, 0, 2)
  return (jnp.asarray(plan.q_lo.reshape(G, tq, D)), jnp.asarray(plan.q_hi.reshape(G, tq, D)),
          jnp.asarray(kc))


def _params(vmem_limit):
  return pltpu.CompilerParams(dimension_semantics=_SEMANTICS, vmem_limit_bytes=vmem_limit)


def _row_specs(tq, H, Hv, D, Gq, W):
  """Specs of q, k, v, q_lo, q_hi, k_coord for the CSR grids (fwd, dq)."""
  kvb = lambda i, s, lst: lst[i * W + s]
  return [
      pl.BlockSpec((None, None, None, tq, H), lambda b, n, i, s, lst, *_: (b, n, i, 0, 0)),
      pl.BlockSpec((None, None, None, tq, H),
                   lambda b, n, i, s, lst, *_: (b, n // Gq, kvb(i, s, lst), 0, 0)),
      pl.BlockSpec((None, None, None, tq, Hv),
                   lambda b, n, i, s, lst, *_: (b, n // Gq, kvb(i, s, lst), 0, 0)),
      pl.BlockSpec((None, tq, D), lambda b, n, i, s, lst, *_: (i, 0, 0)),
      pl.BlockSpec((None, tq, D), lambda b, n, i, s, lst, *_: (i, 0, 0)),
      pl.BlockSpec((None, D, tq), lambda b, n, i, s, lst, *_: (kvb(i, s, lst), 0, 0)),
  ]


def _row_bias(bias, W, tq):
  """(prefetch, inputs, specs) adding the class list and table to a CSR grid."""
  if bias is None:
    return [], [], []
  table, bplan = bias
  spec = pl.BlockSpec((None, None, tq, tq),
                      lambda b, n, i, s, lst, cnt, cls, *_: (n, cls[i * W + s], 0, 0))
  return [jnp.asarray(bplan.kv_class.reshape(-1))], [table], [spec]


def forward(q, k, v, plan, *, scale, interpret, bias=None, vmem_limit=None):
  """q [B, N, L, H], k/v [B, K, L, H|Hv] in tiled order -> (o [B,N,L,Hv], lse [B,N,L]).

  ``bias``: None or (table float32 [N, C, tq, tq], BiasPlan). ``vmem_limit``:
  the scoped VMEM limit in bytes (None: the compiler's default).
  """
  B, N, L, H = q.shape
  K, Hv = k.shape[1], v.shape[-1]
  G, tq, D = plan.num_blocks, plan.block, plan.k_coord.shape[0]
  W = plan.kv_list.shape[1]
  pf, extra, specs = _row_bias(bias, W, tq)
  row = lambda b, n, i, s, *_: (b, n, i, 0, 0)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2 + len(pf), grid=(B, N, G, W),
      in_specs=_row_specs(tq, H, Hv, D, N // K, W) + specs,
      out_specs=[pl.BlockSpec((None, None, None, tq, Hv), row),
                 pl.BlockSpec((None, None, None, tq, 1), row)],
      scratch_shapes=[pltpu.VMEM((tq, 1), jnp.float32), pltpu.VMEM((tq, 1), jnp.float32),
                      pltpu.VMEM((tq, Hv), jnp.float32)])
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, rpb=bias is not None),
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((B, N, G, tq, Hv), q.dtype),
                 jax.ShapeDtypeStruct((B, N, G, tq, 1), jnp.float32)],
      compiler_params=_params(vmem_limit), interpret=interpret, name="na_fwd_tpu",
  )(jnp.asarray(plan.kv_list.reshape(-1)), jnp.asarray(plan.kv_count), *pf, _tiles(q, G),
    _tiles(k, G), _tiles(v, G), *_meta(plan), *extra)
  return out.reshape(B, N, L, Hv), lse.reshape(B, N, L)


def backward(q, k, v, do, lse, delta, plan, *, scale, interpret, bias=None, vmem_limit=None):
  """Gradients (dq, dk, dv, ds) given do [B,N,L,Hv], lse and delta [B,N,L] float32.

  With ``bias`` = (table [N, C, tq, tq], BiasPlan), ``ds`` is the float32
  per-pair logits gradient [B, N, num_slots, tq, tq] (CSR pair order; slots
  past num_pairs belong to query blocks without key blocks and stay unwritten);
  without it, None. ``vmem_limit``: None or the (dq, dk/dv) kernels' scoped
  VMEM limits in bytes.
  """
  B, N, L, H = q.shape
  K, Hv = k.shape[1], v.shape[-1]
  G = plan.num_blocks
  dq_limit, dkv_limit = (None, None) if vmem_limit is None else vmem_limit
  tiled = [_tiles(x, G) for x in (q, k, v, do, lse[..., None], delta[..., None])]
  dq, ds = _dq(*tiled, plan, scale, interpret, bias, dq_limit)
  dk, dv = _dkv(*tiled, plan, scale, interpret, bias, dkv_limit)
  return (dq.reshape(B, N, L, H), dk.reshape(B, K, L, H), dv.reshape(B, K, L, Hv), ds)


def _dq(q, k, v, do, lse, delta, plan, scale, interpret, bias, vmem_limit):
  """dq [B, N, G, tq, H] and the per-pair dS (rpb) over the CSR grid."""
  B, N, G, tq, H = q.shape
  K, Hv = k.shape[1], v.shape[-1]
  D, W = plan.k_coord.shape[0], plan.kv_list.shape[1]
  row = lambda b, n, i, s, *_: (b, n, i, 0, 0)
  pf, extra, specs = _row_bias(bias, W, tq)
  out_specs = pl.BlockSpec((None, None, None, tq, H), row)
  out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
  if bias is not None:
    bplan = bias[1]
    pf.append(jnp.asarray(bplan.pair_slot.reshape(-1)))
    slot = lambda b, n, i, s, lst, cnt, cls, sl: (b, n, sl[i * W + s], 0, 0)
    out_specs = [out_specs, pl.BlockSpec((None, None, None, tq, tq), slot)]
    out_shape = [out_shape,
                 jax.ShapeDtypeStruct((B, N, bplan.num_slots, tq, tq), jnp.float32)]
  res = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, rpb=bias is not None),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2 + len(pf), grid=(B, N, G, W),
          in_specs=_row_specs(tq, H, Hv, D, N // K, W) + [
              pl.BlockSpec((None, None, None, tq, Hv), row),
              pl.BlockSpec((None, None, None, tq, 1), row),
              pl.BlockSpec((None, None, None, tq, 1), row)] + specs,
          out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((tq, H), jnp.float32)]),
      out_shape=out_shape, compiler_params=_params(vmem_limit),
      interpret=interpret, name="na_dq_tpu",
  )(jnp.asarray(plan.kv_list.reshape(-1)), jnp.asarray(plan.kv_count), *pf, q, k, v,
    *_meta(plan), do, lse, delta, *extra)
  return res if bias is not None else (res, None)


def _dkv(q, k, v, do, lse, delta, plan, scale, interpret, bias, vmem_limit):
  """(dk, dv) [B, K, G, tq, H|Hv] over the CSC grid times the query heads of each KV head."""
  B, N, G, tq, H = q.shape
  K, Hv = k.shape[1], v.shape[-1]
  D, Gq, Wq = plan.k_coord.shape[0], N // K, plan.q_list.shape[1]
  qb = lambda j, t, lst: lst[j * Wq + t % Wq]
  qrow = lambda b, h, j, t, lst, *_: (b, h * Gq + t // Wq, qb(j, t, lst), 0, 0)
  kvrow = lambda b, h, j, t, *_: (b, h, j, 0, 0)
  pf, extra, specs = [], [], []
  if bias is not None:
    table, bplan = bias
    pf, extra = [jnp.asarray(bplan.q_class.reshape(-1))], [table]
    specs = [pl.BlockSpec((None, None, tq, tq), lambda b, h, j, t, lst, cnt, cls: (
        h * Gq + t // Wq, cls[j * Wq + t % Wq], 0, 0))]
  return pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, width=Wq, rpb=bias is not None),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2 + len(pf), grid=(B, K, G, Gq * Wq),
          in_specs=[
              pl.BlockSpec((None, None, None, tq, H), qrow),
              pl.BlockSpec((None, None, None, tq, H), kvrow),
              pl.BlockSpec((None, None, None, tq, Hv), kvrow),
              pl.BlockSpec((None, tq, D), lambda b, h, j, t, lst, *_: (qb(j, t, lst), 0, 0)),
              pl.BlockSpec((None, tq, D), lambda b, h, j, t, lst, *_: (qb(j, t, lst), 0, 0)),
              pl.BlockSpec((None, D, tq), lambda b, h, j, t, *_: (j, 0, 0)),
              pl.BlockSpec((None, None, None, tq, Hv), qrow),
              pl.BlockSpec((None, None, None, tq, 1), qrow),
              pl.BlockSpec((None, None, None, tq, 1), qrow)] + specs,
          out_specs=[pl.BlockSpec((None, None, None, tq, H), kvrow),
                     pl.BlockSpec((None, None, None, tq, Hv), kvrow)],
          scratch_shapes=[pltpu.VMEM((tq, H), jnp.float32),
                          pltpu.VMEM((tq, Hv), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(vmem_limit), interpret=interpret, name="na_dkv_tpu",
  )(jnp.asarray(plan.q_list.reshape(-1)), jnp.asarray(plan.q_count), *pf, q, k, v,
    *_meta(plan), do, lse, delta, *extra)
