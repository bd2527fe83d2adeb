"""Block-sparse flash attention for NVIDIA GPUs (Pallas Triton lowering).

Why Triton and not Mosaic GPU: the Triton lowering runs on every CUDA GPU
JAX supports (Ampere, Hopper, Blackwell), keeps the BTNH layout without
transposes (strided loads), supports data-dependent loops (``fori_loop`` with a
run-time trip count read from the block list) and ``lax.cond`` for the
full/partial branch, and runs in interpret mode on CPU so the same kernel body
is tested in CI. Mosaic GPU (wgmma + TMA warp specialisation) is the faster
route on Hopper for dense attention, but its pipelining is built around
statically known block sequences; a data-dependent CSR walk there needs manual
TMA/barrier management per block that cannot be tested without a GPU.

Kernels (grid over q-blocks, batch, heads, as JAX's Triton flash attention):

- forward: program (i, b, h) loads its q tile, walks its CSR row of the
  ``BlockLayout`` (count first, then packed ``2 * k_block + full`` entries),
  and for each listed k-block loads K/V tiles straight from the [B, S, K, H]
  arrays of KV head ``h // G`` (GQA without repeating K/V).
- dQ: the same walk, recomputing probabilities from the saved lse.
- dK/dV: program (kb, b, kh) walks, for each of the G query heads of KV head
  kh, the CSC list of q-blocks that visit k-block kb, accumulating dK/dV of
  the whole group in registers.

Compiled use needs power-of-two block sizes >= 16; head dims that are not a
power of two are zero-padded (exact).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
import numpy as np

from pallas_kernels.block_sparse import common as C

try:  # the Triton dialect is importable on CPU builds too; guard anyway.
  from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - depends on the jaxlib build
  plgpu = None


def _pow2(n: int) -> bool:
  return n > 0 and (n & (n - 1)) == 0


def check_blocks(cfg):
  if cfg.interpret:
    return
  for name, b in (("block_q", cfg.block_q), ("block_kv", cfg.block_kv)):
    if not _pow2(b) or b < 16:
      raise ValueError(f"the GPU kernel needs {name} to be a power of two >= 16, got {b}.")


def _compiler_params(cfg, stages=None):
  if plgpu is None or cfg.interpret:
    return None
  tile = max(cfg.block_q, cfg.block_kv)
  warps = 8 if tile >= 128 and max(cfg.H, cfg.Hv) >= 128 else 4
  return plgpu.CompilerParams(num_warps=warps, num_stages=stages or (3 if tile <= 64 else 2))


def _pad_last(x, size):
  if x.shape[-1] == size:
    return x
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def _padded_dims(cfg):
  if cfg.interpret:
    return cfg.H, cfg.Hv
  return max(16, int(pl.next_power_of_2(cfg.H))), max(16, int(pl.next_power_of_2(cfg.Hv)))


def _side(cfg, aux, batch_of, q_spec_fn, k_spec_fn):
  """Position / segment arrays with BlockSpecs; returns (arrays, specs, names)."""
  q_pos, k_pos, q_seg, k_seg = aux
  arrays, specs, names = [], [], []
  items = []
  if cfg.has_q_pos:
    items.append(("q_pos", q_pos, cfg.pos_batched[0], q_spec_fn))
  if cfg.has_k_pos:
    items.append(("k_pos", k_pos, cfg.pos_batched[1], k_spec_fn))
  if cfg.has_segments:
    items += [("q_seg", q_seg, True, q_spec_fn), ("k_seg", k_seg, True, k_spec_fn)]
  for name, x, batched, spec_fn in items:
    arrays.append(x)
    specs.append(spec_fn(batched))
    names.append(name)
  return arrays, specs, names


def _q_side_block(cfg, b_axis, i_axis):
  def make(batched):
    return pl.BlockSpec((None, cfg.block_q),
                        lambda *g: (g[b_axis] if batched else 0, g[i_axis]))
  return make


def _full_side(length, b_axis):
  def make(batched):
    return pl.BlockSpec((None, length), lambda *g: (g[b_axis] if batched else 0, 0))
  return make


def _k_side_block(cfg, b_axis, k_axis):
  def make(batched):
    return pl.BlockSpec((None, cfg.block_kv),
                        lambda *g: (g[b_axis] if batched else 0, g[k_axis]))
  return make


def _context(cfg, side, qi, kb, q_local, k_local):
  """(q_pos [bq,1], k_pos [1,bk], q_seg, k_seg) for q-block qi and k-block kb.

  ``q_local``/``k_local``: the side refs hold only this block (True) or the
  whole sequence (False, sliced here).
  """
  bq, bk = cfg.block_q, cfg.block_kv

  def read(name, blk, size, local):
    ref = side[name]
    return ref[...] if local else ref[pl.ds(blk * size, size)]

  qp = (read("q_pos", qi, bq, q_local)[:, None] if "q_pos" in side
        else C.iota_positions(cfg.q_offset, qi * bq, bq, 0))
  kp = (read("k_pos", kb, bk, k_local)[None, :] if "k_pos" in side
        else C.iota_positions(cfg.k_offset, kb * bk, bk, 1))
  qs = read("q_seg", qi, bq, q_local)[:, None] if "q_seg" in side else None
  ks = read("k_seg", kb, bk, k_local)[None, :] if "k_seg" in side else None
  return qp, kp, qs, ks


def _branch(cfg, full, step, carry):
  """step(is_full)(carry) for the block kinds present, choosing at run time."""
  if cfg.any_full and cfg.any_partial:
    return lax.cond(full, step(True), step(False), carry)
  return step(cfg.any_full)(carry)


# -- forward -------------------------------------------------------------------
def _fwd_kernel(q_ref, k_ref, v_ref, rows_ref, *refs, cfg, names):
  side = dict(zip(names, refs[:len(names)]))
  o_ref, lse_ref = refs[len(names):]
  i, h = pl.program_id(0), pl.program_id(2)
  bk = cfg.block_kv
  q = q_ref[...]

  def body(j, carry):
    kb, full = C.decode(rows_ref[j + 1])

    def step(is_full):
      def run(carry):
        m, l, acc = carry
        sl = pl.ds(kb * bk, bk)
        k, v = k_ref[sl, :], v_ref[sl, :]
        qp, kp, qs, ks = _context(cfg, side, i, kb, True, False)
        _, s = C.block_logits(cfg, q, k, h, qp, kp)
        vis = C.visibility(cfg, h, qp, kp, qs, ks, is_full)
        return C.online_update(cfg, s, vis, v, m, l, acc)
      return run

    return _branch(cfg, full, step, carry)

  init = (jnp.full((cfg.block_q, 1), C.NEG_INF, jnp.float32),
          jnp.zeros((cfg.block_q, 1), jnp.float32),
          jnp.zeros((cfg.block_q, o_ref.shape[-1]), jnp.float32))
  m, l, acc = lax.fori_loop(0, rows_ref[0], body, init)
  out, lse = C.finalize(cfg, m, l, acc)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


def forward(cfg, lists, q, k, v, aux):
  """q [B,T,N,H] ... -> (out [B,T,N,Hv] cfg.out_dtype, lse [B,N,T] float32)."""
  check_blocks(cfg)
  Hp, Hvp = _padded_dims(cfg)
  qp_, kp_, vp_ = _pad_last(q, Hp), _pad_last(k, Hp), _pad_last(v, Hvp)
  G, bq, S = cfg.G, cfg.block_q, cfg.S
  lh = (lambda h: h) if cfg.layout_heads > 1 else (lambda h: 0)
  rows = lists["fwd_rows"]
  side_arrays, side_specs, names = _side(
      cfg, aux, None, _q_side_block(cfg, 1, 0), _full_side(S, 1))
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, names=tuple(names)),
      grid=(cfg.nq, cfg.B, cfg.N),
      in_specs=[
          pl.BlockSpec((None, bq, None, Hp), lambda i, b, h: (b, i, h, 0)),
          pl.BlockSpec((None, S, None, Hp), lambda i, b, h: (b, 0, h // G, 0)),
          pl.BlockSpec((None, S, None, Hvp), lambda i, b, h: (b, 0, h // G, 0)),
          pl.BlockSpec((None, None, rows.shape[-1]), lambda i, b, h: (lh(h), i, 0)),
      ] + side_specs,
      out_specs=[pl.BlockSpec((None, bq, None, Hvp), lambda i, b, h: (b, i, h, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct((cfg.B, cfg.T, cfg.N, Hvp), cfg.out_dtype),
                 jax.ShapeDtypeStruct((cfg.B, cfg.N, cfg.T), jnp.float32)],
      compiler_params=_compiler_params(cfg),
      interpret=cfg.interpret,
      name="block_sparse_fwd_gpu",
  )(qp_, kp_, vp_, rows, *side_arrays)
  return out[..., :cfg.Hv], lse


# -- backward: dQ ------------------------------------------------------------------
def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, rows_ref, *refs, cfg, names):
  side = dict(zip(names, refs[:len(names)]))
  (dq_ref,) = refs[len(names):]
  i, h = pl.program_id(0), pl.program_id(2)
  bk = cfg.block_kv
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]

  def body(j, dq):
    kb, full = C.decode(rows_ref[j + 1])

    def step(is_full):
      def run(dq):
        sl = pl.ds(kb * bk, bk)
        k, v = k_ref[sl, :], v_ref[sl, :]
        qp, kp, qs, ks = _context(cfg, side, i, kb, True, False)
        vis = C.visibility(cfg, h, qp, kp, qs, ks, is_full)
        ds, _ = C.block_grads(cfg, q, k, v, do, lse, delta, vis, h, qp, kp)
        return dq + C.dot_nn(ds.astype(k.dtype), k)
      return run

    return _branch(cfg, full, step, dq)

  dq = lax.fori_loop(0, rows_ref[0], body, jnp.zeros(dq_ref.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


# -- backward: dK, dV ------------------------------------------------------------
def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, rows_ref, *refs, cfg, names):
  side = dict(zip(names, refs[:len(names)]))
  dk_ref, dv_ref = refs[len(names):]
  kb, kh = pl.program_id(0), pl.program_id(2)
  bq = cfg.block_q
  k, v = k_ref[...], v_ref[...]

  def head_loop(g, carry):
    h = kh * cfg.G + g
    lh = h if cfg.layout_heads > 1 else 0

    def body(jj, carry):
      qi, full = C.decode(rows_ref[lh, jj + 1])

      def step(is_full):
        def run(carry):
          dk, dv = carry
          sl = pl.ds(qi * bq, bq)
          q, do = q_ref[sl, g, :], do_ref[sl, g, :]
          lse, delta = lse_ref[g, sl][:, None], delta_ref[g, sl][:, None]
          qp, kp, qs, ks = _context(cfg, side, qi, kb, False, True)
          vis = C.visibility(cfg, h, qp, kp, qs, ks, is_full)
          ds, p = C.block_grads(cfg, q, k, v, do, lse, delta, vis, h, qp, kp)
          return dk + C.dot_tn(ds.astype(q.dtype), q), dv + C.dot_tn(p.astype(do.dtype), do)
        return run

      return _branch(cfg, full, step, carry)

    return lax.fori_loop(0, rows_ref[lh, 0], body, carry)

  init = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
  dk, dv = lax.fori_loop(0, cfg.G, head_loop, init)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(cfg, lists, q, k, v, aux, do, lse, delta):
  """Gradients (dq, dk, dv) in the input dtypes; lse/delta are [B, N, T] float32."""
  Hp, Hvp = _padded_dims(cfg)
  qp_, kp_, vp_, dop = _pad_last(q, Hp), _pad_last(k, Hp), _pad_last(v, Hvp), _pad_last(do, Hvp)
  B, T, S, N, K, G = cfg.B, cfg.T, cfg.S, cfg.N, cfg.K, cfg.G
  bq, bk = cfg.block_q, cfg.block_kv
  lh = (lambda h: h) if cfg.layout_heads > 1 else (lambda h: 0)
  rows = lists["fwd_rows"]
  side_arrays, side_specs, names = _side(
      cfg, aux, None, _q_side_block(cfg, 1, 0), _full_side(S, 1))
  qrow = lambda i, b, h: (b, i, h, 0)
  lrow = lambda i, b, h: (b, h, i)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, names=tuple(names)),
      grid=(cfg.nq, B, N),
      in_specs=[
          pl.BlockSpec((None, bq, None, Hp), qrow),
          pl.BlockSpec((None, S, None, Hp), lambda i, b, h: (b, 0, h // G, 0)),
          pl.BlockSpec((None, S, None, Hvp), lambda i, b, h: (b, 0, h // G, 0)),
          pl.BlockSpec((None, bq, None, Hvp), qrow),
          pl.BlockSpec((None, None, bq), lrow),
          pl.BlockSpec((None, None, bq), lrow),
          pl.BlockSpec((None, None, rows.shape[-1]), lambda i, b, h: (lh(h), i, 0)),
      ] + side_specs,
      out_specs=pl.BlockSpec((None, bq, None, Hp), qrow),
      out_shape=jax.ShapeDtypeStruct((B, T, N, Hp), q.dtype),
      compiler_params=_compiler_params(cfg),
      interpret=cfg.interpret, name="block_sparse_dq_gpu",
  )(qp_, kp_, vp_, dop, lse, delta, rows, *side_arrays)

  # dK/dV: query-side arrays expose the GQA group axis: [B, T, K, G, H].
  q5 = qp_.reshape(B, T, K, G, Hp)
  do5 = dop.reshape(B, T, K, G, Hvp)
  lse4, delta4 = lse.reshape(B, K, G, T), delta.reshape(B, K, G, T)
  rows_b = lists["bwd_rows"]
  side_arrays, side_specs, names = _side(
      cfg, aux, None, _full_side(T, 1), _k_side_block(cfg, 1, 0))
  krow = lambda kb, b, kh: (b, kb, kh, 0)
  grow = lambda kb, b, kh: (b, kh, 0, 0)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, names=tuple(names)),
      grid=(cfg.nk, B, K),
      in_specs=[
          pl.BlockSpec((None, T, None, G, Hp), lambda kb, b, kh: (b, 0, kh, 0, 0)),
          pl.BlockSpec((None, bk, None, Hp), krow),
          pl.BlockSpec((None, bk, None, Hvp), krow),
          pl.BlockSpec((None, T, None, G, Hvp), lambda kb, b, kh: (b, 0, kh, 0, 0)),
          pl.BlockSpec((None, None, G, T), grow),
          pl.BlockSpec((None, None, G, T), grow),
          pl.BlockSpec((rows_b.shape[0], None, rows_b.shape[-1]), lambda kb, b, kh: (0, kb, 0)),
      ] + side_specs,
      out_specs=[pl.BlockSpec((None, bk, None, Hp), krow),
                 pl.BlockSpec((None, bk, None, Hvp), krow)],
      out_shape=[jax.ShapeDtypeStruct((B, S, K, Hp), k.dtype),
                 jax.ShapeDtypeStruct((B, S, K, Hvp), v.dtype)],
      compiler_params=_compiler_params(cfg),
      interpret=cfg.interpret, name="block_sparse_dkv_gpu",
  )(q5, kp_, vp_, do5, lse4, delta4, rows_b, *side_arrays)
  return dq[..., :cfg.H], dk[..., :cfg.H], dv[..., :cfg.Hv]


def _rows(indices, full, counts):
  code = C.encoded_lists(indices, full)
  return np.concatenate([counts[..., None].astype(np.int32), code], axis=-1)


def prepare_lists(layout):
  """Per-row lists [layout_heads, rows, 1 + width]: the count, then packed entries."""
  return {
      "fwd_rows": jnp.asarray(_rows(layout.fwd_indices, layout.fwd_full, layout.fwd_counts)),
      "bwd_rows": jnp.asarray(_rows(layout.bwd_indices, layout.bwd_full, layout.bwd_counts)),
  }
