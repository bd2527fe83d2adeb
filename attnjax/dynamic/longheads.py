"""LongHeads: per-head chunk selection with RoPE re-applied on the selected chunks (Lu et al., 2024; arXiv:2402.10685).

"LongHeads: Multi-Head Attention is Secretly a Long Context Processor".

Training-free context extension. Keys are cut into chunks of ``chunk_size``
tokens. Chunk representation (per head): non-causal attention inside the
chunk with chunk-local RoPE positions, mean of its outputs ``c``, then the
attention-pooled key ``r = sum_j softmax_j(c . k_j) k_j`` (as the released
code: local-RoPE keys). A query scores earlier chunks by ``q . r`` with the
un-rotated q, always keeps chunk 0 and its own and previous chunk, fills up
to ``attn_len / chunk_size`` chunks with the best, and attends causally over
their tokens with RoPE re-applied at contiguous positions ``0 .. m*w-1``
(query at ``(its slot) * w + offset``). Sequences up to
``begin_selective_length`` use plain causal RoPE attention.

Selection granularity: the paper selects per query token; here the queries
of one block of ``query_block`` tokens share a selection (scored with their
mean query). ``query_block=1`` is the paper's per-token choice (memory
O(T * attn_len * H) per head); the default ``query_block = chunk_size`` costs
O(T * attn_len * H / chunk_size) for the gathered keys.

Causality: with ``query_block > 1`` a query's chunks are scored with the
mean of its block's queries, later ones included, so in causal
self-attention an output depends on later tokens through the choice of
chunks (never through their keys or values):
``attnjax.analysis.causality.check_causal_cross`` fails. Scores that must
not see the future (a language model's perplexity, teacher-forced
accuracy) need ``query_block=1``; :func:`longheads_decode_step` decodes one
token at a time with the same per-token choice.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import validation as V
from attnjax.dynamic.gather import masked_softmax_attend
from attnjax.dynamic.select import topk_blocks
from attnjax.layers.rope import apply_rope
from attnjax import api
from attnjax.masks import Causal

__all__ = ["longheads_attention", "longheads_decode_step", "chunk_representations"]


def _rope_bnlh(x, positions, base):
  """RoPE on [B, N, ..., L, H] with positions broadcastable to x.shape[:-1]."""
  shape = x.shape
  pos = jnp.broadcast_to(positions, shape[:-1]).reshape(shape[0], -1)
  return apply_rope(x.reshape(shape[0], -1, 1, shape[-1]), pos, base).reshape(shape)


def chunk_representations(key, value, query, *, chunk_size: int = 256, rope_base: float = 10000.0,
                          scale=None):
  """Chunk keys r [B, N, S/chunk, H] from un-rotated query [B, S, N, H], key [B, S, K, H], value [B, S, K, H]."""
  B, S, N, H = query.shape
  K = key.shape[2]
  if value.shape[-1] != H:
    raise ValueError(f"LongHeads chunk representations need Hv == H (the mean chunk output "
                     f"queries the keys); got value {value.shape}, query {query.shape}.")
  scale = V.check_scale(scale, H)
  w = chunk_size
  nc = S // w
  hi = jnp.arange(N) // (N // K)
  tr = lambda x: jnp.transpose(x, (0, 2, 1, 3)).reshape(B, x.shape[2], nc, w, x.shape[-1])
  local = jnp.arange(w)
  ql = _rope_bnlh(tr(query).astype(jnp.float32), local, rope_base)
  kl = _rope_bnlh(tr(key).astype(jnp.float32), local, rope_base)[:, hi]
  vl = tr(value)[:, hi]
  every = jnp.ones((1, 1, 1, 1, 1), bool)
  o, _ = masked_softmax_attend(ql, kl, vl, every, scale)  # [B, N, nc, w, H]
  c = o.mean(-2, keepdims=True)
  r, _ = masked_softmax_attend(c, kl, kl, every, scale)
  return r[..., 0, :]


def longheads_attention(query, key, value, *, chunk_size: int = 256, attn_len: int = 4096,
                        begin_selective_length: Optional[int] = None, query_block: Optional[int] = None,
                        rope_base: float = 10000.0, scale=None, return_chunks: bool = False):
  """LongHeads attention (causal self-attention; q and k are *un-rotated*).

  Args:
    query: [B, T, N, H]; key: [B, T, K, H]; value: [B, T, K, H] (Hv == H).
    chunk_size: w (256). attn_len: tokens attended per query (4096), a
      multiple of w: m = attn_len / w chunks (>= 3).
    begin_selective_length: lengths up to this use plain causal RoPE
      attention (default attn_len).
    query_block: queries sharing one selection (default chunk_size; 1 = per token).
    rope_base: RoPE base applied inside.

  A length that ``chunk_size`` does not divide (a prompt of any length) is
  padded at the end with zeros: the padded keys come after every real query,
  so causality hides them, and zero queries scale a block's mean query
  without changing its ranking of chunks. The chunk lists then cover the
  padded blocks.

  Returns:
    out [B, T, N, H] (and chunk lists (indices [B, N, T'/query_block, m], counts),
    T' = T rounded up to a multiple of chunk_size).
  """
  d = V.check_qkv(query, key, value)
  if d.T != d.S:
    raise NotImplementedError(f"longheads_attention is defined for causal self-attention only "
                              f"(its pattern has no cross-attention form): T={d.T} != S={d.S}.")
  scale = V.check_scale(scale, d.H)
  w = V.check_positive_int("chunk_size", chunk_size)
  V.check_positive_int("attn_len", attn_len)
  if attn_len % w or attn_len // w < 3:
    raise ValueError(f"attn_len={attn_len} must be a multiple of chunk_size={w} holding at "
                     "least 3 chunks (the first, the previous and the own chunk).")
  begin = attn_len if begin_selective_length is None else begin_selective_length
  if d.S <= begin:
    pos = jnp.arange(d.T)
    out = api.attention(apply_rope(query, pos, rope_base), apply_rope(key, pos, rope_base),
                        value, mask=Causal(), scale=scale)
    return (out, None) if return_chunks else out
  qb = w if query_block is None else V.check_positive_int("query_block", query_block)
  pad = -d.S % w
  if pad:        # zeros after the last token: causality hides them from every real query
    if w % qb:
      raise ValueError(f"query_block={qb} must divide chunk_size={w} when chunk_size does not "
                       f"divide the length T={d.T}.")
    grow = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
    res = longheads_attention(grow(query), grow(key), grow(value), chunk_size=w,
                              attn_len=attn_len, begin_selective_length=begin,
                              query_block=qb, rope_base=rope_base, scale=scale,
                              return_chunks=return_chunks)
    return (res[0][:, :d.T], res[1]) if return_chunks else res[:, :d.T]
  if d.T % qb:
    raise ValueError(f"query_block={qb} must divide T={d.T}.")
  nq = d.T // qb
  r = chunk_representations(key, value, query, chunk_size=w, rope_base=rope_base, scale=scale)
  qt = jnp.transpose(query.astype(jnp.float32), (0, 2, 1, 3)).reshape(d.B, d.N, nq, qb, d.H)
  t = jnp.broadcast_to(jnp.arange(d.T).reshape(nq, qb), (d.B, nq, qb))
  o, idx, cnt = _select_and_attend(qt, r, key, value, t, w=w, m=attn_len // w, scale=scale,
                                   rope_base=rope_base)
  out = jnp.transpose(o.reshape(d.B, d.N, d.T, d.Hv), (0, 2, 1, 3)).astype(query.dtype)
  return (out, (idx, cnt)) if return_chunks else out


def _select_and_attend(qt, r, key, value, t, *, w: int, m: int, scale, rope_base):
  """LongHeads' chunk choice and attention for query blocks.

  qt: un-rotated queries [B, N, nq, qb, H] at positions t int [B, nq, qb]
  (a block shares one selection, scored with its mean query, and its own
  chunk is that of its last query); r: chunk keys [B, N, S / w, H]; key,
  value: un-rotated [B, S, K, H], S % w == 0. Returns (out float32
  [B, N, nq, qb, Hv], chunk indices [B, N, nq, m'], counts [B, N, nq]).
  """
  B, N, nq, qb, H = qt.shape
  S, K, Hv = key.shape[1], key.shape[2], value.shape[-1]
  nc = S // w
  m = min(m, nc)
  scores = jnp.einsum("bnqh,bnch->bnqc", qt.mean(-2), r)
  own = (t[..., -1] // w)[:, None, :, None]                        # [B, 1, nq, 1]
  c = jnp.arange(nc)
  valid = c <= own
  force = valid & ((c == 0) | (c == own) | (c == own - 1))
  idx, cnt = topk_blocks(jax.lax.stop_gradient(scores), m, valid=valid, force=force)
  # Gather chunks (un-rotated keys), re-rotate at slot positions.
  hi = jnp.arange(N) // (N // K)
  kc = jnp.transpose(key.reshape(B, nc, w, K, H), (0, 3, 1, 2, 4))[:, hi]
  vc = jnp.transpose(value.reshape(B, nc, w, K, Hv), (0, 3, 1, 2, 4))[:, hi]
  bi, ni = jnp.arange(B)[:, None, None, None], jnp.arange(N)[None, :, None, None]
  ks = kc[bi, ni, idx].reshape(B, N, nq, m * w, H).astype(jnp.float32)
  vs = vc[bi, ni, idx].reshape(B, N, nq, m * w, Hv)
  ks = _rope_bnlh(ks, jnp.arange(m * w), rope_base)
  # Query slot position: its own chunk's slot (the last valid one) * w + offset in chunk.
  tok_chunk = (t // w)[:, None]                                    # [B, 1, nq, qb]
  listed = jnp.arange(m) < cnt[..., None]                          # [B, N, nq, m]
  own_slot = jnp.sum((idx[..., None, :] < tok_chunk[..., None]) & listed[..., None, :], -1)
  qs = _rope_bnlh(qt, own_slot * w + (t % w)[:, None], rope_base)
  slot_ok = jnp.repeat(listed, w, axis=-1)                         # [B, N, nq, m*w]
  key_tok = (idx[..., None] * w + jnp.arange(w)).reshape(B, N, nq, m * w)
  valid_tok = slot_ok[..., None, :] & (key_tok[..., None, :] <= t[:, None, :, :, None])
  o, _ = masked_softmax_attend(qs, ks, vs, valid_tok, scale)
  return o, idx, cnt


def longheads_decode_step(query, key, value, chunk_reps, position, *, chunk_size: int = 256,
                          attn_len: int = 4096, begin_selective_length: Optional[int] = None,
                          rope_base: float = 10000.0, scale=None):
  """One decoded token of LongHeads over an un-rotated KV cache: out [B, 1, N, Hv].

  Args:
    query: [B, 1, N, H], the token's un-rotated query, at ``position`` int [B].
    key, value: [B, L, K, H] un-rotated caches holding tokens 0 .. position
      (the token's own key/value written; later entries are never read);
      L % chunk_size == 0.
    chunk_reps: [B, N, L / chunk_size, H], :func:`chunk_representations` of
      the complete chunks; the entries of the token's chunk, the previous one
      and later ones are not read (those chunks are forced or invisible).
    begin_selective_length: while ``position`` is below it, plain causal RoPE
      attention over the cache (default attn_len; then the chunk choice takes
      every visible chunk, which is the same attention).

  Equals row ``position`` of ``longheads_attention(..., query_block=1)`` on
  the sequence so far whenever that sequence is longer than
  ``begin_selective_length`` or ``begin_selective_length <= attn_len``.
  """
  B, T, N, H = query.shape
  L, K = key.shape[1], key.shape[2]
  w = V.check_positive_int("chunk_size", chunk_size)
  if T != 1 or key.shape[0] != B or value.shape[:3] != key.shape[:3] or N % K:
    raise ValueError(f"longheads_decode_step takes one token: query [B, 1, N, H], key/value "
                     f"[B, L, K, H]; got {query.shape}, {key.shape}, {value.shape}.")
  if L % w or chunk_reps.shape != (B, N, L // w, H):
    raise ValueError(f"chunk_size={w} must divide the cache length L={L} and chunk_reps be "
                     f"[B, N, L / chunk_size, H]=({B}, {N}, {L // w}, {H}); got "
                     f"{chunk_reps.shape}.")
  if attn_len % w or attn_len // w < 3:
    raise ValueError(f"attn_len={attn_len} must be a multiple of chunk_size={w} holding at "
                     "least 3 chunks.")
  scale = V.check_scale(scale, H)
  pos = jnp.broadcast_to(jnp.asarray(position, jnp.int32), (B,))
  qt = jnp.transpose(query.astype(jnp.float32), (0, 2, 1, 3))[:, :, :, None]   # [B, N, 1, 1, H]
  o, _, _ = _select_and_attend(qt, chunk_reps.astype(jnp.float32), key, value,
                               pos[:, None, None], w=w, m=attn_len // w, scale=scale,
                               rope_base=rope_base)
  out = jnp.transpose(o[:, :, :, 0], (0, 2, 1, 3))                 # [B, 1, N, Hv]
  begin = attn_len if begin_selective_length is None else begin_selective_length
  if begin > attn_len:
    kpos = jnp.arange(L, dtype=jnp.int32)
    plain = api.attention(apply_rope(query, pos[:, None], rope_base),
                          apply_rope(key, kpos, rope_base), value, mask=Causal(), scale=scale,
                          q_positions=pos[:, None], k_positions=kpos)
    out = jnp.where((pos < begin)[:, None, None, None], plain.astype(jnp.float32), out)
  return out.astype(query.dtype)
