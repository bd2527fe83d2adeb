"""ListOps (Nangia & Bowman, 2018; the Long Range Arena variant) generated on the fly.

Expressions are trees of the operators MAX, MIN, MED (median, rounded down
as ``int(np.median)``), SM (sum modulo 10) over digits 0-9, written in prefix
form ``[MAX 2 9 [MIN 4 7 ] 0 ]``. A tree of depth at most ``max_depth`` with
at most ``max_args`` arguments per operator is drawn (an argument becomes a
sub-tree with probability ``branch_prob``); expressions longer than
``seq_len`` tokens are redrawn. The label is the value (10 classes).

Tokens: 0 PAD, 1..10 digits 0-9, 11 [MAX, 12 [MIN, 13 [MED, 14 [SM, 15 ].
Batches are padded with PAD on the right; ``token_mask`` marks real tokens.
Size: ``batch_size`` expressions of at most ``seq_len`` tokens (default 128,
depth 4, up to 5 arguments) per batch, generated on the fly.
"""
from __future__ import annotations

import numpy as np

from experiments.tasks import base

PAD, DIGIT0, CLOSE = 0, 1, 15
OPS = {"MAX": 11, "MIN": 12, "MED": 13, "SM": 14}
_FUNCS = {"MAX": max, "MIN": min, "MED": lambda x: int(np.median(x)), "SM": lambda x: sum(x) % 10}


def evaluate(tokens) -> int:
  """Value of a token sequence (prefix form, no padding)."""
  stack = []
  inv = {v: k for k, v in OPS.items()}
  for t in tokens:
    t = int(t)
    if t in inv:
      stack.append((inv[t], []))
    elif t == CLOSE:
      op, args = stack.pop()
      val = _FUNCS[op](args)
      if not stack:
        return val
      stack[-1][1].append(val)
    elif DIGIT0 <= t < DIGIT0 + 10:
      if not stack:
        return t - DIGIT0
      stack[-1][1].append(t - DIGIT0)
    else:
      raise ValueError(f"unexpected token {t} in a ListOps expression.")
  raise ValueError("unterminated ListOps expression.")


class ListOps(base.Task):
  """Encoder classification task (kind "classify", 10 classes)."""
  name = "listops"
  kind = "classify"
  vocab_size = 16
  num_classes = 10

  def __init__(self, seed, batch_size, eval_batches, seq_len=128, max_depth=4, max_args=5,
               branch_prob=0.3):
    super().__init__(seed, batch_size, eval_batches)
    self.seq_len = base.check_int("task.seq_len", seq_len, 3)
    self.max_depth = base.check_int("task.max_depth", max_depth)
    self.max_args = base.check_int("task.max_args", max_args, 2)
    if not 0.0 <= branch_prob <= 1.0:
      raise ValueError(f"task.branch_prob must be in [0, 1], got {branch_prob}.")
    self.branch_prob = float(branch_prob)

  def _tree(self, rng, depth):
    op = list(OPS)[rng.integers(len(OPS))]
    toks = [OPS[op]]
    for _ in range(rng.integers(2, self.max_args + 1)):
      if depth < self.max_depth and rng.random() < self.branch_prob:
        toks += self._tree(rng, depth + 1)
      else:
        toks.append(DIGIT0 + int(rng.integers(10)))
    return toks + [CLOSE]

  def _example(self, rng):
    for _ in range(1000):
      toks = self._tree(rng, 1)
      if len(toks) <= self.seq_len:
        break
    else:
      raise ValueError(f"task.seq_len={self.seq_len} is too short for ListOps trees of "
                       f"max_depth={self.max_depth}, max_args={self.max_args}.")
    x = np.full(self.seq_len, PAD, np.int32)
    x[:len(toks)] = toks
    return {"inputs": x, "labels": np.int32(evaluate(toks)), "weights": np.float32(1.0),
            "token_mask": x != PAD}

  def batch(self, split, index):
    rng = base.rng_for(self.seed, split, index)
    return base.stack([self._example(rng) for _ in range(self.batch_size)])

  def describe(self):
    return {"task": self.name, "seq_len": self.seq_len, "vocab": self.vocab_size,
            "classes": 10, "max_depth": self.max_depth, "max_args": self.max_args}
