"""Feature maps phi for kernelised linear attention (BASED, arXiv:2402.18668; Katharopoulos et al.).

Every map acts on the last axis: x [..., H] -> phi(x) [..., F]. The maps are
plain functions so that any callable with the same contract can be passed to
`linear_attention(feature_map=...)`.
"""
from __future__ import annotations

import math
from typing import Callable, Union

import jax
import jax.numpy as jnp

FeatureMap = Callable[[jax.Array], jax.Array]


def identity(x: jax.Array) -> jax.Array:
  """phi(x) = x; F = H."""
  return x


def elu_plus_one(x: jax.Array) -> jax.Array:
  """phi(x) = elu(x) + 1 (Katharopoulos et al., 2020); strictly positive, F = H."""
  return jax.nn.elu(x) + 1.0


def relu(x: jax.Array) -> jax.Array:
  """phi(x) = max(x, 0); F = H."""
  return jax.nn.relu(x)


def taylor(x: jax.Array) -> jax.Array:
  """BASED's second-order Taylor map: [1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))].

  With d = H the result has F = 1 + d + d^2 features (273 for d = 16) and
  phi(q) . phi(k) = 1 + s + s^2 / 2 for s = q . k / sqrt(d), the second-order
  Taylor expansion of exp(s). The full outer product is kept (not its
  symmetric half), as in the BASED reference code.

  Args:
    x: [..., d].
  Returns:
    [..., 1 + d + d * d], same dtype as x.
  """
  d = x.shape[-1]
  ones = jnp.ones(x.shape[:-1] + (1,), x.dtype)
  first = x * (1.0 / d ** 0.25)
  outer = (x[..., :, None] * x[..., None, :]).reshape(x.shape[:-1] + (d * d,))
  second = outer * (1.0 / (math.sqrt(2.0) * math.sqrt(d)))
  return jnp.concatenate([ones, first, second.astype(x.dtype)], axis=-1)


FEATURE_MAPS = {
    "identity": identity,
    "elu+1": elu_plus_one,
    "elu_plus_one": elu_plus_one,
    "relu": relu,
    "taylor": taylor,
}


def resolve_feature_map(feature_map: Union[str, FeatureMap, None]) -> FeatureMap:
  """Returns the callable for a feature-map name or callable (None = identity)."""
  if feature_map is None:
    return identity
  if callable(feature_map):
    return feature_map
  if isinstance(feature_map, str) and feature_map in FEATURE_MAPS:
    return FEATURE_MAPS[feature_map]
  raise ValueError(
      f"feature_map must be a callable or one of {sorted(FEATURE_MAPS)}, got "
      f"{feature_map!r}.")
