"""Block-sparse flash attention for TPU (Pallas Mosaic), forward and backward.

Layout inside the kernels is [B, N, T, H] (the BTNH inputs are transposed once)
so that every block is a [rows, head_dim] tile, as Mosaic requires. The block
lists of the ``BlockLayout`` are scalar-prefetched into SMEM
(``PrefetchScalarGridSpec``); the k-block index_map reads them, so only
visited blocks are ever copied to VMEM:

- forward: grid (B, N, nq, max_kb); step j of q-block i visits the j-th listed
  k-block (CSR). Padded steps repeat the last block index, so no copy is
  issued and no compute runs for them.
- dQ: the same grid and lists, recomputing the probabilities from the lse.
- dK/dV: grid (B, K, nk, G * max_qb); the last axis runs over the G query
  heads of KV head kh and, for each, the q-blocks of its CSC list, so GQA
  gradients are summed in VMEM without repeating K/V or writing per-query-head
  partial gradients.

Run-time lists (``runtime.py``) add a batch axis to the prefetched lists
(``cfg.lists_batched``): the list row of grid step (b, h, i) is then
``(b * layout_heads + list_head(h)) * nq + i``.

Full blocks skip the mask predicate; partial blocks evaluate it from iota
positions (or from position arrays when given).

Attention dropout: the per-(batch, query head) Threefry keys are
scalar-prefetched too; every kernel regenerates the keep mask of the block it
visits from them (``common.dropout_keep``), the same bits as the XLA engine
and the reference.

Padded batches: per-batch lengths are scalar-prefetched too ([2B]: q_len then
kv_len), with per-batch counts of the listed blocks that start inside the
lengths (lists are ascending, so those are a prefix of each row). Steps past
that count repeat the last kept block index (no copy, no compute); a block
across a length runs the masked body with the length test. Additive bias and
boolean mask arrays ([Bx, Nx, Tx, Sx], dims of 1 broadcast) are read by
BlockSpecs over the visited block's [bq|1, bk|1] tile; the mask as int8. When
the bias is differentiated the dQ kernel also writes each visited block's
logit gradient into a zero-initialised (aliased) [B, N, T, S] float32 array. Real TPUs need
``block_q % 8 == 0`` and ``block_kv % 128 == 0`` (checked when not
interpreting). The packed lists live in SMEM (about 1 MiB = 261,632 int32
entries on v5e/v5p/v6e/7x, see ``pallas_kernels.targets.budgets``), shared by
the code and count arrays of one pallas_call. Longer lists are cut into
chunks along the q-block axis (forward, dQ) or the k-block axis (dK/dV): one
pallas_call per chunk, each prefetching only its slice of the lists
(``cfg.smem_list_entries`` bounds a chunk, ``resources.list_chunks``); the
chunk outputs are concatenated along the sequence axis (one extra copy of
the outputs when there is more than one chunk).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attnjax.core import flash as F
from pallas_kernels.block_sparse import common as C
from pallas_kernels.block_sparse import lists as L


def _interpret_arg(cfg):
  return pltpu.InterpretParams() if cfg.interpret else False


def check_blocks(cfg, bias_dtype=None):
  if cfg.interpret:
    return
  if cfg.block_q % 8 or cfg.block_kv % 128:
    raise ValueError(
        f"the TPU kernel needs block_q % 8 == 0 and block_kv % 128 == 0, got "
        f"block_q={cfg.block_q}, block_kv={cfg.block_kv}: rebuild the layout with "
        "larger blocks.")
  for name, shape, itemsize in (("mask_array", cfg.mask_shape, 1),
                                ("bias", cfg.bias_shape,
                                 jnp.dtype(bias_dtype or jnp.float32).itemsize)):
    sub = 8 * max(1, 4 // itemsize)
    if shape is not None and shape[2] > 1 and cfg.block_q % sub:
      raise ValueError(
          f"the TPU kernel reads {name} in [block_q, block_kv] tiles, which needs block_q % "
          f"{sub} == 0 for its dtype; got block_q={cfg.block_q}: use larger blocks.")


def _count_row(cfg, b, row, rows):
  """Index into the counts of list row ``row`` (per-batch counts with lengths)."""
  if cfg.has_lengths:
    return b * cfg.layout_heads * rows + row
  return row


def _entry(cfg, code_ref, count_ref, b, row, rows, j, width):
  """The packed list entry of step j (steps past the kept count repeat the last kept)."""
  if cfg.has_lengths:
    j = jnp.minimum(j, jnp.maximum(count_ref[_count_row(cfg, b, row, rows)] - 1, 0))
  return code_ref[row * width + j]


def _lens(cfg, lens_ref, b):
  return (lens_ref[b], lens_ref[cfg.B + b]) if cfg.has_lengths else (None, None)


def _kept_full(cfg, full, qi, kb, lens):
  """A full block stays unmasked only when it lies inside both lengths."""
  if not cfg.has_lengths:
    return full
  q_len, kv_len = lens
  inside = ((qi + 1) * cfg.block_q <= q_len) & ((kb + 1) * cfg.block_kv <= kv_len)
  return jnp.logical_and(full, inside)


def _len_vis(cfg, qi, kb, lens):
  if not cfg.has_lengths:
    return None
  return C.length_visibility(qi * cfg.block_q, cfg.block_q, kb * cfg.block_kv, cfg.block_kv,
                             *lens)


def _scalars(cfg, code, counts, aux):
  """The scalar-prefetch operands: (code, counts[, lens [2B]][, dropout keys [B*N*2]]).

  The dropout keys (``Aux.drop``, uint32 [B, N, 2]) travel bitcast to int32.
  """
  out = (code, counts)
  if cfg.has_lengths:
    out += (jnp.concatenate(aux.lens),)
  if cfg.dropout_rate > 0:
    out += (lax.bitcast_convert_type(aux.drop, jnp.int32).reshape(-1),)
  return out


def _split_scalars(cfg, refs):
  """((code, counts, lens or None, dropout keys or None), the other refs)."""
  n = 2 + int(cfg.has_lengths)
  lens = refs[2] if cfg.has_lengths else None
  drop = refs[n] if cfg.dropout_rate > 0 else None
  n += int(cfg.dropout_rate > 0)
  return (refs[0], refs[1], lens, drop), refs[n:]


def _keep(cfg, drop_ref, b, h, qi, kb):
  """Dropout multiplier [bq, bk] of block (qi, kb) of (batch b, query head h), or None."""
  if drop_ref is None:
    return None
  at = (b * cfg.N + h) * 2
  key = (drop_ref[at].astype(jnp.uint32), drop_ref[at + 1].astype(jnp.uint32))
  return C.dropout_keep(cfg, key, qi * cfg.block_q, cfg.block_q, kb * cfg.block_kv,
                        cfg.block_kv)


# -- bias / mask-array tiles -------------------------------------------------------
def _pair_inputs(cfg, aux, bias, coords):
  """Bias and mask-array operands with BlockSpecs over the visited block's tile.

  ``coords(*grid, *scalar_refs)`` -> (b, h, q-block, k-block).
  """
  arrays, specs, names = [], [], []
  for name, x, shape in (("bias", bias, cfg.bias_shape), ("mask", aux.mask, cfg.mask_shape)):
    if shape is None:
      continue
    arrays.append(x)
    specs.append(pl.BlockSpec(
        (None, None) + C.pair_block(shape, cfg.block_q, cfg.block_kv),
        lambda *a, shape=shape: C.pair_index(shape, *coords(*a))))
    names.append(name)
  return arrays, specs, names


def _tile(side, name):
  return side[name][...] if name in side else None


# -- position / segment side inputs --------------------------------------------
def _side_inputs(cfg, aux, q_block_fn, k_block_fn):
  """Side arrays (positions, segment ids) with their BlockSpecs.

  ``q_block_fn(grid..., refs)`` -> (batch, q-block) and ``k_block_fn`` ->
  (batch, k-block) give the block coordinates from the grid indices.
  q-side arrays are [Bq, T, 1], k-side [Bk, 1, S].
  """
  q_pos, k_pos, q_seg, k_seg = aux[:4]
  arrays, specs, names = [], [], []

  def add_q(name, x, batched):
    arrays.append(x.reshape(x.shape[0], cfg.T, 1))
    specs.append(pl.BlockSpec(
        (None, cfg.block_q, 1),
        lambda *a: (lambda bb, ii: (bb if batched else 0, ii, 0))(*q_block_fn(*a))))
    names.append(name)

  def add_k(name, x, batched):
    arrays.append(x.reshape(x.shape[0], 1, cfg.S))
    specs.append(pl.BlockSpec(
        (None, 1, cfg.block_kv),
        lambda *a: (lambda bb, kk: (bb if batched else 0, 0, kk))(*k_block_fn(*a))))
    names.append(name)

  if cfg.has_q_pos:
    add_q("q_pos", q_pos, cfg.pos_batched[0])
  if cfg.has_k_pos:
    add_k("k_pos", k_pos, cfg.pos_batched[1])
  if cfg.has_segments:
    add_q("q_seg", q_seg, True)
    add_k("k_seg", k_seg, True)
  return arrays, specs, names


def _block_context(cfg, side, head, qi, kb):
  """(q_pos [bq,1], k_pos [1,bk], q_seg, k_seg) inside a kernel."""
  qp = side["q_pos"][...] if "q_pos" in side else C.iota_positions(
      cfg.q_offset, qi * cfg.block_q, cfg.block_q, 0)
  kp = side["k_pos"][...] if "k_pos" in side else C.iota_positions(
      cfg.k_offset, kb * cfg.block_kv, cfg.block_kv, 1)
  qs = side["q_seg"][...] if "q_seg" in side else None
  ks = side["k_seg"][...] if "k_seg" in side else None
  return qp, kp, qs, ks


def _run_block(cfg, body, full):
  """Calls body(full) for the block kinds the layout has, branching at run time."""
  if cfg.any_full and cfg.masks_blocks:
    pl.when(full)(lambda: body(True))
    pl.when(jnp.logical_not(full))(lambda: body(False))
  else:
    body(cfg.any_full)


# -- forward ---------------------------------------------------------------------
def _fwd_kernel(*refs, cfg, names, i0, rows):
  (code_ref, count_ref, lens_ref, drop_ref), refs = _split_scalars(cfg, refs)
  q_ref, k_ref, v_ref = refs[:3]
  side = dict(zip(names, refs[3:3 + len(names)]))
  o_ref, lse_ref, m_scr, l_scr, acc_scr = refs[3 + len(names):]
  b, h, il, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  row = C.list_row(cfg, b, h, il, rows)
  i = il + i0
  lens = _lens(cfg, lens_ref, b)

  @pl.when(j == 0)
  def _init():
    m_scr[...], l_scr[...], acc_scr[...] = F.init_state(m_scr.shape[:1], acc_scr.shape[-1])

  @pl.when(j < count_ref[_count_row(cfg, b, row, rows)])
  def _visit():
    kb, full = C.decode(code_ref[row * cfg.max_kb + j])

    def body(is_full):
      qp, kp, qs, ks = _block_context(cfg, side, h, i, kb)
      _, s = C.block_logits(cfg, q_ref[...], k_ref[...], h, qp, kp, _tile(side, "bias"))
      vis = C.visibility(cfg, h, qp, kp, qs, ks, is_full, _tile(side, "mask"),
                         None if is_full else _len_vis(cfg, i, kb, lens))
      m, l, acc = C.online_update(cfg, s, vis, v_ref[...], m_scr[...], l_scr[...], acc_scr[...],
                                  _keep(cfg, drop_ref, b, h, i, kb))
      m_scr[...], l_scr[...], acc_scr[...] = m, l, acc

    _run_block(cfg, body, _kept_full(cfg, full, i, kb, lens))

  @pl.when(j == cfg.max_kb - 1)
  def _done():
    out, lse = C.finalize(cfg, m_scr[...], l_scr[...], acc_scr[...])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _params(cfg):
  return pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
      vmem_limit_bytes=cfg.vmem_limit_bytes)


def _cat(parts, axis):
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis)


def _lists(cfg, lists, aux, name, n, width, forward):
  """List chunks (start, stop, code, counts); counts are per batch with lengths."""
  code, counts = lists[f"{name}_code"], lists[f"{name}_counts"]
  if cfg.has_lengths:
    counts = L.tpu_length_counts(cfg, code, counts, n, width, aux.lens, forward)
  return L.tpu_list_slices(cfg, code, counts, n, width)


def forward(cfg, lists, q, k, v, aux, bias=None):
  """q [B,T,N,H] ... -> (out [B,T,N,Hv] cfg.out_dtype, lse [B,N,T] float32)."""
  check_blocks(cfg, None if bias is None else bias.dtype)
  qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
  outs, lses = [], []
  for i0, i1, code, counts in _lists(cfg, lists, aux, "fwd", cfg.nq, cfg.max_kb, True):
    out, lse = _forward_chunk(cfg, code, counts, qt, kt, vt, aux, bias, i0, i1 - i0)
    outs.append(out)
    lses.append(lse)
  return jnp.swapaxes(_cat(outs, 2), 1, 2), _cat(lses, 2)[..., 0]


def _forward_chunk(cfg, code, counts, qt, kt, vt, aux, bias, i0, rows):
  """Forward over q-blocks [i0, i0 + rows): (out [B,N,rows*bq,Hv], lse [B,N,rows*bq,1])."""
  G, bq, bk = cfg.G, cfg.block_q, cfg.block_kv
  scalars = _scalars(cfg, code, counts, aux)

  def kb_of(b, h, i, j, code_ref, count_ref, *_):
    row = C.list_row(cfg, b, h, i, rows)
    return _entry(cfg, code_ref, count_ref, b, row, rows, j, cfg.max_kb) // 2

  kv_block = lambda b, h, i, j, *r: (b, h // G, kb_of(b, h, i, j, *r), 0)
  q_blk = lambda b, h, i, j, *_: (b, i + i0)
  k_blk = lambda b, h, i, j, *r: (b, kb_of(b, h, i, j, *r))
  side_arrays, side_specs, names = _side_inputs(cfg, aux, q_blk, k_blk)
  pair_arrays, pair_specs, pair_names = _pair_inputs(
      cfg, aux, bias, lambda b, h, i, j, *r: (b, h, i + i0, kb_of(b, h, i, j, *r)))
  in_specs = [
      pl.BlockSpec((None, None, bq, cfg.H), lambda b, h, i, j, *_: (b, h, i + i0, 0)),
      pl.BlockSpec((None, None, bk, cfg.H), kv_block),
      pl.BlockSpec((None, None, bk, cfg.Hv), kv_block),
  ] + side_specs + pair_specs
  out_specs = [
      pl.BlockSpec((None, None, bq, cfg.Hv), lambda b, h, i, j, *_: (b, h, i, 0)),
      pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j, *_: (b, h, i, 0)),
  ]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(scalars), grid=(cfg.B, cfg.N, rows, cfg.max_kb),
      in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, cfg.Hv), jnp.float32)])
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, names=tuple(names + pair_names), i0=i0,
                        rows=rows),
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((cfg.B, cfg.N, rows * bq, cfg.Hv), cfg.out_dtype),
                 jax.ShapeDtypeStruct((cfg.B, cfg.N, rows * bq, 1), jnp.float32)],
      compiler_params=_params(cfg),
      interpret=_interpret_arg(cfg),
      name="block_sparse_fwd",
  )(*scalars, qt, kt, vt, *side_arrays, *pair_arrays)


# -- backward: dQ ------------------------------------------------------------------
def _dq_kernel(*refs, cfg, names, i0, rows, with_ds):
  (code_ref, count_ref, lens_ref, drop_ref), refs = _split_scalars(cfg, refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
  side = dict(zip(names, refs[6:6 + len(names)]))
  refs = refs[6 + len(names):]
  if with_ds:   # the aliased zeros input of dS (never read)
    refs = refs[1:]
  dq_ref, ds_ref, dq_scr = (refs[0], refs[1], refs[2]) if with_ds else (refs[0], None, refs[1])
  b, h, il, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  row = C.list_row(cfg, b, h, il, rows)
  count = count_ref[_count_row(cfg, b, row, rows)]
  i = il + i0
  lens = _lens(cfg, lens_ref, b)

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)
    if with_ds:   # a row with nothing to visit still owns the dS block its steps point at
      @pl.when(count == 0)
      def _():
        ds_ref[...] = jnp.zeros(ds_ref.shape, ds_ref.dtype)

  @pl.when(j < count)
  def _visit():
    kb, full = C.decode(code_ref[row * cfg.max_kb + j])

    def body(is_full):
      qp, kp, qs, ks = _block_context(cfg, side, h, i, kb)
      vis = C.visibility(cfg, h, qp, kp, qs, ks, is_full, _tile(side, "mask"),
                         None if is_full else _len_vis(cfg, i, kb, lens))
      k = k_ref[...]
      grads = C.block_grads(cfg, q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...],
                            delta_ref[...], vis, h, qp, kp, _tile(side, "bias"), with_ds,
                            _keep(cfg, drop_ref, b, h, i, kb))
      dq_scr[...] += C.dot_nn(grads[0].astype(k.dtype), k)
      if with_ds:
        ds_ref[...] = jnp.broadcast_to(grads[2], ds_ref.shape).astype(ds_ref.dtype)

    _run_block(cfg, body, _kept_full(cfg, full, i, kb, lens))

  @pl.when(j == cfg.max_kb - 1)
  def _done():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


# -- backward: dK, dV ------------------------------------------------------------
def _dkv_kernel(*refs, cfg, names, i0, rows):
  (code_ref, count_ref, lens_ref, drop_ref), refs = _split_scalars(cfg, refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
  side = dict(zip(names, refs[6:6 + len(names)]))
  dk_ref, dv_ref, dk_scr, dv_scr = refs[6 + len(names):]
  b, kh, kl, t = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  h = kh * cfg.G + t // cfg.max_qb
  jj = t % cfg.max_qb
  row = C.list_row(cfg, b, h, kl, rows)
  kb = kl + i0
  lens = _lens(cfg, lens_ref, b)

  @pl.when(t == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  @pl.when(jj < count_ref[_count_row(cfg, b, row, rows)])
  def _visit():
    qi, full = C.decode(code_ref[row * cfg.max_qb + jj])

    def body(is_full):
      qp, kp, qs, ks = _block_context(cfg, side, h, qi, kb)
      vis = C.visibility(cfg, h, qp, kp, qs, ks, is_full, _tile(side, "mask"),
                         None if is_full else _len_vis(cfg, qi, kb, lens))
      q, do = q_ref[...], do_ref[...]
      ds, p = C.block_grads(cfg, q, k_ref[...], v_ref[...], do, lse_ref[...],
                            delta_ref[...], vis, h, qp, kp, _tile(side, "bias"),
                            keep=_keep(cfg, drop_ref, b, h, qi, kb))
      dv_scr[...] += C.dot_tn(p.astype(do.dtype), do)
      dk_scr[...] += C.dot_tn(ds.astype(q.dtype), q)

    _run_block(cfg, body, _kept_full(cfg, full, qi, kb, lens))

  @pl.when(t == cfg.G * cfg.max_qb - 1)
  def _done():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward(cfg, lists, q, k, v, aux, bias, do, lse, delta, want_dbias=False):
  """Gradients (dq, dk, dv, ds); lse/delta are [B, N, T] float32.

  ``ds``: with ``want_dbias`` (and a bias), dL/d(logits) as float32 [B, N, T, S]
  (zero outside the visited blocks), else None.
  """
  check_blocks(cfg, None if bias is None else bias.dtype)
  arrays = tuple(jnp.swapaxes(x, 1, 2) for x in (q, k, v, do)) + (lse[..., None],
                                                                   delta[..., None])
  with_ds = bool(want_dbias) and bias is not None
  ds = jnp.zeros((cfg.B, cfg.N, cfg.T, cfg.S), jnp.float32) if with_ds else None
  dqs = []
  for a, b_, code, counts in _lists(cfg, lists, aux, "fwd", cfg.nq, cfg.max_kb, True):
    dq, ds = _dq_chunk(cfg, code, counts, arrays, aux, bias, ds, a, b_ - a)
    dqs.append(dq)
  dq = _cat(dqs, 2)
  parts = [_dkv_chunk(cfg, code, counts, arrays, aux, bias, a, b_ - a) for a, b_, code, counts
           in _lists(cfg, lists, aux, "bwd", cfg.nk, cfg.max_qb, False)]
  dk = _cat([p[0] for p in parts], 2)
  dv = _cat([p[1] for p in parts], 2)
  return jnp.swapaxes(dq, 1, 2), jnp.swapaxes(dk, 1, 2), jnp.swapaxes(dv, 1, 2), ds


def _dq_chunk(cfg, code, counts, arrays, aux, bias, ds, i0, rows):
  """dQ of q-blocks [i0, i0 + rows): CSR lists, grid (B, N, rows, max_kb) -> [B,N,rows*bq,H].

  With ``ds`` (float32 [B, N, T, S]) the chunk also writes the logit
  gradients of its visited blocks into it (aliased); returns (dq, ds).
  """
  qt, kt, vt, dot_, lse4, delta4 = arrays
  G, bq, bk = cfg.G, cfg.block_q, cfg.block_kv
  scalars = _scalars(cfg, code, counts, aux)

  def kb_of(b, h, i, j, code_ref, count_ref, *_):
    row = C.list_row(cfg, b, h, i, rows)
    return _entry(cfg, code_ref, count_ref, b, row, rows, j, cfg.max_kb) // 2

  kv_block = lambda b, h, i, j, *r: (b, h // G, kb_of(b, h, i, j, *r), 0)
  qrow = lambda b, h, i, j, *_: (b, h, i + i0, 0)
  side_arrays, side_specs, names = _side_inputs(
      cfg, aux, lambda b, h, i, j, *_: (b, i + i0),
      lambda b, h, i, j, *r: (b, kb_of(b, h, i, j, *r)))
  pair_arrays, pair_specs, pair_names = _pair_inputs(
      cfg, aux, bias, lambda b, h, i, j, *r: (b, h, i + i0, kb_of(b, h, i, j, *r)))
  in_specs = [pl.BlockSpec((None, None, bq, cfg.H), qrow),
              pl.BlockSpec((None, None, bk, cfg.H), kv_block),
              pl.BlockSpec((None, None, bk, cfg.Hv), kv_block),
              pl.BlockSpec((None, None, bq, cfg.Hv), qrow),
              pl.BlockSpec((None, None, bq, 1), qrow),
              pl.BlockSpec((None, None, bq, 1), qrow)] + side_specs + pair_specs
  out_specs = [pl.BlockSpec((None, None, bq, cfg.H), lambda b, h, i, j, *_: (b, h, i, 0))]
  out_shape = [jax.ShapeDtypeStruct((cfg.B, cfg.N, rows * bq, cfg.H), qt.dtype)]
  operands = [*scalars, qt, kt, vt, dot_, lse4, delta4, *side_arrays, *pair_arrays]
  aliases = {}
  if ds is not None:
    ds_spec = pl.BlockSpec((None, None, bq, bk),
                           lambda b, h, i, j, *r: (b, h, i + i0, kb_of(b, h, i, j, *r)))
    in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
    out_specs.append(ds_spec)
    out_shape.append(jax.ShapeDtypeStruct(ds.shape, ds.dtype))
    aliases = {len(operands): 1}
    operands.append(ds)
  res = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, names=tuple(names + pair_names), i0=i0, rows=rows,
                        with_ds=ds is not None),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(scalars), grid=(cfg.B, cfg.N, rows, cfg.max_kb),
          in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((bq, cfg.H), jnp.float32)]),
      out_shape=out_shape, input_output_aliases=aliases,
      compiler_params=_params(cfg), interpret=_interpret_arg(cfg), name="block_sparse_dq",
  )(*operands)
  return (res[0], res[1]) if ds is not None else (res[0], None)


def _dkv_chunk(cfg, code, counts, arrays, aux, bias, k0, rows):
  """dK/dV of k-blocks [k0, k0 + rows): CSC lists, grid (B, K, rows, G * max_qb)."""
  qt, kt, vt, dot_, lse4, delta4 = arrays
  G, bq, bk = cfg.G, cfg.block_q, cfg.block_kv
  scalars = _scalars(cfg, code, counts, aux)

  def qb_of(b, kh, kb, t, code_ref, count_ref, *_):
    h = kh * G + t // cfg.max_qb
    row = C.list_row(cfg, b, h, kb, rows)
    return _entry(cfg, code_ref, count_ref, b, row, rows, t % cfg.max_qb, cfg.max_qb) // 2

  q_block = lambda b, kh, kb, t, *r: (b, kh * G + t // cfg.max_qb, qb_of(b, kh, kb, t, *r), 0)
  krow = lambda b, kh, kb, t, *_: (b, kh, kb + k0, 0)
  orow = lambda b, kh, kb, t, *_: (b, kh, kb, 0)
  side_arrays, side_specs, names = _side_inputs(
      cfg, aux, lambda b, kh, kb, t, *r: (b, qb_of(b, kh, kb, t, *r)),
      lambda b, kh, kb, t, *_: (b, kb + k0))
  pair_arrays, pair_specs, pair_names = _pair_inputs(
      cfg, aux, bias, lambda b, kh, kb, t, *r: (b, kh * G + t // cfg.max_qb,
                                                qb_of(b, kh, kb, t, *r), kb + k0))
  shape = lambda x, width: jax.ShapeDtypeStruct((cfg.B, cfg.K, rows * bk, width), x.dtype)
  return pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, names=tuple(names + pair_names), i0=k0,
                        rows=rows),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(scalars), grid=(cfg.B, cfg.K, rows, G * cfg.max_qb),
          in_specs=[pl.BlockSpec((None, None, bq, cfg.H), q_block),
                    pl.BlockSpec((None, None, bk, cfg.H), krow),
                    pl.BlockSpec((None, None, bk, cfg.Hv), krow),
                    pl.BlockSpec((None, None, bq, cfg.Hv), q_block),
                    pl.BlockSpec((None, None, bq, 1), q_block),
                    pl.BlockSpec((None, None, bq, 1), q_block)] + side_specs + pair_specs,
          out_specs=[pl.BlockSpec((None, None, bk, cfg.H), orow),
                     pl.BlockSpec((None, None, bk, cfg.Hv), orow)],
          scratch_shapes=[pltpu.VMEM((bk, cfg.H), jnp.float32),
                          pltpu.VMEM((bk, cfg.Hv), jnp.float32)]),
      out_shape=[shape(kt, cfg.H), shape(vt, cfg.Hv)],
      compiler_params=_params(cfg), interpret=_interpret_arg(cfg), name="block_sparse_dkv",
  )(*scalars, qt, kt, vt, dot_, lse4, delta4, *side_arrays, *pair_arrays)


prepare_lists = L.tpu_prepare_lists
runtime_lists = L.tpu_runtime_lists
