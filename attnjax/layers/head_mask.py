"""Head ablation of a layer's per-head outputs (circuit analysis: "Interpreting and
Improving Large Language Models in Arithmetic Calculation", arXiv:2409.01659).

``attnjax.layers.MultiHeadAttention(head_mask=...)`` applies it before the output
projection; ``attnjax.analysis`` re-exports it with the other head tools.
"""
from __future__ import annotations

import jax.numpy as jnp


def apply_head_mask(head_out, head_mask, replacement=None):
  """Ablates heads: head_out [B,T,N,H] * mask, mask [N] or [B,N] (1 keep, 0 ablate).

  With ``replacement`` (broadcastable to head_out, e.g. the head's mean
  output), ablated heads take that value instead of zero (mean ablation).
  """
  B, _, N, _ = head_out.shape
  m = jnp.asarray(head_mask, head_out.dtype)
  if m.shape == (N,):
    m = m[None, None, :, None]
  elif m.shape == (B, N):
    m = m[:, None, :, None]
  else:
    raise ValueError(f"head_mask must have shape [N]=({N},) or [B, N]=({B}, {N}), got {m.shape}.")
  out = head_out * m
  if replacement is not None:
    out = out + (1 - m) * jnp.asarray(replacement, head_out.dtype)
  return out
