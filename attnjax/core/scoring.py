"""The score protocol: how logits become attention weights.

A score variant is a small object (in ``attnjax.scores``) with:

- ``normalization``: ``"softmax"`` (exp, normalised; the default),
  ``"sum"`` (a positive map normalised by its row sum, e.g. softplus with l1
  normalisation) or ``"none"`` (unnormalised weights, e.g. ReLU attention);
- ``transform(logits, *, head, q_pos, k_pos, row_count)``: elementwise edit of
  the scaled float32 logits before normalisation (soft-cap, temperatures,
  length scaling); ``head`` [N, 1, 1], ``q_pos`` [.., T, 1], ``k_pos`` [.., 1, S],
  ``row_count`` the number of visible keys per query row [.., N, T, 1];
- ``weights(logits)``: the positive map for ``"sum"``/``"none"``;
- ``sink_logits()``: None or per-head extra logits [N] that take softmax mass
  without contributing a value (learned attention sinks);
- ``reweight(probs, row_count)``: None-returning hook or a function applied to
  normalised weights (LSSAR's re-weighting), which needs the full row.

``DEFAULT_SCORE`` is plain softmax.
"""
from __future__ import annotations


class ScoreBase:
  """Protocol defaults: softmax normalisation, identity transform, no sink, no re-weighting."""
  normalization = "softmax"
  needs_row_count = False
  has_reweight = False

  def transform(self, logits, *, head=None, q_pos=None, k_pos=None, row_count=None):
    return logits

  def weights(self, logits):
    raise TypeError(f"{type(self).__name__} is a softmax score: it has no separate "
                    "positive map.")

  def sink_logits(self):
    return None

  def reweight(self, probs, row_count):
    return probs


class SoftmaxScore(ScoreBase):
  """Plain softmax over the scaled logits."""

  def __hash__(self):
    return hash(type(self))

  def __eq__(self, other):
    return type(self) is type(other)

  def __repr__(self):
    return "SoftmaxScore()"


DEFAULT_SCORE = SoftmaxScore()


def resolve_score(score):
  """None -> DEFAULT_SCORE; otherwise checks the protocol."""
  if score is None:
    return DEFAULT_SCORE
  for attr in ("normalization", "transform", "sink_logits"):
    if not hasattr(score, attr):
      raise TypeError(
          f"score must be an attnjax score variant (attnjax.scores), got "
          f"{type(score).__name__} without '{attr}'.")
  if score.normalization not in ("softmax", "sum", "none"):
    raise ValueError(
        f"score.normalization must be 'softmax', 'sum' or 'none', got "
        f"{score.normalization!r}.")
  return score
