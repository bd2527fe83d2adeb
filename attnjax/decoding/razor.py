"""RazorAttention: Efficient KV Cache Compression Through Retrieval Heads (arXiv:2407.15891).

Retrieval heads keep their whole cache; every other KV head keeps
``num_sink`` first tokens and the most recent ``L_h = max(min_buffer,
ceil(N / ratio))`` tokens, and summarises the dropped ones in one
compensation token (mean key, mean value) whose logit gets ``+log|D|``. The
compressed cache is stored padded to the cache length with a per-key
validity mask and bias (static shapes); ``kept_fraction`` reports the
compression actually achieved per head.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from attnjax.api import attention


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RazorCache:
  """k [B, S+1, K, H], v [B, S+1, K, Hv], valid bool [K, S+1], bias [K, S+1] (index S = compensation)."""
  k: jax.Array
  v: jax.Array
  valid: jax.Array
  bias: jax.Array

  @property
  def kept_fraction(self):
    """Stored keys (kept + compensation) over original keys, per KV head [K]."""
    S = self.k.shape[1] - 1
    return jnp.sum(self.valid, axis=-1) / S


def razor_keep_mask(seq_len: int, keep_heads, *, num_sink: int = 4, min_buffer: int = 0,
                    ratio: float = 5.0):
  """bool [K, S]: the tokens each KV head keeps (retrieval heads keep all)."""
  keep_heads = jnp.asarray(keep_heads, bool)
  if keep_heads.ndim != 1:
    raise ValueError(f"keep_heads must be bool [K], got shape {keep_heads.shape}.")
  if ratio < 1:
    raise ValueError(f"ratio must be >= 1, got {ratio}.")
  if num_sink < 0 or min_buffer < 0:
    raise ValueError(f"num_sink and min_buffer must be >= 0, got {num_sink}, {min_buffer}.")
  recent = max(min_buffer, math.ceil(seq_len / ratio))
  pos = jnp.arange(seq_len)
  window = (pos < num_sink) | (pos >= seq_len - recent)
  return keep_heads[:, None] | window[None, :]


def razor_compress(key, value, keep_heads, *, num_sink: int = 4, min_buffer: int = 0,
                   ratio: float = 5.0) -> RazorCache:
  """Compresses key [B, S, K, H] / value [B, S, K, Hv] into a :class:`RazorCache`.

  Defaults: 4 sink tokens [verify] and ratio 5 (the paper reports >70% KV
  reduction; choose ratio and min_buffer per model).
  """
  B, S, K, _ = key.shape
  keep = razor_keep_mask(S, keep_heads, num_sink=num_sink, min_buffer=min_buffer, ratio=ratio)
  if keep.shape[0] != K:
    raise ValueError(f"keep_heads has {keep.shape[0]} entries but key has K={K} heads.")
  dropped = (~keep).T[None, :, :, None]  # [1, S, K, 1]
  count = jnp.sum(~keep, axis=-1)  # [K]
  denom = jnp.maximum(count, 1)[None, :, None]
  k_hat = jnp.sum(jnp.where(dropped, key, 0), axis=1) / denom
  v_hat = jnp.sum(jnp.where(dropped, value, 0), axis=1) / denom
  k = jnp.concatenate([key, k_hat[:, None].astype(key.dtype)], axis=1)
  v = jnp.concatenate([value, v_hat[:, None].astype(value.dtype)], axis=1)
  valid = jnp.concatenate([keep, (count > 0)[:, None]], axis=1)
  bias = jnp.concatenate([jnp.zeros((K, S)), jnp.log(jnp.maximum(count, 1))[:, None]], axis=1)
  return RazorCache(k, v, valid, bias.astype(jnp.float32))


def razor_decode_attention(query, cache: RazorCache, *, scale=None, implementation=None):
  """Attention of query [B, T, N, H] (non-causal over the cache) on a RazorCache -> [B, T, N, Hv]."""
  B, T, N, _ = query.shape
  K = cache.k.shape[2]
  if N % K:
    raise ValueError(f"query heads N={N} must be a multiple of the cache's K={K}.")
  g = N // K
  valid = jnp.repeat(cache.valid, g, axis=0)[None, :, None, :]
  bias = jnp.repeat(cache.bias, g, axis=0)[None, :, None, :]
  return attention(query, cache.k, cache.v, mask=valid, bias=bias, scale=scale,
                   implementation=implementation)
