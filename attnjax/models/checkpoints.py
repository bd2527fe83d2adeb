"""Checkpoint loaders: Hugging Face safetensors and GGUF -> Flax params.

Every loader builds the full list of (checkpoint tensor name, expected shape,
Flax param path, transform) for the architecture first, then reads the
tensors; a missing tensor or one of another shape raises ``ValueError``
naming the first such tensor (a checkpoint of another architecture fails on
its first tensor). ``safetensors`` and ``gguf`` are optional dependencies
(``pip install attnjax[models]``), imported when a loader runs.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from attnjax.models.bert import BertConfig
from attnjax.models.common import scans_layers, stack_layers
from attnjax.models.llama import LlamaConfig

__all__ = ["bert_tensor_map", "llama_tensor_map", "gguf_llama_tensor_map", "load_params",
           "load_bert_safetensors", "load_llama_safetensors", "read_gguf", "load_llama_gguf",
           "GGUFFile"]


class Tensor(NamedTuple):
  """One checkpoint tensor: where it goes in the Flax params and how it is reshaped."""
  name: str                      # name in the checkpoint
  shape: Tuple[int, ...]         # its expected shape in the checkpoint
  path: Tuple[str, ...]          # Flax param path
  transform: Callable[[np.ndarray], np.ndarray]


def _t(x):             # torch Linear weight [out, in] -> Flax Dense kernel [in, out]
  return x.T


def _heads_in(n, h):   # [n*h, D] -> DenseGeneral kernel [D, n, h]
  return lambda x: x.T.reshape(x.shape[1], n, h)


def _heads_out(n, h):  # [D, n*h] -> out kernel [n, h, D]
  return lambda x: x.T.reshape(n, h, x.shape[0])


def _id(x):
  return x


def bert_tensor_map(c: BertConfig) -> List[Tensor]:
  """Hugging Face BertModel names -> ``attnjax.models.BertEncoder`` params."""
  D, n = c.hidden_size, c.num_heads
  h, F = D // n, c.intermediate_size
  out = [
      Tensor("embeddings.word_embeddings.weight", (c.vocab_size, D),
             ("word_embeddings", "embedding"), _id),
      Tensor("embeddings.position_embeddings.weight", (c.max_position_embeddings, D),
             ("position_embeddings", "embedding"), _id),
      Tensor("embeddings.token_type_embeddings.weight", (c.type_vocab_size, D),
             ("token_type_embeddings", "embedding"), _id),
      Tensor("embeddings.LayerNorm.weight", (D,), ("embeddings_norm", "scale"), _id),
      Tensor("embeddings.LayerNorm.bias", (D,), ("embeddings_norm", "bias"), _id),
  ]
  for i in range(c.num_layers):
    p, L = f"encoder.layer.{i}.", f"layer_{i}"
    for hf, ours in (("query", "query"), ("key", "key"), ("value", "value")):
      out += [Tensor(f"{p}attention.self.{hf}.weight", (D, D), (L, "attention", ours, "kernel"),
                     _heads_in(n, h)),
              Tensor(f"{p}attention.self.{hf}.bias", (D,), (L, "attention", ours, "bias"),
                     lambda x: x.reshape(n, h))]
    out += [
        Tensor(f"{p}attention.output.dense.weight", (D, D), (L, "attention", "out", "kernel"),
               _heads_out(n, h)),
        Tensor(f"{p}attention.output.dense.bias", (D,), (L, "attention", "out", "bias"), _id),
        Tensor(f"{p}attention.output.LayerNorm.weight", (D,), (L, "attention_norm", "scale"),
               _id),
        Tensor(f"{p}attention.output.LayerNorm.bias", (D,), (L, "attention_norm", "bias"), _id),
        Tensor(f"{p}intermediate.dense.weight", (F, D), (L, "intermediate", "kernel"), _t),
        Tensor(f"{p}intermediate.dense.bias", (F,), (L, "intermediate", "bias"), _id),
        Tensor(f"{p}output.dense.weight", (D, F), (L, "output", "kernel"), _t),
        Tensor(f"{p}output.dense.bias", (D,), (L, "output", "bias"), _id),
        Tensor(f"{p}output.LayerNorm.weight", (D,), (L, "output_norm", "scale"), _id),
        Tensor(f"{p}output.LayerNorm.bias", (D,), (L, "output_norm", "bias"), _id),
    ]
  return out


def llama_tensor_map(c: LlamaConfig, names: Optional[Mapping[str, str]] = None) -> List[Tensor]:
  """Hugging Face LlamaForCausalLM names -> ``attnjax.models.LlamaDecoder`` params.

  ``names`` renames the per-layer/global parts (used for GGUF's spelling).
  """
  nm = dict(_HF_LLAMA if names is None else names)
  D, n, k, h, F = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
  q_fix = nm.pop("_q_transform", lambda x: x)
  k_fix = nm.pop("_k_transform", lambda x: x)
  out = [Tensor(nm["embed"], (c.vocab_size, D), ("embed_tokens", "embedding"), _id)]
  for i in range(c.num_layers):
    L, f = f"layer_{i}", (lambda part, i=i: nm[part].format(i=i))
    out += [
        Tensor(f("attn_norm"), (D,), (L, "attention_norm", "scale"), _id),
        Tensor(f("q"), (n * h, D), (L, "attention", "query", "kernel"),
               lambda x: _heads_in(n, h)(q_fix(x))),
        Tensor(f("k"), (k * h, D), (L, "attention", "key", "kernel"),
               lambda x: _heads_in(k, h)(k_fix(x))),
        Tensor(f("v"), (k * h, D), (L, "attention", "value", "kernel"), _heads_in(k, h)),
        Tensor(f("o"), (D, n * h), (L, "attention", "out", "kernel"), _heads_out(n, h)),
        Tensor(f("mlp_norm"), (D,), (L, "mlp_norm", "scale"), _id),
        Tensor(f("gate"), (F, D), (L, "gate", "kernel"), _t),
        Tensor(f("up"), (F, D), (L, "up", "kernel"), _t),
        Tensor(f("down"), (D, F), (L, "down", "kernel"), _t),
    ]
    if c.qkv_bias:  # [n*h] -> DenseGeneral bias [n, h]
      out += [Tensor(_bias_name(f(part)), (m * h,), (L, "attention", ours, "bias"),
                     lambda x, m=m, fix=fix: fix(x[:, None])[:, 0].reshape(m, h))
              for part, ours, m, fix in (("q", "query", n, q_fix), ("k", "key", k, k_fix),
                                         ("v", "value", k, _id))]
    if c.out_bias:
      out.append(Tensor(_bias_name(f("o")), (D,), (L, "attention", "out", "bias"), _id))
    if c.mlp_bias:
      out += [Tensor(_bias_name(f(part)), (size,), (L, part, "bias"), _id)
              for part, size in (("gate", F), ("up", F), ("down", D))]
  out.append(Tensor(nm["norm"], (D,), ("norm", "scale"), _id))
  if not c.tie_embeddings:
    out.append(Tensor(nm["lm_head"], (c.vocab_size, D), ("lm_head", "kernel"), _t))
  return out


def _bias_name(weight_name: str) -> str:
  """The checkpoint name of a projection's bias: "...q_proj.weight" -> "...q_proj.bias"."""
  return weight_name[:-len("weight")] + "bias"


_HF_LLAMA = {
    "embed": "model.embed_tokens.weight", "norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "q": "model.layers.{i}.self_attn.q_proj.weight",
    "k": "model.layers.{i}.self_attn.k_proj.weight",
    "v": "model.layers.{i}.self_attn.v_proj.weight",
    "o": "model.layers.{i}.self_attn.o_proj.weight",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "gate": "model.layers.{i}.mlp.gate_proj.weight",
    "up": "model.layers.{i}.mlp.up_proj.weight",
    "down": "model.layers.{i}.mlp.down_proj.weight",
}


def _unpermute(n_head: int):
  """Undoes llama.cpp's q/k row permutation (interleaved pairs -> rotate-half halves)."""
  def f(x):
    return (x.reshape(n_head, x.shape[0] // n_head // 2, 2, *x.shape[1:])
            .swapaxes(1, 2).reshape(x.shape))
  return f


def gguf_llama_tensor_map(c: LlamaConfig) -> List[Tensor]:
  """GGUF (llama.cpp) 'llama' names -> ``LlamaDecoder`` params (q/k rows un-permuted)."""
  names = {
      "embed": "token_embd.weight", "norm": "output_norm.weight", "lm_head": "output.weight",
      "attn_norm": "blk.{i}.attn_norm.weight", "q": "blk.{i}.attn_q.weight",
      "k": "blk.{i}.attn_k.weight", "v": "blk.{i}.attn_v.weight",
      "o": "blk.{i}.attn_output.weight", "mlp_norm": "blk.{i}.ffn_norm.weight",
      "gate": "blk.{i}.ffn_gate.weight", "up": "blk.{i}.ffn_up.weight",
      "down": "blk.{i}.ffn_down.weight",
      "_q_transform": _unpermute(c.num_heads), "_k_transform": _unpermute(c.num_kv_heads),
  }
  return llama_tensor_map(c, names)


def load_params(tensor_map: List[Tensor], shapes: Mapping[str, Tuple[int, ...]],
                read: Callable[[str], np.ndarray], dtype=jnp.float32, source: str = "checkpoint"):
  """Flax params (nested dict of ``dtype`` arrays) from a checkpoint.

  Args:
    tensor_map: what the architecture expects (``bert_tensor_map`` etc.).
    shapes: name -> shape of every tensor in the checkpoint (read before any data).
    read: name -> float NumPy array (dequantized where needed).
    dtype: float32 or bfloat16 (any float dtype).
    source: the checkpoint's name, for error messages.

  Raises:
    ValueError naming the first expected tensor that is missing or has another
    shape (all are checked before any data is read).
  """
  for t in tensor_map:
    if t.name not in shapes:
      close = [s for s in shapes if s.split(".")[-1] == t.name.split(".")[-1]][:3]
      raise ValueError(
          f"{source}: tensor {t.name!r} is missing (the checkpoint has {len(shapes)} tensors"
          f"{', e.g. ' + repr(close) if close else ''}); is it a checkpoint of another "
          "architecture or size?")
    if tuple(shapes[t.name]) != tuple(t.shape):
      raise ValueError(f"{source}: tensor {t.name!r} has shape {tuple(shapes[t.name])}, the "
                       f"model config expects {tuple(t.shape)}.")
  params: Dict[str, Any] = {}
  for t in tensor_map:
    arr = t.transform(np.asarray(read(t.name), np.float32))
    node = params
    for key in t.path[:-1]:
      node = node.setdefault(key, {})
    node[t.path[-1]] = jnp.asarray(arr, dtype)
  return params


def load_bert_safetensors(model_dir: str, dtype=jnp.float32, **config_overrides):
  """(BertConfig, params) from a Hugging Face BERT folder (config.json, model.safetensors)."""
  from safetensors import safe_open  # optional dependency  # pylint: disable=g-import-not-at-top
  config_overrides.setdefault("dtype", dtype)
  with open(os.path.join(model_dir, "config.json")) as f:
    config = BertConfig.from_hf(json.load(f), **config_overrides)
  path = os.path.join(model_dir, "model.safetensors")
  with safe_open(path, "np") as f:
    names = list(f.keys())
    # Checkpoints saved from BertForX prefix the encoder's names with "bert.".
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in names else ""
    shapes = {k[len(prefix):]: tuple(f.get_slice(k).get_shape()) for k in names
              if k.startswith(prefix)}
    params = load_params(bert_tensor_map(config), shapes, lambda k: f.get_tensor(prefix + k),
                         dtype, source=path)
  return config, _layout(params, config)


def _safetensors_files(model_dir: str) -> List[str]:
  """model.safetensors, or the shards listed by model.safetensors.index.json."""
  index = os.path.join(model_dir, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(model_dir, s) for s in shards]
  path = os.path.join(model_dir, "model.safetensors")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{model_dir}: neither model.safetensors nor "
                            "model.safetensors.index.json is there.")
  return [path]


def load_llama_safetensors(model_dir: str, dtype=jnp.float32, **config_overrides):
  """(LlamaConfig, params) from a Hugging Face Llama or Qwen2 folder.

  Reads config.json and model.safetensors (or the shards of
  model.safetensors.index.json); projection biases follow the config
  (``LlamaConfig.from_hf``). A missing tensor or one of another shape raises
  ValueError naming it, before any data is read.
  """
  from safetensors import safe_open  # optional dependency  # pylint: disable=g-import-not-at-top
  config_overrides.setdefault("dtype", dtype)
  with open(os.path.join(model_dir, "config.json")) as f:
    config = LlamaConfig.from_hf(json.load(f), **config_overrides)
  handles = [safe_open(p, "np") for p in _safetensors_files(model_dir)]
  where = {name: h for h in handles for name in h.keys()}
  shapes = {name: tuple(h.get_slice(name).get_shape()) for name, h in where.items()}
  params = load_params(llama_tensor_map(config), shapes,
                       lambda name: where[name].get_tensor(name), dtype, source=model_dir)
  return config, _layout(params, config)


class GGUFFile(NamedTuple):
  """A GGUF file's metadata (key -> Python value) and its tensors by name."""
  path: str
  metadata: Dict[str, Any]
  tensors: Dict[str, Any]        # name -> gguf ReaderTensor


def read_gguf(path: str) -> GGUFFile:
  """Opens a GGUF file (memory-mapped) with the ``gguf`` package."""
  import gguf  # optional dependency  # pylint: disable=g-import-not-at-top
  reader = gguf.GGUFReader(path)
  meta = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):
      continue
    meta[key] = field.contents()
  return GGUFFile(path, meta, {t.name: t for t in reader.tensors})


def _gguf_array(t) -> np.ndarray:
  """A GGUF tensor dequantized to float32, shape in row-major (PyTorch) order."""
  import gguf  # optional dependency  # pylint: disable=g-import-not-at-top
  shape = tuple(int(d) for d in reversed(t.shape))
  return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)


def load_llama_gguf(path_or_file, dtype=jnp.float32, **config_overrides):
  """(LlamaConfig, params) from a llama.cpp GGUF file, dequantized to ``dtype``.

  Any quantization the ``gguf`` package dequantizes (Q4_0, Q4_1, Q8_0, K-quants, ...)
  is read with NumPy; the result is float32 (or ``dtype``), not quantized.
  """
  g = path_or_file if isinstance(path_or_file, GGUFFile) else read_gguf(path_or_file)
  meta = dict(g.metadata)
  if "output.weight" in g.tensors:
    config_overrides.setdefault("tie_embeddings", False)
  for flag, name in (("qkv_bias", "blk.0.attn_q.bias"), ("out_bias", "blk.0.attn_output.bias"),
                     ("mlp_bias", "blk.0.ffn_up.bias")):
    if name in g.tensors:
      config_overrides.setdefault(flag, True)
  meta.setdefault("tokenizer.ggml.tokens", ())
  config_overrides.setdefault("dtype", dtype)
  config = LlamaConfig.from_gguf_metadata(meta, **config_overrides)
  shapes = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in g.tensors.items()}
  params = load_params(gguf_llama_tensor_map(config), shapes,
                       lambda k: _gguf_array(g.tensors[k]), dtype, source=g.path)
  return config, _layout(params, config)


def _layout(params, config):
  """Stacks the per-layer params when the model scans its layers (``scans_layers``)."""
  return stack_layers(params, config.num_layers) if scans_layers(config) else params
