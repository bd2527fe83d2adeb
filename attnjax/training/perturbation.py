"""Adversarial perturbations of attention scores.

Attention AT / iAT ("Attention Meets Perturbations: Robust and Interpretable
Attention with Adversarial Training", arXiv:2009.12064) and Attention VAT / iVAT
("Making Attention Mechanisms More Robust and Interpretable with Virtual
Adversarial Training", arXiv:2104.08763). Both perturb the pre-softmax
attention scores ``a [B, T]`` of a classifier by a direction of norm ``epsilon`` per example;
iAT/iVAT restrict the direction to the span of the normalised differences of
the minibatch's score vectors, which keeps perturbed scores interpretable.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _normalize(x, mask=None, eps=1e-12):
  if mask is not None:
    x = jnp.where(mask, x, 0.0)
  n = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps * eps)
  return x / n


def _difference_basis(scores, mask):
  """D [B, B, T]: normalised a_i - a_j (zero on the diagonal)."""
  d = scores[:, None, :] - scores[None, :, :]
  m = None if mask is None else (mask[:, None, :] & mask[None, :, :])
  return _normalize(d, m)


def adversarial_attention_perturbation(loss_of_scores, scores, *, epsilon: float,
                                       mode: str = "at", mask=None):
  """The worst-case perturbation r [B, T] of the scores, with ||r_b||_2 = epsilon.

  Args:
    loss_of_scores: ``f(scores [B, T]) -> scalar`` loss (e.g. summed CE).
    scores: [B, T] pre-softmax attention scores.
    epsilon: perturbation norm per example.
    mode: "at" (gradient direction) or "iat" (gradient w.r.t. coefficients of
      the normalised pairwise score differences within the minibatch).
    mask: optional bool [B, T]; padded positions get no perturbation.

  Returns:
    r, with stop_gradient applied (it is a constant of the training loss
    ``L(a) + lambda * L(a + r)``).
  """
  if mode not in ("at", "iat"):
    raise ValueError(f"mode must be 'at' or 'iat', got {mode!r}.")
  if scores.ndim != 2:
    raise ValueError(f"scores must be [B, T], got shape {scores.shape}.")
  scores = jax.lax.stop_gradient(scores)
  if mode == "at":
    g = jax.grad(lambda d: loss_of_scores(scores + d))(jnp.zeros_like(scores))
    r = epsilon * _normalize(g, mask)
  else:
    D = _difference_basis(scores, mask)
    B = scores.shape[0]
    def loss_c(c):  # first order in the coefficients (normalising at c = 0 is undefined)
      return loss_of_scores(scores + jnp.einsum("ij,ijt->it", c, D))
    gc = jax.grad(loss_c)(jnp.zeros((B, B), scores.dtype))
    r = epsilon * _normalize(jnp.einsum("ij,ijt->it", gc, D), mask)
  return jax.lax.stop_gradient(r)


def _kl(p_logits, q_logits):
  p = jax.nn.log_softmax(p_logits, -1)
  q = jax.nn.log_softmax(q_logits, -1)
  return jnp.sum(jnp.exp(p) * (p - q), axis=-1)


def attention_vat_loss(predict_from_scores, scores, rng, *, epsilon: float, xi: float = 1e-6,
                       mode: str = "vat", mask=None):
  """Virtual adversarial loss on attention scores (no labels needed).

  Args:
    predict_from_scores: ``f(scores [B, T]) -> class logits [B, C]``.
    scores: [B, T] pre-softmax scores.
    rng: PRNG key for the random start direction.
    epsilon: norm of the virtual adversarial perturbation; xi: finite-difference step.
    mode: "vat" or "ivat" (direction restricted to the minibatch difference span).
    mask: optional bool [B, T].

  Returns:
    scalar: mean over the batch of KL(p(y|a) || p(y|a + r_vadv)), with p(y|a)
    held constant. One power iteration.
  """
  if mode not in ("vat", "ivat"):
    raise ValueError(f"mode must be 'vat' or 'ivat', got {mode!r}.")
  clean = jax.lax.stop_gradient(predict_from_scores(scores))
  a0 = jax.lax.stop_gradient(scores)
  if mode == "vat":
    d = _normalize(jax.random.normal(rng, scores.shape, scores.dtype), mask)
    g = jax.grad(lambda r: jnp.sum(_kl(clean, predict_from_scores(a0 + r))))(xi * d)
  else:
    D = _difference_basis(a0, mask)
    c0 = jax.random.normal(rng, (scores.shape[0],) * 2, scores.dtype)
    def kl_c(c):
      r = xi * _normalize(jnp.einsum("ij,ijt->it", c, D), mask)
      return jnp.sum(_kl(clean, predict_from_scores(a0 + r)))
    gc = jax.grad(kl_c)(c0)
    g = jnp.einsum("ij,ijt->it", gc, D)
  r_vadv = jax.lax.stop_gradient(epsilon * _normalize(g, mask))
  return jnp.mean(_kl(clean, predict_from_scores(scores + r_vadv)))
