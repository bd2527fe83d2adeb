"""Entry point of the Pallas block-sparse kernels: validation, backend choice, custom VJP."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import dropout as DR
from attnjax.core import placement
from attnjax.core import scoring
from attnjax.core import validation as V
from attnjax.masks import layout as LY
from pallas_kernels.block_sparse import common as C
from pallas_kernels.block_sparse import gpu as gpu_kernels
from pallas_kernels.block_sparse import resources as R
from pallas_kernels.block_sparse import tpu as tpu_kernels
from pallas_kernels.targets import budgets as BG

BACKENDS = ("tpu", "gpu")
_MODULES = {"tpu": tpu_kernels, "gpu": gpu_kernels}


def resolve_backend(backend, interpret, *arrays):
  platform = placement.pallas_backend(*arrays)
  if backend is None:
    backend = platform or "tpu"
  if backend not in BACKENDS:
    raise ValueError(f"backend must be 'tpu', 'gpu' or None, got {backend!r}.")
  if interpret is None:
    interpret = platform != backend
  if not interpret and platform != backend:
    raise ValueError(
        f"backend={backend!r} cannot run compiled on platform "
        f"{placement.target_platform(*arrays)!r}: pass interpret=True (or None).")
  return backend, bool(interpret)


def fit_config(cfg, query, key, value, tiles_forced: bool):
  """``resources.fit`` for the target the inputs are placed on (ValueError if too big)."""
  target = BG.target_of_device(placement.target_device(query, key, value))
  return R.fit(cfg, target, query.dtype, tiles_forced)


def _check_layout(layout, d: V.Dims):
  if not isinstance(layout, LY.BlockLayout):
    raise TypeError(f"layout must be an attnjax BlockLayout, got {type(layout).__name__}.")
  if (layout.q_len, layout.kv_len) != (d.T, d.S):
    raise ValueError(
        f"layout was built for q_len={layout.q_len}, kv_len={layout.kv_len}; the "
        f"inputs have T={d.T}, S={d.S}.")
  heads = (1, d.N, d.K) if layout.batched else (1, d.N)
  if layout.num_heads not in heads:
    raise ValueError(
        f"layout has num_heads={layout.num_heads}; expected 1 or the number of query "
        f"heads N={d.N}" + (f" or of KV heads K={d.K}." if layout.batched else "."))


def _gpu_tiles(tiles, block_q, block_kv, interpret):
  if tiles is None:
    return gpu_kernels.default_tiles(int(block_q), int(block_kv), interpret)
  try:
    tiles = tuple((int(a), int(b)) for a, b in tiles)
  except (TypeError, ValueError) as e:
    raise ValueError(
        f"tiles must be ((fwd_q, fwd_k), (dq_q, dq_k), (dkv_q, dkv_k)), got {tiles!r}.") from e
  if len(tiles) != 3:
    raise ValueError(
        f"tiles must be ((fwd_q, fwd_k), (dq_q, dq_k), (dkv_q, dkv_k)), got {tiles!r}.")
  return tiles


def check_score(score):
  """Resolves the score variant; raises for those the kernels cannot run."""
  score = scoring.resolve_score(score)
  if getattr(score, "needs_row_count", False):
    raise NotImplementedError(
        f"{score!r} needs the visible-key count of each row (row_count), which the "
        "block-sparse kernels do not compute; use implementation='xla' or 'reference'.")
  if getattr(score, "has_reweight", False):
    raise NotImplementedError(
        f"{score!r} re-weights normalised rows (reweight), which needs whole rows; "
        "use implementation='xla' or 'reference'.")
  return score


def position_arrays(q_positions, k_positions, d: V.Dims):
  """Validated position arrays as [Bq, T] / [Bk, S] int32, or None where not given."""
  q_pos = k_pos = None
  if q_positions is not None:
    q_pos = V.check_positions(q_positions, None, d)[0]
    q_pos = q_pos if q_pos.ndim == 2 else q_pos[None]
  if k_positions is not None:
    k_pos = V.check_positions(None, k_positions, d)[1]
    k_pos = k_pos if k_pos.ndim == 2 else k_pos[None]
  return q_pos, k_pos


def pair_array(name, x, d: V.Dims, kind: str):
  """A bias ("float") or mask array ("bool") broadcastable to [B, N, T, S], as 4-D.

  Returns None for None; the mask comes back as int8 (1 = may attend), a
  non-float bias as float32.
  """
  if x is None:
    return None
  x = jnp.asarray(x)
  V.check_broadcastable(name, x, (d.B, d.N, d.T, d.S))
  if kind == "bool" and x.dtype != jnp.bool_:
    raise TypeError(f"{name} must be a boolean array (True = may attend), got {x.dtype}.")
  if kind == "float" and not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)     # as the reference adds it
  x = x.reshape((1,) * (4 - x.ndim) + x.shape)
  return x.astype(jnp.int8) if kind == "bool" else x


@functools.lru_cache(maxsize=256)
def mask_table_shapes(mask) -> tuple:
  """Shapes of the constant tables ``mask.predicate`` reads (() when it reads none).

  The kernels evaluate the predicate inside the kernel body, where a captured
  array (``Documents(ids)``'s id runs, ``RandomBlocks``' block table,
  ``KeyIn``/``QueryIn`` over more than 16 positions) cannot be used, so such
  masks are refused (the attention dispatcher sends them to the XLA path).
  """
  spec = jax.ShapeDtypeStruct((8,), jnp.int32)
  segs = (spec, spec) if mask.needs_segments else (None, None)
  closed = jax.make_jaxpr(lambda h, q, k, *sg: mask.predicate(h, q, k, *sg))(
      spec, spec, spec, *[x for x in segs if x is not None])
  return tuple(tuple(np.shape(c)) for c in closed.consts if np.ndim(c) > 0)


def check_mask_tables(mask):
  """NotImplementedError when ``mask``'s predicate reads a constant table."""
  shapes = () if mask is None else mask_table_shapes(mask)
  if shapes:
    raise NotImplementedError(
        f"the block-sparse kernels cannot evaluate {mask!r} inside a partial block: its "
        f"predicate reads constant tables of shapes {list(shapes)} (kernels take no "
        "captured arrays); use implementation='xla'.")


def check_lengths(name, x, B: int):
  """Per-batch sequence lengths as int32 [B], or None (a length >= the sequence keeps
  everything, one <= 0 keeps nothing)."""
  if x is None:
    return None
  x = jnp.asarray(x)
  if x.shape != (B,) or not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array of shape [B]=({B},), got "
                     f"{x.dtype}{list(x.shape)}.")
  return x.astype(jnp.int32)


def _prepare(query, key, value, layout, mask, score, scale, q_positions, k_positions,
             segment_ids, interpret, tiles=(), tiles_forced=False, bias4=None, mask_array=None,
             lengths=(None, None), dropout=(0.0, None)):
  """Validates everything; returns (KernelConfig, Aux, sinks or None).

  ``dropout``: (dropout_rate, dropout_rng) (``attnjax.core.dropout``).
  ``bias4``: the bias as ``pair_array`` returns it (4-D), or None.
  """
  d = V.check_qkv(query, key, value)
  _check_layout(layout, d)
  score = check_score(score)
  scale = C.check_static_scale(V.check_scale(scale, d.H))
  mask4 = pair_array("mask_array", mask_array, d, "bool")
  rate = DR.check_dropout(*dropout)
  q_len = check_lengths("query_seq_lengths", lengths[0], d.B)
  kv_len = check_lengths("key_value_seq_lengths", lengths[1], d.B)
  lens = None
  if q_len is not None or kv_len is not None:
    lens = (jnp.full((d.B,), d.T, jnp.int32) if q_len is None else q_len,
            jnp.full((d.B,), d.S, jnp.int32) if kv_len is None else kv_len)
  mask = mask if mask is not None else layout.mask
  if layout.batched and (mask4 is not None or bias4 is not None or lens is not None):
    raise NotImplementedError("run-time block lists take no bias, mask_array or sequence "
                              "lengths in the kernels; use implementation='xla'.")
  if layout.any_partial and mask is None and mask4 is None:
    raise ValueError(
        "layout has partial blocks but no mask to evaluate inside them: pass mask= "
        "(the attnjax Mask the layout was built from) or mask_array=.")
  if not layout.any_partial:
    mask = mask4 = None    # full blocks skip the mask and the mask array
  check_mask_tables(mask)
  segs = V.check_segment_ids(segment_ids, d)
  if mask is not None and mask.needs_segments and segs is None:
    raise ValueError(f"mask {mask!r} reads segment ids: pass segment_ids.")

  q_pos, k_pos = position_arrays(q_positions, k_positions, d)
  if layout.batched and mask is not None:   # a static layout's mask was validated when built
    dq, dk = V.default_positions(d.T, d.S)
    mask.validate(d.N, dq if q_pos is None else q_pos, dk if k_pos is None else k_pos)
  if q_positions is None and layout.q_offset != d.S - d.T:
    raise ValueError(
        f"layout was built with q_offset={layout.q_offset} but the default query "
        f"positions start at S - T = {d.S - d.T}: pass q_positions.")
  if k_positions is None and layout.k_offset != 0:
    raise ValueError(
        f"layout was built with k_offset={layout.k_offset} but the default key "
        "positions start at 0: pass k_positions.")

  sinks = C.sink_vector(score, d.N) if score.normalization == "softmax" else None
  reads_segments = mask is not None and mask.needs_segments
  cfg = C.KernelConfig(
      plan=layout.skeleton(), B=d.B, N=d.N, K=d.K, H=d.H, Hv=d.Hv, scale=scale, score=score,
      mask=mask, has_segments=segs is not None,
      segment_test_on_full=segs is not None and not reads_segments,
      has_q_pos=q_pos is not None, has_k_pos=k_pos is not None,
      pos_batched=(q_pos is not None and q_pos.shape[0] == d.B and d.B > 1,
                   k_pos is not None and k_pos.shape[0] == d.B and d.B > 1),
      out_dtype=jnp.float32 if sinks is not None else query.dtype,
      interpret=interpret, tiles=tiles, has_lengths=lens is not None,
      bias_shape=None if bias4 is None else tuple(bias4.shape),
      mask_shape=None if mask4 is None else tuple(mask4.shape), dropout_rate=rate)
  cfg = fit_config(cfg, query, key, value, tiles_forced)
  drop = DR.head_keys(dropout[1], d.B, d.N) if rate > 0 else None
  aux = C.Aux(q_pos, k_pos, *(segs if segs is not None else (None, None)), mask4, lens, drop)
  return cfg, aux, sinks


def _make_attention(cfg, lists, module):
  """custom_vjp function (q, k, v, aux, sinks, bias) -> (out [B,T,N,Hv], lse [B,N,T]).

  ``lists``: the kernel block lists of a static layout (``module.prepare_lists``).
  """
  attend = make_attention(cfg, module, lambda lists, backward: lists)
  return lambda q, k, v, aux, sinks, bias=None: attend(q, k, v, aux, sinks, lists, bias)


def runtime_expander(cfg, module):
  """expand(plan, backward) for ``make_attention``: the kernel lists of run-time lists
  (a batched plan, traced leaves), built under jit (``module.runtime_lists``)."""

  def expand(plan, backward):
    bwd = (plan.bwd_indices, plan.bwd_counts) if backward else None
    return module.runtime_lists(cfg, (plan.fwd_indices, plan.fwd_counts), bwd)

  return expand


def plan_attention(cfg, layout, module):
  """custom_vjp function (q, k, v, aux, sinks, bias) -> (out, lse) on a plan's lists:
  a static plan's lists prepared once, run-time lists passed as traced leaves."""
  if not layout.batched:
    return _make_attention(cfg, module.prepare_lists(layout), module)
  attend = make_attention(cfg, module, runtime_expander(cfg, module))
  return lambda q, k, v, aux, sinks, bias=None: attend(q, k, v, aux, sinks, layout, bias)


def _unwrap(x):
  return x.value if isinstance(x, jax.custom_derivatives.CustomVJPPrimal) else x


def _dense_cotangent(ct, like):
  if isinstance(ct, jax.custom_derivatives.SymbolicZero):
    return jnp.zeros(like.shape, like.dtype)
  return ct


def reduce_pair_grad(ds, shape, dtype):
  """dS [B, N, T, S] float32 summed over the dims where the bias broadcasts (size 1)."""
  axes = tuple(a for a in range(4) if shape[a] == 1 and ds.shape[a] != 1)
  if axes:
    ds = jnp.sum(ds, axis=axes, keepdims=True)
  return ds.astype(dtype)


def make_attention(cfg, module, expand):
  """custom_vjp function (q, k, v, aux, sinks, lists, bias) -> (out [B,T,N,Hv], lse [B,N,T]).

  ``lists`` is a pytree of integer arrays (no gradient);
  ``expand(lists, backward)`` turns it into the dict the module's kernels read
  (with the backward lists too when ``backward``). Static layouts pass their
  finished lists; run-time lists are expanded under jit. ``aux`` is a
  ``common.Aux`` (no gradient); ``bias`` the 4-D additive bias or None. The
  bias gradient is computed only when the bias is differentiated: the dQ
  kernel then also writes dL/d(logits) of the visited blocks into a float32
  [B, N, T, S] array (zeros elsewhere), which is summed over the bias's
  broadcast dims.
  """

  def fwd_impl(q, k, v, aux, sinks, lists, bias):
    out, lse = module.forward(cfg, expand(lists, False), q, k, v, aux, bias)
    if sinks is not None:
      lse_all = jnp.logaddexp(lse, sinks[None, :, None])
      w = jnp.where(lse == C.NEG_INF, 0.0, jnp.exp(lse - lse_all))   # NaN stays NaN
      out = out * jnp.swapaxes(w, 1, 2)[..., None]
      lse = lse_all
    return out.astype(q.dtype), lse

  @jax.custom_vjp
  def attend(q, k, v, aux, sinks, lists, bias=None):
    return fwd_impl(q, k, v, aux, sinks, lists, bias)

  def attend_fwd(q, k, v, aux, sinks, lists, bias=None):
    # symbolic_zeros: each leaf arrives as CustomVJPPrimal(value, perturbed)
    want_dbias = bias is not None and bool(getattr(bias, "perturbed", False))
    q, k, v, aux, sinks, lists, bias = jax.tree_util.tree_map(
        _unwrap, (q, k, v, aux, sinks, lists, bias),
        is_leaf=lambda x: isinstance(x, jax.custom_derivatives.CustomVJPPrimal))
    out, lse = fwd_impl(q, k, v, aux, sinks, lists, bias)
    flag = () if want_dbias else None   # a static marker in the residuals' structure
    return (out, lse), (q, k, v, aux, sinks, lists, bias, out, lse, flag)

  def attend_bwd(res, cts):
    q, k, v, aux, sinks, lists, bias, out, lse, flag = res
    d_out, d_lse = cts
    d_out = _dense_cotangent(d_out, out).astype(q.dtype)
    d_lse = _dense_cotangent(d_lse, lse)
    delta = jnp.einsum("btnh,btnh->bnt", d_out.astype(jnp.float32), out.astype(jnp.float32))
    if cfg.normalization != "none":
      delta = delta - d_lse.astype(jnp.float32)
    dq, dk, dv, ds = module.backward(cfg, expand(lists, True), q, k, v, aux, bias, d_out, lse,
                                     delta, flag is not None)
    d_bias = None if ds is None else reduce_pair_grad(ds, bias.shape, bias.dtype)
    d_sinks = None
    if sinks is not None:
      p_sink = jnp.where(lse == C.NEG_INF, 0.0, jnp.exp(sinks[None, :, None] - lse))
      d_sinks = -jnp.sum(p_sink * delta, axis=(0, 2))
    d_aux = jax.tree_util.tree_map(lambda _: None, aux)
    d_lists = jax.tree_util.tree_map(lambda _: None, lists)
    return dq, dk, dv, d_aux, d_sinks, d_lists, d_bias

  attend.defvjp(attend_fwd, attend_bwd, symbolic_zeros=True)
  return attend


def block_sparse_pallas(query, key, value, layout, *, mask=None, score=None, scale=None,
                        q_positions=None, k_positions=None, segment_ids=None, bias=None,
                        mask_array=None, query_seq_lengths=None, key_value_seq_lengths=None,
                        return_lse=False, interpret=None, backend=None, tiles=None,
                        dropout_rate=0.0, dropout_rng=None):
  """Block-sparse flash attention with the Pallas TPU (Mosaic) or GPU (Triton) kernels.

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv]; N % K == 0
      (GQA/MQA read each KV head once; nothing is repeated in memory).
    layout: an ``attnjax.masks.BlockLayout`` (the block plan) for (T, S) with 1
      or N heads, or run-time lists (``attnjax.plan.from_lists``, 1, K or N
      heads, no bias, mask_array or lengths); only its listed blocks are
      computed. Its block sizes are the kernel tiles.
    mask: the ``Mask`` evaluated element-wise on partial blocks (default:
      ``layout.mask``); full blocks skip it.
    score: score variant (``attnjax.core.scoring`` protocol): softmax (with
      optional per-head sink logits, differentiable), "sum" or "none"
      normalisation, ``transform`` applied to the logits in the kernel.
      Scores that need ``row_count`` or ``reweight`` raise NotImplementedError.
    scale: Python float, default 1/sqrt(H).
    q_positions, k_positions: int [T]/[B, T], [S]/[B, S]; default positions
      come from iota and must match the layout's offsets (bottom-right aligned).
      With explicit positions the layout must list every visible block.
    segment_ids: [B, T] (T == S) or a pair ([B, T], [B, S]).
    bias: additive float array broadcastable to [B, N, T, S], added to the
      scaled logits before the score transform. The kernels read it tile by
      tile (broadcast dims of size 1 are read as such, never expanded). It is
      differentiable: when it is differentiated, the dQ kernel also writes
      the logit gradients of the visited blocks into a float32 [B, N, T, S]
      array, summed over the bias's broadcast dims (so a differentiated bias
      costs B*N*T*S*4 bytes of HBM; an undifferentiated one costs nothing).
    mask_array: boolean array broadcastable to [B, N, T, S] (True = may
      attend), combined (and) with ``mask``; read tile by tile as int8 on
      the layout's partial blocks only (full blocks skip it, as they skip
      ``mask``), so every block where the array has a False must be partial
      in ``layout`` (``attnjax``'s entry points build the layout that way).
    query_seq_lengths, key_value_seq_lengths: int [B] (padded batches):
      queries at index >= ``query_seq_lengths[b]`` see no key (zeros, lse =
      -inf, zero gradients), keys at index >= ``key_value_seq_lengths[b]``
      are seen by no query. Blocks wholly past a length are neither computed
      nor (TPU) copied; the blocks across it are masked element-wise.
    return_lse: also return lse [B, T, N] float32 (differentiable).
    interpret: None = interpret unless running on the backend's platform.
    backend: "tpu" | "gpu" | None (the platform's; "tpu" on CPU).
    tiles: GPU kernel tiles ((fwd_q, fwd_k), (dq_q, dq_k), (dkv_q, dkv_k)),
      each dividing the layout blocks; None = ``gpu.default_tiles``. The TPU
      kernels use the layout blocks as tiles.
    dropout_rate, dropout_rng: attention dropout (a Python float in [0, 1) and
      a jax.random key): the kernels regenerate the keep mask of each tile
      from per-(batch, head) keys, the same mask as the XLA engine and the
      reference with the same key (``attnjax.core.dropout``).

  Returns:
    out [B, T, N, Hv] in the query dtype (and lse). Rows with no visible key
    give zeros and lse = -inf.
  """
  backend, interpret = resolve_backend(backend, interpret, query, key, value)
  _check_layout(layout, V.check_qkv(query, key, value))
  kernel_tiles = ()
  if backend == "gpu":
    kernel_tiles = _gpu_tiles(tiles, layout.block_q, layout.block_kv, interpret)
  bias4 = pair_array("bias", bias, V.check_qkv(query, key, value), "float")
  cfg, aux, sinks = _prepare(
      query, key, value, layout, mask, score, scale, q_positions, k_positions, segment_ids,
      interpret, kernel_tiles, tiles_forced=tiles is not None, bias4=bias4, mask_array=mask_array,
      lengths=(query_seq_lengths, key_value_seq_lengths), dropout=(dropout_rate, dropout_rng))
  if return_lse and cfg.normalization == "none":
    raise ValueError(
        "return_lse is undefined for unnormalised scores (normalization='none'): "
        "their outputs do not merge through a log-sum-exp.")
  attend = plan_attention(cfg, layout, _MODULES[backend])
  out, lse = attend(query, key, value, aux, sinks, bias4)
  if return_lse:
    return out, jnp.swapaxes(lse, 1, 2)
  return out
