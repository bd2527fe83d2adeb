"""Shared pieces of the block-sparse flash kernels: static config and block math.

Both backends (``tpu.py``: Mosaic, ``gpu.py``: Triton) run the same per-block
arithmetic, written here on plain ``jnp`` values so it lowers through either
compiler and through the interpreters:

- ``block_logits``: scaled ``q @ k^T`` in float32 plus the additive bias tile,
  the score transform, and the element visibility (mask predicate on
  positions from iota or arrays, segment ids, the boolean mask-array tile,
  the per-batch sequence lengths) - evaluated only on partial blocks; full
  blocks skip the mask.
- ``online_update``, ``finalize``, ``block_grads``: the flash recurrence, its
  finalisation and the per-block backward, on ``attnjax.core.flash`` (running
  max for softmax; plain sums for the ``"sum"``/``"none"`` normalisations).

Notation: a q-block of ``bq`` rows, a k-block of ``bk`` columns; ``m``/``l``
are [bq, 1] float32 (running max and normaliser), ``acc`` [bq, Hv] float32.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.core import dropout as DR
from attnjax.core import flash as F
from attnjax.core.flash import NEG_INF, dot_nn, dot_nt, dot_tn
from attnjax.core.scoring import SoftmaxScore


@dataclasses.dataclass(frozen=True, eq=False)
class KernelConfig:
  """Static description of one call: its block plan and what the plan does not say.

  Attributes:
    plan: the call's ``attnjax.masks.BlockLayout`` with its lists as
      ``jax.ShapeDtypeStruct`` (``skeleton``). The properties ``T``, ``S``,
      ``block_q``, ``block_kv``, ``nq``, ``nk``, ``layout_heads`` (1, N or,
      for run-time lists only, K), ``max_kb``/``max_qb`` (widths of the
      forward CSR / backward CSC lists), ``any_full``/``any_partial``,
      ``q_offset``/``k_offset`` (positions of the first query / key when no
      position arrays are given) and ``lists_batched`` (run-time lists with a
      leading batch axis) read it.
    B, N, K, H, Hv: BTNH sizes (q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv]).
    scale: logit scale (Python float).
    score: the score variant (normalization, transform, weights).
    mask: the Mask evaluated on partial blocks (None when there are none).
    has_segments: segment ids are given.
    segment_test_on_full: full blocks still need the segment-id test (the
      mask does not read segment ids itself).
    has_q_pos, has_k_pos: position arrays are given ([Bp, T] / [Bp, S]).
    pos_batched: (q, k) position arrays have a batch axis of size B.
    out_dtype: dtype the forward kernel writes (float32 when a sink
      correction follows).
    interpret: run through the Pallas interpreter.
    tiles: GPU tiles ((fwd_q, fwd_k), (dq_q, dq_k), (dkv_q, dkv_k)); each
      divides the layout's (block_q, block_kv). Unused by the TPU kernels.
    vmem_limit_bytes: TPU scoped-VMEM limit of the kernels (None: the
      compiler's default); set by ``resources.check`` when a configuration
      needs more than the default and fits in the physical VMEM.
    smem_list_entries: TPU: most list entries (code + counts, padded) one
      pallas_call may scalar-prefetch; longer lists are cut into several calls
      over the q-block (forward, dQ) or k-block (dK/dV) axis. 0 = no limit.
    has_lengths: per-batch sequence lengths are given (``Aux.lens``): blocks
      past them are not visited, blocks across them are masked element-wise.
    bias_shape, mask_shape: the 4-D shapes [Bx, Nx, Tx, Sx] (each dim 1 or the
      full size) of the additive bias and of the boolean mask array, or None.
    dropout_rate: attention dropout (``attnjax.core.dropout``; 0 = none): the
      kernels regenerate the keep mask of each tile from ``Aux.drop``.
  """
  plan: Any
  B: int
  N: int
  K: int
  H: int
  Hv: int
  scale: float
  score: Any
  mask: Any
  has_segments: bool
  segment_test_on_full: bool
  has_q_pos: bool
  has_k_pos: bool
  pos_batched: tuple
  out_dtype: Any
  interpret: bool
  tiles: tuple = ()
  vmem_limit_bytes: Optional[int] = None
  smem_list_entries: int = 0
  has_lengths: bool = False
  bias_shape: Optional[tuple] = None
  mask_shape: Optional[tuple] = None
  dropout_rate: float = 0.0

  T = property(lambda self: self.plan.q_len)
  S = property(lambda self: self.plan.kv_len)
  block_q = property(lambda self: self.plan.block_q)
  block_kv = property(lambda self: self.plan.block_kv)
  layout_heads = property(lambda self: self.plan.num_heads)
  max_kb = property(lambda self: self.plan.max_kb)
  max_qb = property(lambda self: self.plan.max_qb)
  any_full = property(lambda self: self.plan.any_full)
  any_partial = property(lambda self: self.plan.any_partial)
  q_offset = property(lambda self: self.plan.q_offset)
  k_offset = property(lambda self: self.plan.k_offset)
  lists_batched = property(lambda self: self.plan.batched)

  @property
  def masks_blocks(self) -> bool:
    """Some visited block may need the element mask (layout partial or lengths)."""
    return self.any_partial or self.has_lengths

  @property
  def nq(self) -> int:
    return self.T // self.block_q

  @property
  def nk(self) -> int:
    return self.S // self.block_kv

  @property
  def G(self) -> int:
    """Query heads per KV head."""
    return self.N // self.K

  @property
  def normalization(self) -> str:
    return self.score.normalization


class Aux(NamedTuple):
  """Non-differentiable side inputs of the kernels.

  q_pos [Bp, T], k_pos [Bp, S] int32 or None; q_seg [B, T], k_seg [B, S] or
  None; mask: int8 [Bx, Nx, Tx, Sx] (nonzero = may attend) or None; lens:
  (q_len, kv_len) int32 [B] each, or None; drop: the per-(batch, query head)
  dropout keys uint32 [B, N, 2] (``dropout.head_keys``) or None.
  """
  q_pos: Any = None
  k_pos: Any = None
  q_seg: Any = None
  k_seg: Any = None
  mask: Any = None
  lens: Any = None
  drop: Any = None


def pair_index(shape, b, h, i, kb):
  """Block index of a [Bx, Nx, Tx, Sx] pair array (bias / mask) for block (b, h, i, kb).

  Broadcast dims (size 1) always read block 0.
  """
  return tuple(x if n > 1 else 0 for x, n in zip((b, h, i, kb), shape))


def pair_block(shape, bq: int, bk: int):
  """[rows, cols] block shape of a pair array: 1 where the array broadcasts."""
  return (bq if shape[2] > 1 else 1, bk if shape[3] > 1 else 1)


def length_visibility(q_start, bq: int, k_start, bk: int, q_len, kv_len):
  """[bq, bk] bool: query index < q_len and key index < kv_len (indices, not positions)."""
  qi = lax.broadcasted_iota(jnp.int32, (bq, 1), 0) + q_start
  ki = lax.broadcasted_iota(jnp.int32, (1, bk), 1) + k_start
  return (qi < q_len) & (ki < kv_len)


def list_head(cfg: KernelConfig, h):
  """Head index into the block lists for query head ``h`` (static choice)."""
  if cfg.layout_heads == cfg.N:
    return h
  if cfg.layout_heads == 1:
    return 0
  return h // (cfg.N // cfg.layout_heads)


def list_row(cfg: KernelConfig, b, h, i, rows: int):
  """Flat row of (batch b, query head h, block i) in lists of ``rows`` rows per head."""
  lh = list_head(cfg, h)
  if cfg.lists_batched:
    return (b * cfg.layout_heads + lh) * rows + i
  return lh * rows + i


# -- dropout -----------------------------------------------------------------------
def dropout_keep(cfg: KernelConfig, key, q_start, bq: int, k_start, bk: int,
                 key_major: bool = False):
  """Dropout multiplier [bq, bk] float32 of the tile at (q_start, k_start), or None.

  ``key``: the (k0, k1) uint32 words of the tile's (batch, query head), or
  None. The same values as the XLA engine's and the reference's
  (``dropout.keep_multiplier`` at the tile's query and key indices).
  ``key_major``: draw it as [bk, bq] and transpose it (same values): the GPU
  dK/dV kernel, whose matmuls read the tile transposed; drawn [bq, bk] there,
  Triton rematerialises the rounds in the transposed layout and exhausts the
  compiler's memory (> 16 GB at T=256).
  """
  if cfg.dropout_rate == 0.0 or key is None:
    return None
  shape, (q_axis, k_axis) = ((bk, bq), (1, 0)) if key_major else ((bq, bk), (0, 1))
  qi = lax.broadcasted_iota(jnp.int32, shape, q_axis) + q_start
  ki = lax.broadcasted_iota(jnp.int32, shape, k_axis) + k_start
  keep = DR.keep_multiplier(key[0], key[1], qi, ki, cfg.dropout_rate)
  return keep.T if key_major else keep


# -- positions ---------------------------------------------------------------------
def iota_positions(offset: int, start, size: int, axis: int):
  """Positions ``offset + start + arange(size)`` as [size, 1] (axis 0) or [1, size]."""
  shape = (size, 1) if axis == 0 else (1, size)
  return lax.broadcasted_iota(jnp.int32, shape, axis) + (start + offset)


# -- block math ------------------------------------------------------------------
def _is_identity_transform(score) -> bool:
  return type(score).transform is SoftmaxScore.transform


def _transform(cfg: KernelConfig, raw, head, q_pos, k_pos):
  if _is_identity_transform(cfg.score):
    return raw
  return cfg.score.transform(raw, head=head, q_pos=q_pos, k_pos=k_pos, row_count=None)


def visibility(cfg: KernelConfig, head, q_pos, k_pos, q_seg, k_seg, full: bool,
               mask_tile=None, len_vis=None):
  """Element visibility [bq, bk] of one block, or None when nothing is masked.

  ``full`` blocks skip the mask predicate, the mask-array tile and the length
  test; the segment-id test still applies to them when segment ids are given
  and the mask does not read them. ``mask_tile``: the block's tile of the
  boolean mask array (int8, broadcastable to [bq, bk]); ``len_vis``: the
  block's ``length_visibility``.
  """
  vis = None
  shape = (q_pos.shape[0], k_pos.shape[1])
  reads_segments = cfg.mask is not None and cfg.mask.needs_segments
  if not full:
    if cfg.mask is not None:
      if reads_segments:
        vis = cfg.mask.predicate(head, q_pos, k_pos, q_seg, k_seg)
      else:
        vis = cfg.mask.predicate(head, q_pos, k_pos)
      vis = jnp.broadcast_to(jnp.asarray(vis, jnp.bool_), shape)
    for extra in (mask_tile, len_vis):
      if extra is not None:
        extra = jnp.broadcast_to(extra != 0 if extra.dtype != jnp.bool_ else extra, shape)
        vis = extra if vis is None else vis & extra
  if cfg.has_segments and (cfg.segment_test_on_full or not full) and not reads_segments:
    same = q_seg == k_seg
    vis = same if vis is None else vis & same
  return vis


def _raw(cfg: KernelConfig, q, k, bias_tile):
  raw = dot_nt(q, k) * cfg.scale
  if bias_tile is not None:
    raw = raw + bias_tile.astype(jnp.float32)
  return raw


def block_logits(cfg: KernelConfig, q, k, head, q_pos, k_pos, bias_tile=None):
  """Raw scaled (and biased) logits [bq, bk] float32 and their transform.

  ``bias_tile``: the block's tile of the additive bias (broadcastable to
  [bq, bk]), added before the score transform, as the reference does.
  """
  raw = _raw(cfg, q, k, bias_tile)
  return raw, _transform(cfg, raw, head, q_pos, k_pos)


def online_update(cfg: KernelConfig, s, vis, v, m, l, acc, keep=None):
  """One k-block of the forward recurrence (``attnjax.core.flash``); returns (m, l, acc).

  ``keep``: the tile's dropout multiplier (``dropout_keep``) or None.
  """
  if cfg.normalization == "softmax":
    if vis is not None:
      s = jnp.where(vis, s, NEG_INF)
    return F.online_update(m, l, acc, s, v, keep)
  w = cfg.score.weights(s).astype(jnp.float32)
  if vis is not None:
    w = jnp.where(vis, w, 0.0)
  return (m,) + F.sum_update(l, acc, w, v, keep)


def finalize(cfg: KernelConfig, m, l, acc):
  """(out [bq, Hv] float32, lse [bq, 1] float32) from the running state.

  Rows that saw no key give zeros and lse = -inf; a NaN logit makes ``l``
  NaN, which is not an empty row: it reaches the output and the lse. For
  ``"none"`` the output is the unnormalised sum and lse is the log of the
  weight sum. Sinks are applied outside the kernels (``api.py``).
  """
  return F.finalize(m, l, acc, normalization=cfg.normalization)


def block_grads(cfg: KernelConfig, q, k, v, do, lse, delta, vis, head, q_pos, k_pos,
                bias_tile=None, with_dlogits=False, keep=None):
  """Per-block backward quantities.

  Args:
    q [bq, H], k [bk, H], v [bk, Hv], do [bq, Hv]; lse, delta [bq, 1] float32
      (``delta`` = rowsum(dO * O) - dlse, see ``api.py``).
    vis: [bq, bk] bool or None.
    bias_tile: the block's bias tile (broadcastable to [bq, bk]) or None.
    with_dlogits: also return dL/d(biased logits) (the bias gradient tile).
    keep: the tile's dropout multiplier (``dropout_keep``) or None.

  Returns:
    (ds [bq, bk] float32: dL/d(raw logits) already multiplied by the scale,
     p [bq, bk] float32: the normalised weights times ``keep``, for
     dV = p^T dO), plus
    dL/d(logits) [bq, bk] float32 when ``with_dlogits``.
  """
  raw = _raw(cfg, q, k, bias_tile)
  dp = dot_nt(do, v)
  norm = cfg.normalization
  if norm == "softmax":
    fn = lambda x: _transform(cfg, x, head, q_pos, k_pos)
  else:
    fn = lambda x: cfg.score.weights(_transform(cfg, x, head, q_pos, k_pos)).astype(jnp.float32)
  if norm == "softmax" and _is_identity_transform(cfg.score):
    s, pullback = raw, None
  else:
    s, pullback = jax.vjp(fn, raw)

  if norm == "softmax":
    p = F.probs_from_lse(s, lse, vis)
    dsx = F.logits_grad(p, dp, delta, keep)
  else:
    w = s if vis is None else jnp.where(vis, s, 0.0)
    if norm == "sum":
      inv = F.inverse_sum(lse)
      p = w * inv
      dsx = F.logits_grad(inv, dp, delta, keep)
    else:
      p = w
      dsx = F.dropped_probs(dp, keep)
    if vis is not None:
      dsx = jnp.where(vis, dsx, 0.0)
  ds = dsx if pullback is None else pullback(dsx)[0]
  p = F.dropped_probs(p, keep)
  if with_dlogits:
    return ds * cfg.scale, p, ds
  return ds * cfg.scale, p


def decode(code):
  """(block index, is_full) from a packed list entry."""
  return code // 2, (code % 2) == 1


def check_static_scale(scale) -> float:
  try:
    return float(scale)
  except (TypeError, jax.errors.ConcretizationTypeError) as e:
    raise ValueError(
        f"scale must be a Python number for the Pallas block-sparse kernels, got "
        f"{type(scale).__name__}.") from e


def sink_vector(score, N: int) -> Optional[jnp.ndarray]:
  """Per-head sink logits as float32 [N], or None."""
  sink = score.sink_logits()
  if sink is None:
    return None
  sink = jnp.asarray(sink, jnp.float32)
  if sink.ndim > 1 or sink.shape not in ((), (1,), (N,)):
    raise ValueError(
        f"score.sink_logits() must be a scalar or have shape [N]=({N},), got {sink.shape}.")
  return jnp.broadcast_to(sink, (N,))
