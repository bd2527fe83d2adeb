"""RazorAttention, DuoAttention and TidalDecode inside ``attnjax.models.LlamaDecoder``.

Teacher-forcing forms of three decode-time methods: every query position
gets the keys it would attend to if the sequence were decoded token by
token with the method's cache.

- RazorAttention (arXiv:2407.15891), :func:`razor_family`: per layer and KV
  head, a protected (retrieval) head attends to the whole causal prefix; any
  other head to ``num_sink`` first keys, the ``window`` latest (the query
  included) and one compensation token: the mean key and mean value of the
  keys it dropped, its logit raised by ``log |D|``.
- DuoAttention (arXiv:2410.10819), :func:`duo_family`: retrieval KV heads
  full, streaming heads on the Lambda mask (``sink`` + ``recent``); the
  gates are fitted by ``attnjax.decoding.fit_duo_gates`` on
  :func:`duo_hidden_states` (each layer gets its row of gates).
- TidalDecode (arXiv:2410.05076), :func:`tidal_forward`: full layers,
  selection layers (full attention, plus each query's top-k positions per KV
  group from the group's summed logits: :func:`tidal_select`, the teacher-
  forcing form of ``attnjax.decoding.topk_positions``) and sparse layers that
  attend only to the last selection (:func:`tidal_sparse_family`).

The selection and the gates are arrays computed inside the traced function
and handed to the next layers through an explicit loop over the decoder's
blocks (:func:`run_blocks`), not through any module-level state.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks
from attnjax.api import attention
from attnjax.core.merge import merge_attention
from attnjax.decoding import duo_mask, duo_mixed_attention
from attnjax.dynamic.gather import gather_attention
from attnjax.layers import registry
from attnjax.layers.rope import apply_rope
from attnjax.models.llama import LlamaBlock
from experiments.pretrained_families import positions_of


def _bool_heads(name: str, heads, num_kv_heads: int):
  heads = tuple(bool(h) for h in np.ravel(np.asarray(heads)))
  if len(heads) != num_kv_heads:
    raise ValueError(f"{name} must hold one flag per KV head (K={num_kv_heads}), "
                     f"got {len(heads)}.")
  return heads


def razor_family(query, key, value, *, causal, q_positions=None, k_positions=None,
                 segment_ids=None, protected_heads=(), num_sink: int = 4, window: int = 251,
                 scale=None, implementation=None):
  """RazorAttention per query: protected KV heads full; the others sink + window + compensation.

  ``protected_heads``: K flags. A non-protected head's query at position i
  attends to keys j <= i with j < num_sink or i - j < window, plus one
  compensation token for the dropped set D = {j: num_sink <= j <= i - window}
  (key and value = the means over D, logit + log|D|; none while D is empty):
  ``num_sink + window + 1`` keys in all. Honours positions, so it also runs
  over a partly filled KV cache. Cost: the sink/window/full part runs on
  ``attnjax.attention`` with a per-head mask; the compensation means of all
  queries are a [B, T, S] weight matrix times the keys and values
  (O(T S K H), like one dense attention per KV head).
  """
  if not causal:
    raise NotImplementedError("razor_family is causal (a compressed decoding cache).")
  if segment_ids is not None:
    raise NotImplementedError("razor_family takes no segment ids (one sequence per row).")
  B, T, N, H = query.shape
  S, K = key.shape[1], key.shape[2]
  prot = _bool_heads("protected_heads", protected_heads, K)
  if num_sink < 0 or window < 1:
    raise ValueError(f"num_sink must be >= 0 and window >= 1, got {num_sink}, {window}.")
  g = N // K
  per_head = tuple(prot[n // g] for n in range(N))
  mask = masks.PerHead(tuple(masks.Causal() if p else masks.SinkWindow(num_sink, window)
                             for p in per_head))
  o1, l1 = attention(query, key, value, mask=mask, q_positions=q_positions,
                     k_positions=k_positions, scale=scale, return_lse=True,
                     implementation=implementation)
  qp, kp = positions_of(q_positions, k_positions, B, T, S)
  dropped = (kp[:, None, :] >= num_sink) & (kp[:, None, :] <= qp[:, :, None] - window)
  count = jnp.sum(dropped, axis=-1)                                   # [B, T]
  d = dropped.astype(jnp.float32) / jnp.maximum(count, 1)[:, :, None]
  k_hat = jnp.einsum("bts,bskh->btkh", d, key.astype(jnp.float32))
  v_hat = jnp.einsum("bts,bskh->btkh", d, value.astype(jnp.float32))
  s = H ** -0.5 if scale is None else scale
  qg = query.astype(jnp.float32).reshape(B, T, K, g, H)
  logit = (jnp.einsum("btkgh,btkh->btkg", qg, k_hat) * s).reshape(B, T, N)
  logit = logit + jnp.log(jnp.maximum(count, 1)).astype(jnp.float32)[:, :, None]
  use = (count > 0)[:, :, None] & ~jnp.asarray(per_head)[None, None, :]
  o2 = jnp.repeat(v_hat, g, axis=2)
  out, _ = merge_attention(o1, l1, o2.astype(o1.dtype), jnp.where(use, logit, -jnp.inf))
  return out.astype(query.dtype)


def duo_family(query, key, value, *, causal, q_positions=None, k_positions=None,
               segment_ids=None, retrieval_heads=(), sink: int = 64, recent: int = 192,
               implementation=None):
  """DuoAttention at deployment: retrieval KV heads causal, streaming heads sink + recent."""
  if not causal:
    raise NotImplementedError("duo_family is causal.")
  if segment_ids is not None:
    raise NotImplementedError("duo_family takes no segment ids.")
  heads = _bool_heads("retrieval_heads", retrieval_heads, key.shape[2])
  return attention(query, key, value, mask=duo_mask(heads, query.shape[2], sink=sink,
                                                    recent=recent),
                   q_positions=q_positions, k_positions=k_positions,
                   implementation=implementation)


def duo_gated_family(query, key, value, *, causal, q_positions=None, k_positions=None,
                     segment_ids=None, alpha=None, sink: int = 16, recent: int = 64,
                     implementation=None):
  """Gate training: ``alpha * full + (1 - alpha) * streaming`` per KV head, alpha [K]."""
  if not causal or q_positions is not None or k_positions is not None or segment_ids is not None:
    raise NotImplementedError("duo_gated_family is a causal prefill over one sequence.")
  if alpha is None or jnp.shape(alpha) != (key.shape[2],):
    raise ValueError(f"alpha must be [K]=({key.shape[2]},), got "
                     f"{None if alpha is None else jnp.shape(alpha)}.")
  return duo_mixed_attention(query, key, value, alpha, sink=sink, recent=recent,
                             implementation=implementation)


def tidal_select(query, key, k: int, q_positions=None, k_positions=None):
  """TidalDecode's selection for every query: int32 [B, K, T, min(k, S)], sorted.

  Query i of KV group h ranks the keys visible to it (by positions, default
  bottom-right aligned: j <= i + S - T) by the sum
  of the group's logits q_n . k_j / sqrt(H) (``topk_positions``' reduction)
  and keeps the best k; with fewer than k visible keys the remaining entries
  are later positions, which :func:`tidal_sparse_family` masks. Cost: the
  group logits [B, K, T, S] are formed densely (one selection layer), then
  ``lax.top_k``; the sparse layers gather k keys per query (O(T N k H)).
  """
  if not isinstance(k, (int, np.integer)) or k <= 0:
    raise ValueError(f"k must be a positive int, got {k!r}.")
  B, T, N, H = query.shape
  S, K = key.shape[1], key.shape[2]
  qg = query.astype(jnp.float32).reshape(B, T, K, N // K, H).sum(3)
  s = jnp.einsum("btkh,bskh->bkts", qg, key.astype(jnp.float32)) * H ** -0.5
  qp, kp = positions_of(q_positions, k_positions, B, T, S)
  s = jnp.where((kp[:, None, :] <= qp[:, :, None])[:, None], s, -jnp.inf)
  _, top = jax.lax.top_k(s, min(int(k), S))
  return jnp.sort(top, axis=-1).astype(jnp.int32)


def tidal_sparse_family(query, key, value, *, causal, q_positions=None, k_positions=None,
                        segment_ids=None, indices=None, implementation=None):
  """Attention of query i to the keys ``indices[:, h, i]`` of its KV group h that it may see
  (by positions, default bottom-right aligned; so it also runs over a KV cache)."""
  del implementation
  if not causal or segment_ids is not None:
    raise NotImplementedError("tidal_sparse_family is causal over one sequence per row.")
  B, T, N, _ = query.shape
  S, K = key.shape[1], key.shape[2]
  if indices is None or indices.ndim != 4 or indices.shape[:3] != (B, K, T):
    raise ValueError(f"indices must be int [B, K, T, k]=({B}, {K}, {T}, k), got "
                     f"{None if indices is None else indices.shape}.")
  idx = jnp.repeat(indices, N // K, axis=1).transpose(0, 2, 1, 3)     # [B, T, N, k]
  qp, kp = positions_of(q_positions, k_positions, B, T, S)
  kpos = jnp.take_along_axis(kp, idx.reshape(B, -1), axis=1).reshape(idx.shape)
  return gather_attention(query, key, value, idx, valid=kpos <= qp[:, :, None, None])


razor_family.supports_kv_cache = True
duo_family.supports_kv_cache = True
tidal_sparse_family.supports_kv_cache = True

FAMILIES = (("eval_razor", razor_family), ("eval_duo", duo_family),
            ("eval_duo_gated", duo_gated_family), ("eval_tidal_sparse", tidal_sparse_family))


def register_families():
  for name, fn in FAMILIES:
    if name not in registry.list_families():
      registry.register_family(name, fn)


# --------------------------------------------------------------------------- decoder loop

def layer_params(params, i: int):
  """Params of block i, from stacked ("layers") or unrolled ("layer_i") params."""
  if "layers" in params:
    return jax.tree.map(lambda a: a[i], params["layers"])
  return params[f"layer_{i}"]




def embed(c, params, tokens):
  return nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype).apply(
      {"params": params["embed_tokens"]}, tokens)


def final_norm(c, params, x):
  return nn.RMSNorm(epsilon=c.rms_norm_eps, dtype=c.dtype).apply({"params": params["norm"]}, x)


def lm_head(c, params, h):
  """Logits of the normalised final hidden states h (tied or untied head), float32."""
  if c.tie_embeddings:
    return nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype).apply(
        {"params": params["embed_tokens"]}, h, method="attend").astype(jnp.float32)
  return nn.Dense(c.vocab_size, use_bias=False, dtype=c.dtype).apply(
      {"params": params["lm_head"]}, h).astype(jnp.float32)


def capture_qkv(module, method_name):
  """``capture_intermediates`` filter: the attention's q, k and v projections."""
  return method_name == "__call__" and module.name in ("query", "key", "value")


def rope(c, x, positions):
  """x [B, T, heads, H] rotated as LlamaBlock's attention does at ``positions`` [T] or [B, T]."""
  kw = ({} if c.rope_scaling is None else
        dict(scaling=c.rope_scaling, seq_len=jnp.max(jnp.asarray(positions)) + 1))
  return apply_rope(x, positions, c.rope_base, **kw)


def captured_qkv(c, state, positions):
  """q, k and v [B, T, heads, H] from a block's captured intermediates, q and k rotated at
  ``positions`` (None: as projected, un-rotated)."""
  inter = state["intermediates"]["attention"]
  q, k, v = (inter[n]["__call__"][0] for n in ("query", "key", "value"))
  if positions is None:
    return q, k, v
  return rope(c, q, positions), rope(c, k, positions), v


def block_with_qk(c, p, x, family="dense", options=(), with_value=False):
  """One block's output and its post-RoPE q [B, T, N, H], k [B, T, K, H] (and v) (self-attention)."""
  out, state = LlamaBlock(c, family, tuple(options)).apply(
      {"params": p}, x, capture_intermediates=capture_qkv, mutable=["intermediates"])
  q, k, v = captured_qkv(c, state, jnp.arange(x.shape[1], dtype=jnp.int32))
  return out, ((q, k, v) if with_value else (q, k))


def run_blocks(model, params, tokens, step: Callable, state=None):
  """Runs the decoder block by block: normalised final hidden states [B, T, D].

  ``step(i, p, x, state) -> (x, state)`` runs block i (params ``p``) on x;
  ``state`` carries what one layer hands to the next (e.g. TidalDecode's
  selection). Everything lives in the call; nothing is stored elsewhere.
  """
  c = model.config
  x = embed(c, params, jnp.asarray(tokens))
  for i in range(c.num_layers):
    x, state = step(i, layer_params(params, i), x, state)
  return final_norm(c, params, x)


def dense_step(c):
  return lambda i, p, x, s: (LlamaBlock(c, "dense", ()).apply({"params": p}, x), s)


def layer_qk(model, params, tokens):
  """Post-RoPE (q, k) of every layer of the dense model: lists of L arrays."""
  c = model.config
  qs, ks = [], []

  def step(i, p, x, s):
    out, (q, k) = block_with_qk(c, p, x)
    qs.append(q)
    ks.append(k)
    return out, s
  run_blocks(model, params, tokens, step)
  return qs, ks


# --------------------------------------------------------------------------- methods

def tidal_roles(num_layers: int, schedule):
  """``schedule.role(i)`` of every layer; ValueError if a sparse layer precedes every select."""
  roles = [schedule.role(i) for i in range(num_layers)]
  first = next((i for i, r in enumerate(roles) if r == "select"), None)
  if "sparse" in roles and (first is None or roles.index("sparse") < first):
    raise ValueError(f"schedule {schedule}: a sparse layer comes before any select layer.")
  return roles


def tidal_forward(model, params, tokens, *, schedule, k: int, hidden: bool = False):
  """TidalDecode in teacher-forcing form: logits [B, T, vocab] (or the final hidden states).

  Layers with ``schedule.role(i)`` "full" run dense attention; "select" runs
  dense attention and replaces the selection with :func:`tidal_select` of its
  own q/k; "sparse" attends to the current selection only.
  """
  c = model.config
  if not isinstance(k, (int, np.integer)) or k <= 0:
    raise ValueError(f"k must be a positive int, got {k!r}.")
  roles = tidal_roles(c.num_layers, schedule)

  def step(i, p, x, idx):
    if roles[i] == "sparse":
      return LlamaBlock(c, "eval_tidal_sparse", (("indices", idx),)).apply({"params": p}, x), idx
    if roles[i] == "select":
      out, (q, kk) = block_with_qk(c, p, x)
      return out, tidal_select(q, kk, k)
    return LlamaBlock(c, "dense", ()).apply({"params": p}, x), idx
  h = run_blocks(model, params, tokens, step)
  return h if hidden else lm_head(c, params, h)


def duo_hidden_states(model, params, gates, tokens, *, sink: int, recent: int):
  """Final hidden states with layer i's KV heads mixing full and streaming by ``gates[i]``.

  With stacked params (``"layers"``) the blocks run as one ``lax.scan`` over
  (layer params, gate rows), so the gate fit compiles one block.
  """
  c = model.config
  gates = jnp.asarray(gates)
  if gates.shape != (c.num_layers, c.num_kv_heads):
    raise ValueError(f"gates must be [L, K]=({c.num_layers}, {c.num_kv_heads}), got "
                     f"{gates.shape}.")

  def block(p, x, alpha):
    opts = (("alpha", alpha), ("recent", recent), ("sink", sink))
    return LlamaBlock(c, "eval_duo_gated", opts).apply({"params": p}, x)
  if "layers" in params:       # stacked params: one scanned block, compiled once (not L times)
    x, _ = jax.lax.scan(lambda x, pa: (block(pa[0], x, pa[1]), None),
                        embed(c, params, jnp.asarray(tokens)), (params["layers"], gates))
    return final_norm(c, params, x)
  return run_blocks(model, params, tokens, lambda i, p, x, s: (block(p, x, gates[i]), s))


def per_layer_model(model, family: str, options: Sequence[dict]):
  """An unrolled LlamaDecoder with ``family`` in every layer and per-layer ``options``."""
  import dataclasses
  from flax.core import FrozenDict
  c = model.config
  if len(options) != c.num_layers:
    raise ValueError(f"options must hold one mapping per layer ({c.num_layers}), got "
                     f"{len(options)}.")
  return model.clone(config=dataclasses.replace(
      c, attention=(family,) * c.num_layers, scan_layers=False,
      attention_options=tuple(FrozenDict(o) for o in options)))


def _head_options(name, heads, key, num_layers: int, num_kv_heads: int, **extra):
  """One options mapping per layer: ``key`` = that layer's row of bool ``heads`` [L, K]."""
  heads = np.asarray(heads, bool)
  if heads.shape != (num_layers, num_kv_heads):
    raise ValueError(f"{name} must be bool [L, K]=({num_layers}, {num_kv_heads}), got "
                     f"{heads.shape}.")
  return [{key: tuple(bool(b) for b in row), **extra} for row in heads]


def razor_options(protected, *, num_sink: int, window: int, num_layers: int, num_kv_heads: int):
  """Per-layer options of "eval_razor" from protected bool [L, K]."""
  return _head_options("protected", protected, "protected_heads", num_layers, num_kv_heads,
                       num_sink=num_sink, window=window)


def duo_options(retrieval, *, sink: int, recent: int, num_layers: int, num_kv_heads: int):
  """Per-layer options of "eval_duo" from retrieval bool [L, K]."""
  return _head_options("retrieval", retrieval, "retrieval_heads", num_layers, num_kv_heads,
                       sink=sink, recent=recent)


def razor_head_scores(model, params, vocab_size: int, *, length: int = 128, seed: int = 0,
                      low: int = 100):
  """Echo and induction scores [L, N] of the dense model on ``length`` random tokens x 2."""
  from attnjax.decoding import repeated_random_tokens, retrieval_head_scores
  ids = repeated_random_tokens(jax.random.PRNGKey(seed), 1, length, vocab_size, low=low)
  qs, ks = jax.jit(lambda p, t: layer_qk(model, p, t))(params, ids)
  sc = [retrieval_head_scores(token_ids=ids[0], query=q, key=k) for q, k in zip(qs, ks)]
  return {n: np.stack([np.asarray(s[n])[0] for s in sc]) for n in ("echo", "induction")}


def kv_bytes(keys_per_head, head_dim: int, bytes_per: int = 4):
  """float keys+values bytes of a cache keeping ``keys_per_head`` [L, K] keys per KV head."""
  return int(np.sum(keys_per_head)) * head_dim * 2 * bytes_per


def duo_fit_batches(tok, length: int, seed: int):
  """step -> {"tokens": [1, length], "mask": [1, length]}: passkey sequences, answer supervised.

  The mask marks the positions whose next token is an answer token.
  """
  from experiments.pretrained_data import passkey_batch
  cache = {}

  def get(i):
    if i not in cache:
      t, spans, _ = passkey_batch(tok, length, 1, seed=seed * 100003 + i)
      m = np.zeros((1, length), np.float32)
      start, ans = spans[0]
      m[0, start - 1:start - 1 + len(ans)] = 1.0
      cache.clear()
      cache[i] = {"tokens": jnp.asarray(t), "mask": jnp.asarray(m)}
    return cache[i]
  return get


def fit_duo(model, params, tok, *, length: int, steps: int, sink: int, recent: int,
            lr: float, reg: float = 0.05, seed: int = 1, streaming_fraction: Optional[float] = 0.5):
  """fit_duo_gates on SmolLM2-style passkey data: (DuoGateFit, seconds)."""
  import time
  from attnjax.decoding import fit_duo_gates
  c = model.config
  fwd = lambda p, gates, b: duo_hidden_states(model, p, gates, b["tokens"], sink=sink,
                                              recent=recent)
  t0 = time.time()
  fit = fit_duo_gates(fwd, params, duo_fit_batches(tok, length, seed),
                      gate_shape=(c.num_layers, c.num_kv_heads), steps=steps, reg=reg, lr=lr,
                      streaming_fraction=streaming_fraction, loss_mask_fn=lambda b: b["mask"])
  jax.block_until_ready(fit.gates)
  return fit, time.time() - t0
