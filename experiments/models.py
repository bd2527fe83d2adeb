"""Models built from attnjax layers: a decoder-only LM and an encoder classifier.

Each block is pre-norm: ``x + Attn(RMSNorm(x))`` then ``x + MLP(RMSNorm(x))``,
with the attention family of each layer chosen by the config
(``experiments.families.resolve``): e.g. all layers S2, or MASFormer-style
two dense layers and the rest S2.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.layers import MultiHeadAttention

from experiments import config_checks, families

LayerSpec = Tuple[str, Tuple[Tuple[str, Any], ...]]


def _constrain(x, sharding):
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


class Block(nn.Module):
  """One transformer block over x [B, T, D]."""
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  attention: str
  attention_options: Tuple[Tuple[str, Any], ...]
  causal: bool
  use_rope: bool
  implementation: Optional[str]
  dtype: Any = jnp.float32
  act_sharding: Any = None

  @nn.compact
  def __call__(self, x):
    h = nn.RMSNorm(dtype=self.dtype, name="attn_norm")(x)
    h = MultiHeadAttention(
        num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, use_bias=False,
        use_rope=self.use_rope, causal=self.causal, attention=self.attention,
        attention_options=dict(self.attention_options), implementation=self.implementation,
        dtype=self.dtype, name="attn")(h)
    x = _constrain(x + h, self.act_sharding)
    h = nn.RMSNorm(dtype=self.dtype, name="mlp_norm")(x)
    h = nn.Dense(self.mlp_dim, use_bias=False, dtype=self.dtype, name="mlp_in")(h)
    h = nn.Dense(x.shape[-1], use_bias=False, dtype=self.dtype, name="mlp_out")(nn.gelu(h))
    return _constrain(x + h, self.act_sharding)


class Trunk(nn.Module):
  """The stack of blocks, one (family, options) per layer."""
  layers: Sequence[LayerSpec]
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  causal: bool
  use_rope: bool
  implementation: Optional[str]
  dtype: Any = jnp.float32
  act_sharding: Any = None

  @nn.compact
  def __call__(self, x):
    for i, (fam, opts) in enumerate(self.layers):
      x = Block(self.num_heads, self.num_kv_heads, self.mlp_dim, fam, opts, self.causal,
                self.use_rope, self.implementation, self.dtype, self.act_sharding,
                name=f"block_{i}")(x)
    return nn.RMSNorm(dtype=self.dtype, name="final_norm")(x)


class DecoderLM(nn.Module):
  """Causal LM: tokens [B, T] int -> logits [B, T, vocab] float32 (tied embeddings)."""
  vocab_size: int
  d_model: int
  trunk: Trunk

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab_size, self.d_model, name="embed",
                     embedding_init=nn.initializers.normal(0.02))
    x = embed(tokens).astype(self.trunk.dtype)
    x = _constrain(x, self.trunk.act_sharding)
    x = self.trunk(x)
    return embed.attend(x.astype(jnp.float32))


class EncoderClassifier(nn.Module):
  """Non-causal encoder: tokens [B, T] int or features [B, T, F] -> logits [B, C].

  Learned position embeddings (plus RoPE when the config asks); mean pooling
  over the real tokens (``token_mask`` [B, T], default all).
  """
  num_classes: int
  d_model: int
  seq_len: int
  trunk: Trunk
  vocab_size: Optional[int] = None

  @nn.compact
  def __call__(self, inputs, token_mask=None):
    if self.vocab_size is not None:
      x = nn.Embed(self.vocab_size, self.d_model, name="embed",
                   embedding_init=nn.initializers.normal(0.02))(inputs)
    else:
      x = nn.Dense(self.d_model, name="embed")(inputs)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (self.seq_len, self.d_model))
    x = (x + pos[None, :x.shape[1]]).astype(self.trunk.dtype)
    x = self.trunk(_constrain(x, self.trunk.act_sharding)).astype(jnp.float32)
    if token_mask is None:
      pooled = x.mean(axis=1)
    else:
      m = token_mask.astype(jnp.float32)[..., None]
      pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    return nn.Dense(self.num_classes, name="head")(pooled)


#: Families that run context-parallel on every multi-device mesh (head-sharded S2); the
#: others run context-parallel (``attnjax.sharding.context_parallel_family``) when the
#: mesh's context axis is larger than 1.
CONTEXT_PARALLEL = ("s2",)


def _mesh_family(name: str, mesh) -> str:
  """Registers (once per mesh) the context-parallel version of ``name``; returns its name.

  A family with no context-parallel route is a ValueError naming it (and why).
  """
  from attnjax.layers import registry  # pylint: disable=g-import-not-at-top
  from attnjax import sharding  # pylint: disable=g-import-not-at-top
  shape = "x".join(f"{k}{v}" for k, v in mesh.shape.items())
  sharded = f"{name}@{shape}#{id(mesh)}"
  if sharded not in registry.list_families():
    if name in CONTEXT_PARALLEL:
      fn = sharding.s2_family_for_mesh(mesh)
    else:
      try:
        fn = sharding.context_parallel_family(name, mesh, axis="context", head_axis="heads",
                                              data_axis="data")
      except NotImplementedError as e:
        raise ValueError(f"config.mesh.context={mesh.shape['context']}: {e}") from None
    registry.register_family(sharded, fn)
  return sharded


def _runs_context_parallel(name: str, mesh) -> bool:
  if mesh is None or mesh.size <= 1:
    return False
  return name in CONTEXT_PARALLEL or mesh.shape.get("context", 1) > 1


def build_model(config, task, act_sharding=None, mesh=None) -> nn.Module:
  """The model of ``config.model`` for ``task`` (kinds must match).

  Every layer's attention options are checked first by tracing the family
  (``config_checks.check_attention``): a bad option is a ValueError naming its
  config field.

  On a multi-device ``mesh`` the S2 layers run context-parallel
  (``attnjax.sharding.context_parallel_attention`` inside ``shard_map``); with
  ``config.mesh.context > 1`` every other family runs context-parallel too
  (``attnjax.sharding.context_parallel_family``: block-sparse, linear or
  neighborhood route), and a family that cannot is a ValueError naming it.
  Otherwise families are partitioned by XLA from the sharded activations.
  """
  m = config.model
  resolved = families.resolve(m)
  resolved = [(_mesh_family(f, mesh) if _runs_context_parallel(f, mesh) else f, o)
              for f, o in resolved]
  layers = tuple((fam, tuple(sorted(opts.items()))) for fam, opts in resolved)
  impl = None if m.implementation in ("auto", "", None) else str(m.implementation)
  dtype = jnp.dtype(m.dtype)
  kv = int(m.num_kv_heads) or int(m.num_heads)
  kind = str(m.kind)
  if kind not in ("decoder_lm", "encoder_classifier"):
    raise ValueError(f"config.model.kind must be 'decoder_lm' or 'encoder_classifier', got "
                     f"{kind!r}.")
  want = "lm" if kind == "decoder_lm" else "classify"
  if task.kind != want:
    raise ValueError(f"config.model.kind={kind!r} cannot train task {task.name!r} (a "
                     f"{task.kind!r} task); use "
                     f"{'decoder_lm' if task.kind == 'lm' else 'encoder_classifier'}.")
  config_checks.check_attention(config, task.seq_len)
  trunk = Trunk(layers, int(m.num_heads), kv, int(m.mlp_ratio) * int(m.d_model),
                causal=(kind == "decoder_lm"), use_rope=bool(m.use_rope), implementation=impl,
                dtype=dtype, act_sharding=act_sharding, parent=None)
  if kind == "decoder_lm":
    return DecoderLM(task.vocab_size, int(m.d_model), trunk)
  return EncoderClassifier(task.num_classes, int(m.d_model), task.seq_len, trunk,
                           vocab_size=task.vocab_size)
