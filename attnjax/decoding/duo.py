"""DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads
(arXiv:2410.10819).

Each KV head is either a *retrieval* head (full causal attention, full KV
cache) or a *streaming* head (the Lambda mask: ``sink`` first tokens plus the
``recent`` latest; a constant-size cache). During identification every head
mixes both, ``o = alpha * full + (1 - alpha) * stream``, and only the gates
``alpha`` are trained (an L2 distillation loss plus ``0.05 * L1(alpha)``).
Defaults: sink 64 and recent 256 at deployment (128 + 256 during gate
training), gate threshold 0.5.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from attnjax import masks
from attnjax.api import attention
from attnjax.core.merge import merge_attention


def duo_mask(retrieval_heads: Sequence[bool], num_heads: int, *, sink: int = 64,
             recent: int = 256) -> masks.Mask:
  """PerHead mask over the N query heads: Causal for retrieval KV heads, SinkWindow otherwise."""
  K = len(retrieval_heads)
  if K < 1 or num_heads % K:
    raise ValueError(f"num_heads={num_heads} must be a multiple of len(retrieval_heads)={K}.")
  g = num_heads // K
  stream = masks.SinkWindow(sink, recent)
  return masks.PerHead(tuple(masks.Causal() if bool(retrieval_heads[h // g]) else stream
                             for h in range(num_heads)))


def duo_attention(query, key, value, *, retrieval_heads: Sequence[bool], sink: int = 64,
                  recent: int = 256, scale=None, return_lse=False, implementation=None):
  """Prefill with retrieval heads at full attention and streaming heads on the Lambda mask.

  query [B, T, N, H], key/value [B, S, K, H]; ``retrieval_heads`` a static
  sequence of K booleans.
  """
  if len(retrieval_heads) != key.shape[2]:
    raise ValueError(f"retrieval_heads has {len(retrieval_heads)} entries, key has K={key.shape[2]}.")
  m = duo_mask(tuple(bool(r) for r in retrieval_heads), query.shape[2], sink=sink, recent=recent)
  return attention(query, key, value, mask=m, scale=scale, return_lse=return_lse,
                   implementation=implementation)


def mix_heads(full, stream, alpha):
  """o = alpha * full + (1 - alpha) * stream; full/stream [B, T, N, H], alpha [K] (per KV head)."""
  N = full.shape[2]
  a = jnp.asarray(alpha, full.dtype)
  if a.ndim != 1 or N % a.shape[0]:
    raise ValueError(f"alpha must be [K] with N={N} a multiple of K, got shape {a.shape}.")
  a = jnp.repeat(a, N // a.shape[0])[None, None, :, None]
  return a * full + (1 - a) * stream


def duo_gate_loss(alpha, reference_out, mixed_out, *, reg: float = 0.05):
  """Distillation loss of the gates: mean squared error + reg * mean |alpha|."""
  return jnp.mean((reference_out - mixed_out) ** 2) + reg * jnp.mean(jnp.abs(alpha))


def select_retrieval_heads(alpha, *, threshold: float = 0.5, streaming_fraction=None):
  """Bool [K] retrieval heads: alpha >= threshold, or the top (1 - streaming_fraction) by alpha."""
  alpha = jnp.asarray(alpha)
  if streaming_fraction is None:
    return alpha >= threshold
  if not 0.0 <= streaming_fraction <= 1.0:
    raise ValueError(f"streaming_fraction must be in [0, 1], got {streaming_fraction}.")
  n_keep = alpha.shape[0] - int(round(streaming_fraction * alpha.shape[0]))
  order = jnp.argsort(-alpha, stable=True)
  return jnp.zeros(alpha.shape, bool).at[order[:n_keep]].set(True)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SinkRecentKVCache:
  """Constant-size cache of a streaming head: ``sink`` first tokens and a ring of ``recent``.

  k_sink/v_sink [B, sink, K, H], k_ring/v_ring [B, recent, K, H], length: the
  number of tokens appended so far (int32 scalar).
  """
  k_sink: jax.Array
  v_sink: jax.Array
  k_ring: jax.Array
  v_ring: jax.Array
  length: jax.Array

  @classmethod
  def create(cls, batch: int, kv_heads: int, head_dim: int, *, sink: int = 64, recent: int = 256,
             dtype=jnp.float32, value_dim=None):
    if sink < 0 or recent < 1:
      raise ValueError(f"sink must be >= 0 and recent >= 1, got {sink}, {recent}.")
    hv = head_dim if value_dim is None else value_dim
    z = lambda n, h: jnp.zeros((batch, n, kv_heads, h), dtype)
    return cls(z(sink, head_dim), z(sink, hv), z(recent, head_dim), z(recent, hv),
               jnp.zeros((), jnp.int32))

  @property
  def nbytes(self) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in (self.k_sink, self.v_sink, self.k_ring, self.v_ring))

  def append(self, k_t, v_t) -> "SinkRecentKVCache":
    """Adds one token, k_t [B, K, H], v_t [B, K, Hv]."""
    sink, recent = self.k_sink.shape[1], self.k_ring.shape[1]
    n = self.length
    in_sink = n < sink
    si = jnp.minimum(n, max(sink - 1, 0))
    ri = jnp.mod(n - sink, recent)
    k_sink = jnp.where(in_sink, self.k_sink.at[:, si].set(k_t), self.k_sink) if sink else self.k_sink
    v_sink = jnp.where(in_sink, self.v_sink.at[:, si].set(v_t), self.v_sink) if sink else self.v_sink
    k_ring = jnp.where(in_sink, self.k_ring, self.k_ring.at[:, ri].set(k_t))
    v_ring = jnp.where(in_sink, self.v_ring, self.v_ring.at[:, ri].set(v_t))
    return SinkRecentKVCache(k_sink, v_sink, k_ring, v_ring, n + 1)

  def attend(self, q_t, *, scale=None):
    """Attention of the newest token's query q_t [B, N, H] over the cache -> [B, N, Hv].

    Equals one row of :func:`duo_attention`'s streaming heads (``SinkWindow``).
    """
    sink, recent = self.k_sink.shape[1], self.k_ring.shape[1]
    n = self.length
    q = q_t[:, None]
    slot = jnp.arange(recent)
    ring_pos = sink + slot + recent * jnp.floor_divide(n - 1 - sink - slot, recent)
    ring_valid = (n > sink) & (ring_pos >= sink) & (ring_pos <= n - 1) & (ring_pos > n - 1 - recent)
    o2, l2 = attention(q, self.k_ring, self.v_ring, mask=ring_valid[None, None, None, :],
                       scale=scale, return_lse=True)
    if sink == 0:
      return o2[:, 0]
    sink_valid = jnp.arange(sink) < n
    o1, l1 = attention(q, self.k_sink, self.v_sink, mask=sink_valid[None, None, None, :],
                       scale=scale, return_lse=True)
    return merge_attention(o1, l1, o2, l2)[0][:, 0]
