"""A BERT-style encoder (post-LayerNorm) built from ``attnjax.layers.MultiHeadAttention``.

BERT ("BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding", arXiv:1810.04805): word + position + token-type embeddings
and LayerNorm, then blocks ``x = LN(x + Attn(x))``, ``x = LN(x + FFN(x))``
with an exact-erf GELU FFN. Sentence embeddings as sentence-transformers
(arXiv:1908.10084): mean over the real tokens, then L2 normalisation.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from attnjax.layers import MultiHeadAttention
from attnjax.models.common import layer_attention, scans_layers

__all__ = ["BertConfig", "BertEncoder", "mean_pool", "l2_normalize", "sentence_embedding"]


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Sizes of a BERT encoder; defaults are all-MiniLM-L6-v2's."""
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  attention: Union[str, Sequence[str]] = "dense"
  attention_options: Any = None
  implementation: Optional[str] = None
  dtype: Any = jnp.float32
  scan_layers: bool = True

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "BertConfig":
    """From a Hugging Face ``config.json`` dict of a BERT model."""
    if hf.get("model_type", "bert") != "bert":
      raise ValueError(f"config.json has model_type={hf.get('model_type')!r}; BertConfig "
                       "reads 'bert' configs.")
    if hf.get("hidden_act", "gelu") != "gelu":
      raise ValueError(f"hidden_act={hf.get('hidden_act')!r} is not supported (exact 'gelu').")
    if hf.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError("only absolute position embeddings are supported, got "
                       f"{hf.get('position_embedding_type')!r}.")
    kw = dict(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
              num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
              intermediate_size=hf["intermediate_size"],
              max_position_embeddings=hf["max_position_embeddings"],
              type_vocab_size=hf.get("type_vocab_size", 2),
              layer_norm_eps=hf.get("layer_norm_eps", 1e-12))
    kw.update(overrides)
    return cls(**kw)


class BertLayer(nn.Module):
  """One post-LN block over x [B, T, D]."""
  config: BertConfig
  attention: str = "dense"
  attention_options: Any = ()

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    ln = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, use_fast_variance=False,
                                   dtype=c.dtype, name=name)
    a = MultiHeadAttention(num_heads=c.num_heads, use_bias=True, attention=self.attention,
                           attention_options=dict(self.attention_options),
                           implementation=c.implementation, dtype=c.dtype,
                           name="attention")(x, mask=mask)
    x = ln("attention_norm")(x + a)
    h = nn.Dense(c.intermediate_size, dtype=c.dtype, name="intermediate")(x)
    h = nn.Dense(c.hidden_size, dtype=c.dtype, name="output")(nn.gelu(h, approximate=False))
    return ln("output_norm")(x + h)


class _ScannedLayer(BertLayer):
  """BertLayer with the (carry, output) signature ``nn.scan`` needs."""

  def __call__(self, x, mask):  # pylint: disable=arguments-renamed
    return super().__call__(x, mask), None


class BertEncoder(nn.Module):
  """token ids [B, T] -> hidden states [B, T, D] (float32 unless config.dtype).

  ``attention_mask`` [B, T] (1/True = real token, default all) masks padded
  keys in every layer; ``token_type_ids`` default 0. The attention family of
  each layer is ``config.attention`` (one name, or one per layer); the layers
  are one ``nn.scan`` with params stacked under "layers" when they all have
  the same attention (``config.scan_layers``), else "layer_0", ...
  """
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
    c = self.config
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must have shape [B, T], got {input_ids.shape}.")
    B, T = input_ids.shape
    if T > c.max_position_embeddings:
      raise ValueError(f"input_ids has T={T} tokens; the model has "
                       f"max_position_embeddings={c.max_position_embeddings}.")
    mask = (jnp.ones((B, T), bool) if attention_mask is None
            else jnp.asarray(attention_mask).astype(bool))
    if mask.shape != (B, T):
      raise ValueError(f"attention_mask must have shape [B, T]=({B}, {T}), got {mask.shape}.")
    types = jnp.zeros((B, T), jnp.int32) if token_type_ids is None else token_type_ids
    embed = lambda n, name: nn.Embed(n, c.hidden_size, name=name)
    x = (embed(c.vocab_size, "word_embeddings")(input_ids)
         + embed(c.max_position_embeddings, "position_embeddings")(jnp.arange(T))[None]
         + embed(c.type_vocab_size, "token_type_embeddings")(types))
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, use_fast_variance=False, dtype=c.dtype,
                     name="embeddings_norm")(x.astype(c.dtype))
    specs = layer_attention(c.attention, c.attention_options, c.num_layers)
    if scans_layers(c):
      stack = nn.scan(_ScannedLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=nn.broadcast, length=c.num_layers)
      x, _ = stack(c, specs[0][0], specs[0][1], name="layers")(x, mask)
    else:
      for i, (fam, opts) in enumerate(specs):
        x = BertLayer(c, fam, opts, name=f"layer_{i}")(x, mask)
    return x


def mean_pool(hidden, mask):
  """Mean of hidden [B, T, D] over the tokens where mask [B, T] is true -> [B, D] float32."""
  m = jnp.asarray(mask).astype(jnp.float32)[..., None]
  return (hidden.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)


def l2_normalize(x, eps: float = 1e-12):
  """x / max(||x||_2, eps) along the last axis (as torch.nn.functional.normalize)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def sentence_embedding(model: BertEncoder, params, input_ids, attention_mask):
  """Mean-pooled, L2-normalised embeddings [B, D] (sentence-transformers' recipe)."""
  hidden = model.apply({"params": params}, input_ids, attention_mask)
  return l2_normalize(mean_pool(hidden, attention_mask))
