"""The dense reference oracle: the definition every other path is tested against.

Computes the full [B, N, T, S] logits in float32 (float64 when the inputs are
float64 under ``jax_enable_x64``), applies the explicit mask, the score
variant and the bias, and normalises. Memory is O(T * S): use it for tests
and short sequences only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.core import dropout
from attnjax.core import scoring
from attnjax.core import validation as V
from attnjax.masks.base import Mask


def _compute_dtype(query):
  return jnp.float64 if query.dtype == jnp.float64 else jnp.float32


def _masked_logsumexp(x):
  """logsumexp over the last axis: -inf (zero gradient) for rows with no finite entry.

  Unlike ``jax.nn.logsumexp``, a row whose entries are all -inf (masked, or
  removed by a -inf bias) gets a zero gradient instead of NaN; a NaN entry
  still makes its row NaN.
  """
  m = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
  m = jnp.where(m == -jnp.inf, 0.0, m)
  total = jnp.sum(jnp.exp(x - m), axis=-1)
  empty = total == 0
  return jnp.where(empty, -jnp.inf, m[..., 0] + jnp.log(jnp.where(empty, 1.0, total)))


def dense_visibility(mask, d: V.Dims, q_pos, k_pos, segs):
  """Boolean visibility broadcastable to [B, N, T, S] from a Mask or an array."""
  V.check_mask_argument(mask, Mask)
  if mask is None:
    vis = jnp.ones((1, 1, d.T, d.S), bool)
  elif isinstance(mask, Mask):
    mask.validate(d.N, q_pos, k_pos)  # a per-head mask built for another head count
    head = jnp.arange(d.N)[None, :, None, None]
    qp = q_pos[..., :, None] if q_pos.ndim == 1 else q_pos[:, None, :, None]
    kp = k_pos[..., None, :] if k_pos.ndim == 1 else k_pos[:, None, None, :]
    if mask.needs_segments:
      if segs is None:
        raise ValueError(f"mask {mask!r} reads segment ids: pass segment_ids.")
      q_seg, k_seg = segs
      vis = mask.predicate(head, qp, kp, q_seg[:, None, :, None], k_seg[:, None, None, :])
    else:
      vis = mask.predicate(head, qp, kp)
    vis = jnp.asarray(vis, bool)
  else:
    vis = jnp.asarray(mask)
    if vis.dtype != bool:
      raise TypeError(f"mask array must be boolean (True = may attend), got {vis.dtype}.")
    V.check_broadcastable("mask", vis, (d.B, d.N, d.T, d.S))
  while vis.ndim < 4:
    vis = vis[None]
  return vis


def reference_attention(query, key, value, *, mask=None, bias=None, scale=None,
                        q_positions=None, k_positions=None, segment_ids=None,
                        score=None, return_lse=False, return_probs=False,
                        logits_hook=None, probs_hook=None, dropout_rate=0.0,
                        dropout_rng=None):
  """Dense masked attention, the oracle.

  Args:
    query: [B, T, N, H]. key: [B, S, K, H]. value: [B, S, K, Hv]; N % K == 0.
    mask: None, an ``attnjax.masks.Mask`` (evaluated on positions and segment
      ids), or a boolean array broadcastable to [B, N, T, S] (True = attend).
    bias: additive float array broadcastable to [B, N, T, S].
    scale: logit scale, default 1/sqrt(H).
    q_positions, k_positions: int [T]/[B, T] and [S]/[B, S]; default
      bottom-right aligned (q_pos = arange(T) + S - T).
    segment_ids: [B, T] (self) or a pair ([B, T], [B, S]); when given, keys
      of another segment are masked in addition to ``mask``.
    score: a score variant from ``attnjax.scores`` (default softmax).
    return_lse: also return lse [B, T, N] float32 (log of the normaliser).
    return_probs: also return the weights [B, N, T, S] (analysis tools;
      after dropout, when it is on).
    logits_hook: optional ``f(logits [B, N, T, S]) -> logits`` applied to the
      scaled, score-transformed logits before masking (inference-time edits).
    probs_hook: optional ``f(probs [B, N, T, S]) -> probs`` applied to the
      normalised weights before they multiply the values.
    dropout_rate, dropout_rng: attention dropout on the normalised weights
      (after ``probs_hook``): the mask of ``attnjax.core.dropout``, the same
      one the XLA engine draws per tile for the same key.

  Returns:
    out [B, T, N, Hv] in the query dtype; plus lse and/or probs when asked.
    Rows with no visible key give zeros and lse = -inf.
  """
  d = V.check_qkv(query, key, value)
  dropout_rate = dropout.check_dropout(dropout_rate, dropout_rng)
  q_pos, k_pos = V.check_positions(q_positions, k_positions, d)
  segs = V.check_segment_ids(segment_ids, d)
  scale = V.check_scale(scale, d.H)
  score = scoring.resolve_score(score)
  cdt = _compute_dtype(query)

  q = query.astype(cdt)
  k = V.repeat_kv(key, d.N).astype(cdt)
  v = V.repeat_kv(value, d.N).astype(cdt)
  logits = jnp.einsum("btnh,bsnh->bnts", q, k, precision=jax.lax.Precision.HIGHEST)
  logits = logits * jnp.asarray(scale, cdt)
  if bias is not None:
    V.check_broadcastable("bias", bias, (d.B, d.N, d.T, d.S))
    logits = logits + jnp.asarray(bias, cdt)

  vis = dense_visibility(mask, d, q_pos, k_pos, segs)
  if segs is not None and not (mask is not None and getattr(mask, "needs_segments", False)):
    vis = vis & (segs[0][:, None, :, None] == segs[1][:, None, None, :])
  vis = jnp.broadcast_to(vis, (d.B, d.N, d.T, d.S))
  row_count = vis.sum(-1, keepdims=True).astype(cdt)

  head = jnp.arange(d.N)[:, None, None]
  qp = q_pos[:, None] if q_pos.ndim == 1 else q_pos[:, None, :, None]
  kp = k_pos[None, :] if k_pos.ndim == 1 else k_pos[:, None, None, :]
  logits = score.transform(logits, head=head, q_pos=qp, k_pos=kp, row_count=row_count)
  if logits_hook is not None:
    logits = logits_hook(logits)

  if score.normalization == "softmax":
    masked = jnp.where(vis, logits, -jnp.inf)
    lse = _masked_logsumexp(masked)
    sink = score.sink_logits()
    if sink is not None:
      sink = jnp.broadcast_to(jnp.asarray(sink, cdt), (d.N,))[None, :, None]
      lse = jnp.logaddexp(lse, sink)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    probs = jnp.where(vis, jnp.exp(masked - safe[..., None]), 0.0)
  else:
    w = jnp.where(vis, score.weights(logits), 0.0)
    denom = w.sum(-1)
    if score.normalization == "sum":
      probs = w / jnp.where(denom > 0, denom, 1.0)[..., None]
    else:
      probs = w
    lse = jnp.where(denom > 0, jnp.log(jnp.where(denom > 0, denom, 1.0)), -jnp.inf)
  if getattr(score, "has_reweight", False):
    probs = score.reweight(probs, row_count)
  if probs_hook is not None:
    probs = probs_hook(probs)
  if dropout_rate > 0:
    probs = probs * dropout.dense_multiplier(dropout_rng, dropout_rate, d.B, d.N, d.T,
                                             d.S).astype(cdt)
  out = jnp.einsum("bnts,bsnh->btnh", probs, v, precision=jax.lax.Precision.HIGHEST)
  lse = jnp.transpose(lse, (0, 2, 1)).astype(jnp.float32)
  result = (out.astype(query.dtype),)
  if return_lse:
    if score.normalization == "none":
      raise ValueError(
          "return_lse is undefined for unnormalised scores (normalization='none'): "
          "their outputs do not merge through a log-sum-exp.")
    result += (lse,)
  if return_probs:
    result += (probs,)
  return result[0] if len(result) == 1 else result
