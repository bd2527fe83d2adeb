"""DiTCtrl: Attention Control in MM-DiT for Tuning-Free Multi-Prompt Longer Video Generation
(arXiv:2412.18597).

KV-sharing lets the queries of a target prompt's segment attend to the keys
and values of the source segment; mask-guided KV-sharing splits that into a
foreground and a background attention, each restricted to the source's
foreground or background video tokens (text keys always allowed), and mixes
them with the target's foreground map. ``token_attention_mask`` derives the
foreground map from video-to-text attention.
"""
from __future__ import annotations

import jax.numpy as jnp

from attnjax.api import attention


def kv_shared_attention(q_tgt, k_src, v_src, *, key_mask=None, scale=None, implementation=None):
  """softmax(Q_t K_s^T / sqrt(d)) V_s: q [B, T, N, H], k/v [B, S, K, H]; key_mask bool [B, S] or [S]."""
  mask = None
  if key_mask is not None:
    km = jnp.asarray(key_mask, bool)
    mask = km[None, None, None, :] if km.ndim == 1 else km[:, None, None, :]
  return attention(q_tgt, k_src, v_src, mask=mask, scale=scale, implementation=implementation)


def token_attention_mask(probs, token_idx, *, text_len: int, frames: int, thres: float = 0.3):
  """Foreground map of the video tokens from their attention to chosen text tokens.

  Args:
    probs: [B, N, L, L] attention of the joint sequence [text (text_len); video].
    token_idx: text token indices whose attention defines the foreground.
    frames: latent frames F (video tokens = F * h * w, frame-major).
    thres: threshold after per-frame min-max normalisation (0.3 in the
      released inference config).

  Returns:
    float {0, 1} [B, L_video]: 1 for foreground video tokens.
  """
  vid = probs[:, :, text_len:, :][..., jnp.asarray(token_idx)]  # [B, N, Lv, k]
  m = jnp.mean(vid, axis=(1, 3))  # average over heads and tokens: [B, Lv]
  B, Lv = m.shape
  if Lv % frames:
    raise ValueError(f"video length {Lv} is not divisible by frames={frames}.")
  per = m.reshape(B, frames, Lv // frames)
  lo, hi = per.min(-1, keepdims=True), per.max(-1, keepdims=True)
  norm = (per - lo) / jnp.where(hi > lo, hi - lo, 1.0)
  return (norm > thres).astype(probs.dtype).reshape(B, Lv)


def mask_guided_kv_sharing(q_tgt, k_src, v_src, m_src, m_tgt, *, text_len: int, scale=None,
                           implementation=None):
  """O = M_t * O_fg + (1 - M_t) * O_bg over the joint sequence [text; video].

  q_tgt [B, L, N, H], k_src/v_src [B, L, K, H]; m_src, m_tgt float/bool
  [B, L - text_len] foreground maps of the video tokens. O_fg attends to text
  keys and the source's foreground video keys, O_bg to text keys and its
  background ones. ``m_tgt`` may also be [B, L] to weight the text query
  rows; given as [B, L - text_len], text rows take the background branch.
  """
  B, L = k_src.shape[:2]
  ms = jnp.asarray(m_src) > 0.5
  if ms.shape != (B, L - text_len):
    raise ValueError(f"m_src must be [B, L - text_len]=({B}, {L - text_len}), got {ms.shape}.")
  text = jnp.ones((B, text_len), bool)
  fg_keys = jnp.concatenate([text, ms], axis=1)
  bg_keys = jnp.concatenate([text, ~ms], axis=1)
  o_fg = kv_shared_attention(q_tgt, k_src, v_src, key_mask=fg_keys, scale=scale, implementation=implementation)
  o_bg = kv_shared_attention(q_tgt, k_src, v_src, key_mask=bg_keys, scale=scale, implementation=implementation)
  mt = jnp.asarray(m_tgt, o_fg.dtype)
  if mt.shape == (B, L - text_len):
    mt = jnp.concatenate([jnp.zeros((B, text_len), o_fg.dtype), mt], axis=1)
  if mt.shape != (B, q_tgt.shape[1]):
    raise ValueError(f"m_tgt must be [B, L_video] or [B, L], got {jnp.shape(m_tgt)}.")
  mt = mt[:, :, None, None]
  return mt * o_fg + (1 - mt) * o_bg
