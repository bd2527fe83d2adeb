"""Token-by-token decoding of SmolLM2 under each KV-cache method, and its timing.

A :class:`Decoder` is a pair of pure functions: ``prefill(params, prompt
[B, P], max_len) -> (logits [B, P, V], state)`` and ``step(params, state,
tokens [B, 1]) -> (logits [B, 1, V], state)``.

- :func:`cache_decoder`: ``LlamaDecoder``'s own KV cache, for every family
  with ``supports_kv_cache`` (dense, the block-sparse masks, HiP, TokenSelect,
  RazorAttention, DuoAttention).
- :func:`tidal_decoder`: TidalDecode (arXiv:2410.05076) over the same
  per-layer caches, with an explicit loop over the blocks that hands each
  selection layer's top-k positions of the current token to the following
  sparse layers.
- :func:`longheads_decoder`: LongHeads (arXiv:2402.10685), one chunk choice
  per decoded token over un-rotated caches and cached chunk keys.
- :func:`h2o_decoder`: H2O (arXiv:2306.14048) with its own fixed-size cache
  per layer (``attnjax.decoding.H2OCache``, heavy + recent keys per KV head,
  greedy eviction by accumulated attention); the prompt runs with full
  attention and leaves its heavy hitters and recent tokens in the cache.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp

from attnjax.decoding import h2o_accumulate, h2o_decode_step, h2o_prefill
from attnjax.models import init_cache
from attnjax.models.common import unstack_layers
from attnjax.models.llama import LlamaBlock
from experiments import pretrained_methods as pm
from experiments.pretrained_families import _causal_probs


@dataclasses.dataclass(frozen=True)
class Decoder:
  prefill: Callable
  step: Callable


def _unrolled(model):
  return model.clone(decode=True, config=dataclasses.replace(model.config, scan_layers=False))


def cache_decoder(model) -> Decoder:
  """Decoding through ``LlamaDecoder``'s KV cache (``decode=True``), layers unrolled.

  Every method is timed with unrolled layers and per-layer params (the
  timing splits stacked params once, outside the token loop): decoding with
  the layers inside ``nn.scan`` took 2.6x longer per token on CPU, which
  would bury the differences between the methods.
  """
  dec = _unrolled(model)

  def prefill(params, prompt, max_len: int):
    cache = init_cache(dec, prompt.shape[0], max_len)
    logits, upd = dec.apply({"params": unstack_layers(params), "cache": cache}, prompt,
                            mutable=["cache"])
    return logits, upd["cache"]

  def step(params, cache, tokens):
    logits, upd = dec.apply({"params": unstack_layers(params), "cache": cache}, tokens,
                            mutable=["cache"])
    return logits, upd["cache"]
  return Decoder(prefill, step)


def tidal_apply(model, params, cache, tokens, *, schedule, k: int):
  """TidalDecode over per-layer KV caches: appends ``tokens`` [B, T]; (logits, new cache).

  ``cache``: an unrolled decoder's cache ({"layer_i": ...}). Layer roles come
  from ``schedule`` (``attnjax.decoding.TidalSchedule``): "full" and "select"
  layers attend to the whole cache, a "select" layer also ranks the cache for
  each new token (:func:`experiments.pretrained_methods.tidal_select` by
  positions), and "sparse" layers attend to the last selection. With T > 1
  (the prompt) every token selects for itself, as in the teacher-forcing form.
  """
  c = model.config
  roles = pm.tidal_roles(c.num_layers, schedule)
  x = pm.embed(c, params, tokens)
  T = tokens.shape[1]
  new_cache, sel = {}, None
  for i in range(c.num_layers):
    ci = cache[f"layer_{i}"]
    pos = ci["attention"]["cache_index"][:, None] + jnp.arange(T, dtype=jnp.int32)
    fam, opts = ("eval_tidal_sparse", (("indices", sel),)) if roles[i] == "sparse" else ("dense", ())
    x, st = LlamaBlock(c, fam, opts, decode=True).apply(
        {"params": pm.layer_params(params, i), "cache": ci}, x,
        capture_intermediates=pm.capture_qkv, mutable=["cache", "intermediates"])
    new_cache[f"layer_{i}"] = st["cache"]
    if roles[i] == "select":
      q = pm.captured_qkv(c, st, pos)[0]
      keys = st["cache"]["attention"]["cached_key"]
      sel = pm.tidal_select(q, keys, k, q_positions=pos,
                            k_positions=jnp.arange(keys.shape[1], dtype=jnp.int32))
  return pm.lm_head(c, params, pm.final_norm(c, params, x)), new_cache


def tidal_decoder(model, *, schedule, k: int) -> Decoder:
  """TidalDecode through the decoder's per-layer KV caches (params stacked or unrolled)."""
  dec = _unrolled(model)

  def prefill(params, prompt, max_len: int):
    cache = init_cache(dec, prompt.shape[0], max_len)
    return tidal_apply(dec, params, cache, prompt, schedule=schedule, k=k)

  def step(params, cache, tokens):
    return tidal_apply(dec, params, cache, tokens, schedule=schedule, k=k)
  return Decoder(prefill, step)


def h2o_decoder(model, *, heavy: int, recent: int) -> Decoder:
  """H2O with a fixed cache of ``heavy + recent`` keys per KV head and layer.

  State: (one ``H2OCache`` per layer, tokens so far [B]). The prompt runs
  with full attention; its accumulated attention picks what each layer keeps.
  Each step then attends to the kept keys only (``h2o_decode_step``).
  """
  c = model.config

  def prefill(params, prompt, max_len: int):
    del max_len                                    # the cache has heavy + recent slots
    x = pm.embed(c, params, prompt)
    caches = []
    for i in range(c.num_layers):
      x, (q, k, v) = pm.block_with_qk(c, pm.layer_params(params, i), x, with_value=True)
      probs, _ = _causal_probs(q, k)
      acc = h2o_accumulate(jnp.zeros((k.shape[0], k.shape[2], k.shape[1])), probs)
      caches.append(h2o_prefill(k, v, acc, heavy=heavy, recent=recent))
    n = jnp.full((prompt.shape[0],), prompt.shape[1], jnp.int32)
    return pm.lm_head(c, params, pm.final_norm(c, params, x)), (tuple(caches), n)

  def step(params, state, tokens):
    caches, n = state
    if tokens.shape[1] != 1:
      raise ValueError(f"h2o_decoder steps one token at a time, got tokens {tokens.shape}.")
    pos = n[:, None]
    x = pm.embed(c, params, tokens)
    new = []
    for i in range(c.num_layers):
      opts = (("cache", caches[i]), ("heavy", heavy), ("recent", recent))
      x, st = LlamaBlock(c, "eval_h2o_step", opts).apply(
          {"params": pm.layer_params(params, i)}, x, positions=pos,
          capture_intermediates=pm.capture_qkv, mutable=["intermediates"])
      q, k, v = pm.captured_qkv(c, st, pos)
      new.append(h2o_decode_step(q, k, v, caches[i], n, heavy=heavy, recent=recent)[1])
    return pm.lm_head(c, params, pm.final_norm(c, params, x)), (tuple(new), n + 1)
  return Decoder(prefill, step)


def write_token(k_cache, v_cache, key, value, position):
  """Caches [B, L, K, H] with key/value [B, 1, K, H] written at ``position`` int [B]."""
  b = jnp.arange(k_cache.shape[0])
  return (k_cache.at[b, position].set(key[:, 0].astype(k_cache.dtype)),
          v_cache.at[b, position].set(value[:, 0].astype(v_cache.dtype)))


def longheads_write(state, query, key, value, position, *, chunk_size: int, rope_base: float):
  """LongHeads' decode state after one token: its key/value in the un-rotated caches, its query
  in the current chunk's buffer, and the chunk's key once the token completes it.

  state: (key [B, L, K, H], value [B, L, K, H], chunk keys [B, N, L / w, H],
  query buffer [B, w, N, H]); query [B, 1, N, H], key/value [B, 1, K, H]
  un-rotated; position int [B].
  """
  from attnjax.dynamic import chunk_representations
  kc, vc, reps, qbuf = state
  w = chunk_size
  b = jnp.arange(kc.shape[0])
  kc, vc = write_token(kc, vc, key, value, position)
  qbuf = qbuf.at[b, position % w].set(query[:, 0].astype(qbuf.dtype))
  complete = position % w == w - 1
  chunk = lambda x: jax.vmap(lambda a, s: jax.lax.dynamic_slice_in_dim(a, s, w, 0))(
      x, (position // w) * w)

  def add_rep(reps):
    rep = chunk_representations(chunk(kc), chunk(vc), qbuf, chunk_size=w, rope_base=rope_base)
    old = reps[b, :, position // w]
    return reps.at[b, :, position // w].set(jnp.where(complete[:, None, None], rep[:, :, 0], old))
  reps = jax.lax.cond(jnp.any(complete), add_rep, lambda r: r, reps)
  return kc, vc, reps, qbuf


def longheads_decoder(model, *, chunk_size: int, attn_len: int, rope_base: float) -> Decoder:
  """LongHeads with one chunk choice per token (``attnjax.dynamic.longheads_decode_step``).

  State: per layer (un-rotated keys and values [B, L, K, H] with L the cache
  length rounded up to a multiple of ``chunk_size``, chunk keys of the
  complete chunks, the current chunk's queries), and the tokens so far [B].
  The prompt runs through the per-token teacher-forcing form.
  """
  c = model.config
  w = chunk_size
  lh = dict(chunk_size=w, attn_len=attn_len, rope_base=rope_base)

  def prefill(params, prompt, max_len: int):
    from attnjax.dynamic import chunk_representations
    B, P = prompt.shape
    L = -(-max_len // w) * w
    full = P // w * w
    x = pm.embed(c, params, prompt)
    states = []
    for i in range(c.num_layers):
      x, st = LlamaBlock(c, "eval_longheads", tuple(dict(lh, query_block=1).items())).apply(
          {"params": pm.layer_params(params, i)}, x, capture_intermediates=pm.capture_qkv,
          mutable=["intermediates"])
      q, k, v = pm.captured_qkv(c, st, None)
      pad = lambda a: jnp.pad(a, ((0, 0), (0, L - P), (0, 0), (0, 0)))
      reps = jnp.zeros((B, c.num_heads, L // w, c.head_dim), jnp.float32)
      if full:
        reps = reps.at[:, :, :full // w].set(chunk_representations(
            k[:, :full], v[:, :full], q[:, :full], chunk_size=w, rope_base=rope_base))
      qbuf = jnp.zeros((B, w) + q.shape[2:], q.dtype).at[:, :P - full].set(q[:, full:])
      states.append((pad(k), pad(v), reps, qbuf))
    n = jnp.full((B,), P, jnp.int32)
    return pm.lm_head(c, params, pm.final_norm(c, params, x)), (tuple(states), n)

  def step(params, state, tokens):
    layers, n = state
    if tokens.shape[1] != 1:
      raise ValueError(f"longheads_decoder steps one token at a time, got tokens {tokens.shape}.")
    x = pm.embed(c, params, tokens)
    new = []
    for i in range(c.num_layers):
      # No positions: RoPE at position 0 is the identity, so the family and the capture see
      # the un-rotated q/k that LongHeads needs.
      opts = (("state", layers[i]), ("position", n)) + tuple(lh.items())
      x, st = LlamaBlock(c, "eval_longheads_step", opts).apply(
          {"params": pm.layer_params(params, i)}, x, capture_intermediates=pm.capture_qkv,
          mutable=["intermediates"])
      q, k, v = pm.captured_qkv(c, st, None)
      new.append(longheads_write(layers[i], q, k, v, n, chunk_size=w, rope_base=rope_base))
    return pm.lm_head(c, params, pm.final_norm(c, params, x)), (tuple(new), n + 1)
  return Decoder(prefill, step)


def _scan(decoder: Decoder, n: int):
  """Jitted ``f(params, state, token [B]) -> tokens [n, B]``: n greedy steps from ``state``."""
  def f(p, state, tok):
    def body(carry, _):
      state, tok = carry
      lg, state = decoder.step(p, state, tok[:, None])
      return (state, jnp.argmax(lg[:, -1], -1).astype(jnp.int32)), tok
    return jax.lax.scan(body, (state, tok), None, length=n)[1]
  return jax.jit(f)


def _prefill(decoder: Decoder, params, prompt, max_len: int):
  """(state, first greedy token [B]) after the prompt."""
  logits, state = jax.jit(decoder.prefill, static_argnums=2)(params, prompt, max_len)
  return state, jnp.argmax(logits[:, -1], -1).astype(jnp.int32)


def greedy(decoder: Decoder, params, prompt, steps: int):
  """Greedy continuation tokens [B, steps] (one jitted prefill, one jitted scan)."""
  params = unstack_layers(params)
  prompt = jnp.asarray(prompt, jnp.int32)
  state, tok = _prefill(decoder, params, prompt, prompt.shape[1] + steps)
  return jnp.swapaxes(_scan(decoder, steps)(params, state, tok), 0, 1)


def decode_ms_per_token(decoder: Decoder, params, prompt, steps: int, repeats: int = 3):
  """Milliseconds per greedily decoded token, prefill excluded.

  The prompt fills the state once; then a jitted ``lax.scan`` of ``steps + 1``
  decode steps and one of a single step run from that state (each compiled
  first, then timed ``repeats`` times, the fastest run kept), and the
  difference is divided by ``steps``. Stacked params are split per layer
  first (outside the timed loop), so no method slices them per token.
  """
  params = unstack_layers(params)
  prompt = jnp.asarray(prompt, jnp.int32)
  state, tok = _prefill(decoder, params, prompt, prompt.shape[1] + steps + 1)
  best = {}
  for n in (1, steps + 1):
    f = _scan(decoder, n)
    jax.block_until_ready(f(params, state, tok))             # compile
    best[n] = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(f(params, state, tok))
      best[n] = min(best[n], time.perf_counter() - t0)
  return 1000.0 * (best[steps + 1] - best[1]) / steps
