"""Heavy-hitter KV eviction (H2O, arXiv:2306.14048), the inference side of "SinkLoRA:
Enhanced Efficiency and Chat Capabilities for Long-Context Large Language Models"
(arXiv:2406.05678).

Each KV head keeps its ``recent`` latest tokens plus the ``heavy`` earlier
tokens with the largest accumulated attention ("heavy hitters"). H2O's
default budget is 20% of the cache split evenly between the two [verify
SinkLoRA's own setting].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def h2o_accumulate(acc, probs):
  """Adds attention received per key: acc [B, K, S] + probs [B, N, T, S] summed over T and each KV group."""
  B, N, _, S = probs.shape
  K = acc.shape[1]
  if acc.shape != (B, K, S) or N % K:
    raise ValueError(f"acc must be [B, K, S] with N={N} a multiple of K; got acc {acc.shape}, "
                     f"probs {probs.shape}.")
  return acc + jnp.sum(probs.reshape(B, K, N // K, -1, S), axis=(2, 3))


def h2o_keep_indices(acc, *, heavy: int, recent: int):
  """Sorted int32 [B, K, heavy + recent] cache positions to keep (all S when the budget covers them).

  acc [B, K, S]: accumulated attention per key. The last ``recent`` positions
  are always kept; the ``heavy`` best-scored earlier positions join them.
  """
  B, K, S = acc.shape
  if heavy < 0 or recent < 0:
    raise ValueError(f"heavy and recent must be >= 0, got {heavy}, {recent}.")
  if heavy + recent >= S:
    return jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, K, S))
  early = acc[..., :S - recent]
  top = jax.lax.top_k(early, heavy)[1] if heavy else jnp.zeros((B, K, 0), jnp.int32)
  tail = jnp.broadcast_to(jnp.arange(S - recent, S), (B, K, recent))
  return jnp.sort(jnp.concatenate([top, tail], axis=-1), axis=-1).astype(jnp.int32)
