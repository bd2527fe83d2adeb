"""Tokenizers of the pretrained models, through the ``tokenizers`` library.

``tokenizer.json`` files load as they are; a GGUF file's tokenizer (the
``tokenizer.ggml.*`` metadata of a byte-level BPE, ``model == "gpt2"``) is
rebuilt as a ``tokenizers.Tokenizer`` from its tokens and merges, with the
pre-tokenizer that ``tokenizer.ggml.pre`` names. ``tokenizers`` is an optional
dependency (``pip install attnjax[models]``), imported when a function runs.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = ["load_tokenizer_json", "gguf_tokenizer", "encode_batch"]

#: GGUF token types (llama.cpp): 3 is a control token, 4 user-defined.
_CONTROL, _USER_DEFINED = 3, 4


def load_tokenizer_json(path: str, max_length: Optional[int] = None, pad_id: int = 0):
  """A ``tokenizers.Tokenizer`` from ``tokenizer.json``.

  ``max_length`` sets truncation (sentence-transformers' ``max_seq_length``);
  padding is to the longest sequence of a batch, on the right, with ``pad_id``.
  """
  import tokenizers  # optional dependency  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer.from_file(path)
  if max_length is not None:
    tok.enable_truncation(max_length)
  else:
    tok.no_truncation()
  pad = tok.id_to_token(pad_id)
  tok.enable_padding(direction="right", pad_id=pad_id, pad_token=pad)
  return tok


def _pre_tokenizer(pre: str):
  import tokenizers  # pylint: disable=g-import-not-at-top
  pt = tokenizers.pre_tokenizers
  byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in ("gpt2", "default"):
    return byte_level
  if pre == "smollm":   # digits one by one, then GPT-2's byte-level split (llama.cpp's SMOLLM)
    return pt.Sequence([pt.Digits(individual_digits=True), byte_level])
  raise ValueError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported (known: 'gpt2', "
                   "'default', 'smollm'); its split pattern would have to be written here.")


def gguf_tokenizer(metadata: Mapping[str, Any]):
  """A ``tokenizers.Tokenizer`` from GGUF metadata (``attnjax.models.read_gguf``).

  Byte-level BPE only (``tokenizer.ggml.model == "gpt2"``). Control and
  user-defined tokens (``tokenizer.ggml.token_type`` 3/4) become special added
  tokens, so text such as ``<|im_start|>`` encodes to its single id. No
  BOS/EOS is added (``tokenizer.ggml.add_bos_token`` is honoured).
  """
  import tokenizers  # optional dependency  # pylint: disable=g-import-not-at-top
  model = metadata.get("tokenizer.ggml.model")
  if model != "gpt2":
    raise ValueError(f"GGUF tokenizer.ggml.model={model!r}: only byte-level BPE ('gpt2') "
                     "tokenizers are supported.")
  tokens = list(metadata["tokenizer.ggml.tokens"])
  merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
  types = np.asarray(metadata.get("tokenizer.ggml.token_type", [1] * len(tokens)))
  bpe = tokenizers.models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                              fuse_unk=False, byte_fallback=False)
  tok = tokenizers.Tokenizer(bpe)
  tok.pre_tokenizer = _pre_tokenizer(metadata.get("tokenizer.ggml.pre", "default"))
  tok.decoder = tokenizers.decoders.ByteLevel()
  special = [tokenizers.AddedToken(tokens[i], special=True, normalized=False)
             for i in np.nonzero((types == _CONTROL) | (types == _USER_DEFINED))[0]]
  tok.add_special_tokens(special)
  bos = metadata.get("tokenizer.ggml.bos_token_id")
  if metadata.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{tokens[bos]} $A", special_tokens=[(tokens[bos], int(bos))])
  pad = metadata.get("tokenizer.ggml.padding_token_id")
  if pad is not None:
    tok.enable_padding(direction="right", pad_id=int(pad), pad_token=tokens[int(pad)])
  return tok


def encode_batch(tokenizer, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
  """(ids [B, T] int32, attention mask [B, T] int32), right-padded to the longest text."""
  if isinstance(texts, str):
    raise TypeError("texts must be a sequence of strings, got one string.")
  enc = tokenizer.encode_batch(list(texts))
  pad_id = (tokenizer.padding or {}).get("pad_id", 0)
  T = max((len(e.ids) for e in enc), default=0)
  ids = np.full((len(enc), T), pad_id, np.int32)
  mask = np.zeros((len(enc), T), np.int32)
  for b, e in enumerate(enc):
    n = int(np.sum(e.attention_mask)) if e.attention_mask else len(e.ids)
    ids[b, :n], mask[b, :n] = e.ids[:n], 1
  return ids, mask
