"""A Llama-style decoder built from ``attnjax.layers.MultiHeadAttention``.

Llama ("LLaMA: Open and Efficient Foundation Language Models",
arXiv:2302.13971): pre-RMSNorm blocks ``x + Attn(RMSNorm(x))``,
``x + SwiGLU(RMSNorm(x))``, rotary embeddings (rotate-half), grouped-query
attention, optionally tied input/output embeddings. The projection bias
flags cover the Llama-family checkpoints that carry biases: Hugging Face
Llama's ``attention_bias`` (q, k, v and o) and ``mlp_bias``, and Qwen2
("Qwen2 Technical Report", arXiv:2407.10671: q, k, v only). With ``decode=True`` the
attention layers keep a KV cache (``attnjax.layers.MultiHeadAttention``);
``attnjax.models.generate`` runs the decoding loop.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.layers import MultiHeadAttention
from attnjax.layers.rope import RopeScaling
from attnjax.models.common import layer_attention, scans_layers

__all__ = ["LlamaConfig", "LlamaDecoder", "init_cache"]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Sizes of a Llama decoder; defaults are SmolLM2-135M's."""
  vocab_size: int = 49152
  hidden_size: int = 576
  num_layers: int = 30
  num_heads: int = 9
  num_kv_heads: int = 3
  head_dim: int = 64
  intermediate_size: int = 1536
  rope_base: float = 100000.0
  rope_scaling: Any = None      # None or an attnjax.layers.rope.RopeScaling
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = True
  qkv_bias: bool = False        # bias in the q, k and v projections (Qwen2, Llama attention_bias)
  out_bias: bool = False        # bias in the output projection (Llama attention_bias)
  mlp_bias: bool = False        # bias in gate/up/down (Llama mlp_bias)
  max_position_embeddings: int = 8192
  attention: Union[str, Sequence[str]] = "dense"
  attention_options: Any = None
  implementation: Optional[str] = None
  dtype: Any = jnp.float32
  scan_layers: bool = True

  @classmethod
  def from_gguf_metadata(cls, meta: Mapping[str, Any], **overrides) -> "LlamaConfig":
    """From GGUF key/values (``llama.*``; see ``attnjax.models.checkpoints``)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
      raise ValueError(f"GGUF general.architecture is {arch!r}; LlamaDecoder loads 'llama'.")
    g = lambda k, d=None: meta.get(f"llama.{k}", d)
    width, heads = int(g("embedding_length")), int(g("attention.head_count"))
    head_dim = int(g("attention.key_length", width // heads))
    rot = g("rope.dimension_count", head_dim)
    if int(rot) != head_dim:
      raise ValueError(f"llama.rope.dimension_count={rot} != head_dim={head_dim}: partial "
                       "rotary GGUF models are not supported.")
    kw = dict(vocab_size=int(g("vocab_size", len(meta.get("tokenizer.ggml.tokens", ())))),
              hidden_size=width, num_layers=int(g("block_count")), num_heads=heads,
              num_kv_heads=int(g("attention.head_count_kv", heads)), head_dim=head_dim,
              intermediate_size=int(g("feed_forward_length")),
              rope_base=float(g("rope.freq_base", 10000.0)),
              rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
              max_position_embeddings=int(g("context_length", 2048)))
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "LlamaConfig":
    """From a Hugging Face ``config.json`` dict of a Llama or Qwen2 model.

    ``rope_scaling`` ("linear", "dynamic", "yarn", "llama3") becomes an
    ``attnjax.layers.rope.RopeScaling``. Llama's ``attention_bias`` sets
    ``qkv_bias`` and ``out_bias``, ``mlp_bias`` sets ``mlp_bias``; Qwen2 has
    q/k/v biases. Qwen2's sliding-window layers (``use_sliding_window``) are
    not modelled and raise.
    """
    model_type = hf.get("model_type")
    if model_type not in ("llama", "qwen2"):
      raise ValueError(f"config.json has model_type={model_type!r}; LlamaConfig reads "
                       "'llama' and 'qwen2' configs.")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
      raise ValueError("config.json: use_sliding_window=True (Qwen2 sliding-window layers) is "
                       "not supported; LlamaDecoder attends to the whole causal prefix.")
    attention_bias = bool(hf.get("attention_bias", False))
    heads = hf["num_attention_heads"]
    kw = dict(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
              num_layers=hf["num_hidden_layers"], num_heads=heads,
              num_kv_heads=hf.get("num_key_value_heads", heads),
              head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
              intermediate_size=hf["intermediate_size"],
              rope_base=float(hf.get("rope_theta", 10000.0)),
              rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
              tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
              max_position_embeddings=hf.get("max_position_embeddings", 2048),
              qkv_bias=model_type == "qwen2" or attention_bias, out_bias=attention_bias,
              mlp_bias=bool(hf.get("mlp_bias", False)))
    if hf.get("rope_scaling"):
      kw["rope_scaling"] = RopeScaling.from_hf(hf["rope_scaling"], kw["max_position_embeddings"])
    kw.update(overrides)
    return cls(**kw)


class LlamaBlock(nn.Module):
  """One pre-norm block over x [B, T, D].

  ``positions`` (int [T] or [B, T], without a KV cache): the tokens' positions,
  for RoPE and causality (default ``arange(T)``); a block run on its own can
  then process a chunk that continues a sequence.
  """
  config: LlamaConfig
  attention: str = "dense"
  attention_options: Any = ()
  decode: bool = False

  @nn.compact
  def __call__(self, x, input_lengths=None, positions=None):
    c = self.config
    norm = lambda name: nn.RMSNorm(epsilon=c.rms_norm_eps, dtype=c.dtype, name=name)
    h = MultiHeadAttention(
        num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
        qkv_features=c.num_heads * c.head_dim, out_features=c.hidden_size,
        use_bias=c.qkv_bias, use_out_bias=c.out_bias,
        use_rope=True, rope_base=c.rope_base, rope_scaling=c.rope_scaling, causal=True,
        attention=self.attention, attention_options=dict(self.attention_options), implementation=c.implementation,
        decode=self.decode, dtype=c.dtype, name="attention")(
            norm("attention_norm")(x), input_lengths=input_lengths, q_positions=positions,
            k_positions=positions)
    x = x + h
    h = norm("mlp_norm")(x)
    dense = lambda n, name: nn.Dense(n, use_bias=c.mlp_bias, dtype=c.dtype, name=name)
    h = nn.silu(dense(c.intermediate_size, "gate")(h)) * dense(c.intermediate_size, "up")(h)
    return x + dense(c.hidden_size, "down")(h)


class _ScannedBlock(LlamaBlock):
  """LlamaBlock with the (carry, output) signature ``nn.scan`` needs."""

  def __call__(self, x, input_lengths=None):  # pylint: disable=arguments-renamed
    return super().__call__(x, input_lengths), None


class LlamaDecoder(nn.Module):
  """Causal LM: tokens [B, T] int -> logits [B, T, vocab] float32.

  Params: "embed_tokens", "norm" (and "lm_head" untied) and the blocks,
  stacked under "layers" (leading axis L) when every layer has the same
  attention (``config.scan_layers``), else "layer_0" ... "layer_{L-1}".

  Without a cache, right padding needs no mask (causality hides the padded
  tail from real tokens). With ``decode=True`` each call appends T tokens to
  every example's cache; ``input_lengths`` [B] says how many of them are
  real (right-padded prompts of different lengths).
  """
  config: LlamaConfig
  decode: bool = False

  @nn.compact
  def __call__(self, tokens, input_lengths=None):
    c = self.config
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be an int array [B, T], got {tokens.shape} {tokens.dtype}.")
    embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, name="embed_tokens")
    x = embed(tokens)
    specs = layer_attention(c.attention, c.attention_options, c.num_layers)
    if scans_layers(c):
      stack = nn.scan(_ScannedBlock, variable_axes={"params": 0, "cache": 0},
                      split_rngs={"params": True}, in_axes=nn.broadcast, length=c.num_layers)
      x, _ = stack(c, specs[0][0], specs[0][1], self.decode, name="layers")(x, input_lengths)
    else:
      for i, (fam, opts) in enumerate(specs):
        x = LlamaBlock(c, fam, opts, self.decode, name=f"layer_{i}")(x, input_lengths)
    x = nn.RMSNorm(epsilon=c.rms_norm_eps, dtype=c.dtype, name="norm")(x)
    if c.tie_embeddings:
      return embed.attend(x).astype(jnp.float32)
    return nn.Dense(c.vocab_size, use_bias=False, dtype=c.dtype,
                    name="lm_head")(x).astype(jnp.float32)


def init_cache(model: LlamaDecoder, batch_size: int, max_len: int, dtype=None):
  """An empty KV cache for ``model`` (decode=True): ``batch_size`` x ``max_len`` tokens.

  Shapes come from ``jax.eval_shape`` (nothing is computed); keys/values in
  ``dtype`` (default the model's compute dtype).
  """
  if not model.decode:
    model = model.clone(decode=True)
  if max_len < 1 or batch_size < 1:
    raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size}, {max_len}.")
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((batch_size, max_len), jnp.int32)))
  dt = jnp.dtype(dtype or model.config.dtype)
  return jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype if jnp.issubdtype(s.dtype, jnp.integer) else dt),
      shapes["cache"])
