"""KV-cache bookkeeping of ``MultiHeadAttention``: appending past ``max_len`` raises."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_cache_fits"]


def _cache_overflow_error(idx, n_new, max_len):
  bad = [int(b) for b in np.nonzero(np.asarray(idx) + np.asarray(n_new) > max_len)[0]]
  b = bad[0]
  return ValueError(
      f"KV cache overflow: example {b} holds {int(np.asarray(idx)[b])} tokens and appends "
      f"{int(np.asarray(n_new)[b])}, past the cache's max_len={max_len} (examples {bad} "
      "overflow); initialise the cache with a longer input or decode fewer tokens.")


def _raise_on_overflow(idx, n_new, max_len):
  if np.any(np.asarray(idx) + np.asarray(n_new) > max_len):
    raise _cache_overflow_error(idx, n_new, max_len)


def check_cache_fits(idx, n_new, max_len: int):
  """Overflow flag (scalar bool) of appending n_new [B] tokens at idx [B].

  Raises ValueError now when the values are concrete; under jit a host
  callback raises it when the step runs.
  """
  overflow = jnp.any(idx + n_new > max_len)
  try:
    concrete = bool(overflow)
  except jax.errors.ConcretizationTypeError:
    jax.debug.callback(functools.partial(_raise_on_overflow, max_len=max_len), idx, n_new)
    return overflow
  if concrete:
    raise _cache_overflow_error(idx, n_new, max_len)
  return overflow
