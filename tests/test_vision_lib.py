"""Shared test data for the attnjax.vision tests (NumPy draws: no per-shape XLA compile)."""
import jax
import jax.numpy as jnp
import numpy as np

KEY = jax.random.PRNGKey(0)


def rnd(shape, seed, scale=1.0):
  """Standard normal float32 array of ``shape`` from seed ``seed``."""
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def unif(shape, seed, maxval=1.0):
  """Uniform [0, maxval) float32 array of ``shape`` from seed ``seed``."""
  return jnp.asarray(np.random.default_rng(seed).uniform(0.0, maxval, shape), jnp.float32)
