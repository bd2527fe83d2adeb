"""TAP + ADL, low-rank pooling attention and LSceneLLM token selection (three papers, below).

TAP + ADL (Guo et al., "Robustifying Token Attention for Vision Transformers",
arXiv:2303.11126), low-rank factorised pooling attention (Mehta et al., "Low
Rank Factorization for Compact Multi-Head Self-Attention", arXiv:1912.00835)
and attention-guided token selection plus coarse/fine fusion ("LSceneLLM:
Enhancing Large 3D Scene Understanding Using Adaptive Visual Preferences",
arXiv:2412.01292).
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.api import attention
from attnjax.vision._common import check_rank


# ----------------------------------------------------------------------------- TAP
def dilated_avg_pool(x, dilation: int):
  """3x3 average pool with dilation d, zero padding d, always divided by 9; d = 0 is the identity.

  x [B, H, W, C] -> [B, H, W, C].
  """
  if dilation == 0:
    return x
  d = dilation
  xf = x.astype(jnp.float32)
  s = jax.lax.reduce_window(xf, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1),
                            ((0, 0), (d, d), (d, d), (0, 0)), window_dilation=(1, d, d, 1))
  return (s / 9.0).astype(x.dtype)


def token_aware_avg_pool(x, predictor_logits, *, dilations: Optional[Sequence[int]] = None,
                         temperature: float = 1.0):
  """TAP: per-token softmax mixture of dilated average pools.

  ``x_tap = sum_i softmax_i(logits / T) * pool_{d_i}(x)``; branch 0 (d = 0)
  is the identity.

  Args:
    x: [B, H, W, C] tokens on their grid.
    predictor_logits: [B, H, W, K], one logit per branch.
    dilations: K dilations, default (0, 1, ..., K-1) (the released code, K = 4).
  """
  check_rank("x", x, 4, "[B, H, W, C]")
  check_rank("predictor_logits", predictor_logits, 4, "[B, H, W, K]")
  K = predictor_logits.shape[-1]
  if predictor_logits.shape[:3] != x.shape[:3]:
    raise ValueError(f"predictor_logits must have shape [B, H, W, K] with [B, H, W]={x.shape[:3]}, "
                     f"got {predictor_logits.shape}.")
  dilations = tuple(range(K)) if dilations is None else tuple(dilations)
  if len(dilations) != K or any(d < 0 for d in dilations):
    raise ValueError(f"dilations must be {K} non-negative ints (one per logit), got {dilations}.")
  w = jax.nn.softmax(predictor_logits.astype(jnp.float32) / temperature, axis=-1)
  out = sum(w[..., i:i + 1] * dilated_avg_pool(x, d).astype(jnp.float32) for i, d in enumerate(dilations))
  return out.astype(x.dtype)


class TokenAwarePooling(nn.Module):
  """TAP layer: predictor Conv3x3(C->K, no bias) -> BatchNorm -> Conv3x3(K->K, no bias), then TAP.

  ``__call__(x [B, H, W, C], *, train=False)``. In a ViT block attention
  runs on ``norm(TAP(x))`` and its output is added to the original x.
  """
  num_scales: int = 4
  temperature: float = 1.0

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    K = self.num_scales
    h = nn.Conv(K, (3, 3), use_bias=False, name="pred_conv1")(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="pred_bn")(h)
    logits = nn.Conv(K, (3, 3), use_bias=False, name="pred_conv2")(h)
    return token_aware_avg_pool(x, logits, temperature=self.temperature)


def attention_diversification_loss(probs_list: Sequence, *, th: float = 2.0, eps: float = 1e-8):
  """ADL: mean over layers of the mean cosine similarity between each row and the mean row.

  For each layer: ``A = mean_heads(probs)`` [B, T, T]; tau = th / T;
  ``A_hat = A * (A > tau)``; ``r = mean_rows(A)`` thresholded the same way;
  ``loss = mean_{b, i} cos(A_hat_i, r_hat)`` (cosine with torch's eps rule,
  x.y / max(|x||y|, eps)). Add ``lambda * ADL`` (lambda = 1) to the task loss.

  Args:
    probs_list: attention maps, each [B, N, T, T] (or [B, T, T]).
  """
  if not probs_list:
    raise ValueError("probs_list must hold at least one attention map.")
  total = 0.0
  for i, p in enumerate(probs_list):
    p = p.astype(jnp.float32)
    if p.ndim == 4:
      p = jnp.mean(p, axis=1)
    if p.ndim != 3:
      raise ValueError(f"probs_list[{i}] must be [B, N, T, T] or [B, T, T], got {p.shape}.")
    tau = th / p.shape[-1]
    r = jnp.mean(p, axis=1, keepdims=True)
    a_hat = jnp.where(p > tau, p, 0.0)
    r_hat = jnp.where(r > tau, r, 0.0)
    num = jnp.sum(a_hat * r_hat, -1)
    den = jnp.maximum(jnp.linalg.norm(a_hat, axis=-1) * jnp.linalg.norm(r_hat, axis=-1), eps)
    total = total + jnp.mean(num / den)
  return total / len(probs_list)


# ----------------------------------------------------------------------------- low-rank pooling
def low_rank_pooling_attention(h, c, U, V, P, *, mask=None):
  """Multi-head pooling attention with a low-rank bilinear score.

  ``s_i = P^T (sigmoid(U^T h_i) * sigmoid(V^T c))`` [m scores per token];
  ``A[:, j] = softmax_i(s_ij)`` over unmasked tokens; ``M = A^T H``.
  The sigmoid non-linearity and c = mean of the states (the layer's default)
  follow our reading of the paper and were not confirmed.

  Args:
    h: [B, T, D] token (GRU) states; c: [B, Dc] global context.
    U: [D, k]; V: [Dc, k]; P: [k, m] (rank k, m heads).
    mask: optional bool [B, T] (True = real token).

  Returns:
    (M [B, m, D] float32, A [B, T, m]); a fully masked sequence gives zeros.
  """
  check_rank("h", h, 3, "[B, T, D]")
  check_rank("c", c, 2, "[B, Dc]")
  if U.shape[0] != h.shape[-1] or V.shape[0] != c.shape[-1] or U.shape[1] != V.shape[1] or P.shape[0] != U.shape[1]:
    raise ValueError(f"factor shapes must be U [D={h.shape[-1]}, k], V [Dc={c.shape[-1]}, k], P [k, m]; "
                     f"got U {U.shape}, V {V.shape}, P {P.shape}.")
  hf = h.astype(jnp.float32)
  joint = jax.nn.sigmoid(hf @ U) * jax.nn.sigmoid(c.astype(jnp.float32) @ V)[:, None, :]
  s = joint @ P  # [B, T, m]
  if mask is not None:
    if mask.shape != h.shape[:2]:
      raise ValueError(f"mask must have shape [B, T]={h.shape[:2]}, got {mask.shape}.")
    s = jnp.where(mask[..., None], s, -jnp.inf)
  mx = jnp.max(s, axis=1, keepdims=True)
  e = jnp.exp(s - jnp.where(jnp.isfinite(mx), mx, 0.0))
  z = jnp.sum(e, axis=1, keepdims=True)
  A = jnp.where(z > 0, e / jnp.where(z > 0, z, 1.0), 0.0)
  return jnp.einsum("btm,btd->bmd", A, hf), A


class LowRankPoolingAttention(nn.Module):
  """Low-rank multi-head pooling over h [B, T, D] -> (M [B, m, D], A [B, T, m]); c = masked mean of h."""
  num_heads: int
  rank: int

  @nn.compact
  def __call__(self, h, mask=None):
    D = h.shape[-1]
    init = nn.initializers.lecun_normal()
    U = self.param("U", init, (D, self.rank))
    V = self.param("V", init, (D, self.rank))
    P = self.param("P", init, (self.rank, self.num_heads))
    w = jnp.ones(h.shape[:2], jnp.float32) if mask is None else mask.astype(jnp.float32)
    c = jnp.sum(h * w[..., None], 1) / jnp.maximum(jnp.sum(w, 1, keepdims=True), 1.0)
    return low_rank_pooling_attention(h, c, U, V, P, mask=mask)


# ----------------------------------------------------------------------------- LSceneLLM
def attention_guided_topk(probs, *, k: int, query_slice: Optional[slice] = None, reduce: str = "mean"):
  """Indices [B, k] of the most attended key (visual) tokens, in descending score order.

  ``score[b, j] = reduce over heads and the queries in query_slice of
  probs[b, :, query_slice, j]``; reduce in {"mean", "sum", "max"}.
  probs: [B, N, Lq, Lv].
  """
  check_rank("probs", probs, 4, "[B, N, Lq, Lv]")
  if not 1 <= k <= probs.shape[-1]:
    raise ValueError(f"k must be in [1, Lv={probs.shape[-1]}], got {k}.")
  p = probs[:, :, query_slice if query_slice is not None else slice(None)].astype(jnp.float32)
  if p.shape[2] == 0:
    raise ValueError(f"query_slice {query_slice} selects no query of Lq={probs.shape[2]}.")
  ops = {"mean": jnp.mean, "sum": jnp.sum, "max": jnp.max}
  if reduce not in ops:
    raise ValueError(f"reduce must be one of {sorted(ops)}, got {reduce!r}.")
  score = ops[reduce](p, axis=(1, 2))
  return jax.lax.top_k(score, k)[1]


def coarse_fine_attention(query, coarse_k, coarse_v, fine_k, fine_v, *, fine_mask=None,
                          implementation=None):
  """Attention over ``concat(coarse, fine)`` tokens; ``fine_mask`` [B, F] marks real fine tokens.

  query [B, T, N, H]; coarse_k/v [B, Sc, K, *]; fine_k/v [B, F, K, *]. With
  no valid fine token this equals attention over the coarse tokens alone.
  """
  k = jnp.concatenate([coarse_k, fine_k], axis=1)
  v = jnp.concatenate([coarse_v, fine_v], axis=1)
  mask = None
  if fine_mask is not None:
    B, F = fine_k.shape[:2]
    if fine_mask.shape != (B, F):
      raise ValueError(f"fine_mask must have shape [B, F]=({B}, {F}), got {fine_mask.shape}.")
    keep = jnp.concatenate([jnp.ones((B, coarse_k.shape[1]), bool), fine_mask.astype(bool)], axis=1)
    mask = keep[:, None, None, :]
  return attention(query, k, v, mask=mask, implementation=implementation)
