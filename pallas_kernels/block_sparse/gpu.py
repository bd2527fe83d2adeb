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

- forward: program (i, b, h) loads its q tile, walks the CSR row of its
  q-block in the ``BlockLayout`` and, for each listed k-block, loads K/V tiles
  straight from the [B, S, K, H] arrays of KV head ``h // G`` (GQA without
  repeating K/V).
- dQ: the same walk, recomputing probabilities from the saved lse.
- dK/dV: program (kt, b, kh) walks, for each of the G query heads of KV head
  kh, the CSC list of q-blocks that visit its k-block, accumulating dK/dV of
  the whole group in registers.

Each list row is stored as ``[n_full, n_listed, full blocks..., partial
blocks...]`` so a row is walked by two branch-free loops: full blocks without
any mask arithmetic, then partial blocks with the mask predicate. Keeping the
loop bodies straight-line lets Triton software-pipeline the K/V (or Q/dO)
loads. Kernel tiles may be smaller than the layout blocks (``tiles``): the
backward passes in particular want narrow tiles (register pressure of the
dK/dV accumulators), so a listed block is visited as several tiles.

Run-time lists (``runtime.py``) add a batch axis to the row arrays
(``cfg.lists_batched``); the row BlockSpecs then index it with the grid's
batch coordinate.

Padded batches: each program also reads, for its row and batch element, how
many listed blocks start inside the lengths and how many of the full ones lie
wholly inside them (lists are ascending within the full and the partial
parts, so these are prefixes): the walk visits full blocks inside the lengths
unmasked, the other kept blocks masked with the length test, and skips the
rest. Additive bias and boolean mask arrays ([Bx, Nx, Tx, Sx], dims of 1
broadcast) are read per tile pair as strided loads; the mask as int8. When
the bias is differentiated the dQ kernel also stores each visited tile's
logit gradient into a zero-initialised (aliased) [B, N, T, S] float32 array.

Attention dropout: each program reads the Threefry key of its (batch, query
head) (a [B, N, 2] uint32 input) and regenerates the keep mask of every tile
it visits (``common.dropout_keep``): the same bits as the XLA engine and the
reference, whatever the tiles (the dK/dV kernel draws it key-major, see
``common.dropout_keep``).

Compiled use needs power-of-two tiles >= 16; head dims that are not a power
of two are zero-padded (exact).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attnjax.core import flash as F
from pallas_kernels.block_sparse import common as C
from pallas_kernels.block_sparse import lists as L

try:  # the Triton dialect is importable on CPU builds too; guard anyway.
  from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - depends on the jaxlib build
  plgpu = None


def _pow2(n: int) -> bool:
  return n > 0 and (n & (n - 1)) == 0


def default_tiles(block_q: int, block_kv: int, interpret: bool):
  """((fwd_q, fwd_k), (dq_q, dq_k), (dkv_q, dkv_k)) tiles for a layout's blocks.

  Interpret mode uses the layout blocks (fewest steps). Compiled defaults
  follow the Triton fused-attention tutorial's shapes for head_dim 128:
  forward 128 x 64, dQ 128 x 32, dK/dV 32 x 128 (each capped by the blocks).
  """
  if interpret:
    return ((block_q, block_kv),) * 3
  return ((min(block_q, 128), min(block_kv, 64)), (min(block_q, 128), min(block_kv, 32)),
          (min(block_q, 32), min(block_kv, 128)))


def check_tiles(cfg):
  for name, (tq, tk) in zip(("forward", "dq", "dkv"), cfg.tiles):
    if cfg.block_q % tq or cfg.block_kv % tk:
      raise ValueError(
          f"{name} tiles ({tq}, {tk}) must divide the layout blocks "
          f"({cfg.block_q}, {cfg.block_kv}).")
    if not cfg.interpret and (not _pow2(tq) or not _pow2(tk) or min(tq, tk) < 16):
      raise ValueError(
          f"the compiled GPU kernel needs power-of-two tiles >= 16; {name} tiles are "
          f"({tq}, {tk}): use layout blocks of 16, 32, 64, 128, ...")


def _compiler_params(cfg, tq, tk, stages=None):
  if plgpu is None or cfg.interpret:
    return None
  big = tq * tk >= 128 * 64 and max(cfg.H, cfg.Hv) >= 128
  return plgpu.CompilerParams(num_warps=8 if big else 4, num_stages=stages or 3)


def _pad_last(x, size):
  if x.shape[-1] == size:
    return x
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def _padded_dims(cfg):
  if cfg.interpret:
    return cfg.H, cfg.Hv
  return max(16, int(pl.next_power_of_2(cfg.H))), max(16, int(pl.next_power_of_2(cfg.Hv)))


def _side(cfg, aux, q_spec_fn, k_spec_fn):
  """Position / segment arrays with BlockSpecs; returns (arrays, specs, names)."""
  q_pos, k_pos, q_seg, k_seg = aux[:4]
  items = []
  if cfg.has_q_pos:
    items.append(("q_pos", q_pos, cfg.pos_batched[0], q_spec_fn))
  if cfg.has_k_pos:
    items.append(("k_pos", k_pos, cfg.pos_batched[1], k_spec_fn))
  if cfg.has_segments:
    items += [("q_seg", q_seg, True, q_spec_fn), ("k_seg", k_seg, True, k_spec_fn)]
  return ([x for _, x, _, _ in items], [fn(bt) for _, _, bt, fn in items],
          [name for name, _, _, _ in items])


def _tile_side(size, b_axis, t_axis):
  """BlockSpec factory for a [Bp, L] side array cut in tiles of ``size``."""
  def make(batched):
    return pl.BlockSpec((None, size), lambda *g: (g[b_axis] if batched else 0, g[t_axis]))
  return make


def _full_side(length, b_axis):
  def make(batched):
    return pl.BlockSpec((None, length), lambda *g: (g[b_axis] if batched else 0, 0))
  return make


def _context(cfg, side, q_start, tq, k_start, tk, q_local, k_local):
  """(q_pos [tq,1], k_pos [1,tk], q_seg, k_seg) of the tile pair at these starts.

  ``q_local``/``k_local``: the side refs hold just this tile (True) or the
  whole sequence (False: sliced here).
  """
  def read(name, start, size, local):
    ref = side[name]
    return ref[...] if local else ref[pl.ds(start, size)]

  qp = (read("q_pos", q_start, tq, q_local)[:, None] if "q_pos" in side
        else C.iota_positions(cfg.q_offset, q_start, tq, 0))
  kp = (read("k_pos", k_start, tk, k_local)[None, :] if "k_pos" in side
        else C.iota_positions(cfg.k_offset, k_start, tk, 1))
  qs = read("q_seg", q_start, tq, q_local)[:, None] if "q_seg" in side else None
  ks = read("k_seg", k_start, tk, k_local)[None, :] if "k_seg" in side else None
  return qp, kp, qs, ks


def _walk(cfg, entry, ranges, sub_tiles, visit, carry):
  """Runs visit(block, sub_tile, is_full, carry) over list entries.

  ``entry(j)`` reads the j-th listed block; ``ranges``: [(lo, hi, is_full)]
  entry ranges, each walked by its own branch-free loop (``_ranges``).
  """
  def loop(lo, hi, is_full, carry):
    def one(j, c):
      blk = entry(j)
      if sub_tiles == 1:
        return visit(blk, 0, is_full, c)
      return lax.fori_loop(0, sub_tiles, lambda s, c2: visit(blk, s, is_full, c2), c)
    return lax.fori_loop(lo, hi, one, carry)

  for lo, hi, is_full in ranges:
    carry = loop(lo, hi, is_full, carry)
  return carry


def _ranges(cfg, n_full, n_listed, kept, live):
  """[(lo, hi, is_full)] of a list row.

  Without lengths: the full blocks, then the partial ones. With lengths
  (``kept`` = the row's (full inside, full kept, partial kept) counts;
  ``live``: the program's tile starts inside its length): full blocks
  inside both lengths, full blocks across one (masked), partial blocks kept.
  """
  if not cfg.has_lengths:
    return (([(0, n_full, True)] if cfg.any_full else [])
            + ([(n_full, n_listed, False)] if cfg.any_partial else []))
  f_in, f_kept, p_kept = (jnp.where(live, x, 0) for x in kept)
  out = []
  if cfg.any_full:
    out += [(0, f_in, True), (f_in, f_kept, False)]
  if cfg.any_partial:
    out.append((n_full, n_full + p_kept, False))
  return out


def _pair_arrays(cfg, aux, bias):
  """[(name, 4-D array, shape)] of the bias and mask array present."""
  return [(name, x, shape) for name, x, shape in
          (("bias", bias, cfg.bias_shape), ("mask", aux.mask, cfg.mask_shape))
          if shape is not None]


def _row_pair(cfg, aux, bias, tq):
  """Bias / mask operands for the row kernels (grid (i, b, h)): [tq|1, S|1] blocks."""
  arrays, specs, names = [], [], []
  for name, x, shape in _pair_arrays(cfg, aux, bias):
    block = (tq if shape[2] > 1 else 1, shape[3])
    arrays.append(x)
    specs.append(pl.BlockSpec((None, None) + block,
                              lambda i, b, h, shape=shape: C.pair_index(shape, b, h, i, 0)))
    names.append(name)
  return arrays, specs, names


def _row_tile(side, name, shape, k_start, tk):
  """The [tq|1, tk|1] tile of a row kernel's pair block at key ``k_start``."""
  if name not in side:
    return None
  ref = side[name]
  return ref[:, pl.ds(k_start, tk)] if shape[3] > 1 else ref[...]


# -- forward -------------------------------------------------------------------
def _fwd_kernel(q_ref, k_ref, v_ref, rows_ref, *refs, cfg, names):
  side = dict(zip(names, refs[:len(names)]))
  o_ref, lse_ref = refs[len(names):]
  (tq, tk) = cfg.tiles[0]
  it, h = pl.program_id(0), pl.program_id(2)
  q_start = it * tq
  q = q_ref[...]
  lens = (side["lens"][3], side["lens"][4]) if cfg.has_lengths else None
  key = _drop_key(side)

  def visit(kb, sub, is_full, carry):
    m, l, acc = carry
    k_start = kb * cfg.block_kv + sub * tk
    sl = pl.ds(k_start, tk)
    k, v = k_ref[sl, :], v_ref[sl, :]
    qp, kp, qs, ks = _context(cfg, side, q_start, tq, k_start, tk, True, False)
    _, s = C.block_logits(cfg, q, k, h, qp, kp,
                          _row_tile(side, "bias", cfg.bias_shape, k_start, tk))
    vis = C.visibility(cfg, h, qp, kp, qs, ks, is_full,
                       _row_tile(side, "mask", cfg.mask_shape, k_start, tk),
                       _len_vis(lens, is_full, q_start, tq, k_start, tk))
    return C.online_update(cfg, s, vis, v, m, l, acc,
                           C.dropout_keep(cfg, key, q_start, tq, k_start, tk))

  m, l, acc = _walk(cfg, lambda j: rows_ref[j + 2],
                    _row_ranges(cfg, rows_ref, side, q_start, lens),
                    cfg.block_kv // tk, visit, F.init_state((tq,), o_ref.shape[-1]))
  out, lse = C.finalize(cfg, m, l, acc)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


def _drop_key(side, g=None):
  """(k0, k1) uint32 dropout key of the program's query head (``g``: of the GQA group
  in the dK/dV kernel), or None without dropout."""
  if "drop" not in side:
    return None
  ref = side["drop"]
  return (ref[0], ref[1]) if g is None else (ref[g, 0], ref[g, 1])


def _len_vis(lens, is_full, q_start, tq, k_start, tk):
  if lens is None or is_full:
    return None
  return C.length_visibility(q_start, tq, k_start, tk, *lens)


def _row_ranges(cfg, rows_ref, side, q_start, lens):
  kept = None
  if cfg.has_lengths:
    kept = (side["lens"][0], side["lens"][1], side["lens"][2])
  live = None if lens is None else q_start < lens[0]
  return _ranges(cfg, rows_ref[0], rows_ref[1], kept, live)


def _row_side(cfg, aux, bias, rows, tq, rq):
  """(arrays, specs, names) of a row kernel's side operands (grid (i, b, h)): positions,
  segment ids, bias / mask tiles, with lengths the row's [8] length entry and, with
  dropout, the program's (batch, head) dropout key."""
  arrays, specs, names = _side(cfg, aux, _tile_side(tq, 1, 0), _full_side(cfg.S, 1))
  pair_arrays, pair_specs, pair_names = _row_pair(cfg, aux, bias, tq)
  arrays, specs, names = arrays + pair_arrays, specs + pair_specs, names + pair_names
  if cfg.has_lengths:
    arrays.append(L.gpu_length_rows(cfg, rows, aux.lens, True))
    specs.append(_lens_spec(cfg, rq))
    names.append("lens")
  if cfg.dropout_rate > 0:   # the (batch, head) dropout key, uint32 [B, N, 2]
    arrays.append(aux.drop)
    specs.append(pl.BlockSpec((None, None, 2), lambda i, b, h: (b, h, 0)))
    names.append("drop")
  return arrays, specs, names


def _lens_spec(cfg, rq):
  """BlockSpec of a row program's [8] length entry (``lists.gpu_length_rows``)."""
  return pl.BlockSpec((None, None, None, 8),
                      lambda i, b, h: (b, C.list_head(cfg, h), i // rq, 0))


def _row_spec(cfg, rows, rq):
  """BlockSpec of the CSR row of grid program (i, b, h): [2 + max_kb] entries."""
  if cfg.lists_batched:
    return pl.BlockSpec((None, None, None, rows.shape[-1]),
                        lambda i, b, h: (b, C.list_head(cfg, h), i // rq, 0))
  return pl.BlockSpec((None, None, rows.shape[-1]),
                      lambda i, b, h: (C.list_head(cfg, h), i // rq, 0))


def _col_spec(cfg, rows_b, rk):
  """BlockSpec of the CSC rows (all list heads) of grid program (kt, b, kh)."""
  if cfg.lists_batched:
    return pl.BlockSpec((None, rows_b.shape[1], None, rows_b.shape[-1]),
                        lambda kt, b, kh: (b, 0, kt // rk, 0))
  return pl.BlockSpec((rows_b.shape[0], None, rows_b.shape[-1]),
                      lambda kt, b, kh: (0, kt // rk, 0))


def forward(cfg, lists, q, k, v, aux, bias=None):
  """q [B,T,N,H] ... -> (out [B,T,N,Hv] cfg.out_dtype, lse [B,N,T] float32)."""
  check_tiles(cfg)
  Hp, Hvp = _padded_dims(cfg)
  (tq, tk) = cfg.tiles[0]
  rq = cfg.block_q // tq
  G, S = cfg.G, cfg.S
  rows = lists["fwd_rows"]
  side_arrays, side_specs, names = _row_side(cfg, aux, bias, rows, tq, rq)
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, names=tuple(names)),
      grid=(cfg.T // tq, cfg.B, cfg.N),
      in_specs=[
          pl.BlockSpec((None, tq, None, Hp), lambda i, b, h: (b, i, h, 0)),
          pl.BlockSpec((None, S, None, Hp), lambda i, b, h: (b, 0, h // G, 0)),
          pl.BlockSpec((None, S, None, Hvp), lambda i, b, h: (b, 0, h // G, 0)),
          _row_spec(cfg, rows, rq),
      ] + side_specs,
      out_specs=[pl.BlockSpec((None, tq, None, Hvp), lambda i, b, h: (b, i, h, 0)),
                 pl.BlockSpec((None, None, tq), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct((cfg.B, cfg.T, cfg.N, Hvp), cfg.out_dtype),
                 jax.ShapeDtypeStruct((cfg.B, cfg.N, cfg.T), jnp.float32)],
      compiler_params=_compiler_params(cfg, tq, tk),
      interpret=cfg.interpret,
      name="block_sparse_fwd_gpu",
  )(_pad_last(q, Hp), _pad_last(k, Hp), _pad_last(v, Hvp), rows, *side_arrays)
  return out[..., :cfg.Hv], lse


# -- backward: dQ ------------------------------------------------------------------
def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, rows_ref, *refs, cfg, names,
               with_ds):
  side = dict(zip(names, refs[:len(names)]))
  refs = refs[len(names):]
  if with_ds:   # the aliased zeros input of dS (never read)
    refs = refs[1:]
  dq_ref, ds_ref = (refs[0], refs[1]) if with_ds else (refs[0], None)
  (tq, tk) = cfg.tiles[1]
  it, h = pl.program_id(0), pl.program_id(2)
  q_start = it * tq
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  lens = (side["lens"][3], side["lens"][4]) if cfg.has_lengths else None
  key = _drop_key(side)

  def visit(kb, sub, is_full, dq):
    k_start = kb * cfg.block_kv + sub * tk
    sl = pl.ds(k_start, tk)
    k, v = k_ref[sl, :], v_ref[sl, :]
    qp, kp, qs, ks = _context(cfg, side, q_start, tq, k_start, tk, True, False)
    vis = C.visibility(cfg, h, qp, kp, qs, ks, is_full,
                       _row_tile(side, "mask", cfg.mask_shape, k_start, tk),
                       _len_vis(lens, is_full, q_start, tq, k_start, tk))
    grads = C.block_grads(cfg, q, k, v, do, lse, delta, vis, h, qp, kp,
                          _row_tile(side, "bias", cfg.bias_shape, k_start, tk), with_ds,
                          C.dropout_keep(cfg, key, q_start, tq, k_start, tk))
    if with_ds:
      ds_ref[:, sl] = grads[2]
    return dq + C.dot_nn(grads[0].astype(k.dtype), k)

  dq = _walk(cfg, lambda j: rows_ref[j + 2], _row_ranges(cfg, rows_ref, side, q_start, lens),
             cfg.block_kv // tk, visit, jnp.zeros(dq_ref.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


# -- backward: dK, dV ------------------------------------------------------------
def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, rows_ref, *refs, cfg, names):
  side = dict(zip(names, refs[:len(names)]))
  dk_ref, dv_ref = refs[len(names):]
  (tq, tk) = cfg.tiles[2]
  kt, kh = pl.program_id(0), pl.program_id(2)
  k_start = kt * tk
  k, v = k_ref[...], v_ref[...]

  def head_loop(g, carry):
    h = kh * cfg.G + g
    lh = C.list_head(cfg, h)
    lens = (side["lens"][lh, 3], side["lens"][lh, 4]) if cfg.has_lengths else None
    key = _drop_key(side, g)

    def pair(name, shape, q_start):
      if name not in side:
        return None
      return side[name][g if shape[1] > 1 else 0,
                        pl.ds(q_start, tq) if shape[2] > 1 else slice(None), :]

    def visit(qb, sub, is_full, carry):
      dk, dv = carry
      q_start = qb * cfg.block_q + sub * tq
      sl = pl.ds(q_start, tq)
      q, do = q_ref[sl, g, :], do_ref[sl, g, :]
      lse, delta = lse_ref[g, sl][:, None], delta_ref[g, sl][:, None]
      qp, kp, qs, ks = _context(cfg, side, q_start, tq, k_start, tk, False, True)
      vis = C.visibility(cfg, h, qp, kp, qs, ks, is_full, pair("mask", cfg.mask_shape, q_start),
                         _len_vis(lens, is_full, q_start, tq, k_start, tk))
      ds, p = C.block_grads(cfg, q, k, v, do, lse, delta, vis, h, qp, kp,
                            pair("bias", cfg.bias_shape, q_start),
                            keep=C.dropout_keep(cfg, key, q_start, tq, k_start, tk, True))
      return dk + C.dot_tn(ds.astype(q.dtype), q), dv + C.dot_tn(p.astype(do.dtype), do)

    kept = live = None
    if cfg.has_lengths:
      kept = tuple(side["lens"][lh, c] for c in range(3))
      live = k_start < lens[1]
    return _walk(cfg, lambda j: rows_ref[lh, j + 2],
                 _ranges(cfg, rows_ref[lh, 0], rows_ref[lh, 1], kept, live),
                 cfg.block_q // tq, visit, carry)

  init = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
  dk, dv = lax.fori_loop(0, cfg.G, head_loop, init) if cfg.G > 1 else head_loop(0, init)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _col_pair(cfg, aux, bias, tk):
  """Bias / mask operands of the dK/dV kernel (grid (kt, b, kh)) as [Bx, K|1, G|1, Tx, Sx]
  arrays with [G|1, T|1, tk|1] blocks."""
  arrays, specs, names = [], [], []
  for name, x, shape in _pair_arrays(cfg, aux, bias):
    Bx, Nx, Tx, Sx = shape
    heads = (cfg.K, cfg.G) if Nx > 1 else (1, 1)
    arrays.append(x.reshape(Bx, *heads, Tx, Sx))
    block = (None, None, heads[1], Tx, tk if Sx > 1 else 1)
    specs.append(pl.BlockSpec(block, lambda kt, b, kh, shape=shape: (
        b if shape[0] > 1 else 0, kh if shape[1] > 1 else 0, 0, 0, kt if shape[3] > 1 else 0)))
    names.append(name)
  return arrays, specs, names


def backward(cfg, lists, q, k, v, aux, bias, do, lse, delta, want_dbias=False):
  """Gradients (dq, dk, dv, ds); lse/delta are [B, N, T] float32.

  ``ds``: with ``want_dbias`` (and a bias), dL/d(logits) as float32 [B, N, T, S]
  (zero outside the visited blocks), else None.
  """
  check_tiles(cfg)
  Hp, Hvp = _padded_dims(cfg)
  qp_, kp_, vp_, dop = _pad_last(q, Hp), _pad_last(k, Hp), _pad_last(v, Hvp), _pad_last(do, Hvp)
  B, T, S, N, K, G = cfg.B, cfg.T, cfg.S, cfg.N, cfg.K, cfg.G
  with_ds = bool(want_dbias) and bias is not None

  (tq, tk) = cfg.tiles[1]
  rq = cfg.block_q // tq
  rows = lists["fwd_rows"]
  side_arrays, side_specs, names = _row_side(cfg, aux, bias, rows, tq, rq)
  qrow = lambda i, b, h: (b, i, h, 0)
  lrow = lambda i, b, h: (b, h, i)
  out_specs = [pl.BlockSpec((None, tq, None, Hp), qrow)]
  out_shape = [jax.ShapeDtypeStruct((B, T, N, Hp), q.dtype)]
  aliases = {}
  if with_ds:
    side_specs.append(pl.BlockSpec((None, None, tq, S), lambda i, b, h: (b, h, i, 0)))
    out_specs.append(side_specs[-1])
    out_shape.append(jax.ShapeDtypeStruct((B, N, T, S), jnp.float32))
    aliases = {7 + len(side_arrays): 1}
    side_arrays.append(jnp.zeros((B, N, T, S), jnp.float32))
  res = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, names=tuple(names), with_ds=with_ds),
      grid=(T // tq, B, N),
      in_specs=[
          pl.BlockSpec((None, tq, None, Hp), qrow),
          pl.BlockSpec((None, S, None, Hp), lambda i, b, h: (b, 0, h // G, 0)),
          pl.BlockSpec((None, S, None, Hvp), lambda i, b, h: (b, 0, h // G, 0)),
          pl.BlockSpec((None, tq, None, Hvp), qrow),
          pl.BlockSpec((None, None, tq), lrow),
          pl.BlockSpec((None, None, tq), lrow),
          _row_spec(cfg, rows, rq),
      ] + side_specs,
      out_specs=out_specs,
      out_shape=out_shape, input_output_aliases=aliases,
      compiler_params=_compiler_params(cfg, tq, tk),
      interpret=cfg.interpret, name="block_sparse_dq_gpu",
  )(qp_, kp_, vp_, dop, lse, delta, rows, *side_arrays)
  dq, ds = (res[0], res[1]) if with_ds else (res[0], None)

  # dK/dV: query-side arrays expose the GQA group axis: [B, T, K, G, H].
  (tq, tk) = cfg.tiles[2]
  rk = cfg.block_kv // tk
  rows_b = lists["bwd_rows"]
  side_arrays, side_specs, names = _side(cfg, aux, _full_side(T, 1), _tile_side(tk, 1, 0))
  pair_arrays, pair_specs, pair_names = _col_pair(cfg, aux, bias, tk)
  side_arrays, side_specs, names = (side_arrays + pair_arrays, side_specs + pair_specs,
                                    names + pair_names)
  if cfg.has_lengths:
    side_arrays.append(L.gpu_length_rows(cfg, rows_b, aux.lens, False))
    side_specs.append(pl.BlockSpec((None, rows_b.shape[0], None, 8),
                                   lambda kt, b, kh: (b, 0, kt // rk, 0)))
    names.append("lens")
  if cfg.dropout_rate > 0:   # the GQA group's dropout keys, uint32 [B, K, G, 2]
    side_arrays.append(aux.drop.reshape(B, K, G, 2))
    side_specs.append(pl.BlockSpec((None, None, G, 2), lambda kt, b, kh: (b, kh, 0, 0)))
    names.append("drop")
  krow = lambda kt, b, kh: (b, kt, kh, 0)
  grow = lambda kt, b, kh: (b, kh, 0, 0)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, names=tuple(names)),
      grid=(S // tk, B, K),
      in_specs=[
          pl.BlockSpec((None, T, None, G, Hp), lambda kt, b, kh: (b, 0, kh, 0, 0)),
          pl.BlockSpec((None, tk, None, Hp), krow),
          pl.BlockSpec((None, tk, None, Hvp), krow),
          pl.BlockSpec((None, T, None, G, Hvp), lambda kt, b, kh: (b, 0, kh, 0, 0)),
          pl.BlockSpec((None, None, G, T), grow),
          pl.BlockSpec((None, None, G, T), grow),
          _col_spec(cfg, rows_b, rk),
      ] + side_specs,
      out_specs=[pl.BlockSpec((None, tk, None, Hp), krow),
                 pl.BlockSpec((None, tk, None, Hvp), krow)],
      out_shape=[jax.ShapeDtypeStruct((B, S, K, Hp), k.dtype),
                 jax.ShapeDtypeStruct((B, S, K, Hvp), v.dtype)],
      compiler_params=_compiler_params(cfg, tq, tk),
      interpret=cfg.interpret, name="block_sparse_dkv_gpu",
  )(qp_.reshape(B, T, K, G, Hp), kp_, vp_, dop.reshape(B, T, K, G, Hvp),
    lse.reshape(B, K, G, T), delta.reshape(B, K, G, T), rows_b, *side_arrays)
  return dq[..., :cfg.H], dk[..., :cfg.H], dv[..., :cfg.Hv], ds


prepare_lists = L.gpu_prepare_lists
runtime_lists = L.gpu_runtime_lists
