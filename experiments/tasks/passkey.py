"""Passkey / needle-in-a-haystack retrieval at chosen context lengths (synthetic, token level).

Vocabulary: 0 PAD, 1 QUERY, 2 NEEDLE, 3..12 the digits 0-9, 13..vocab-1
filler tokens. An example of context length ``c`` is ``c`` tokens of random
filler holding, at a uniformly random depth, ``NEEDLE d1 .. dk`` (a random
``k``-digit passkey), followed by ``QUERY d1 .. dk`` and PAD up to
``seq_len``. The model is trained to emit the digits after QUERY (loss only
on those ``k`` positions); accuracy is exact match of all ``k`` digits under
teacher forcing, which equals greedy decoding's exact match.

Training draws ``c`` uniformly from ``[min_context, seq_len - k - 1]`` so that
one model is evaluated at every context length of ``eval_contexts``
(``context_batch(c, index)``); the default evaluation uses the longest.
Size: ``batch_size`` x ``seq_len`` tokens per batch, generated on the fly.
"""
from __future__ import annotations

import numpy as np

from experiments.tasks import base

PAD, QUERY, NEEDLE, DIGIT0 = 0, 1, 2, 3
FILLER0 = 13


class Passkey(base.Task):
  """Decoder-only retrieval task (kind "lm")."""
  name = "passkey"
  kind = "lm"
  extra_metrics = ("seq_accuracy",)

  def __init__(self, seed, batch_size, eval_batches, seq_len=256, vocab_size=32,
               num_digits=4, min_context=16, eval_contexts=()):
    super().__init__(seed, batch_size, eval_batches)
    self.seq_len = base.check_int("task.seq_len", seq_len, 8)
    self.vocab_size = self.num_classes = base.check_int("task.vocab_size", vocab_size, FILLER0 + 1)
    self.num_digits = base.check_int("task.num_digits", num_digits)
    self.max_context = self.seq_len - self.num_digits - 1
    self.min_context = base.check_int("task.min_context", min_context, self.num_digits + 2)
    if self.min_context > self.max_context:
      raise ValueError(
          f"task.min_context={min_context} exceeds the longest context seq_len - num_digits - 1"
          f" = {self.max_context}.")
    self.eval_contexts = tuple(int(c) for c in eval_contexts) or (self.max_context,)
    for c in self.eval_contexts:
      if not self.num_digits + 1 <= c <= self.max_context:
        raise ValueError(
            f"task.eval_contexts entry {c} must lie in [{self.num_digits + 1}, "
            f"{self.max_context}] for seq_len={self.seq_len}, num_digits={self.num_digits}.")

  def _example(self, rng, context):
    k, L = self.num_digits, self.seq_len
    seq = np.full(L + 1, PAD, np.int32)
    seq[:context] = rng.integers(FILLER0, self.vocab_size, size=context)
    digits = rng.integers(0, 10, size=k) + DIGIT0
    depth = rng.integers(0, context - k)
    seq[depth] = NEEDLE
    seq[depth + 1:depth + 1 + k] = digits
    seq[context] = QUERY
    seq[context + 1:context + 1 + k] = digits
    weights = np.zeros(L, np.float32)
    weights[context:context + k] = 1.0   # inputs QUERY, d1..d_{k-1} predict d1..dk
    return {"inputs": seq[:-1], "targets": seq[1:], "weights": weights}

  def batch(self, split, index):
    rng = base.rng_for(self.seed, split, index)
    if split == "train":
      ctx = rng.integers(self.min_context, self.max_context + 1, size=self.batch_size)
    else:
      ctx = np.full(self.batch_size, self.eval_contexts[-1])
    return base.stack([self._example(rng, int(c)) for c in ctx])

  def context_batch(self, context: int, index: int):
    """Evaluation batch ``index`` at context length ``context`` (deterministic)."""
    rng = base.rng_for(self.seed + 7919 * int(context), "test", index)
    return base.stack([self._example(rng, int(context)) for _ in range(self.batch_size)])

  def extra_eval_sets(self):
    """One evaluation set per context length of ``eval_contexts``."""
    return {f"context_{c}": [self.context_batch(c, i) for i in range(self.num_eval_batches)]
            for c in self.eval_contexts}

  def describe(self):
    return {"task": self.name, "seq_len": self.seq_len, "vocab": self.vocab_size,
            "digits": self.num_digits, "train_contexts": [self.min_context, self.max_context],
            "eval_contexts": list(self.eval_contexts)}
