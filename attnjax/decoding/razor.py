"""RazorAttention: Efficient KV Cache Compression Through Retrieval Heads (arXiv:2407.15891).

Retrieval heads keep their whole cache; every other KV head keeps
``num_sink`` first tokens and the most recent ``L_h = max(min_buffer,
ceil(N / ratio))`` tokens, and summarises the dropped ones in one
compensation token (mean key, mean value) whose logit gets ``+log|D|``. The
compressed cache is stored padded to the cache length with a per-key
validity mask and bias (static shapes); ``kept_fraction`` reports the
compression actually achieved per head.

Which heads are retrieval heads comes from :func:`retrieval_head_scores` on
a random token sequence repeated (:func:`repeated_random_tokens`): the echo
score (attention a token pays to the previous occurrence of itself) and the
induction score (attention to the token that followed that occurrence);
:func:`select_protected_heads` keeps the top echo and top induction heads.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

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
                    ratio: float = 5.0, recent=None):
  """bool [K, S]: the tokens each KV head keeps (retrieval heads keep all).

  A non-retrieval head keeps the first ``num_sink`` tokens and the last
  ``max(min_buffer, ceil(S / ratio))`` (RoPE models), or, when ``recent``
  (int [K], e.g. :func:`alibi_buffer_length`) is given, its own last
  ``recent[h]`` tokens (ALiBi models).
  """
  keep_heads = jnp.asarray(keep_heads, bool)
  if keep_heads.ndim != 1:
    raise ValueError(f"keep_heads must be bool [K], got shape {keep_heads.shape}.")
  if ratio < 1:
    raise ValueError(f"ratio must be >= 1, got {ratio}.")
  if num_sink < 0 or min_buffer < 0:
    raise ValueError(f"num_sink and min_buffer must be >= 0, got {num_sink}, {min_buffer}.")
  pos = jnp.arange(seq_len)
  if recent is None:
    n_recent = jnp.full(keep_heads.shape, max(min_buffer, math.ceil(seq_len / ratio)))
  else:
    n_recent = jnp.asarray(recent)
    if n_recent.shape != keep_heads.shape:
      raise ValueError(f"recent must be int [K]={keep_heads.shape}, got shape {n_recent.shape}.")
  window = (pos[None, :] < num_sink) | (pos[None, :] >= seq_len - n_recent[:, None])
  return keep_heads[:, None] | window


def alibi_buffer_length(slopes, logit_bound, *, eps: float = 1e-3, total_mass: bool = False):
  """Per-head buffer of RazorAttention for ALiBi models: int32 [K].

  With ALiBi the logit of key j for query i is ``a_ij - m_h (i - j)``. If
  every content logit satisfies ``|a_ij| <= logit_bound`` (for instance
  ``scale * ||W_q^h W_k^h^T||_2 * r^2`` when the normalised hidden states
  have norm <= r), the weight on a key at distance d is at most
  ``exp(2 logit_bound - m_h d)`` (compare it with the query's own key, d = 0).
  So ``L_h = ceil((2 logit_bound - log eps) / m_h)`` recent tokens leave
  every dropped key with weight <= ``eps``; with ``total_mass=True`` the sum
  of the dropped weights is <= ``eps`` (the geometric tail adds
  ``-log(1 - exp(-m_h))`` to the numerator). This is the project's
  derivation of the paper's slope bound [verify the paper's exact constant].

  Args:
    slopes: ALiBi slopes m_h > 0, [K].
    logit_bound: scalar or [K] bound on ``|a_ij|`` (the scaled q.k).
    eps: the bound on each dropped weight (or on their sum).
  """
  m = jnp.asarray(slopes, jnp.float32)
  if m.ndim != 1:
    raise ValueError(f"slopes must be [K], got shape {m.shape}.")
  if not 0.0 < eps < 1.0:
    raise ValueError(f"eps must be in (0, 1), got {eps}.")
  if bool(jnp.any(m <= 0)):
    raise ValueError("slopes must be > 0.")
  b = jnp.broadcast_to(jnp.asarray(logit_bound, jnp.float32), m.shape)
  num = 2.0 * b - math.log(eps)
  if total_mass:
    num = num - jnp.log1p(-jnp.exp(-m))
  return jnp.maximum(jnp.ceil(num / m), 1).astype(jnp.int32)


def razor_compress(key, value, keep_heads, *, num_sink: int = 4, min_buffer: int = 0,
                   ratio: float = 5.0, recent=None) -> RazorCache:
  """Compresses key [B, S, K, H] / value [B, S, K, Hv] into a :class:`RazorCache`.

  Defaults: 4 sink tokens [verify] and ratio 5 (the paper reports >70% KV
  reduction; choose ratio and min_buffer per model). ``recent`` (int [K])
  replaces the ratio rule by per-head buffers (ALiBi: :func:`alibi_buffer_length`).
  """
  B, S, K, _ = key.shape
  keep = razor_keep_mask(S, keep_heads, num_sink=num_sink, min_buffer=min_buffer, ratio=ratio,
                         recent=recent)
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


def repeated_random_tokens(rng, batch: int, length: int, vocab_size: int, *, repeats: int = 2,
                           low: int = 0):
  """int32 [batch, length * repeats]: ``length`` random tokens in [low, vocab_size) tiled.

  The probe sequence of the head scores (the paper repeats random tokens;
  the length and the excluded special ids, via ``low``, are the caller's).
  """
  if length < 1 or repeats < 2 or batch < 1:
    raise ValueError(f"need batch >= 1, length >= 1 and repeats >= 2, got {batch}, {length}, "
                     f"{repeats}.")
  if not 0 <= low < vocab_size:
    raise ValueError(f"low must be in [0, vocab_size={vocab_size}), got {low}.")
  ids = jax.random.randint(rng, (batch, length), low, vocab_size, dtype=jnp.int32)
  return jnp.tile(ids, (1, repeats))


def _previous_occurrence(ids):
  """[..., T] -> [..., T]: index of the latest earlier equal token, -1 if none."""
  T = ids.shape[-1]
  pos = jnp.arange(T)
  same = (ids[..., :, None] == ids[..., None, :]) & (pos[None, :] < pos[:, None])
  return jnp.max(jnp.where(same, pos[None, :], -1), axis=-1)


@functools.partial(jax.jit, static_argnums=2)
def _causal_probs(query, key, scale):
  B, T, N, H = query.shape
  if key.ndim != 4 or key.shape[0] != B or key.shape[1] != T or key.shape[3] != H or N % key.shape[2]:
    raise ValueError(f"query {query.shape} and key {key.shape} must be [B, T, N, H] and "
                     "[B, T, K, H] with N % K == 0 (self-attention over the token sequence).")
  k = jnp.repeat(key, N // key.shape[2], axis=2)
  s = (1.0 / math.sqrt(H)) if scale is None else scale
  logits = jnp.einsum("btnh,bsnh->bnts", query.astype(jnp.float32), k.astype(jnp.float32)) * s
  causal = jnp.tril(jnp.ones((T, T), bool))
  return jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)


def retrieval_head_scores(probs=None, token_ids=None, *, query=None, key=None, scale=None):
  """RazorAttention's echo and induction scores of each head (compiled once per shape).

  For every query i whose token occurred before, let j be the latest earlier
  position with the same token. The echo score is the attention weight on
  key j, the induction score the weight on key j + 1 (the token that followed
  it; queries with j + 1 = i are left out of the induction average). Each
  score is averaged over the eligible queries. On a random sequence repeated
  (:func:`repeated_random_tokens`) j is the query's copy one period back.

  Args:
    probs: attention weights [..., T, T] of a causal self-attention over
      ``token_ids`` (e.g. [B, N, T, T] from ``probs_hook`` of
      ``attnjax.analysis.hooked_attention``, or [B, L, N, T, T]).
    token_ids: int [T], or [B, T] when ``probs``' leading axis is the batch.
    query, key: instead of ``probs``, the post-RoPE query [B, T, N, H] and
      key [B, T, K, H]; the causal softmax weights are computed here
      (``scale`` defaults to 1/sqrt(H)).

  Returns:
    dict with ``"echo"`` and ``"induction"``, float32 of shape
    ``probs.shape[:-2]`` (e.g. [B, N]; average over the batch yourself).
    A sequence without repeats gives 0.
  """
  if token_ids is None:
    raise ValueError("token_ids is required.")
  if probs is None:
    if query is None or key is None:
      raise ValueError("pass either probs or both query and key.")
    probs = _causal_probs(jnp.asarray(query), jnp.asarray(key), scale)
  elif query is not None or key is not None:
    raise ValueError("pass either probs or query/key, not both.")
  probs = jnp.asarray(probs, jnp.float32)
  ids = jnp.asarray(token_ids)
  if probs.ndim < 2 or probs.shape[-1] != probs.shape[-2]:
    raise ValueError(f"probs must be [..., T, T] (self-attention), got {probs.shape}.")
  T = probs.shape[-1]
  if ids.ndim not in (1, 2) or ids.shape[-1] != T or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"token_ids must be int [T] or [B, T] with T={T}, got {ids.shape} {ids.dtype}.")
  if ids.ndim == 2 and (probs.ndim < 3 or probs.shape[0] != ids.shape[0]):
    raise ValueError(f"token_ids [B, T]={ids.shape} needs probs [B, ..., T, T], got {probs.shape}.")
  return _echo_induction(probs, ids)


@jax.jit
def _echo_induction(probs, ids):
  T = probs.shape[-1]
  prev = _previous_occurrence(ids)  # [(B,) T]
  pos = jnp.arange(T)
  keys = pos[None, :]
  echo_w = (keys == prev[..., :, None]) & (prev[..., :, None] >= 0)
  ind_ok = (prev >= 0) & (prev + 1 < pos)
  ind_w = (keys == prev[..., :, None] + 1) & ind_ok[..., :, None]
  n_echo = jnp.sum(prev >= 0, axis=-1).astype(jnp.float32)
  n_ind = jnp.sum(ind_ok, axis=-1).astype(jnp.float32)
  if ids.ndim == 2:  # [B, T, S] -> [B, 1.., T, S] against probs [B, ..., T, T]
    extra = (1,) * (probs.ndim - 3)
    echo_w = echo_w.reshape(echo_w.shape[:1] + extra + echo_w.shape[1:])
    ind_w = ind_w.reshape(ind_w.shape[:1] + extra + ind_w.shape[1:])
    n_echo = n_echo.reshape(n_echo.shape + extra)
    n_ind = n_ind.reshape(n_ind.shape + extra)
  echo = jnp.sum(probs * echo_w, axis=(-2, -1)) / jnp.maximum(n_echo, 1.0)
  ind = jnp.sum(probs * ind_w, axis=(-2, -1)) / jnp.maximum(n_ind, 1.0)
  return {"echo": echo, "induction": ind}


def _top_fraction(scores, fraction: float, name: str):
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {fraction}.")
  flat = np.ravel(np.asarray(scores, np.float32))
  k = math.ceil(fraction * flat.size - 1e-9)
  ranks = np.argsort(np.argsort(-flat, kind="stable"), kind="stable")  # 0 = highest score
  return (ranks < k).reshape(np.shape(scores))


def select_protected_heads(scores, *, echo_fraction: float = 0.01,
                           induction_fraction: float = 0.14,
                           num_kv_heads: Optional[int] = None):
  """Retrieval heads to protect: top echo heads plus top induction heads.

  Args:
    scores: the dict of :func:`retrieval_head_scores` with arrays of shape
      [..., N] (e.g. [L, N] after averaging over the batch; ranking is over
      all entries, i.e. over every layer and head).
    echo_fraction, induction_fraction: shares of all heads kept by each
      score. Defaults 1% echo and 14% induction heads (about 15% in all) are
      this project's reading of the paper [verify]. The count is
      ``ceil(fraction * number_of_heads)``, so any positive fraction keeps at
      least one head (the project's choice for small models).
    num_kv_heads: with grouped-query attention the cache is per KV head:
      a KV head is protected when any of its N / K query heads is, and the
      result is [..., K] (what ``razor_compress``'s ``keep_heads`` takes for
      one layer).

  Returns:
    bool [..., N] (or [..., K]).
  """
  echo = np.asarray(scores["echo"])
  ind = np.asarray(scores["induction"])
  if echo.shape != ind.shape or echo.ndim < 1:
    raise ValueError(f"echo {echo.shape} and induction {ind.shape} scores must have one shape [..., N].")
  keep = (_top_fraction(echo, echo_fraction, "echo_fraction")
          | _top_fraction(ind, induction_fraction, "induction_fraction"))
  if num_kv_heads is None:
    return jnp.asarray(keep)
  N = keep.shape[-1]
  if num_kv_heads < 1 or N % num_kv_heads:
    raise ValueError(f"num_kv_heads={num_kv_heads} must divide the N={N} query heads.")
  return jnp.asarray(np.any(keep.reshape(keep.shape[:-1] + (num_kv_heads, N // num_kv_heads)),
                            axis=-1))
