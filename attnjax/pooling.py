"""Attention pooling for multiple-instance learning.

ACMIL ("Attention-Challenging Multiple Instance Learning for Whole Slide Image
Classification", arXiv:2311.07125): gated attention pooling (ABMIL) with
several branches (MBA), stochastic top-K instance masking during training
(STKIM) and a diversity loss between the branches' attention maps.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

MASK_LOGIT = -1e9


def gated_attention_logits(x, v, u, w):
  """ABMIL gated attention: x [B, N, D], v/u [D, Hd], w [Hd, M] -> logits [B, M, N]."""
  a = jnp.tanh(x @ v) * jax.nn.sigmoid(x @ u)
  return jnp.swapaxes(a @ w, -1, -2)


def stochastic_topk_mask(logits, rng, *, k: int = 10, drop_ratio: float = 0.6):
  """STKIM: in each branch, mask floor(k * drop_ratio) random instances among the top k.

  logits [B, M, N] -> logits with the chosen entries set to -1e9 (their
  softmax mass flows to the other instances). drop_ratio 0 is the identity.
  """
  if not 0.0 <= drop_ratio <= 1.0:
    raise ValueError(f"drop_ratio must be in [0, 1], got {drop_ratio}.")
  N = logits.shape[-1]
  k = min(k, N)
  n_drop = int(k * drop_ratio)
  if n_drop == 0:
    return logits
  _, top = jax.lax.top_k(logits, k)  # [B, M, k]
  noise = jax.random.uniform(rng, top.shape)
  pick = jnp.argsort(noise, axis=-1)[..., :n_drop]
  drop_idx = jnp.take_along_axis(top, pick, axis=-1)
  hit = jnp.any(jnp.arange(N)[None, None, None, :] == drop_idx[..., None], axis=-2)
  return jnp.where(hit, MASK_LOGIT, logits)


def branch_diversity_loss(attn):
  """Mean pairwise cosine similarity of the branches' attention maps: attn [B, M, N] -> scalar.

  1 for identical branches, 0 for disjoint supports; 0 when M == 1.
  """
  M = attn.shape[-2]
  if M < 2:
    return jnp.zeros((), attn.dtype)
  a = attn / jnp.maximum(jnp.linalg.norm(attn, axis=-1, keepdims=True), 1e-12)
  sim = a @ jnp.swapaxes(a, -1, -2)  # [B, M, M]
  iu = jnp.triu_indices(M, 1)
  return jnp.mean(sim[..., iu[0], iu[1]])


class ACMILHead(nn.Module):
  """Multi-branch gated attention MIL head with STKIM.

  Input bag features x [B, N, D] (pad with ``mask`` [B, N]); returns a dict
  with ``slide_logits`` [B, C], ``branch_logits`` [B, M, C], ``attention``
  [B, M, N] and ``diversity`` (the loss term). Defaults from the paper's
  README: 5 branches, hidden 128, top-K 10, drop ratio 0.6.
  """
  num_classes: int
  num_branches: int = 5
  hidden: int = 128
  inner_dim: int = 256
  topk: int = 10
  drop_ratio: float = 0.6

  @nn.compact
  def __call__(self, x, *, mask=None, train: bool = False):
    x = nn.relu(nn.Dense(self.inner_dim, name="reduce")(x))
    init = nn.initializers.lecun_normal()
    v = self.param("attn_v", init, (self.inner_dim, self.hidden))
    u = self.param("attn_u", init, (self.inner_dim, self.hidden))
    w = self.param("attn_w", init, (self.hidden, self.num_branches))
    logits = gated_attention_logits(x, v, u, w)
    if mask is not None:
      logits = jnp.where(mask[:, None, :], logits, MASK_LOGIT)
    if train and self.drop_ratio > 0:
      logits = stochastic_topk_mask(logits, self.make_rng("dropout"), k=self.topk,
                                    drop_ratio=self.drop_ratio)
    attn = jax.nn.softmax(logits, axis=-1)
    feats = attn @ x  # [B, M, D]
    branch_logits = nn.DenseGeneral(self.num_classes, name="branch_heads")(feats)
    slide = jnp.mean(attn, axis=1) @ x
    return {"slide_logits": nn.Dense(self.num_classes, name="slide_head")(slide),
            "branch_logits": branch_logits, "attention": attn,
            "diversity": branch_diversity_loss(attn)}
