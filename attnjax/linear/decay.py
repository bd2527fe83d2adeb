"""Per-head decay slopes for linear attention (Lightning Attention-2, arXiv:2401.04658; TNL, arXiv:2405.17381).

A slope s_h >= 0 gives the decay lambda_h = exp(-s_h): key j contributes to
query i with weight lambda_h ** (q_pos[i] - k_pos[j]).
"""
from __future__ import annotations

import math
from typing import List, Optional

import jax
import jax.numpy as jnp
import numpy as np


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi's geometric slopes, [num_heads] float32 (H = 8 -> 2^-1 ... 2^-8).

  For a head count that is not a power of two, the slopes of the closest
  smaller power of two are followed by every other slope of twice that count
  (Press et al.'s construction, also used by the Lightning Attention code).
  """
  if num_heads < 1:
    raise ValueError(f"num_heads must be >= 1, got {num_heads}.")

  def power_of_two(n: int) -> List[float]:
    start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
    return [start * start ** i for i in range(n)]

  if math.log2(num_heads).is_integer():
    return np.asarray(power_of_two(num_heads), np.float32)
  closest = 2 ** math.floor(math.log2(num_heads))
  extra = alibi_slopes(2 * closest)[0::2][: num_heads - closest]
  return np.concatenate([np.asarray(power_of_two(closest), np.float32), extra])


def tnl_decay_slopes(num_heads: int, layer_idx: int = 0, num_layers: int = 1) -> np.ndarray:
  """TNL's per-layer slopes: alibi_slopes(H) * (1 - l / (L - 1) + 1e-5), [H].

  Deeper layers decay less; the last layer keeps only 1e-5 of the ALiBi slope.
  With num_layers == 1 the factor is 1 + 1e-5 (the formula's l / (L - 1) is
  taken as 0 there).
  """
  if num_layers < 1 or not 0 <= layer_idx < num_layers:
    raise ValueError(
        f"layer_idx must be in [0, num_layers) with num_layers >= 1, got "
        f"layer_idx={layer_idx}, num_layers={num_layers}.")
  frac = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
  return (alibi_slopes(num_heads) * (1.0 - frac + 1e-5)).astype(np.float32)


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def resolve_decay(decay, num_heads: int) -> Optional[jax.Array]:
  """Validates `decay` and returns per-head slopes [N] float32, or None.

  Args:
    decay: None (no decay), "tnl" / "alibi" (TNL's default slopes for layer 0
      of 1, i.e. ALiBi slopes), a scalar slope, or slopes of shape [N]. Slopes
      must be finite and >= 0 (lambda = exp(-slope) in (0, 1]).
    num_heads: N, the number of query heads.
  """
  if decay is None:
    return None
  if isinstance(decay, str):
    if decay in ("tnl", "alibi"):
      return jnp.asarray(tnl_decay_slopes(num_heads) if decay == "tnl"
                         else alibi_slopes(num_heads))
    raise ValueError(f"decay must be None, 'tnl', 'alibi', a scalar or [N] slopes; got {decay!r}.")
  arr = jnp.asarray(decay, jnp.float32)
  if arr.ndim == 0:
    arr = jnp.broadcast_to(arr, (num_heads,))
  if arr.shape != (num_heads,):
    raise ValueError(
        f"decay must be a scalar or have shape [N]=({num_heads},), got shape "
        f"{tuple(arr.shape)}.")
  if _is_concrete(decay):
    host = np.asarray(decay, np.float32)
    if not np.all(np.isfinite(host)) or np.any(host < 0):
      raise ValueError(
          f"decay slopes must be finite and >= 0 (lambda = exp(-slope) in (0, 1]), "
          f"got {host.tolist()}.")
  return arr
