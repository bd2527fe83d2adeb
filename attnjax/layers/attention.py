"""``MultiHeadAttention``: a Flax Linen layer over any attnjax attention family.

Projections (query/key/value/out, as ``flax.linen.MultiHeadDotProductAttention``),
GQA/MQA through ``num_kv_heads``, optional rotary embeddings, and the attention
itself chosen by name from the family registry (``attnjax.layers.registry``):
``"dense"`` (``attnjax.attention``, any mask and score variant) or an engine's
family with its ``attention_options``. KV-cache decoding uses Flax's
``"cache"`` collection.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from attnjax import scores as scores_lib
from attnjax.core.dropout import BroadcastKey
from attnjax.layers import padding as padding_lib
from attnjax.layers import registry
from attnjax.layers.dropout import check_dropout_rate, dropout_hook
from attnjax.layers.head_mask import apply_head_mask
from attnjax.layers.kv_cache import check_cache_fits
from attnjax.layers.options import option_names
from attnjax.layers.rope import apply_rope, as_rope_scaling

__all__ = ["MultiHeadAttention", "bind_score_params", "apply_selective_token_temperatures"]


def bind_score_params(module: nn.Module, score, num_heads: int, param_dtype=jnp.float32):
  """Creates a score variant's learned arrays as params of ``module`` and binds them.

  A score with learned arrays (``attnjax.scores.Sink``, ``Selective``) has
  ``init_params(num_heads) -> {name: initial array}`` and
  ``bind(**arrays) -> score``; the params are named ``score_<name>``.
  Scores without learned arrays are returned unchanged.
  """
  if score is None or not hasattr(score, "init_params"):
    return score
  arrays = {}
  for name, init in score.init_params(num_heads).items():
    arrays[name] = module.param(
        f"score_{name}", lambda _, v=init: jnp.asarray(v, param_dtype))
  return score.bind(**arrays)


def apply_selective_token_temperatures(module: nn.Module, query, value,
                                       param_dtype=jnp.float32):
  """Selective Attention's learned token temperatures as params of ``module``, applied.

  Creates ``tau_q_kernel`` [N, H], ``tau_q_bias`` [N], ``tau_v_kernel``
  [K, Hv], ``tau_v_bias`` [K] (zeros) and returns ``(query * tau_q, value *
  tau_v)`` (``attnjax.scores.selective_token_temperatures``; arXiv:2411.12892).
  At initialisation both temperatures are exactly 1.
  """
  init = scores_lib.init_selective_token_params(query.shape[2], value.shape[2],
                                                query.shape[3], value.shape[3])
  params = {name: module.param(name, lambda _, x=x: jnp.asarray(x, param_dtype))
            for name, x in init.items()}
  q_temp, v_temp = scores_lib.selective_token_temperatures(query, value, params)
  return scores_lib.selective_temperatures(query, value, q_temp, v_temp)


def _check_options(name, fn, kwargs):
  """ValueError naming any keyword the family function does not accept.

  The accepted options include those the family forwards through ``**options``
  (``attnjax.layers.options.option_names``); when that forwarding cannot be
  followed the family itself is left to reject an unknown option.
  """
  valid, complete = option_names(fn)
  unknown = sorted(set(kwargs) - set(valid))
  if unknown and complete:
    close = {u: difflib.get_close_matches(u, valid, n=1) for u in unknown}
    hints = "".join(f" (did you mean {c[0]!r} for {u!r}?)" for u, c in close.items() if c)
    raise ValueError(
        f"attention family {name!r} does not accept {unknown} (from attention_options or "
        f"the layer's mask/score/implementation){hints}; it accepts {sorted(valid)}.")


class MultiHeadAttention(nn.Module):
  """Multi-head attention with projections, over any attnjax family.

  Attributes:
    num_heads: query heads N.
    num_kv_heads: key/value heads K (N % K == 0); default N (MHA); 1 is MQA.
    qkv_features: total query features N * H (default: the input features);
      the head dimension is ``qkv_features // num_heads``.
    out_features: output features (default: the query input's features).
    use_bias: biases in the four projections (the default of the four flags below).
    use_query_bias, use_key_bias, use_value_bias, use_out_bias: a bias in that
      projection; None (default) follows ``use_bias``.
    fused_qkv: one projection ``qkv`` (kernel [D, N + 2K, H], bias [N + 2K, H])
      whose head axis holds the N query heads, then the K key heads, then the K
      value heads, in place of ``query``/``key``/``value`` (self-attention
      only; its bias needs the three q/k/v bias flags equal).
    use_rope: rotary embeddings on queries and keys (``attnjax.layers.rope``).
    rope_base, rope_fraction: RoPE frequency base and rotated share of H.
    rotary_dim: number of rotated dimensions (even), instead of rope_fraction.
    rope_scaling: None, an ``attnjax.layers.rope.RopeScaling`` or a Hugging
      Face ``rope_scaling`` dict ("linear", "dynamic", "yarn", "llama3").
      "dynamic" takes L from the keys' largest position + 1 of each call (as
      transformers does; with a KV cache, the keys already cached keep the
      rotation of the call that wrote them).
    rope_interleaved: GPT-J pairs ``(x[2i], x[2i+1])`` instead of rotate-half.
    causal: key j visible to query i iff k_pos[j] <= q_pos[i].
    attention: family name: ``"dense"`` or one of
      ``attnjax.layers.registry.list_families()``.
    attention_options: keyword arguments for the family (e.g. a window size).
    mask: extra ``attnjax.masks.Mask`` (dense family; ANDed with causality).
    score: ``attnjax.scores`` variant (dense family). Scores with learned
      arrays get them as params ``score_<name>``.
    selective_token_temperatures: Selective Attention's learned token
      temperatures tau_q(x_i), tau_v(x_j) (``attnjax.scores.
      selective_token_temperatures``; the form is the project's reading of
      arXiv:2411.12892): queries and values are scaled per token and head
      before the attention (and before RoPE and the KV cache), so every
      family takes them. Params ``tau_q_*``/``tau_v_*`` start at zero, i.e.
      temperature 1: with ``score=Selective()`` the layer starts as the
      position-temperature variant. Default off.
    implementation: "reference" | "xla" | "pallas" | None, given to the family.
    dropout_rate, broadcast_dropout, deterministic: attention-weight dropout
      with Flax's conventions (rng stream ``'dropout'``; keep 1 - rate, scale
      1 / (1 - rate); ``deterministic`` here or at the call), "dense" family.
      ``attnjax.attention(dropout_rate=, dropout_rng=)``, whose mask the XLA
      engine and the Pallas kernels regenerate per tile (no [B, N, T, S]
      array) and the reference draws identically: one mask per batch element
      and head with ``broadcast_dropout=False``, one [T, S] mask for the batch
      and heads (``attnjax.core.dropout.BroadcastKey``) with
      ``broadcast_dropout=True``, Flax's default. The masks follow attnjax's
      counter-based generator, not Flax's ``jax.random.bernoulli`` draws (same
      distribution, other bits). Families without dropout raise
      NotImplementedError when it is active (rate > 0 and not deterministic).
    decode: KV-cache decoding. The first ``init`` (with a full-length input)
      creates ``cache/cached_key``, ``cached_value`` [B, max_len, K, H] and
      ``cache_index`` int32 [B] (tokens held per example); later calls
      append T >= 1 tokens of example b at ``cache_index[b]`` with positions
      ``cache_index[b] + arange(T)``, so the examples of a batch may hold
      different lengths (right-padded prompts: pass ``input_lengths``). Needs
      ``causal=True``, self attention, and a family with
      ``supports_kv_cache``. Appending past ``max_len`` raises ValueError
      naming the lengths (at trace time when T > max_len or the index is
      concrete, else from a host callback when the jitted step runs; the
      output is NaN as well, the cache cannot grow under jit).
    dtype: computation dtype of the projections (default: inferred);
      param_dtype: dtype of the parameters.
  """
  num_heads: int
  num_kv_heads: Optional[int] = None
  qkv_features: Optional[int] = None
  out_features: Optional[int] = None
  use_bias: bool = True
  use_query_bias: Optional[bool] = None
  use_key_bias: Optional[bool] = None
  use_value_bias: Optional[bool] = None
  use_out_bias: Optional[bool] = None
  fused_qkv: bool = False
  use_rope: bool = False
  rope_base: float = 10000.0
  rope_fraction: float = 1.0
  rotary_dim: Optional[int] = None
  rope_scaling: Any = None
  rope_interleaved: bool = False
  causal: bool = False
  attention: str = "dense"
  attention_options: Optional[Mapping[str, Any]] = None
  mask: Any = None
  score: Any = None
  selective_token_temperatures: bool = False
  implementation: Optional[str] = None
  dropout_rate: float = 0.0
  broadcast_dropout: bool = True
  deterministic: Optional[bool] = None
  decode: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  precision: Any = None

  def _dims(self, features: int):
    n = self.num_heads
    kh = n if self.num_kv_heads is None else self.num_kv_heads
    if not isinstance(n, int) or n < 1:
      raise ValueError(f"num_heads must be a positive integer, got {n!r}.")
    if not isinstance(kh, int) or kh < 1 or n % kh:
      raise ValueError(
          f"num_kv_heads must be a positive divisor of num_heads={n}, got {kh!r}.")
    qkv = features if self.qkv_features is None else self.qkv_features
    if qkv % n:
      raise ValueError(f"qkv_features={qkv} must be divisible by num_heads={n}.")
    return n, kh, qkv // n

  def _bias(self, name):
    flag = getattr(self, f"use_{name}_bias")
    return self.use_bias if flag is None else bool(flag)

  def _project(self, inputs_q, inputs_kv, self_attn, n, kh, h):
    """q [B, T, N, H], k, v [B, S, K, H] from the separate or the fused projection."""
    if not self.fused_qkv:
      return (self._dense((n, h), "query")(inputs_q), self._dense((kh, h), "key")(inputs_kv),
              self._dense((kh, h), "value")(inputs_kv))
    if not self_attn:
      raise ValueError("fused_qkv=True projects one input; it needs self-attention "
                       "(inputs_kv=None).")
    flags = {self._bias(x) for x in ("query", "key", "value")}
    if len(flags) != 1:
      raise ValueError("fused_qkv=True has one bias for q, k and v: use_query_bias, "
                       "use_key_bias and use_value_bias must be equal.")
    qkv = self._dense((n + 2 * kh, h), "qkv", flags.pop())(inputs_q)
    return qkv[:, :, :n], qkv[:, :, n:n + kh], qkv[:, :, n + kh:]

  def _dense(self, features, name, use_bias=None, axis=-1):
    use_bias = self._bias(name) if use_bias is None else use_bias
    return nn.DenseGeneral(features, axis=axis, use_bias=use_bias, dtype=self.dtype,
                           param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                           bias_init=self.bias_init, precision=self.precision, name=name)

  @nn.compact
  def __call__(self, inputs_q, inputs_kv=None, *, q_positions=None, k_positions=None,
               segment_ids=None, mask=None, bias=None, head_mask=None, head_replacement=None,
               input_lengths=None, deterministic=None, sow_weights=False):
    """Attends ``inputs_q`` [B, T, D] to ``inputs_kv`` [B, S, D'] (default itself).

    Args:
      inputs_q: [B, T, D]. inputs_kv: [B, S, D'] or None (self-attention).
      q_positions, k_positions: int [T]/[B, T] and [S]/[B, S] positions, used
        for causality and RoPE; default ``arange(T)`` for self-attention and
        bottom-right aligned (``arange(T) + S - T``, ``arange(S)``) for cross.
      segment_ids: [B, T] or a pair ([B, T], [B, S]) (packed documents).
      mask: boolean array (True = may attend), ANDed with the layer's mask and
        causality. The "dense" family takes a key-padding mask [B, S] or any
        array broadcastable to [B, N, T, S]; the other families take a
        key-padding mask [B, S] or [B, 1, 1, S] (Flax's ``make_attention_mask``
        without a query axis) through their ``key_padding`` route
        (``attnjax.layers.padding``): segment ids on the block-sparse
        families and "na1d" (whose windows are the neighborhood AND the
        padding: a non-causal window near the padding is not re-shifted into
        the real length), a ``key_mask`` that zeroes the padded keys'
        features and values on "linear", "lightning" and "based", and right
        padding only on the causal prefix families ("flow", "combiner",
        "longheads", "landmark" with causal=True). Families that cannot take
        padding raise ValueError saying why. Outputs at padded query
        positions are unspecified (zeros where lengths reach the kernel).
      bias: additive float array broadcastable to [B, N, T, S] (ALiBi, T5
        relative bias; [B, N, T, max_len] when decoding with a cache), for the
        families whose function takes ``bias`` ("dense" and the block-sparse
        masks, through ``attnjax.attention``); other families raise ValueError.
      head_mask: optional [N] or [B, N] multiplier of each head's output before
        the output projection (1 keep, 0 ablate); circuit analysis as in
        "Interpreting and Improving Large Language Models in Arithmetic
        Calculation" (arXiv:2409.01659).
      head_replacement: optional [B, T, N, H] values that ablated heads take
        instead of zero (mean ablation, activation patching).
      input_lengths: int [B], how many of the T tokens of each example are
        real (right padding). decode=True: ``cache_index`` advances by it, and
        the padded tail is overwritten by the next call (default T). Without a
        cache (self-attention): the padding of the batch, given to "dense" and
        the block-sparse families as ``query_seq_lengths`` /
        ``key_value_seq_lengths`` (their XLA path skips the padded blocks) and
        to the other families as a key-padding mask (see ``mask``).
      deterministic: no attention dropout (Flax's ``merge_param`` with the
        attribute; needed only when ``dropout_rate > 0``).
      sow_weights: also sow the attention weights [B, N, T, S] float32 as
        ``intermediates/attention_weights`` (before dropout, as Flax). They
        are computed by the dense reference (``attnjax.reference_attention``
        with the same mask, score, bias, segments and padding), which
        materialises [B, N, T, S]: for analysis, not long sequences. The
        output still comes from the call's own backend. "dense" family only.

    The per-head outputs [B, T, N, H] are sown as ``intermediates/head_outputs``.

    Returns:
      [B, T, out_features].
    """
    if inputs_q.ndim != 3:
      raise ValueError(f"inputs_q must have shape [B, T, D], got {inputs_q.shape}.")
    self_attn = inputs_kv is None
    if self_attn:
      inputs_kv = inputs_q
    elif inputs_kv.ndim != 3 or inputs_kv.shape[0] != inputs_q.shape[0]:
      raise ValueError(
          f"inputs_kv must have shape [B, S, D] with B={inputs_q.shape[0]}, got "
          f"{inputs_kv.shape}.")
    n, kh, h = self._dims(inputs_q.shape[-1])
    out_features = self.out_features or inputs_q.shape[-1]
    q, k, v = self._project(inputs_q, inputs_kv, self_attn, n, kh, h)
    if self.selective_token_temperatures:
      q, v = apply_selective_token_temperatures(self, q, v, self.param_dtype)
    T, S = q.shape[1], k.shape[1]
    fn = registry.get_family(self.attention)
    overflow = None
    if self.decode:
      if not self.causal or not self_attn:
        raise ValueError("decode=True needs causal=True self-attention (inputs_kv=None).")
      if not getattr(fn, "supports_kv_cache", False):
        raise NotImplementedError(
            f"attention family {self.attention!r} does not declare KV-cache support "
            "(supports_kv_cache); decode=True is available for the softmax families.")
      q, k, v, q_positions, k_positions, overflow = self._use_cache(
          q, k, v, q_positions, k_positions, segment_ids, mask, input_lengths)
    lengths = None
    if not self.decode and input_lengths is not None:
      if not self_attn:
        raise ValueError("input_lengths gives the padding of inputs_q, which is the keys' "
                         "only in self-attention; for cross-attention pass the keys' padding "
                         "as mask=[B, S].")
      lengths = padding_lib.check_lengths(input_lengths, q.shape[0], T)
    if not self.decode and self.use_rope:
      # Default self-attention positions arange(T) are what every family assumes when
      # none are passed, so they are used for RoPE only (families that cannot take
      # explicit positions, such as the linear ones, keep working in the layer).
      rq, rk = q_positions, k_positions
      if self_attn and rq is None and rk is None:
        rq = rk = jnp.arange(T, dtype=jnp.int32)
      q, k = self._rope(q, k, rq, rk, T, S)

    kwargs = dict(self.attention_options or {})
    score = bind_score_params(self, self.score, n, self.param_dtype)
    layer_mask = self.mask
    if mask is not None:
      if layer_mask is not None:
        raise ValueError("pass either the layer attribute mask or the call argument "
                         "mask, not both (combine them as one boolean array).")
      layer_mask = mask
    if self.attention == "dense":
      shape = getattr(layer_mask, "shape", None)
      if shape in ((q.shape[0], S), (q.shape[0], 1, 1, S)):    # key padding: segment ids
        key_mask = padding_lib.key_padding_mask("dense", layer_mask, q.shape[0], S)
        segment_ids = padding_lib.key_padding_segments(key_mask, segment_ids, q.shape[0], T, S,
                                                       pair=True)
        layer_mask = None
      if lengths is not None:
        kwargs.update(query_seq_lengths=lengths, key_value_seq_lengths=lengths)
    elif layer_mask is not None or lengths is not None:
      key_mask = None if layer_mask is None else padding_lib.key_padding_mask(
          self.attention, layer_mask, q.shape[0], S)
      segment_ids, extra = padding_lib.padding_arguments(
          self.attention, fn, key_mask=key_mask, lengths=lengths, segment_ids=segment_ids,
          causal=self.causal, self_attn=self_attn, batch=q.shape[0], q_len=T, kv_len=S)
      kwargs.update(extra)
      layer_mask = None
    if bias is not None and "bias" not in option_names(fn)[0]:
      raise ValueError(
          f"attention family {self.attention!r} takes no additive bias (bias=): its function "
          "has no bias argument. 'dense' and the block-sparse mask families take one.")
    for name, val in (("mask", layer_mask), ("score", score), ("bias", bias),
                      ("implementation", self.implementation)):
      if val is not None:
        kwargs[name] = val
    hook, fused = self._dropout(fn, deterministic)
    kwargs.update(fused)
    if sow_weights:
      hook = self._sow_weights(fn, hook, q, k, v, q_positions, k_positions, segment_ids,
                               kwargs)
    if hook is not None:
      kwargs["probs_hook"] = hook
    _check_options(self.attention, fn, kwargs)
    out = fn(q, k, v, causal=self.causal, q_positions=q_positions, k_positions=k_positions,
             segment_ids=segment_ids, **kwargs)
    if overflow is not None:
      out = jnp.where(overflow, jnp.nan, out).astype(out.dtype)
    self.sow("intermediates", "head_outputs", out)
    if head_mask is not None:
      out = apply_head_mask(out, head_mask, head_replacement)
    elif head_replacement is not None:
      raise ValueError("head_replacement needs head_mask (0 marks the heads to replace).")
    return self._dense(out_features, "out", axis=(-2, -1))(out)

  def _dropout(self, fn, deterministic):
    """(probs_hook, keyword arguments) of attention dropout; (None, {}) when it is off.

    The family's own dropout (``dropout_rate`` / ``dropout_rng``; a
    ``BroadcastKey`` when ``broadcast_dropout``: one [T, S] mask), else a
    probs_hook of the dense reference for a family that takes one. Raises
    NotImplementedError where neither applies.
    """
    if check_dropout_rate(self.dropout_rate) == 0.0:
      return None, {}
    if nn.merge_param("deterministic", self.deterministic, deterministic):
      return None, {}
    takes = option_names(fn)[0]
    if "dropout_rate" in takes:
      rng = self.make_rng("dropout")
      return None, dict(dropout_rate=self.dropout_rate,
                        dropout_rng=BroadcastKey(rng) if self.broadcast_dropout else rng)
    if "probs_hook" not in takes:
      raise NotImplementedError(
          f"attention family {self.attention!r} cannot apply attention dropout "
          f"(dropout_rate={self.dropout_rate}): its kernels never form the attention weights. "
          "Use attention='dense', dropout_rate=0, or deterministic=True.")
    if self.implementation not in (None, "reference"):
      raise NotImplementedError(
          f"attention family {self.attention!r} applies attention dropout only through a "
          f"probs_hook of the dense reference; implementation={self.implementation!r} never "
          "forms the weights: use implementation=None or 'reference'.")
    return dropout_hook(self.make_rng("dropout"), self.dropout_rate, self.broadcast_dropout), {}

  def _sow_weights(self, fn, dropout, q, k, v, q_positions, k_positions, segment_ids,
                   kwargs):
    """Sows the dense reference's weights; returns the call's probs_hook.

    With dropout the call already runs the reference: the weights are sown by
    its hook before the dropout. Otherwise the reference runs beside the call
    (its output unused) so the call keeps its backend.
    """
    if "probs_hook" not in option_names(fn)[0]:
      raise ValueError(
          f"sow_weights=True needs the attention weights, which attention family "
          f"{self.attention!r} never forms (its kernels skip them); use attention='dense'.")

    def sow(probs):
      self.sow("intermediates", "attention_weights", probs)
      return probs

    if dropout is not None:
      return lambda probs: dropout(sow(probs))
    ref = dict(kwargs, implementation="reference", probs_hook=sow)
    fn(q, k, v, causal=self.causal, q_positions=q_positions, k_positions=k_positions,
       segment_ids=segment_ids, **ref)
    return None

  def _rope(self, q, k, q_positions, k_positions, T, S):
    if q_positions is None or k_positions is None:
      dq, dk = jnp.arange(T) + S - T, jnp.arange(S)
      q_positions = dq if q_positions is None else q_positions
      k_positions = dk if k_positions is None else k_positions
    return self._rope_at(q, q_positions, k, k_positions)

  def _rope_at(self, q, q_positions, k, k_positions):
    kw = dict(rotary_dim=self.rotary_dim, scaling=self.rope_scaling,
              interleaved=self.rope_interleaved)
    if as_rope_scaling(self.rope_scaling) is not None:
      kw["seq_len"] = jnp.max(jnp.asarray(k_positions)) + 1
    return (apply_rope(q, q_positions, self.rope_base, self.rope_fraction, **kw),
            apply_rope(k, k_positions, self.rope_base, self.rope_fraction, **kw))

  def _use_cache(self, q, k, v, q_positions, k_positions, segment_ids, mask, input_lengths):
    """Appends k/v to the cache; returns the cached k/v and their positions."""
    initialized = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    cache_index = self.variable("cache", "cache_index",
                                lambda: jnp.zeros((k.shape[0],), jnp.int32))
    T = q.shape[1]
    if not initialized:  # the init call: a plain causal forward over the input.
      if q_positions is None and k_positions is None:
        q_positions = k_positions = jnp.arange(T, dtype=jnp.int32)
      if self.use_rope:
        q, k = self._rope(q, k, q_positions, k_positions, T, k.shape[1])
      return q, k, v, q_positions, k_positions, None
    if segment_ids is not None or mask is not None:
      raise ValueError("segment_ids and mask are not supported with a KV cache; pad on the "
                       "right and pass input_lengths [B].")
    B, max_len, kh, h = cached_key.value.shape
    if k.shape != (B, T, kh, h):
      raise ValueError(
          f"cache holds keys [B, max_len, K, H]={cached_key.value.shape}; new keys "
          f"{k.shape} must be [{B}, T, {kh}, {h}].")
    if T > max_len:
      raise ValueError(f"{T} new tokens do not fit a KV cache of max_len={max_len}; "
                       "initialise the cache with a longer input.")
    if q_positions is not None or k_positions is not None:
      raise ValueError("positions come from cache_index when decoding; do not pass "
                       "q_positions/k_positions.")
    idx = jnp.broadcast_to(cache_index.value, (B,))
    if input_lengths is None:
      n_new = jnp.full((B,), T, jnp.int32)
    else:
      n_new = jnp.asarray(input_lengths)
      if n_new.shape != (B,) or not jnp.issubdtype(n_new.dtype, jnp.integer):
        raise ValueError(f"input_lengths must be an int array of shape [B]=({B},), got "
                         f"{n_new.shape} {n_new.dtype}.")
      n_new = n_new.astype(jnp.int32)
    pos = idx[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]     # [B, T]
    if self.use_rope:
      q, k = self._rope_at(q, pos, k, pos)
    rows = jnp.arange(B)[:, None]
    # Padded tokens past max_len are dropped; those inside are overwritten later.
    keys = cached_key.value.at[rows, pos].set(k.astype(cached_key.value.dtype), mode="drop")
    values = cached_value.value.at[rows, pos].set(v.astype(cached_value.value.dtype),
                                                 mode="drop")
    cached_key.value, cached_value.value = keys, values
    cache_index.value = idx + n_new
    overflow = check_cache_fits(idx, n_new, max_len)
    return q, keys, values, pos, jnp.arange(max_len, dtype=jnp.int32), overflow

