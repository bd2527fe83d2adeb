"""Entry points of the block-sparse engine: ``fast_attention``, ``block_sparse_attention``
and ``block_sparse_attention_indices``.

The ``"xla"`` implementation gathers only the visited (q-block, k-block)
tiles (``engine``); ``"pallas"`` forwards to ``pallas_kernels.block_sparse``.
Layouts are built for contiguous positions; with other positions (or
positions only known at run time) every block is visited as *partial*, i.e.
the mask predicate is evaluated on the given positions: correct, at dense cost.

Block sizes: short sequences use 512-blocks (or the whole length); for a mask
on a long sequence (T * S >= 4M) ``plan.pick_blocks`` classifies the mask
once on the finest candidate grid (256 x 64), derives the candidates
(512/256 rows x 512/256/128/64 columns) by exact coarsening and keeps the one
with the lowest estimated cost. Layouts and schedules are cached per (mask,
shape, blocks, heads), so a jitted call pays this once, at trace time (seconds
at 128k tokens; measured build times are in docs/build_costs.md).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.block_sparse import engine as E
from attnjax.block_sparse import padding as PD
from attnjax.block_sparse import plan as P
from attnjax.block_sparse import tiles as Tl
from attnjax.core import dispatch
from attnjax.core import dropout as DR
from attnjax.core import placement
from attnjax.core import precision
from attnjax.core import scoring
from attnjax.core import validation as V
from attnjax.core.reference import dense_visibility, reference_attention
from attnjax.masks import layout as LY
from attnjax.masks.base import Mask
from pallas_kernels.block_sparse import block_sparse_pallas
from pallas_kernels.block_sparse.api import mask_table_shapes
from pallas_kernels.block_sparse import resources
from pallas_kernels.targets import budgets

IMPLEMENTATIONS = ("xla", "pallas")


def attention_call(query, key, value, *, mask=None, score=None, bias=None, scale=None,
                   layout=None, lengths=False, dropout=False) -> dispatch.Call:
  """The facts the attention backends judge a call by (nothing is computed).

  query [B, T, N, H], key [B, S, K, H]; ``mask`` a Mask, a boolean array or
  None; ``layout`` a BlockLayout given instead of a mask (its blocks decide
  divisibility); ``lengths``: per-batch sequence lengths are given; ``dropout``:
  attention dropout is asked for (rate > 0).
  """
  d = V.check_qkv(query, key, value)
  score = scoring.resolve_score(score)
  scale = V.check_scale(scale, d.H)  # a bad concrete scale is the caller's error, not a backend's
  try:
    float(scale)
    static_scale = True
  except (TypeError, jax.errors.ConcretizationTypeError):
    static_scale = False
  if layout is not None:
    divides = True
  else:
    blocks = _kernel_blocks(d, query, key, value)
    if blocks is None and kernel_platform(query, key, value) == "tpu":
      divides = False
    else:
      bq, bk = blocks if blocks is not None else P.choose_blocks(d.T, d.S)[:2]
      divides = d.T % bq == 0 and d.S % bk == 0
  facts = dict(
      T=d.T, S=d.S, bias=bias is not None, lengths=bool(lengths), dropout=bool(dropout),
      mask_array=mask is not None and not isinstance(mask, Mask),
      mask_tables=isinstance(mask, Mask) and bool(mask_table_shapes(mask)),
      static_scale=static_scale, reweight=bool(getattr(score, "has_reweight", False)),
      row_count=bool(getattr(score, "needs_row_count", False)), divides=divides,
      kernel_default=placement.default_kernel_implementation(
          "block_sparse", query, key, value) == "pallas")
  return dispatch.Call("attention", placement.target_platform(query, key, value),
                       placement.compile_target(query, key, value), facts)


def _pallas_supports(call: dispatch.Call, explicit: bool):
  if not explicit and not call["kernel_default"]:
    if call.platform in ("tpu", "gpu"):
      return (f"the block-sparse kernels are not known to compile for this "
              f"{call.platform.upper()} ({call.target or 'not a listed target'})")
    return f"kernels run compiled on TPU/GPU only (this call is placed on {call.platform})"
  if call["mask_tables"]:
    return ("the mask's predicate reads constant tables (e.g. Documents(ids), RandomBlocks, "
            "KeyIn over more than 16 positions), which the kernels cannot capture")
  if call["reweight"] or call["row_count"]:
    return "the score needs whole rows (reweight / row_count)"
  if not call["static_scale"]:
    return "the kernels need a static (Python) scale"
  if not call["divides"]:
    return f"T={call['T']}, S={call['S']} are not multiples of a kernel block"
  return None


def _xla_supports(call: dispatch.Call, explicit: bool):
  del explicit
  if call["reweight"]:
    return "the score re-weights whole normalised rows, which a block-streaming engine cannot"
  if not call["static_scale"]:
    return "the block-sparse engine needs a static (Python) scale"
  return None


#: The attention op's backends, fastest first.
ATTENTION_BACKENDS = (dispatch.Backend("pallas", _pallas_supports),
                      dispatch.Backend("xla", _xla_supports))


def check_impl(implementation, call: dispatch.Call) -> str:
  """The attention backend to run for ``call`` (see ``attnjax.core.dispatch``)."""
  return dispatch.resolve(call, ATTENTION_BACKENDS, implementation).backend


def _static_scale(scale, H):
  scale = V.check_scale(scale, H)
  try:
    return float(scale)
  except Exception as e:  # pylint: disable=broad-except  (a traced scale)
    raise NotImplementedError(
        "the block-sparse XLA path needs a static Python scale; a traced scale "
        "is supported by the reference implementation.") from e


def _check_score(score, return_lse):
  score = scoring.resolve_score(score)
  if getattr(score, "has_reweight", False):
    raise NotImplementedError(
        f"{score!r} re-weights whole normalised rows (has_reweight=True); the "
        "block-sparse engine streams blocks and cannot: use implementation='reference'.")
  if return_lse and score.normalization == "none":
    raise ValueError(
        "return_lse is undefined for unnormalised scores (normalization='none'): "
        "their outputs do not merge through a log-sum-exp.")
  return score


def _norm4(name, x, d: V.Dims, dtype=None):
  """A mask/bias array broadcastable to [B, N, T, S] as 4-D [Bx, Nx, Tx, Sx]."""
  x = jnp.asarray(x) if dtype is None else jnp.asarray(x, dtype)
  V.check_broadcastable(name, x, (d.B, d.N, d.T, d.S))
  while x.ndim < 4:
    x = x[None]
  return x


def _pad_pair(x, T, S, Tp, Sp, fill):
  pt = Tp - T if x.shape[2] > 1 else 0
  ps = Sp - S if x.shape[3] > 1 else 0
  if pt or ps:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, pt), (0, ps)), constant_values=fill)
  return x


def _pad_len(x, axis, new, fill=0):
  pad = new - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=fill)


def _pad_pos(pos, new):
  """Positions [Bp, L] continued past the end (padded queries/keys)."""
  L = pos.shape[-1]
  if new == L:
    return pos
  extra = pos[..., -1:] + 1 + jnp.arange(new - L, dtype=pos.dtype)
  return jnp.concatenate([pos, extra], -1)


def run_engine(query, key, value, layout, *, score=None, bias=None, scale=None, q_pos=None,
               k_pos=None, segs=None, mask_array=None, return_lse=False, lengths=None,
               dropout_rate=0.0, dropout_rng=None):
  """Runs the XLA engine on a block plan of the padded lengths.

  ``layout``: a ``BlockLayout`` for (Tp, Sp) >= (T, S): static block kinds
  with 1, K or N heads, or run-time lists (``attnjax.plan.from_lists``); its
  mask is evaluated in the partial blocks. ``q_pos``/``k_pos`` int32
  [T]/[B, T] and [S]/[B, S]; ``segs`` (q_seg, k_seg) or None; ``lengths``
  (q_len, kv_len) int32 [B] or None: the engine then runs per batch element
  over the items inside the lengths (``padding``). ``dropout_rate`` (a
  Python float) and ``dropout_rng``: attention dropout (``attnjax.core.dropout``).
  """
  d = V.check_qkv(query, key, value)
  plan = P.layout_plan(layout, d.N, d.K, 1 if lengths is not None else d.B, segs is not None)
  scheds = plan.scheds if lengths is not None or layout.batched else tuple(
      E.Sched(*(jnp.asarray(a) for a in s[:5])) for s in plan.scheds)
  return _run(query, key, value, d, plan.Hl, plan.R, plan.kvh, plan.kinds, scheds,
              bq=layout.block_q, bk=layout.block_kv, Tp=layout.q_len, Sp=layout.kv_len,
              mask=layout.mask, score=score, bias=bias, scale=scale, q_pos=q_pos, k_pos=k_pos,
              segs=segs, mask_array=mask_array, return_lse=return_lse, lengths=lengths,
              dropout_rate=dropout_rate, dropout_rng=dropout_rng)


def _run(query, key, value, d, Hl, R, kvh, kinds, scheds, *, bq, bk, Tp, Sp, mask, score,
         bias, scale, q_pos, k_pos, segs, mask_array, return_lse, lengths=None,
         dropout_rate=0.0, dropout_rng=None):
  nq, nk = Tp // bq, Sp // bk
  score = _check_score(score, return_lse)
  scale = _static_scale(scale, d.H)
  dropout_rate = DR.check_dropout(dropout_rate, dropout_rng)
  precision.warn_float32_accumulation("the block-sparse engine (implementation='xla')",
                                      query, key, value)
  if q_pos is None or k_pos is None:
    dq_, dk_ = V.default_positions(d.T, d.S)
    q_pos = dq_ if q_pos is None else q_pos
    k_pos = dk_ if k_pos is None else k_pos
  q_pos = jnp.asarray(q_pos, jnp.int32)
  k_pos = jnp.asarray(k_pos, jnp.int32)
  q_pos = _pad_pos(q_pos if q_pos.ndim == 2 else q_pos[None], Tp)
  k_pos = _pad_pos(k_pos if k_pos.ndim == 2 else k_pos[None], Sp)
  q_seg = k_seg = None
  if segs is not None:
    q_seg = _pad_len(segs[0], 1, Tp, -1).reshape(d.B, nq, bq)
    k_seg = _pad_len(segs[1], 1, Sp, -2).reshape(d.B, nk, bk)
  pair = pair_shape = None
  cfg_kwargs = dict(B=d.B, N=d.N, K=d.K, H=d.H, Hv=d.Hv, bq=bq, bk=bk, nq=nq, nk=nk, Hl=Hl,
                    R=R, kvh=tuple(kvh), kv_len=d.S, scale=scale, norm=score.normalization, mask=mask,
                    segments=segs is not None,
                    plain_softmax=type(score) is scoring.SoftmaxScore,
                    dropout_rate=dropout_rate)
  if mask_array is not None:
    ma = _pad_pair(mask_array, d.T, d.S, Tp, Sp, False)
    pair_shape = tuple(ma.shape)
  bias_r = bias_shape = None
  if bias is not None:
    bp = _pad_pair(bias, d.T, d.S, Tp, Sp, 0)
    bias_shape = tuple(bp.shape)
  cfg = Tl.Cfg(pair_shape=pair_shape, bias_shape=bias_shape, **cfg_kwargs)
  if mask_array is not None:
    pair = Tl.regroup_pair(ma, cfg)
  if bias is not None:
    bias_r = Tl.regroup_pair(bp, cfg)
  drop = DR.head_keys(dropout_rng, d.B, d.N) if dropout_rate > 0 else None
  aux = Tl.Aux(q_pos.reshape(-1, nq, bq), k_pos.reshape(-1, nk, bk), q_seg, k_seg, pair,
               lengths, drop)

  q = _pad_len(query, 1, Tp)
  k = _pad_len(key, 1, Sp)
  v = _pad_len(value, 1, Sp)
  q_r = q.reshape(d.B, nq, bq, Hl, R * d.H)    # token layout, no copy (see tiles)
  k_r = k.reshape(d.B, nk, bk, d.K, d.H)
  v_r = v.reshape(d.B, nk, bk, d.K, d.Hv)
  needs_row_count = bool(getattr(score, "needs_row_count", False))
  if lengths is not None:   # scheds: the plan's numpy schedules, compacted per batch element
    out, lse = PD.attend_by_batch(cfg, kinds, scheds, q_r, k_r, v_r, bias_r,
                                  E.as_pytree(score), aux, needs_row_count)
  else:
    row_count = None
    if needs_row_count:
      row_count = E.row_counts(cfg, kinds, aux, scheds)
      row_count = jax.lax.stop_gradient(row_count)
    out, lse = E.attend(cfg, kinds, q_r, k_r, v_r, bias_r, E.as_pytree(score), aux, scheds,
                        row_count)
  out = out.reshape(d.B, Hl, nq, R, bq, d.Hv).transpose(0, 2, 4, 1, 3, 5)
  out = out.reshape(d.B, Tp, d.N, d.Hv)[:, :d.T].astype(query.dtype)
  if not return_lse:
    return out
  lse = lse.reshape(d.B, Hl, nq, R, bq).transpose(0, 2, 4, 1, 3).reshape(d.B, Tp, d.N)
  return out, lse[:, :d.T]


def run_pallas(query, key, value, layout, **kwargs):
  """``block_sparse_pallas`` on a block plan, with the float32-accumulation warning."""
  precision.warn_float32_accumulation("the block-sparse kernels (implementation='pallas')",
                                      query, key, value)
  return block_sparse_pallas(query, key, value, layout, **kwargs)


def attention(query, key, value, *, mask=None, score=None, bias=None, scale=None,
              q_positions=None, k_positions=None, segment_ids=None,
              query_seq_lengths=None, key_value_seq_lengths=None,
              return_lse=False, implementation=None, dropout_rate=0.0, dropout_rng=None):
  """Multi-head attention in BTNH layout, with GQA/MQA.

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv]; N % K == 0.
    mask: an ``attnjax.masks.Mask`` (e.g. ``Causal()``,
      ``SlidingWindow(256)``, their ``&``/``|``/``~`` combinations) or a
      boolean array broadcastable to [B, N, T, S] (True = may attend).
    score: a score variant from ``attnjax.scores`` (default: softmax).
    bias: additive float array broadcastable to [B, N, T, S].
    scale: logit scale, default 1/sqrt(H).
    q_positions, k_positions: int [T]/[B, T], [S]/[B, S]; default
      bottom-right aligned: ``arange(T) + S - T`` and ``arange(S)``.
    segment_ids: [B, T] (T == S) or a pair ([B, T], [B, S]): queries attend
      only to keys of their own segment (packed documents).
    query_seq_lengths, key_value_seq_lengths: int [B] (padded batches): queries
      at index >= ``query_seq_lengths[b]`` see no key (zeros), keys at index >=
      ``key_value_seq_lengths[b]`` are seen by no query. On the XLA path and
      in the Pallas kernels the padded blocks are skipped: the cost follows
      the real lengths.
    return_lse: also return the log-sum-exp [B, T, N] float32 (for
      ``merge_attention``).
    dropout_rate: attention dropout, a Python float in [0, 1): each (query
      head, query, key) weight is kept with probability 1 - rate and scaled
      by 1 / (1 - rate) (Flax's convention; the lse is the undropped one).
      The mask is a function of ``dropout_rng`` and the (batch, head, query
      index, key index) only (``attnjax.core.dropout``): the XLA engine and
      the Pallas kernels regenerate it per tile, the reference draws the same one.
    dropout_rng: a jax.random key, required when ``dropout_rate > 0``.
    implementation: "reference" (dense float32 oracle), "xla" (blocked
      flash-style pure-JAX path that skips fully masked blocks), "pallas"
      (TPU/GPU kernel; interpret mode on CPU) or None: the first of
      ("pallas", "xla") that supports the call on the device it is placed on
      (``attnjax.explain`` says which and why). The reference never runs
      unasked: when no fast backend supports a call it runs with a warning.

  Returns:
    out [B, T, N, Hv] in the query dtype (and lse when asked). A query row
    that sees no key returns zeros and lse = -inf. Accumulation is float32;
    float64 inputs (under ``jax_enable_x64``) are computed in float64 by the
    reference only: the xla/pallas paths give them float32-level error and
    warn (``attnjax.core.precision.Float32AccumulationWarning``).
  """
  query, key, value = V.as_arrays(query, key, value)
  d = V.check_qkv(query, key, value)
  dropout_rate = DR.check_dropout(dropout_rate, dropout_rng)
  lens = PD.full_lengths(PD.check_lengths("query_seq_lengths", query_seq_lengths, d.B),
                         PD.check_lengths("key_value_seq_lengths", key_value_seq_lengths, d.B),
                         d.B, d.T, d.S)
  kwargs = dict(mask=mask, score=score, bias=bias, scale=scale, q_positions=q_positions,
                k_positions=k_positions, segment_ids=segment_ids, return_lse=return_lse,
                dropout_rate=dropout_rate, dropout_rng=dropout_rng)
  call = attention_call(query, key, value, mask=mask, score=score, bias=bias, scale=scale,
                        lengths=lens is not None, dropout=dropout_rate > 0)
  backend = check_impl(implementation, call)
  if backend == "reference":
    if lens is not None:
      kwargs.update(_reference_lengths(d, lens, mask, q_positions, k_positions, segment_ids))
    return reference_attention(query, key, value, **kwargs)
  return run_attention(query, key, value, backend=backend, lengths=lens, **kwargs)


def _reference_lengths(d, lens, mask, q_positions, k_positions, segment_ids):
  """mask/segment_ids arguments of the dense oracle with the lengths folded in."""
  q_pos, k_pos = V.check_positions(q_positions, k_positions, d)
  segs = V.check_segment_ids(segment_ids, d)
  vis = dense_visibility(mask, d, q_pos, k_pos, segs)
  if segs is not None and not (isinstance(mask, Mask) and mask.needs_segments):
    vis = vis & (segs[0][:, None, :, None] == segs[1][:, None, None, :])
  return dict(mask=vis & PD.lengths_mask(lens, d.T, d.S), segment_ids=None)


def fast_attention(query, key, value, *, mask=None, score=None, bias=None, scale=None,
                   q_positions=None, k_positions=None, segment_ids=None, return_lse=False,
                   implementation="xla"):
  """``attnjax.attention`` on the "xla" or "pallas" backend (same arguments).

  ``implementation=None`` resolves through the attention backend table
  (``ATTENTION_BACKENDS``); an explicit backend that cannot run the call
  raises NotImplementedError saying why.
  """
  call = attention_call(query, key, value, mask=mask, score=score, bias=bias, scale=scale)
  backend = check_impl(implementation, call=call)
  if backend == "reference":
    raise ValueError("fast_attention runs the 'xla' or 'pallas' backend; use "
                     "attnjax.attention for implementation='reference'.")
  return run_attention(query, key, value, mask=mask, score=score, bias=bias, scale=scale,
                       q_positions=q_positions, k_positions=k_positions,
                       segment_ids=segment_ids, return_lse=return_lse, backend=backend)


def run_attention(query, key, value, *, mask=None, score=None, bias=None, scale=None,
                  q_positions=None, k_positions=None, segment_ids=None, return_lse=False,
                  backend="xla", lengths=None, dropout_rate=0.0, dropout_rng=None):
  """Runs an already chosen backend ("xla" or "pallas") of the attention op.

  ``mask`` is None (dense), a ``Mask`` (compiled once per shape into a block
  layout; only visited blocks are computed) or a boolean array broadcastable
  to [B, N, T, S] (its tiles are gathered; when the array is concrete at
  trace time, empty blocks are skipped too). ``lengths``: None or (q_len, kv_len)
  int32 [B] each (``padding``). ``dropout_rate``/``dropout_rng``: attention
  dropout. Shapes as ``attnjax.attention``.
  """
  implementation = backend
  dropout_rate = DR.check_dropout(dropout_rate, dropout_rng)
  d = V.check_qkv(query, key, value)
  q_pos, k_pos = V.check_positions(q_positions, k_positions, d)
  segs = V.check_segment_ids(segment_ids, d)
  score = _check_score(score, return_lse)
  V.check_mask_argument(mask, Mask)
  mask_obj = mask if isinstance(mask, Mask) else None
  mask_arr = None
  if mask is not None and mask_obj is None:
    mask_arr = _norm4("mask", mask, d)
    if mask_arr.dtype != bool:
      raise TypeError(f"mask array must be boolean (True = may attend), got {mask_arr.dtype}.")
  if mask_obj is not None and mask_obj.needs_segments and segs is None:
    raise ValueError(f"mask {mask_obj!r} reads segment ids: pass segment_ids.")
  bias4 = None if bias is None else _norm4("bias", bias, d)
  offs = _offsets(q_positions, k_positions, d) if mask_obj is not None else None
  bq, bk, bm0 = _call_blocks(implementation, mask_obj, d, offs, segs, query, key, value)
  layout = _call_layout(mask_obj, mask_arr, d, offs, segs, bq, bk, bm0)
  if implementation == "pallas":
    if (layout.q_len, layout.kv_len) != (d.T, d.S):
      raise NotImplementedError(
          f"implementation='pallas' needs lengths divisible by a block size; got T={d.T}, "
          f"S={d.S}.")
    q_len, kv_len = lengths if lengths is not None else (None, None)
    return run_pallas(query, key, value, layout, mask=mask_obj, score=score, scale=scale,
                   q_positions=q_positions, k_positions=k_positions,
                   segment_ids=segment_ids, bias=bias4, mask_array=mask_arr,
                   query_seq_lengths=q_len, key_value_seq_lengths=kv_len,
                   return_lse=return_lse, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
  return run_engine(query, key, value, layout, score=score, bias=bias4, scale=scale,
                    q_pos=q_pos, k_pos=k_pos, segs=segs, mask_array=mask_arr,
                    return_lse=return_lse, lengths=lengths, dropout_rate=dropout_rate,
                    dropout_rng=dropout_rng)


def _call_blocks(backend, mask_obj, d, offs, segs, *arrays):
  """(bq, bk, block kinds or None) for a backend: the TPU kernels' per-target blocks
  (``_kernel_blocks``), else the cost model's choice (``plan.pick_blocks``) for a mask
  at contiguous positions, else ``plan.choose_blocks``."""
  if backend == "pallas":
    blocks = _kernel_blocks(d, *arrays)
    if blocks is not None:
      return blocks + (None,)
  if offs is not None and not mask_obj.needs_segments and segs is None:
    return P.pick_blocks(mask_obj, d.T, d.S, d.N, *offs)
  return P.choose_blocks(d.T, d.S)[:2] + (None,)


def kernel_platform(*arrays):
  """'tpu' or 'gpu' when the call is placed on a compile target the kernels know, else None."""
  budget = budgets.budget(budgets.target_of_device(placement.target_device(*arrays)))
  return None if budget is None else budget.platform


def _kernel_blocks(d, query, key, value):
  """Blocks for the TPU kernels on a TPU target (fit its default scoped VMEM), else None.

  The XLA path's blocks come from a CPU cost model and may be narrower than a
  TPU kernel accepts (block_kv % 128); GPU kernels tile any of them.
  """
  if kernel_platform(query, key, value) != "tpu":
    return None
  target = budgets.target_of_device(placement.target_device(query, key, value))
  return resources.choose_tpu_blocks(d.T, d.S, d.H, d.Hv, np.dtype(query.dtype).itemsize, target)


def _call_layout(mask_obj, mask_arr, d, offs, segs, bq, bk, bm0=None):
  """The call's block plan at the padded lengths (``bm0``: the mask's kinds, if known)."""
  Tp, Sp = -(-d.T // bq) * bq, -(-d.S // bk) * bk
  nq, nk = Tp // bq, Sp // bk
  if bm0 is not None:
    bm = bm0
  elif mask_obj is not None:
    if offs is None:
      bm = P.dense_block_mask(nq, nk, LY.PARTIAL)
    else:
      try:
        bm = P.mask_block_mask(mask_obj, Tp, Sp, bq, bk, d.N, *offs)
      except ValueError:
        if not mask_obj.needs_segments:
          raise
        bm = P.dense_block_mask(nq, nk, LY.PARTIAL)
  else:
    bm = P.dense_block_mask(nq, nk, LY.FULL)
  if mask_arr is not None:
    cls = _concrete_classes(mask_arr, d, bq, bk, Tp, Sp)
    bm = P.force_partial(bm) if cls is None else np.minimum(bm, cls)
  if segs is not None or (mask_obj is not None and mask_obj.needs_segments):
    bm = P.force_partial(bm)
  if Sp != d.S:
    bm = P.force_partial(bm, cols=[nk - 1])
  if bm.shape[0] > 1 and bm.strides[0] == 0:
    bm = bm[:1]       # a head-independent mask's kinds, broadcast over heads: list one head
  q_off, k_off = offs if offs is not None else (d.S - d.T, 0)
  return LY.layout_from_block_mask(bm, Tp, Sp, bq, bk, q_offset=q_off, k_offset=k_off,
                                   mask=mask_obj)


def _offsets(q_positions, k_positions, d):
  """Layout offsets: defaults for omitted positions, else from concrete contiguous ones."""
  if q_positions is None and k_positions is None:
    return d.S - d.T, 0  # no O(T + S) host arrays: the shape may be too large to plan
  qp = np.arange(d.T) + (d.S - d.T) if q_positions is None else q_positions
  kp = np.arange(d.S) if k_positions is None else k_positions
  return P.layout_offsets(qp, kp)


def _concrete_classes(mask_arr, d, bq, bk, Tp, Sp):
  """Block classes of a mask array known at trace time, else None."""
  try:
    m = np.asarray(mask_arr)
  except Exception:  # pylint: disable=broad-except  (traced)
    return None
  m = np.broadcast_to(m, m.shape[:2] + (d.T, d.S))
  m = np.pad(m, ((0, 0), (0, 0), (0, Tp - d.T), (0, Sp - d.S)))
  cls = P.classify_array(m, bq, bk)
  if cls.shape[0] not in (1, d.N):
    cls = cls[:1]
  return cls
