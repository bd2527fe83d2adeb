"""Attention-weight dropout as a ``probs_hook`` of the dense reference path.

Flax's convention (``flax.linen.dot_product_attention_weights``): each
normalised weight is kept with probability ``1 - rate`` and divided by it;
with ``broadcast_dropout`` one mask [T, S] is shared by the batch and the
heads. Only a path that materialises the weights [B, N, T, S] can apply it;
the fast engines never do, so they raise instead (see ``dropout_hook``'s
callers).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["dropout_hook", "check_dropout_rate"]


def check_dropout_rate(rate) -> float:
  """``rate`` as a float in [0, 1); ValueError otherwise."""
  if not 0.0 <= float(rate) < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {rate!r}.")
  return float(rate)


def dropout_hook(rng, rate: float, broadcast: bool = True):
  """``f(probs [B, N, T, S]) -> probs`` that drops weights with probability ``rate``.

  Args:
    rng: a PRNG key (Flax: ``module.make_rng('dropout')``).
    rate: dropout probability in [0, 1).
    broadcast: one mask [T, S] for every batch element and head (Flax's
      default ``broadcast_dropout=True``); False: a mask per [B, N, T, S].
  """
  keep_prob = 1.0 - check_dropout_rate(rate)

  def hook(probs):
    shape = (1, 1) + probs.shape[-2:] if broadcast else probs.shape
    keep = jax.random.bernoulli(rng, keep_prob, shape)
    return jnp.where(keep, probs / keep_prob, jnp.zeros((), probs.dtype))

  return hook
