"""Bigram-Backcopy (BB), the synthetic task of Active-Dormant Attention Heads (Guo et al., 2024; arXiv:2410.13835).

Token 0 is BOS and starts every sequence. A fixed random bigram transition
table (a function of the seed) gives each non-trigger token
``successors_per_token`` possible successors with Dirichlet(1) weights. The
``num_triggers`` trigger tokens (ids ``1..num_triggers``) never follow the
bigram rule: the token after a trigger copies the token *before* the trigger
(back-copy). Non-trigger tokens may be followed by a trigger with probability
``trigger_prob``. All next-token targets count in the loss; accuracy is also
reported on the deterministic back-copy positions (``copy_accuracy``) through
the ``copy_weights`` field.

Size: vocabulary ``vocab_size`` (default 64), ``batch_size`` x ``seq_len``
(default 64) tokens per batch, generated on the fly.
"""
from __future__ import annotations

import numpy as np

from experiments.tasks import base

BOS = 0


class BigramBackcopy(base.Task):
  """Decoder-only BB task (kind "lm")."""
  name = "bigram_backcopy"
  kind = "lm"
  extra_metrics = ("copy_accuracy",)

  def __init__(self, seed, batch_size, eval_batches, seq_len=64, vocab_size=64,
               num_triggers=3, successors_per_token=4, trigger_prob=0.15):
    super().__init__(seed, batch_size, eval_batches)
    self.seq_len = base.check_int("task.seq_len", seq_len, 3)
    self.vocab_size = self.num_classes = base.check_int("task.vocab_size", vocab_size, 8)
    self.num_triggers = base.check_int("task.num_triggers", num_triggers)
    if self.num_triggers + 2 >= self.vocab_size:
      raise ValueError(f"task.num_triggers={num_triggers} leaves no ordinary tokens in "
                       f"task.vocab_size={vocab_size}.")
    self.successors = base.check_int("task.successors_per_token", successors_per_token)
    if not 0.0 <= trigger_prob < 1.0:
      raise ValueError(f"task.trigger_prob must be in [0, 1), got {trigger_prob}.")
    self.trigger_prob = float(trigger_prob)
    first = self.num_triggers + 1
    ordinary = np.arange(first, self.vocab_size)
    table_rng = np.random.default_rng(np.random.SeedSequence([self.seed, 12345]))
    self.table = np.zeros((self.vocab_size, self.vocab_size), np.float64)
    for tok in [BOS] + list(ordinary):
      succ = table_rng.choice(ordinary, size=min(self.successors, ordinary.size), replace=False)
      self.table[tok, succ] = table_rng.dirichlet(np.ones(succ.size))
    self.cum = np.cumsum(self.table, axis=1)

  def _example(self, rng):
    L = self.seq_len
    seq = np.zeros(L + 1, np.int32)
    copy = np.zeros(L, np.float32)
    seq[0] = BOS
    u = rng.random((L + 1, 2))
    for t in range(1, L + 1):
      prev = seq[t - 1]
      if 1 <= prev <= self.num_triggers:
        seq[t] = seq[t - 2]          # back-copy: a trigger is never at t-1 == 0
        copy[t - 1] = 1.0
      elif t >= 2 and u[t, 0] < self.trigger_prob:
        seq[t] = 1 + int(u[t, 1] * self.num_triggers)
      else:
        seq[t] = int(np.searchsorted(self.cum[prev], u[t, 1] * self.cum[prev, -1], "right"))
    return {"inputs": seq[:-1], "targets": seq[1:],
            "weights": np.ones(L, np.float32), "copy_weights": copy}

  def batch(self, split, index):
    rng = base.rng_for(self.seed, split, index)
    return base.stack([self._example(rng) for _ in range(self.batch_size)])

  def describe(self):
    return {"task": self.name, "seq_len": self.seq_len, "vocab": self.vocab_size,
            "triggers": list(range(1, self.num_triggers + 1)),
            "successors_per_token": self.successors}
