"""Entry point of the Pallas block-sparse kernels: validation, backend choice, custom VJP."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import placement
from attnjax.core import scoring
from attnjax.core import validation as V
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
  for attr in ("fwd_indices", "fwd_full", "fwd_counts", "bwd_indices", "bwd_full", "bwd_counts"):
    if not hasattr(layout, attr):
      raise TypeError(f"layout must be an attnjax BlockLayout, got {type(layout).__name__}.")
  if (layout.q_len, layout.kv_len) != (d.T, d.S):
    raise ValueError(
        f"layout was built for q_len={layout.q_len}, kv_len={layout.kv_len}; the "
        f"inputs have T={d.T}, S={d.S}.")
  if layout.num_heads not in (1, d.N):
    raise ValueError(
        f"layout has num_heads={layout.num_heads}; expected 1 or the number of query "
        f"heads N={d.N}.")


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


def _prepare(query, key, value, layout, mask, score, scale, q_positions, k_positions,
             segment_ids, interpret, tiles=(), tiles_forced=False):
  """Validates everything; returns (KernelConfig, aux arrays, sinks or None)."""
  d = V.check_qkv(query, key, value)
  _check_layout(layout, d)
  score = check_score(score)
  scale = C.check_static_scale(V.check_scale(scale, d.H))
  mask = mask if mask is not None else layout.mask
  listed = np.arange(layout.fwd_indices.shape[-1]) < layout.fwd_counts[..., None]
  any_partial = bool(np.any(listed & ~layout.fwd_full))
  any_full = bool(np.any(layout.fwd_full))
  if any_partial and mask is None:
    raise ValueError(
        "layout has partial blocks but no mask to evaluate inside them: pass mask= "
        "(the attnjax Mask the layout was built from).")
  if not any_partial:
    mask = None
  segs = V.check_segment_ids(segment_ids, d)
  if mask is not None and mask.needs_segments and segs is None:
    raise ValueError(f"mask {mask!r} reads segment ids: pass segment_ids.")

  q_pos, k_pos = position_arrays(q_positions, k_positions, d)
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
      B=d.B, T=d.T, S=d.S, N=d.N, K=d.K, H=d.H, Hv=d.Hv,
      block_q=int(layout.block_q), block_kv=int(layout.block_kv),
      layout_heads=int(layout.num_heads),
      max_kb=int(layout.fwd_indices.shape[-1]), max_qb=int(layout.bwd_indices.shape[-1]),
      any_full=any_full, any_partial=any_partial, scale=scale, score=score, mask=mask,
      has_segments=segs is not None,
      segment_test_on_full=segs is not None and not reads_segments,
      q_offset=int(layout.q_offset), k_offset=int(layout.k_offset),
      has_q_pos=q_pos is not None, has_k_pos=k_pos is not None,
      pos_batched=(q_pos is not None and q_pos.shape[0] == d.B and d.B > 1,
                   k_pos is not None and k_pos.shape[0] == d.B and d.B > 1),
      out_dtype=jnp.float32 if sinks is not None else query.dtype,
      interpret=interpret, tiles=tiles)
  cfg = fit_config(cfg, query, key, value, tiles_forced)
  aux = (q_pos, k_pos) + (segs if segs is not None else (None, None))
  return cfg, aux, sinks


def _make_attention(cfg, lists, module):
  """custom_vjp function (q, k, v, aux, sinks) -> (out [B,T,N,Hv], lse [B,N,T]).

  ``lists``: the kernel block lists of a static layout (``module.prepare_lists``).
  """
  attend = make_attention(cfg, module, lambda lists, backward: lists)
  return lambda q, k, v, aux, sinks: attend(q, k, v, aux, sinks, lists)


def make_attention(cfg, module, expand):
  """custom_vjp function (q, k, v, aux, sinks, lists) -> (out [B,T,N,Hv], lse [B,N,T]).

  ``lists`` is a pytree of integer arrays (no gradient);
  ``expand(lists, backward)`` turns it into the dict the module's kernels read
  (with the backward lists too when ``backward``). Static layouts pass their
  finished lists; run-time lists are expanded under jit.
  """

  def fwd_impl(q, k, v, aux, sinks, lists):
    out, lse = module.forward(cfg, expand(lists, False), q, k, v, aux)
    if sinks is not None:
      lse_all = jnp.logaddexp(lse, sinks[None, :, None])
      w = jnp.where(lse == C.NEG_INF, 0.0, jnp.exp(lse - lse_all))   # NaN stays NaN
      out = out * jnp.swapaxes(w, 1, 2)[..., None]
      lse = lse_all
    return out.astype(q.dtype), lse

  @jax.custom_vjp
  def attend(q, k, v, aux, sinks, lists):
    return fwd_impl(q, k, v, aux, sinks, lists)

  def attend_fwd(q, k, v, aux, sinks, lists):
    out, lse = fwd_impl(q, k, v, aux, sinks, lists)
    return (out, lse), (q, k, v, aux, sinks, lists, out, lse)

  def attend_bwd(res, cts):
    q, k, v, aux, sinks, lists, out, lse = res
    d_out, d_lse = cts
    d_out = d_out.astype(q.dtype)
    delta = jnp.einsum("btnh,btnh->bnt", d_out.astype(jnp.float32), out.astype(jnp.float32))
    if cfg.normalization != "none":
      delta = delta - d_lse.astype(jnp.float32)
    dq, dk, dv = module.backward(cfg, expand(lists, True), q, k, v, aux, d_out, lse, delta)
    d_sinks = None
    if sinks is not None:
      p_sink = jnp.where(lse == C.NEG_INF, 0.0, jnp.exp(sinks[None, :, None] - lse))
      d_sinks = -jnp.sum(p_sink * delta, axis=(0, 2))
    d_aux = jax.tree_util.tree_map(lambda _: None, aux)
    d_lists = jax.tree_util.tree_map(lambda _: None, lists)
    return dq, dk, dv, d_aux, d_sinks, d_lists

  attend.defvjp(attend_fwd, attend_bwd)
  return attend


def block_sparse_pallas(query, key, value, layout, *, mask=None, score=None, scale=None,
                        q_positions=None, k_positions=None, segment_ids=None,
                        return_lse=False, interpret=None, backend=None, tiles=None):
  """Block-sparse flash attention with the Pallas TPU (Mosaic) or GPU (Triton) kernels.

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv]; N % K == 0
      (GQA/MQA read each KV head once; nothing is repeated in memory).
    layout: an ``attnjax.masks.BlockLayout`` for (T, S) with 1 or N heads; only
      its listed blocks are computed. Its block sizes are the kernel tiles.
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
    return_lse: also return lse [B, T, N] float32 (differentiable).
    interpret: None = interpret unless running on the backend's platform.
    backend: "tpu" | "gpu" | None (the platform's; "tpu" on CPU).
    tiles: GPU kernel tiles ((fwd_q, fwd_k), (dq_q, dq_k), (dkv_q, dkv_k)),
      each dividing the layout blocks; None = ``gpu.default_tiles``. The TPU
      kernels use the layout blocks as tiles.

  Returns:
    out [B, T, N, Hv] in the query dtype (and lse). Rows with no visible key
    give zeros and lse = -inf.
  """
  backend, interpret = resolve_backend(backend, interpret, query, key, value)
  _check_layout(layout, V.check_qkv(query, key, value))
  kernel_tiles = ()
  if backend == "gpu":
    kernel_tiles = _gpu_tiles(tiles, layout.block_q, layout.block_kv, interpret)
  cfg, aux, sinks = _prepare(query, key, value, layout, mask, score, scale, q_positions,
                             k_positions, segment_ids, interpret, kernel_tiles,
                             tiles_forced=tiles is not None)
  if return_lse and cfg.normalization == "none":
    raise ValueError(
        "return_lse is undefined for unnormalised scores (normalization='none'): "
        "their outputs do not merge through a log-sum-exp.")
  module = _MODULES[backend]
  attend = _make_attention(cfg, module.prepare_lists(layout), module)
  out, lse = attend(query, key, value, aux, sinks)
  if return_lse:
    return out, jnp.swapaxes(lse, 1, 2)
  return out
