"""H2O, TokenSelect and LongHeads as attention families for ``experiments.pretrained_eval``.

Per-query masks over the full causal attention (H2O, TokenSelect) and a
wrapper that undoes RoPE for LongHeads; see each docstring for how they
differ from the papers' decode-time algorithms.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def positions_of(q_positions, k_positions, B, T, S):
  """[B, T] query and [B, S] key positions (default bottom-right aligned)."""
  qp = jnp.arange(T) + S - T if q_positions is None else jnp.asarray(q_positions)
  kp = jnp.arange(S) if k_positions is None else jnp.asarray(k_positions)
  return jnp.broadcast_to(qp, (B, T)), jnp.broadcast_to(kp, (B, S))


def _causal_probs(q, k, q_positions=None, k_positions=None):
  """q [B,T,N,H], k [B,S,K,H] (GQA) -> (float32 causal softmax [B,N,T,S], visible [B,1,T,S])."""
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  kk = jnp.repeat(k, N // K, axis=2)
  s = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), kk.astype(jnp.float32)) * H ** -0.5
  qp, kp = positions_of(q_positions, k_positions, B, T, S)
  causal = (kp[:, None, :] <= qp[:, :, None])[:, None]
  s = jnp.where(causal, s, -jnp.inf)
  return jax.nn.softmax(s, axis=-1), causal


def _masked_attention(q, k, v, keep):
  """Softmax attention restricted to keep [B, N or 1, T, S] -> [B, T, N, Hv]."""
  N, K, H = q.shape[2], k.shape[2], q.shape[3]
  kk = jnp.repeat(k, N // K, axis=2).astype(jnp.float32)
  vv = jnp.repeat(v, N // K, axis=2).astype(jnp.float32)
  s = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), kk) * H ** -0.5
  p = jax.nn.softmax(jnp.where(keep, s, -jnp.inf), axis=-1)
  return jnp.einsum("bnts,bsnh->btnh", p, vv).astype(q.dtype)


def _topk_keep(scores, allowed, k):
  """bool [..., S]: the k best ``scores`` among ``allowed`` (ties broken by top_k)."""
  k = min(k, scores.shape[-1])
  if k <= 0:
    return jnp.zeros(scores.shape, bool)
  s = jnp.where(allowed, scores, -jnp.inf)
  idx = jax.lax.top_k(s, k)[1]
  hit = jnp.zeros(scores.shape, bool)
  hit = jnp.put_along_axis(hit, idx, True, axis=-1, inplace=False)
  return hit & allowed


def h2o_family(query, key, value, *, causal, q_positions=None, k_positions=None,
               segment_ids=None, heavy: int = 128, recent: int = 128):
  """H2O (arXiv:2306.14048) as a per-query mask: each KV head keeps the ``recent`` latest
  keys plus the ``heavy`` earlier keys with the largest attention accumulated so far.

  The accumulated score of key j at query i is the dense attention it received
  from queries 0..i, summed over the KV head's query group
  (``attnjax.decoding.h2o_accumulate``'s quantity). The paper accumulates the
  scores of the already-evicted cache (greedy, recursive); this reads the
  dense scores instead, so it is the oracle-accumulation variant, an upper
  bound on H2O's own eviction at the same budget.
  """
  del q_positions, k_positions, segment_ids
  assert causal
  B, T, N, _ = query.shape
  K = key.shape[2]
  probs, allowed = _causal_probs(query, key)                      # [B,N,T,S]
  allowed = allowed[0, 0]
  acc = jnp.cumsum(probs.reshape(B, K, N // K, T, -1).sum(2), axis=2)   # [B,K,T,S]
  S = key.shape[1]
  i = jnp.arange(T)[:, None] + (S - T)
  j = jnp.arange(S)[None, :]
  rec = allowed & (i - j < recent)
  keep = _topk_keep(acc, allowed & ~rec, heavy) | rec             # [B,K,T,S]
  keep = jnp.repeat(keep, N // K, axis=1)
  return _masked_attention(query, key, value, keep)


def tokenselect_family(query, key, value, *, causal, q_positions=None, k_positions=None,
                       segment_ids=None, n_init: int = 16, n_local: int = 64, top_k: int = 176):
  """TokenSelect (arXiv:2411.02886) per query token: ``n_init`` first keys, ``n_local`` latest,
  and the ``top_k`` others with the largest soft vote (the sum over all query
  heads of each head's softmax over the candidates); one selection shared by
  all heads. The paper selects per chunk of queries during decoding and
  reuses selections across similar queries; here every query selects.
  Causal by positions, so it also decodes over a partly filled KV cache
  (``supports_kv_cache``): one selection per decoded token, over the whole cache.
  """
  del segment_ids
  if not causal:
    raise NotImplementedError("tokenselect_family is causal.")
  B, T, S = query.shape[0], query.shape[1], key.shape[1]
  probs, allowed = _causal_probs(query, key, q_positions, k_positions)
  allowed = allowed[:, 0]                                         # [B,T,S]
  vote = probs.sum(1)                                             # [B,T,S]
  qp, kp = positions_of(q_positions, k_positions, B, T, S)
  fixed = allowed & ((kp[:, None, :] < n_init) | (qp[:, :, None] - kp[:, None, :] < n_local))
  keep = (_topk_keep(vote, allowed & ~fixed, top_k) | fixed)[:, None]
  return _masked_attention(query, key, value, keep)


tokenselect_family.supports_kv_cache = True


def h2o_step_family(query, key, value, *, causal, q_positions=None, k_positions=None,
                    segment_ids=None, cache=None, heavy: int = 128, recent: int = 128):
  """One H2O decoding step over its own cache (``attnjax.decoding.h2o_decode_step``).

  query [B, 1, N, H], key/value [B, 1, K, H] of the new token at ``q_positions``
  [B, 1]; ``cache`` an ``attnjax.decoding.H2OCache``. Returns the attention
  output only: the caller runs the same step on the captured q/k/v for the
  updated cache (``experiments.pretrained_decode.h2o_decoder``).
  """
  from attnjax.decoding import h2o_decode_step
  del k_positions, segment_ids
  if not causal or cache is None or q_positions is None:
    raise ValueError("h2o_step_family needs causal=True, a cache and the token's q_positions.")
  pos = jnp.broadcast_to(jnp.asarray(q_positions), (query.shape[0], 1))[:, 0]
  return h2o_decode_step(query, key, value, cache, pos, heavy=heavy, recent=recent)[0]


def longheads_family(query, key, value, *, causal, q_positions=None, k_positions=None,
                     segment_ids=None, rope_base: float = 100000.0, **kw):
  """LongHeads on the decoder's already-rotated q/k: RoPE is undone (rotation by -position),
  since ``longheads_attention`` applies RoPE itself with its own chunk positions."""
  from attnjax.dynamic.longheads import longheads_attention
  from attnjax.layers.rope import apply_rope
  del q_positions, k_positions, segment_ids
  assert causal
  pos = -jnp.arange(query.shape[1])
  q = apply_rope(query, pos, rope_base)
  k = apply_rope(key, pos, rope_base)
  return longheads_attention(q, k, value, rope_base=rope_base, **kw)


def longheads_step_family(query, key, value, *, causal, q_positions=None, k_positions=None,
                          segment_ids=None, state=None, position=None, chunk_size: int = 64,
                          attn_len: int = 256, rope_base: float = 100000.0):
  """One LongHeads decoding step (``attnjax.dynamic.longheads_decode_step``) on un-rotated
  query [B, 1, N, H], key/value [B, 1, K, H] at ``position`` [B]; ``state`` as
  ``experiments.pretrained_decode.longheads_write``'s. Returns the output only."""
  from attnjax.dynamic import longheads_decode_step
  from experiments.pretrained_decode import write_token
  del q_positions, k_positions, segment_ids
  if not causal or state is None or position is None:
    raise ValueError("longheads_step_family needs causal=True, a state and the position.")
  kc, vc = write_token(state[0], state[1], key, value, position)
  reps = state[2]            # the token's own chunk is forced: its key is not read
  return longheads_decode_step(query, kc, vc, reps, position, chunk_size=chunk_size,
                               attn_len=attn_len, rope_base=rope_base)


def register_local_families():
  from attnjax.layers import registry
  for name, fn in (("eval_h2o", h2o_family), ("eval_tokenselect", tokenselect_family),
                   ("eval_longheads", longheads_family), ("eval_h2o_step", h2o_step_family),
                   ("eval_longheads_step", longheads_step_family)):
    if name not in registry.list_families():
      registry.register_family(name, fn)


def method_specs(budget: int, context: int, num_layers: int):
  """(name, family, options, kv_keys_kept at ``context``, note) for every method."""
  b = budget
  s2_block = max(16, b // 8)
  s2_local = 4                                  # 4 local blocks = b/2 keys; the rest strided
  stride = max(1, context // (b - s2_local * s2_block)) if b > s2_local * s2_block else context
  return [
      ("dense", "dense", {}, context, "full causal attention"),
      (f"sliding_window({b})", "sliding_window", {"window": b}, b, "latest keys only"),
      (f"streaming(4+{b - 4})", "streaming", {"num_sink": 4, "window": b - 4}, b,
       "StreamingLLM: 4 sink tokens + recent window"),
      (f"s2(block={s2_block},local={s2_local},stride={stride})", "s2",
       {"block_size": s2_block, "local_blocks": s2_local, "vert_stride": stride}, context,
       f"S2 heterogeneous heads, no training; {s2_local * s2_block} local keys + 1 block in "
       f"{stride} (about {s2_local * s2_block + context // stride} keys at the last query); "
       "the union over heads covers every key, so the whole cache is kept"),
      (f"hip(top_k={b})", "hip", {"top_k": b, "block_size_q": 1, "block_stride_q": 1}, context,
       "HiP hierarchical top-k key blocks (of 2 keys), one selection per query "
       "(block_size_q=1: strictly causal); selects from the whole cache"),
      (f"longheads(chunk={b // 4},attn_len={b})", "eval_longheads",
       {"chunk_size": b // 4, "attn_len": b, "rope_base": 100000.0, "query_block": 1}, context,
       "LongHeads chunk selection per head and per query (query_block=1: strictly causal; "
       "RoPE undone in a wrapper); selects from the whole cache"),
      (f"h2o({b // 2}+{b // 2})", "eval_h2o", {"heavy": b // 2, "recent": b // 2}, b,
       "heavy hitters from dense accumulated attention (oracle accumulation) + recent"),
      (f"tokenselect(16+64+{b - 80})", "eval_tokenselect",
       {"n_init": 16, "n_local": 64, "top_k": b - 80}, context,
       "per-query soft-vote top-k + init + local; selects from the whole cache"),
  ]
