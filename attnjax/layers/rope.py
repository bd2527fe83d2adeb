"""Rotary position embeddings (RoFormer, Su et al. 2021), shared by every layer.

Rotate-half convention (GPT-NeoX / Llama): the rotated part of the head
dimension is split into two halves ``x1, x2`` and the pair
``(x1[i], x2[i])`` is rotated by the angle ``pos * base ** (-2 i / R)`` where
``R`` is the number of rotated dimensions. Rotating q and k this way makes the
logit ``q_i . k_j`` depend on positions only through ``i - j``.
"""
from __future__ import annotations

import jax.numpy as jnp

__all__ = ["apply_rope", "rope_frequencies", "rotary_dims"]


def rotary_dims(head_dim: int, fraction: float = 1.0) -> int:
  """Number of rotated dimensions: ``floor(head_dim * fraction)`` rounded down to even."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction must be in (0, 1], got {fraction!r}.")
  rot = int(head_dim * fraction) // 2 * 2
  if rot < 2:
    raise ValueError(
        f"fraction={fraction} of head_dim={head_dim} rotates {rot} dimensions; at least "
        "2 are needed.")
  return rot


def rope_frequencies(rot: int, base: float = 10000.0):
  """Inverse frequencies [rot // 2] float32: ``base ** (-2 i / rot)``."""
  if not base > 0:
    raise ValueError(f"base must be positive, got {base!r}.")
  return jnp.asarray(base, jnp.float32) ** (-jnp.arange(0, rot, 2, dtype=jnp.float32) / rot)


def apply_rope(x, positions, base: float = 10000.0, fraction: float = 1.0):
  """Applies rotary embeddings to ``x``.

  Args:
    x: [B, T, N, H] queries or keys (any float dtype).
    positions: int or float [T] (shared by the batch) or [B, T].
    base: the frequency base (10000 in RoFormer and Llama 1/2).
    fraction: share of the head dimension that is rotated (partial rotary, as
      GPT-NeoX's ``rotary_pct``); the rest passes unchanged. The rotated
      dimensions are the first ``rotary_dims(H, fraction)``.

  Returns:
    [B, T, N, H] in x's dtype; the rotation is computed in float32.
  """
  if getattr(x, "ndim", None) != 4:
    raise ValueError(f"x must have rank 4 [B, T, N, H], got shape {getattr(x, 'shape', None)}.")
  B, T, _, H = x.shape
  positions = jnp.asarray(positions)
  if positions.shape not in ((T,), (B, T)):
    raise ValueError(
        f"positions must have shape [T]=({T},) or [B, T]=({B}, {T}), got {positions.shape}.")
  rot = rotary_dims(H, fraction)
  inv_freq = rope_frequencies(rot, base)
  pos = positions.astype(jnp.float32)
  if pos.ndim == 1:
    pos = pos[None]
  angles = pos[..., None] * inv_freq  # [B|1, T, rot/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2, rest = xf[..., : rot // 2], xf[..., rot // 2: rot], xf[..., rot:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
  return out.astype(x.dtype)
