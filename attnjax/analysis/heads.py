"""Per-head analysis tools.

Retrieval heads ("Retrieval Head Mechanistically Explains Long-Context
Factuality", arXiv:2404.15574), head ablation for circuit analysis
("Interpreting and Improving Large Language Models in Arithmetic Calculation",
arXiv:2409.01659), vision-aware head divergence and re-weighting (VHD/VHR:
"Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence",
arXiv:2412.13949) and extreme-token metrics ("Active-Dormant Attention Heads:
Demystifying Extreme-Token Phenomena", arXiv:2410.13835).
"""
from __future__ import annotations

import jax.numpy as jnp

from attnjax.layers.head_mask import apply_head_mask  # noqa: F401  (the layer's ablation, re-exported)


def scale_heads(head_out, scale):
  """VHR: multiplies each head's output [B,T,N,H] by scale [N]."""
  N = head_out.shape[2]
  s = jnp.asarray(scale, head_out.dtype)
  if s.shape != (N,):
    raise ValueError(f"scale must have shape [N]=({N},), got {s.shape}.")
  return head_out * s[None, None, :, None]


def head_divergence(head_out_a, head_out_b):
  """VHD: L2 distance between per-head outputs [..., N, H] of two runs -> [..., N]."""
  if head_out_a.shape != head_out_b.shape:
    raise ValueError(f"head outputs must match: {head_out_a.shape} vs {head_out_b.shape}.")
  d = (head_out_a - head_out_b).astype(jnp.float32)
  return jnp.sqrt(jnp.sum(d * d, axis=-1))


def select_top_heads(scores, fraction: float):
  """Bool mask of the top ``fraction`` of heads by score (over all entries of ``scores``)."""
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"fraction must be in [0, 1], got {fraction}.")
  flat = jnp.ravel(scores)
  k = int(round(fraction * flat.size))
  ranks = jnp.argsort(jnp.argsort(-flat, stable=True), stable=True)  # 0 = highest score
  return (ranks < k).reshape(jnp.shape(scores))


def retrieval_score_step(last_row_probs, gen_token, input_ids, needle_span):
  """Retrieval-head score increment for one decoding step.

  Args:
    last_row_probs: [L, N, T] attention of the last query, per layer and head.
    gen_token: the token id emitted at this step.
    input_ids: [T] context token ids.
    needle_span: (start, end) of the needle in the context.

  Returns:
    [L, N] float32: ``1 / (end - start)`` where the head's top-1 key lies in
    the needle and holds the emitted token (a copy), else 0.
  """
  s, e = needle_span
  if not 0 <= s < e <= last_row_probs.shape[-1]:
    raise ValueError(f"needle_span must satisfy 0 <= start < end <= T, got {needle_span}.")
  j = jnp.argmax(last_row_probs, axis=-1)
  ids = jnp.asarray(input_ids)
  hit = (j >= s) & (j < e) & (ids[j] == gen_token)
  return jnp.where(hit, 1.0 / (e - s), 0.0).astype(jnp.float32)


def top1_attention_index(q_last, key):
  """Argmax key per head for one query without the softmax: q [B,N,H], k [B,S,K,H] -> [B,N]."""
  B, N, H = q_last.shape
  K = key.shape[2]
  if key.shape[0] != B or key.shape[3] != H or N % K:
    raise ValueError(f"q_last {q_last.shape} and key {key.shape} are not a valid [B,N,H]/[B,S,K,H] pair.")
  k = jnp.repeat(key, N // K, axis=2)
  logits = jnp.einsum("bnh,bsnh->bns", q_last.astype(jnp.float32), k.astype(jnp.float32))
  return jnp.argmax(logits, axis=-1)


def sink_metrics(probs, value=None, residual=None, *, sink_index: int = 0):
  """Extreme-token metrics (Active-Dormant heads).

  Args:
    probs: [B, N, T, S] attention weights.
    value: optional [B, S, K, H] value states.
    residual: optional [B, S, D] residual-stream states.

  Returns:
    dict with ``sink_mass`` [N] (mean weight on key ``sink_index``), and when
    given ``value_norm_ratio`` (||v_sink|| / mean ||v||, per KV head) and
    ``residual_norm_ratio`` (||h_sink|| / mean ||h||).
  """
  out = {"sink_mass": jnp.mean(probs[..., sink_index], axis=(0, 2))}
  if value is not None:
    n = jnp.linalg.norm(value.astype(jnp.float32), axis=-1)  # [B, S, K]
    out["value_norm_ratio"] = jnp.mean(n[:, sink_index] / jnp.mean(n, axis=1), axis=0)
  if residual is not None:
    n = jnp.linalg.norm(residual.astype(jnp.float32), axis=-1)
    out["residual_norm_ratio"] = jnp.mean(n[:, sink_index] / jnp.mean(n, axis=1))
  return out

