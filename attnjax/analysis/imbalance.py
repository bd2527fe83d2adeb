"""Dual-stream visual token selection and head-specific modulation of "Fixing Imbalanced
Attention to Mitigate In-Context Hallucination of Large Vision-Language Model"
(arXiv:2501.12206).

The paper names the two parts -- a dual-stream selection of "locally
informative" and "spatially significant" visual tokens, and a modulation that
amplifies attention to them per head in proportion to the head's visual
sensitivity -- without formulas for either. The rules below are read from the
authors' released code (github.com/hasanar1f/llava-hallunication-fix, LLaVA-1.5
with a CLIP ViT); where it is silent or degenerate the project's reading is
marked as such:

1. *Local stream*: the attention of the vision encoder's CLS query to each
   patch in its first layer, summed over heads (:func:`cls_attention_scores`);
   the top ``local_ratio`` (0.25 in the code) of the patches.
2. *Spatial stream*: the attention each patch receives from all patch queries
   in that layer, head mean (:func:`received_attention_scores`). The released
   code sums each softmax row over its keys (all ones) with a ratio of 0, so
   the stream is empty there; the column sum (attention received) is the
   project's reading of "spatially significant".
3. Merge: union of the two streams, minus the *sink* patches: IQR outliers
   (``> Q3 + 1.5 IQR``) of the CLS attention in the penultimate encoder layer
   (:func:`iqr_outliers`). Sinks are boosted too, with the weaker ``beta``.
4. Modulation, at the current (last) query row of decoder layers 2..32 in the
   code: ``l -> l + alpha * |l|`` on the selected keys and ``l + beta * |l|`` on
   the sinks (alpha 0.7, beta 0.3), the same alpha for every head.
   Head-specific strength ``s_h`` multiplies alpha here; its measurement is
   not given, and :func:`visual_sensitivity` (each head's attention mass on the
   image, scaled so the most visual head has 1) is the project's reading.
   ``form="additive"`` instead adds ``alpha * s_h`` through
   :func:`attnjax.analysis.boost_token_attention` (probabilities of the
   selected keys multiplied by ``exp(alpha * s_h)``, then renormalised).

All functions are pure and take [B, ...] arrays; the edit is a
``logits_hook`` of :func:`attnjax.analysis.hooked_attention`.
"""
from __future__ import annotations

import jax.numpy as jnp

from attnjax.analysis.edits import boost_token_attention

__all__ = ["cls_attention_scores", "received_attention_scores", "iqr_outliers",
           "top_fraction", "dual_stream_token_selection", "visual_key_mask",
           "visual_sensitivity", "fix_imbalanced_attention"]


def _vit_probs(probs, num_visual):
  probs = jnp.asarray(probs, jnp.float32)
  if probs.ndim != 4 or probs.shape[-1] != probs.shape[-2]:
    raise ValueError(f"probs must be a ViT layer's self-attention [B, N, L, L], got {probs.shape}.")
  if not 0 < num_visual <= probs.shape[-1]:
    raise ValueError(f"num_visual must be in [1, L={probs.shape[-1]}], got {num_visual}.")
  return probs


def cls_attention_scores(probs, num_visual: int, *, cls_index: int = 0):
  """Local-stream score: CLS -> patch attention summed over heads.

  probs [B, N, L, L] (a ViT layer; patches are the last ``num_visual``
  tokens) -> [B, num_visual].
  """
  probs = _vit_probs(probs, num_visual)
  return jnp.sum(probs[:, :, cls_index, -num_visual:], axis=1)


def received_attention_scores(probs, num_visual: int):
  """Spatial-stream score: attention each patch receives from the patch queries, head mean.

  probs [B, N, L, L] -> [B, num_visual] (column sums over the patch rows).
  """
  probs = _vit_probs(probs, num_visual)
  return jnp.sum(jnp.mean(probs, axis=1)[:, -num_visual:, -num_visual:], axis=1)


def iqr_outliers(scores, *, whisker: float = 1.5):
  """bool [B, P]: scores above ``Q3 + whisker * (Q3 - Q1)`` of their row (sink patches)."""
  scores = jnp.asarray(scores, jnp.float32)
  q1, q3 = jnp.percentile(scores, 25, axis=-1, keepdims=True), jnp.percentile(
      scores, 75, axis=-1, keepdims=True)
  return scores > q3 + whisker * (q3 - q1)


def top_fraction(scores, ratio: float):
  """bool [B, P]: the ``floor(ratio * P)`` highest scores of each row (ties: lower index)."""
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"ratio must be in [0, 1], got {ratio}.")
  scores = jnp.asarray(scores, jnp.float32)
  P = scores.shape[-1]
  k = int(ratio * P)
  rank = jnp.argsort(jnp.argsort(-scores, axis=-1, stable=True), axis=-1)
  return rank < k


def dual_stream_token_selection(local_scores, spatial_scores, *, local_ratio: float = 0.25,
                                spatial_ratio: float = 0.25, sinks=None):
  """Merged selection of visual tokens: (top local | top spatial) & ~sinks.

  Args:
    local_scores, spatial_scores: [B, P] per visual token (e.g.
      :func:`cls_attention_scores`, :func:`received_attention_scores`).
    local_ratio, spatial_ratio: share of the P tokens each stream keeps
      (0.25 local in the released code; the spatial ratio is the project's).
    sinks: optional bool [B, P] removed from the selection (e.g.
      :func:`iqr_outliers` of the penultimate layer's CLS attention).

  Returns:
    bool [B, P].
  """
  local_scores, spatial_scores = jnp.asarray(local_scores), jnp.asarray(spatial_scores)
  if local_scores.shape != spatial_scores.shape:
    raise ValueError(f"local_scores {local_scores.shape} and spatial_scores "
                     f"{spatial_scores.shape} must have the same shape [B, P].")
  sel = top_fraction(local_scores, local_ratio) | top_fraction(spatial_scores, spatial_ratio)
  if sinks is not None:
    sel = sel & ~jnp.asarray(sinks, bool)
  return sel


def visual_key_mask(visual, start: int, num_keys: int):
  """Places a per-visual-token mask [B, P] at keys ``start .. start + P`` of [B, num_keys]."""
  visual = jnp.asarray(visual, bool)
  P = visual.shape[-1]
  if start < 0 or start + P > num_keys:
    raise ValueError(f"visual tokens [{start}, {start + P}) do not fit {num_keys} keys.")
  return jnp.pad(visual, ((0, 0), (start, num_keys - start - P)))


def visual_sensitivity(probs, visual_mask):
  """Per-head visual sensitivity (the project's reading): [B, N, T, S] probs -> [N] in [0, 1].

  Mean over batch and query rows of each head's attention mass on the visual
  keys (``visual_mask`` bool [S]), divided by the largest head's.
  """
  probs = jnp.asarray(probs, jnp.float32)
  vm = jnp.asarray(visual_mask, bool)
  if vm.shape != probs.shape[-1:]:
    raise ValueError(f"visual_mask must have shape [S]={probs.shape[-1:]}, got {vm.shape}.")
  mass = jnp.mean(jnp.sum(jnp.where(vm, probs, 0.0), -1), axis=(0, 2))
  return mass / jnp.maximum(jnp.max(mass), 1e-30)


def fix_imbalanced_attention(logits, selected, head_strength, *, alpha: float = 0.7, sinks=None,
                             beta: float = 0.3, form: str = "relative", rows: str = "all"):
  """The head-specific visual boost: logits [B, N, T, S] -> logits (a ``logits_hook``).

  Args:
    logits: scaled logits [B, N, T, S].
    selected: bool [S] or [B, S] keys to amplify (:func:`visual_key_mask` of
      :func:`dual_stream_token_selection`).
    head_strength: [N] per-head strength s_h (1 everywhere: the released code).
    alpha: strength on ``selected`` (0.7 in the code); beta: on ``sinks`` (0.3).
    sinks: optional bool [S] or [B, S] keys boosted with ``beta``.
    form: "relative" (the code: ``l + alpha * s_h * |l|``) or "additive"
      (``l + alpha * s_h`` via :func:`attnjax.analysis.boost_token_attention`).
    rows: "all" or "last" (only the last query row, as the code edits the
      token being decoded; with a KV cache T = 1 and both agree).

  alpha = beta = 0 (or s = 0) is the identity.
  """
  if form not in ("relative", "additive"):
    raise ValueError(f"form must be 'relative' or 'additive', got {form!r}.")
  if rows not in ("all", "last"):
    raise ValueError(f"rows must be 'all' or 'last', got {rows!r}.")
  logits = jnp.asarray(logits)
  B, N, T, S = logits.shape
  hs = jnp.asarray(head_strength, jnp.float32)
  if hs.shape != (N,):
    raise ValueError(f"head_strength must have shape [N]=({N},), got {hs.shape}.")

  def keys(name, m):
    m = jnp.asarray(m, bool)
    if m.shape not in ((S,), (B, S)):
      raise ValueError(f"{name} must be bool [S]=({S},) or [B, S]=({B}, {S}), got {m.shape}.")
    return m

  out = logits
  for name, m, a in (("selected", selected, alpha), ("sinks", sinks, beta)):
    if m is None:
      continue
    m = keys(name, m)
    if form == "additive":
      out = boost_token_attention(out, m, hs, alpha=a)
    else:
      km = m if m.ndim == 1 else m[:, None, None, :]
      out = out + jnp.where(km, a * hs[:, None, None] * jnp.abs(logits), 0.0).astype(out.dtype)
  if rows == "last":
    out = logits.at[:, :, -1:].set(out[:, :, -1:])
  return out
