"""Accumulation dtypes of the fast paths, and the warning for float64 inputs they round.

The contract accumulates in float32 for bfloat16, float16 and float32 inputs.
With float64 inputs (under ``jax_enable_x64``) the reference oracles and the
linear engine's xla path compute in float64; the block-sparse engine (xla and
pallas), the neighborhood xla/pallas paths and the linear pallas kernels keep
float32 accumulators, so their float64 outputs carry float32-level error
(~1e-7 relative). Those paths call :func:`warn_float32_accumulation`.
"""
from __future__ import annotations

import warnings

import jax.numpy as jnp


class Float32AccumulationWarning(UserWarning):
  """float64 inputs computed with float32 accumulators (float32-level accuracy)."""


def accumulation_dtype(*arrays):
  """float32 for bfloat16/float16/float32 inputs, float64 if any input is float64."""
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def warn_float32_accumulation(op: str, *arrays) -> bool:
  """Warns when an input of ``op`` is float64.

  The warning is attributed to the calling line of the library, so Python's
  default filter shows it once per process and path.

  Returns True when it warned. ``op`` names the path, e.g.
  ``"attention(implementation='xla')"``.
  """
  if not any(getattr(x, "dtype", None) == jnp.float64 for x in arrays):
    return False
  warnings.warn(
      f"{op} accumulates in float32: float64 inputs give float64 outputs with "
      "float32-level error (~1e-7 relative). Use implementation='reference' for a "
      "float64 result.", Float32AccumulationWarning, stacklevel=2)
  return True
