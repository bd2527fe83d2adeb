"""Heavy-hitter KV eviction (H2O, arXiv:2306.14048), the inference side of "SinkLoRA:
Enhanced Efficiency and Chat Capabilities for Long-Context Large Language Models"
(arXiv:2406.05678).

Each KV head keeps its ``recent`` latest tokens plus the ``heavy`` earlier
tokens with the largest accumulated attention ("heavy hitters"). H2O's
default budget is 20% of the cache split evenly between the two [verify
SinkLoRA's own setting].
"""
from __future__ import annotations

import dataclasses

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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class H2OCache:
  """H2O's fixed-size cache: ``heavy + recent`` slots per KV head.

  key [B, K, C, H], value [B, K, C, Hv]; positions int32 [B, K, C] (-1 marks
  an empty slot); score float32 [B, K, C], the attention each kept token has
  received (summed over its KV head's query group) since it entered.
  """
  key: jax.Array
  value: jax.Array
  positions: jax.Array
  score: jax.Array


def _check_budget(heavy, recent):
  for name, v in (("heavy", heavy), ("recent", recent)):
    if not isinstance(v, int) or v < 0:
      raise ValueError(f"{name} must be an int >= 0, got {v!r}.")
  if recent < 1:
    raise ValueError(f"recent must be >= 1 (the newest token is always kept), got {recent}.")
  return heavy + recent


def h2o_prefill(key, value, acc, *, heavy: int, recent: int) -> H2OCache:
  """The cache H2O keeps after a prompt: its ``recent`` last tokens and ``heavy`` heavy hitters.

  Args:
    key: [B, S, K, H] and value [B, S, K, Hv] of the prompt (post-RoPE keys).
    acc: float [B, K, S], the attention each prompt token received from the
      prompt's queries (:func:`h2o_accumulate`).

  Returns:
    :class:`H2OCache` with C = heavy + recent slots; a prompt shorter than C
    leaves slots empty.
  """
  C = _check_budget(heavy, recent)
  B, S, K = key.shape[:3]
  if value.shape[:3] != (B, S, K) or jnp.shape(acc) != (B, K, S):
    raise ValueError(f"value must be [B, S, K, Hv] and acc [B, K, S] for key {key.shape}; got "
                     f"value {value.shape}, acc {jnp.shape(acc)}.")
  idx = h2o_keep_indices(acc, heavy=heavy, recent=recent)             # [B, K, min(S, C)]
  take = lambda x: jnp.take_along_axis(jnp.swapaxes(x, 1, 2), idx[..., None], axis=2)
  k, v = take(key), take(value)
  score = jnp.take_along_axis(acc.astype(jnp.float32), idx, axis=-1)
  pad = C - idx.shape[-1]
  if pad > 0:
    k = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0)))
    idx = jnp.pad(idx, ((0, 0), (0, 0), (0, pad)), constant_values=-1)
    score = jnp.pad(score, ((0, 0), (0, 0), (0, pad)))
  return H2OCache(k, v, idx.astype(jnp.int32), score)


def empty_h2o_cache(batch: int, num_kv_heads: int, head_dim: int, *, heavy: int, recent: int,
                    value_dim=None, dtype=jnp.float32) -> H2OCache:
  """An H2OCache with every slot empty."""
  C = _check_budget(heavy, recent)
  hv = head_dim if value_dim is None else value_dim
  return H2OCache(jnp.zeros((batch, num_kv_heads, C, head_dim), dtype),
                  jnp.zeros((batch, num_kv_heads, C, hv), dtype),
                  jnp.full((batch, num_kv_heads, C), -1, jnp.int32),
                  jnp.zeros((batch, num_kv_heads, C), jnp.float32))


def h2o_decode_step(query, key, value, cache: H2OCache, position, *, heavy: int, recent: int,
                    scale=None):
  """One decoding step of H2O's greedy eviction: (out [B, 1, N, Hv], new cache).

  The new token (key/value [B, 1, K, H], at ``position`` int [B]) joins the
  cache's tokens; per KV head the ``recent`` latest of them and the ``heavy``
  others with the largest accumulated score stay (C = heavy + recent keys,
  the new token included, as in the paper's eviction with a recent window);
  query [B, 1, N, H] attends to those C keys, and their scores grow by the
  attention they got (summed over the KV head's query group).
  """
  C = _check_budget(heavy, recent)
  B, T, N, H = query.shape
  K = key.shape[2]
  if T != 1 or key.shape[:2] != (B, 1) or value.shape[:3] != (B, 1, K):
    raise ValueError(f"h2o_decode_step takes one token: query [B, 1, N, H], key/value "
                     f"[B, 1, K, H]; got {query.shape}, {key.shape}, {value.shape}.")
  if cache.key.shape[:3] != (B, K, C) or N % K:
    raise ValueError(f"cache must hold [B, K, heavy + recent]=({B}, {K}, {C}) slots and N={N} "
                     f"be a multiple of K; got cache key {cache.key.shape}.")
  position = jnp.broadcast_to(jnp.asarray(position, jnp.int32), (B,))
  cat = lambda a, b: jnp.concatenate([a, b.astype(a.dtype)], axis=2)
  ks = cat(cache.key, jnp.swapaxes(key, 1, 2))                         # [B, K, C + 1, H]
  vs = cat(cache.value, jnp.swapaxes(value, 1, 2))
  pos = cat(cache.positions, jnp.broadcast_to(position[:, None, None], (B, K, 1)))
  score = cat(cache.score, jnp.zeros((B, K, 1), jnp.float32))
  valid = pos >= 0
  newest = jax.lax.top_k(jnp.where(valid, pos, -1), recent)[1]          # [B, K, recent]
  is_recent = jnp.zeros(pos.shape, bool)
  is_recent = jnp.put_along_axis(is_recent, newest, True, axis=-1, inplace=False) & valid
  other = jnp.where(valid & ~is_recent, score, -jnp.inf)
  if heavy:
    top_s, top = jax.lax.top_k(other, heavy)
    keep = jnp.concatenate([top, newest], axis=-1)                    # [B, K, C]
    kept_ok = jnp.concatenate([jnp.isfinite(top_s),
                               jnp.take_along_axis(valid, newest, axis=-1)], axis=-1)
  else:
    keep, kept_ok = newest, jnp.take_along_axis(valid, newest, axis=-1)
  take = lambda x: jnp.take_along_axis(x, keep.reshape(keep.shape + (1,) * (x.ndim - 3)),
                                       axis=2)
  ks, vs, score = take(ks), take(vs), take(score)
  pos = jnp.where(kept_ok, take(pos), -1)
  s = H ** -0.5 if scale is None else scale
  q = query[:, 0].astype(jnp.float32).reshape(B, K, N // K, H)
  logits = jnp.einsum("bkgh,bkch->bkgc", q, ks.astype(jnp.float32)) * s
  probs = jax.nn.softmax(jnp.where(kept_ok[:, :, None], logits, -jnp.inf), axis=-1)
  out = jnp.einsum("bkgc,bkcv->bkgv", probs, vs.astype(jnp.float32))
  out = out.reshape(B, 1, N, -1).astype(query.dtype)
  new = H2OCache(ks, vs, pos.astype(jnp.int32), score + probs.sum(2))
  return out, new
