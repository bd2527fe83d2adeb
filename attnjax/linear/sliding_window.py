"""Exact softmax attention in a short sliding window as a banded chunked computation (BASED P2-09, papers_2).

Queries are cut into blocks of `block` rows; each block attends only to the
key blocks its window can reach, gathered as a band, so the cost is
T * (window + block) rather than T * S. Causality and the window are by
positions, bottom-right aligned: query i (position i + S - T) sees key j iff
-left <= j - (i + S - T) <= right.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp

from attnjax.core.validation import check_qkv, check_scale


def _window(window, causal) -> Tuple[int, int]:
  if isinstance(window, (tuple, list)):
    if len(window) != 2:
      raise ValueError(f"window must be an int or a pair (left, right), got {window!r}.")
    left, right = window
  else:
    left, right = window, (0 if causal else window)
  for name, w in (("left window", left), ("right window", right)):
    if isinstance(w, bool) or not isinstance(w, int) or w < 0:
      raise ValueError(f"{name} must be an integer >= 0, got {w!r} (window={window!r}).")
  if causal and right != 0:
    raise ValueError(f"causal=True needs a right window of 0, got window={window!r}.")
  return left, right


def sliding_window_attention(query, key, value, *, window: Union[int, Tuple[int, int]] = (64, 0),
                             causal: bool = True, scale: Optional[float] = None,
                             block: int = 64):
  """Banded exact softmax attention.

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv].
    window: (left, right) keys per side of the query's position (an int w
      means (w, 0) when causal, (w, w) otherwise). (W - 1, 0) gives W keys.
    causal: requires right == 0 (kept as a flag for the family contract).
    block: query block length of the banded computation.
  Returns:
    [B, T, N, Hv] in query.dtype; rows without a visible key are zeros.
  """
  d = check_qkv(query, key, value)
  left, right = _window(window, causal)
  if isinstance(block, bool) or not isinstance(block, int) or block < 1:
    raise ValueError(f"block must be an integer >= 1, got {block!r}.")
  scale = check_scale(scale, d.H)
  g = d.N // d.K
  nq = -(-d.T // block)
  offset = d.S - d.T
  # Key index range needed by query block i: [i*block + offset - left, (i+1)*block - 1 + offset + right].
  span = block + left + right
  lo_pad = left + max(-offset, 0)
  first = jnp.arange(nq) * block + offset - left + lo_pad  # start in padded-key coordinates
  hi_pad = max(nq * block + offset + right - d.S, 0) + 1
  kp = jnp.pad(key.astype(jnp.float32), ((0, 0), (lo_pad, hi_pad), (0, 0), (0, 0)))
  vp = jnp.pad(value.astype(jnp.float32), ((0, 0), (lo_pad, hi_pad), (0, 0), (0, 0)))
  idx = first[:, None] + jnp.arange(span)[None, :]  # [nq, span]
  kb, vb = kp[:, idx], vp[:, idx]  # [B, nq, span, K, H]
  q = jnp.pad(query.astype(jnp.float32), ((0, 0), (0, nq * block - d.T), (0, 0), (0, 0)))
  q = q.reshape(d.B, nq, block, d.K, g, d.H)
  logits = jnp.einsum("bircgh,bisch->bicgrs", q, kb) * scale
  q_pos = (jnp.arange(nq)[:, None] * block + jnp.arange(block)[None, :]) + offset  # [nq, block]
  k_pos = idx - lo_pad  # [nq, span]
  rel = k_pos[:, None, :] - q_pos[:, :, None]  # [nq, block, span]
  ok = (rel >= -left) & (rel <= right) & (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] < d.S)
  ok = ok[None, :, None, None]  # [1, nq, 1, 1, block, span]
  logits = jnp.where(ok, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(ok, jnp.exp(logits - m), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("bicgrs,bisce->bircge", p, vb)
  out = out.reshape(d.B, nq * block, d.N, d.Hv)[:, :d.T]
  return out.astype(query.dtype)
