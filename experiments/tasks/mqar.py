"""Multi-query associative recall (MQAR), as in Zoology (Arora et al., 2023) and BASED (arXiv:2402.18668).

A sequence of length ``seq_len`` starts with ``num_kv_pairs`` key-value
pairs ``k1 v1 k2 v2 ...`` (keys drawn without replacement from
``[1, vocab/2)``, values from ``[vocab/2, vocab)``). The rest of the sequence
is filler token 0, except that every key appears again, followed by its
value, at a random even offset of the query region; query slots are drawn
without replacement with probability proportional to ``(slot+1)**(alpha-1)``
(Zoology's power-law placement, ``alpha=0.01``: short gaps more likely).
The target at a query position is its value; only those positions count
(``weights``), so accuracy = fraction of recalled values.

Size: ``batch_size`` x ``seq_len`` tokens per batch, generated on the fly;
requires ``seq_len >= 4 * num_kv_pairs`` and ``vocab >= 2 * num_kv_pairs + 2``.
Default config: vocab 128, seq_len 128, 8 pairs.
"""
from __future__ import annotations

import numpy as np

from experiments.tasks import base


class MQAR(base.Task):
  """Decoder-only recall task (kind "lm", loss on query positions only)."""
  name = "mqar"
  kind = "lm"
  extra_metrics = ("seq_accuracy",)

  def __init__(self, seed, batch_size, eval_batches, seq_len=128, vocab_size=128,
               num_kv_pairs=8, alpha=0.01):
    super().__init__(seed, batch_size, eval_batches)
    self.seq_len = base.check_int("task.seq_len", seq_len, 4)
    self.vocab_size = self.num_classes = base.check_int("task.vocab_size", vocab_size, 4)
    self.num_kv_pairs = base.check_int("task.num_kv_pairs", num_kv_pairs)
    if 4 * self.num_kv_pairs > self.seq_len:
      raise ValueError(
          f"task.seq_len={seq_len} must be >= 4 * task.num_kv_pairs={4 * num_kv_pairs} "
          "(the pairs, then a query and its value for each).")
    if self.vocab_size // 2 - 1 < self.num_kv_pairs:
      raise ValueError(
          f"task.vocab_size={vocab_size} gives {self.vocab_size // 2 - 1} distinct keys, fewer "
          f"than task.num_kv_pairs={num_kv_pairs}.")
    self.alpha = float(alpha)
    n_slots = (self.seq_len - 2 * self.num_kv_pairs) // 2
    p = (np.arange(n_slots) + 1.0) ** (self.alpha - 1.0)
    self.slot_p = p / p.sum()

  def _example(self, rng):
    D, L, V = self.num_kv_pairs, self.seq_len, self.vocab_size
    keys = rng.choice(np.arange(1, V // 2), size=D, replace=False)
    values = rng.choice(np.arange(V // 2, V), size=D, replace=True)
    seq = np.zeros(L + 1, np.int32)
    seq[0:2 * D:2] = keys
    seq[1:2 * D:2] = values
    slots = rng.choice(self.slot_p.size, size=D, replace=False, p=self.slot_p)
    order = rng.permutation(D)
    pos = 2 * D + 2 * slots
    seq[pos] = keys[order]
    seq[pos + 1] = values[order]
    weights = np.zeros(L, np.float32)
    weights[pos] = 1.0
    return {"inputs": seq[:-1], "targets": seq[1:], "weights": weights}

  def batch(self, split, index):
    rng = base.rng_for(self.seed, split, index)
    return base.stack([self._example(rng) for _ in range(self.batch_size)])

  def describe(self):
    return {"task": self.name, "seq_len": self.seq_len, "vocab": self.vocab_size,
            "num_kv_pairs": self.num_kv_pairs, "queries_per_example": self.num_kv_pairs}
