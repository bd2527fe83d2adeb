"""DCAL: attention rollout, global-local and pair-wise cross attention (arXiv:2205.02151).

Zhu et al., "Dual Cross-Attention Learning for Fine-Grained Visual
Categorization and Object Re-Identification" (CVPR 2022, arXiv:2205.02151). Tokens are BTNH
([B, T, N, H]); token 0..num_prefix-1 are CLS-like tokens. The softmax
attention itself is ``attnjax.attention``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.api import attention
from attnjax.vision._common import check_rank


def attention_rollout(probs_list: Sequence, *, residual: float = 0.5):
  """Rollout of attention maps: ``S_bar_l = (1 - r) S_l + r I``, ``S_hat = S_bar_L ... S_bar_1``.

  Args:
    probs_list: L attention maps, first layer first, each [B, N, T, T] (averaged
      over heads here) or [B, T, T] (already averaged).
    residual: r, 0.5 in DCAL (the identity term accounts for the residual path).

  Returns:
    S_hat [B, T, T] float32; its row 0 gives the CLS token's accumulated
    attention to every token.
  """
  if not probs_list:
    raise ValueError("probs_list must hold at least one attention map.")
  out = None
  for i, p in enumerate(probs_list):
    if p.ndim == 4:
      p = jnp.mean(p.astype(jnp.float32), axis=1)
    if p.ndim != 3 or p.shape[-1] != p.shape[-2]:
      raise ValueError(f"probs_list[{i}] must be [B, N, T, T] or [B, T, T], got {p.shape}.")
    s = (1.0 - residual) * p.astype(jnp.float32) + residual * jnp.eye(p.shape[-1], dtype=jnp.float32)
    out = s if out is None else s @ out
  return out


def select_top_tokens(cls_scores, *, top_ratio: float, num_prefix: int = 1):
  """Indices [B, num_prefix + R] of the prefix tokens and the top-R patch tokens by score.

  ``cls_scores`` [B, T] (e.g. ``attention_rollout(...)[:, 0]``); R =
  max(1, round(top_ratio * (T - num_prefix))). Patch indices are returned in
  descending score order after the prefix.
  """
  check_rank("cls_scores", cls_scores, 2, "[B, T]")
  B, T = cls_scores.shape
  P = T - num_prefix
  if P < 1:
    raise ValueError(f"need at least one patch token after num_prefix={num_prefix}, got T={T}.")
  if not 0.0 < top_ratio <= 1.0:
    raise ValueError(f"top_ratio must be in (0, 1], got {top_ratio}.")
  R = max(1, int(round(top_ratio * P)))
  _, idx = jax.lax.top_k(cls_scores[:, num_prefix:], R)
  prefix = jnp.broadcast_to(jnp.arange(num_prefix, dtype=idx.dtype), (B, num_prefix))
  return jnp.concatenate([prefix, idx + num_prefix], axis=1)


def glca_attention(query, key, value, cls_scores, *, top_ratio: float, num_prefix: int = 1,
                   implementation=None):
  """Global-local cross attention: the selected local queries attend to all keys.

  ``out = softmax(Q_loc K^T / sqrt(H)) V`` with Q_loc = the prefix queries plus
  the top-R patch queries by ``cls_scores`` (R = 10% of patches for
  fine-grained classification, 30% for re-ID in DCAL).

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv].
    cls_scores: [B, T] (rollout CLS row).

  Returns:
    (out [B, num_prefix + R, N, Hv], indices [B, num_prefix + R]).
  """
  idx = select_top_tokens(cls_scores, top_ratio=top_ratio, num_prefix=num_prefix)
  if cls_scores.shape != query.shape[:2]:
    raise ValueError(f"cls_scores must have shape [B, T]={query.shape[:2]}, got {cls_scores.shape}.")
  q_loc = jnp.take_along_axis(query, idx[:, :, None, None], axis=1)
  return attention(q_loc, key, value, implementation=implementation), idx


def pairwise_cross_attention(q1, k1, v1, k2, v2, *, implementation=None):
  """PWCA: ``softmax(Q1 [K1; K2]^T / sqrt(H)) [V1; V2]`` (training only in DCAL).

  The partner image's tokens compete in the softmax as distractors.
  q1 [B, T, N, H]; k1 [B, S1, K, H]; v1 [B, S1, K, Hv]; k2/v2 [B, S2, K, *].
  An empty partner (S2 = 0) gives self-attention.
  """
  return attention(q1, jnp.concatenate([k1, k2], axis=1), jnp.concatenate([v1, v2], axis=1),
                   implementation=implementation)


def partner_permutation(rng, batch: int):
  """A random partner index [B] with no image paired with itself (needs B >= 2)."""
  if batch < 2:
    raise ValueError(f"pair-wise cross attention needs a batch of at least 2, got {batch}.")
  r_shift, r_perm = jax.random.split(rng)
  shift = jax.random.randint(r_shift, (), 1, batch)
  perm = jax.random.permutation(r_perm, batch)
  partner = jnp.zeros(batch, jnp.int32).at[perm].set(jnp.roll(perm, -shift))
  return partner


class DCALAttention(nn.Module):
  """Multi-head self-attention with DCAL's GLCA and PWCA branches sharing its projections.

  ``__call__(x [B, T, D], *, mode="self" | "glca" | "pwca", cls_scores=None,
  partner=None)``: "self" is ordinary attention; "glca" needs ``cls_scores``
  [B, T] and returns the selected tokens [B, prefix + R, D] and their indices;
  "pwca" needs ``partner`` [B] (batch indices of the distractor images).
  """
  num_heads: int
  head_dim: int
  top_ratio: float = 0.1
  num_prefix: int = 1
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x, *, mode: str = "self", cls_scores=None, partner=None):
    N, H = self.num_heads, self.head_dim
    q, k, v = (nn.DenseGeneral((N, H), name=n)(x) for n in ("query", "key", "value"))
    proj = nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out")
    if mode == "self":
      return proj(attention(q, k, v, implementation=self.implementation))
    if mode == "glca":
      if cls_scores is None:
        raise ValueError("mode='glca' needs cls_scores [B, T].")
      out, idx = glca_attention(q, k, v, cls_scores, top_ratio=self.top_ratio,
                                num_prefix=self.num_prefix, implementation=self.implementation)
      return proj(out), idx
    if mode == "pwca":
      if partner is None:
        raise ValueError("mode='pwca' needs partner [B] (batch index of each image's distractor).")
      return proj(pairwise_cross_attention(q, k, v, k[partner], v[partner],
                                           implementation=self.implementation))
    raise ValueError(f"mode must be 'self', 'glca' or 'pwca', got {mode!r}.")
