"""Lightning Attention-2 and TNL's decayed linear attention (arXiv:2401.04658, arXiv:2405.17381).

"Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in
LLMs" and TNL, "Various Lengths, Constant Speed: Efficient Language Modeling with
Lightning Attention".

o_t = sum_{j<=t} lambda_h^(t-j) (q_t . k_j) v_j with lambda_h = exp(-s_h); no
feature map and no denominator (TNL applies SiLU in its projections).
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from attnjax.linear.api import linear_attention
from attnjax.linear.decay import tnl_decay_slopes


def lightning_attention(query, key, value, *, slopes=None, layer_idx: int = 0,
                        num_layers: int = 1, causal: bool = True, block_size: int = 64,
                        initial_state=None, return_state: bool = False,
                        implementation: Optional[str] = None, **kwargs):
  """Decayed causal linear attention, chunked as in Lightning Attention-2.

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv].
    slopes: per-head slopes [N] (>= 0); None uses TNL's
      tnl_decay_slopes(N, layer_idx, num_layers).
    block_size: the chunk length (64 as the Triton kernel of the paper).
    Other arguments as linear_attention (identity feature map, no normalisation).
  Returns:
    out [B, T, N, Hv] (and the final state [B, N, H, Hv] if return_state).
  """
  if slopes is None:
    slopes = jnp.asarray(tnl_decay_slopes(query.shape[2], layer_idx, num_layers))
  return linear_attention(query, key, value, feature_map="identity", causal=causal,
                          decay=slopes if causal else None, chunk_size=block_size,
                          initial_state=initial_state, return_state=return_state,
                          implementation=implementation, **kwargs)


def srms_norm(x, eps: float = 1e-6):
  """TNL's simple RMS norm x / (||x||_2 / sqrt(d)) over the last axis."""
  x32 = x.astype(jnp.float32)
  rms = jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 / rms).astype(x.dtype)
