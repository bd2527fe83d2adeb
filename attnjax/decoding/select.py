"""Token-level KV selection for decoding.

TokenSelect ("TokenSelect: Dynamic Token-Level KV Cache Selection",
arXiv:2411.02886): per query chunk, score every candidate cache position by
soft voting over heads (the sum over query heads of their softmax over candidates), keep the
``top_k`` best plus ``n_init`` initial and ``n_local`` recent positions, and
attend to that set; a selection cache reuses the last indices when the
chunk's query fingerprint barely moved (cosine >= 0.9).

TidalDecode ("TidalDecode: Fast and Accurate LLM Decoding with Position
Persistent Sparse Attention", arXiv:2410.05076): a few layers run full
attention; a selection layer also picks each KV head's top-k positions, and
the following layers reuse those positions until a re-selection layer.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from attnjax.decoding.cache import decode_attention
from attnjax.dynamic.gather import gather_attention


def _group_logits(query, k_cache):
  """query [B, N, H], k_cache [B, L, K, H] -> float32 logits [B, N, L]."""
  N, K = query.shape[1], k_cache.shape[2]
  if N % K:
    raise ValueError(f"query heads N={N} must be a multiple of cache heads K={K}.")
  q = query.reshape(query.shape[0], K, N // K, query.shape[-1]).astype(jnp.float32)
  s = jnp.einsum("bkgh,blkh->bkgl", q, k_cache.astype(jnp.float32))
  return s.reshape(query.shape[0], N, -1) * query.shape[-1] ** -0.5


def tokenselect_indices(query, k_cache, *, n_init: int = 128, n_local: int = 512,
                        top_k: int = 2048, pool: int | None = None):
  """Positions each sequence attends to: int32 [B, n_init + top_k + n_local] (sorted).

  Args:
    query: [B, T, N, H], the current chunk's queries (their mean per head is
      the fingerprint). k_cache: [B, L, K, H], all L positions valid.
    pool: optional odd 1-D max-pool width smoothing the vote scores.

  When ``n_init + top_k + n_local >= L`` every position is returned (exact
  full attention). Defaults are the Llama-3-8B configuration of the paper's code.
  """
  L = k_cache.shape[1]
  for name, v in (("n_init", n_init), ("n_local", n_local), ("top_k", top_k)):
    if v < 0:
      raise ValueError(f"{name} must be >= 0, got {v}.")
  if n_init + top_k + n_local >= L:
    return jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (query.shape[0], L))
  fp = jnp.mean(query.astype(jnp.float32), axis=1)  # [B, N, H]
  cand = jnp.arange(n_init, L - n_local)
  logits = _group_logits(fp, k_cache[:, n_init:L - n_local])
  votes = jnp.sum(jax.nn.softmax(logits, axis=-1), axis=1)  # [B, C]
  if pool:
    if pool % 2 == 0:
      raise ValueError(f"pool must be odd, got {pool}.")
    votes = jax.lax.reduce_window(votes, -jnp.inf, jax.lax.max, (1, pool), (1, 1), "SAME")
  _, top = jax.lax.top_k(votes, top_k)
  chosen = jnp.sort(cand[top], axis=-1)
  B = query.shape[0]
  head = jnp.broadcast_to(jnp.arange(n_init), (B, n_init))
  tail = jnp.broadcast_to(jnp.arange(L - n_local, L), (B, n_local))
  return jnp.concatenate([head, chosen, tail], axis=-1).astype(jnp.int32)


def sparse_decode_attention(query, k_cache, v_cache, indices, lengths, *, scale=None):
  """Decode attention restricted to cache positions ``indices``.

  query [B, T, N, H] (positions lengths-T .. lengths-1), caches [B, L, K, H];
  indices int [B, k] shared by all heads, or [B, K, k] per KV head. Positions
  after a query are masked (causal by positions).
  """
  B, T, N, _ = query.shape
  K = k_cache.shape[2]
  idx = jnp.asarray(indices, jnp.int32)
  if idx.ndim == 2:
    idx = jnp.broadcast_to(idx[:, None, None, :], (B, T, N, idx.shape[-1]))
  elif idx.ndim == 3 and idx.shape[1] == K:
    idx = jnp.broadcast_to(jnp.repeat(idx, N // K, axis=1)[:, None], (B, T, N, idx.shape[-1]))
  else:
    raise ValueError(f"indices must be [B, k] or [B, K={K}, k], got shape {idx.shape}.")
  q_pos = jnp.asarray(lengths, jnp.int32)[:, None] - T + jnp.arange(T)[None, :]
  valid = idx <= q_pos[:, :, None, None]
  return gather_attention(query, k_cache, v_cache, idx, valid=valid, scale=scale)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SelectionCache:
  """TokenSelect's selection cache: last fingerprint [B, N, H] and indices [B, k]."""
  fingerprint: jax.Array
  indices: jax.Array

  def select(self, query, k_cache, *, threshold: float = 0.9, **kwargs):
    """(indices, new_cache, hit [B]): reuse cached indices where cosine >= threshold."""
    fp = jnp.mean(query.astype(jnp.float32), axis=1)
    a = fp.reshape(fp.shape[0], -1)
    b = self.fingerprint.reshape(a.shape)
    cos = jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)
    hit = cos >= threshold
    fresh = tokenselect_indices(query, k_cache, **kwargs)
    idx = jnp.where(hit[:, None], self.indices, fresh)
    new_fp = jnp.where(hit[:, None, None], self.fingerprint, fp)
    return idx, SelectionCache(new_fp, idx), hit


def topk_positions(query, k_cache, *, k: int, lengths=None):
  """TidalDecode's selection: top-k cache positions per KV head, int32 [B, K, k] (sorted).

  query [B, N, H] (the decoding token); the group's score of a position is the
  sum over the group's query heads of their logits [verify: the released code
  reduces GQA groups this way or by max]. With ``lengths`` [B], positions at
  or past a sequence's length are never chosen while valid ones remain.
  """
  L, K = k_cache.shape[1], k_cache.shape[2]
  if not 0 < k <= L:
    raise ValueError(f"k must be in [1, L={L}], got {k}.")
  logits = _group_logits(query, k_cache)  # [B, N, L]
  if lengths is not None:
    valid = jnp.arange(L)[None, None, :] < jnp.asarray(lengths)[:, None, None]
    logits = jnp.where(valid, logits, -jnp.inf)
  B, N, _ = logits.shape
  grp = jnp.sum(logits.reshape(B, K, N // K, L), axis=2)
  _, top = jax.lax.top_k(grp, k)
  return jnp.sort(top, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TidalSchedule:
  """Which layers run full attention, select positions, or reuse them.

  Default: layers 0-1 full, layer 2 selects, layer 13 re-selects (the
  paper's Llama-3-8B setting; a per-model hyper-parameter).
  """
  full_layers: Sequence[int] = (0, 1)
  select_layers: Sequence[int] = (2, 13)

  def role(self, layer: int) -> str:
    if layer in self.full_layers:
      return "full"
    if layer in self.select_layers:
      return "select"
    if layer < min(self.select_layers, default=0):
      return "full"
    return "sparse"


def tidal_decode_step(query, k_cache, v_cache, lengths, *, role: str, indices=None, k: int = 128,
                      scale=None):
  """One layer's decode attention under TidalDecode: returns (out [B, 1, N, Hv], indices).

  ``role`` from :class:`TidalSchedule`: "full" (dense), "select" (dense plus
  fresh top-k positions), "sparse" (attend to the given ``indices`` [B, K, k]).
  """
  if role in ("full", "select"):
    out = decode_attention(query, k_cache, v_cache, lengths, scale=scale)
    if role == "select":
      indices = topk_positions(query[:, -1], k_cache, k=k, lengths=lengths)
    return out, indices
  if role != "sparse":
    raise ValueError(f"role must be 'full', 'select' or 'sparse', got {role!r}.")
  if indices is None:
    raise ValueError("role='sparse' needs the indices of the last selection layer.")
  return sparse_decode_attention(query, k_cache, v_cache, indices, lengths, scale=scale), indices
