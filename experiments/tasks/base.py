"""Common protocol of the embedded tasks: batches are pure functions of (seed, split, step).

Every task returns NumPy batches (dicts of arrays) so that the data order
never depends on process state: resuming a run at step ``s`` sees exactly the
batches an uninterrupted run would have seen.

Batch formats:

- ``kind == "lm"`` (decoder, next-token prediction): ``inputs`` int32 [B, T],
  ``targets`` int32 [B, T], ``weights`` float32 [B, T] (1 where the target
  counts in the loss and the metrics).
- ``kind == "classify"`` (encoder): ``inputs`` int32 [B, T] token ids or
  float32 [B, T, F] features, ``labels`` int32 [B], ``weights`` float32 [B]
  (0 for padding rows of the last evaluation batch), and optionally
  ``token_mask`` bool [B, T] (False on padding tokens).
"""
from __future__ import annotations

import abc
from typing import Dict, Iterator, List

import numpy as np

SPLITS = {"train": 0, "eval": 1, "test": 2}


def rng_for(seed: int, split: str, index: int) -> np.random.Generator:
  """The generator of batch ``index`` of ``split``: a pure function of its arguments."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}.")
  return np.random.default_rng(np.random.SeedSequence([int(seed), SPLITS[split], int(index)]))


class Task(abc.ABC):
  """A dataset with deterministic batches.

  Attributes:
    name: registry name.
    kind: "lm" or "classify".
    vocab_size: input vocabulary (None for feature inputs).
    input_dim: feature size F for float inputs (None for token inputs).
    num_classes: output size (vocabulary for LM tasks).
    seq_len: T.
    batch_size: B of training batches.
  """
  name: str = ""
  kind: str = "lm"
  vocab_size = None
  input_dim = None
  num_classes: int = 0
  seq_len: int = 0
  batch_size: int = 0
  #: Metrics the task adds to loss/accuracy (e.g. bits_per_byte).
  extra_metrics: tuple = ()

  def __init__(self, seed: int, batch_size: int, eval_batches: int):
    self.seed = int(seed)
    self.batch_size = check_int("task.batch_size", batch_size)
    self.num_eval_batches = check_int("task.eval_batches", eval_batches)

  @abc.abstractmethod
  def batch(self, split: str, index: int) -> Dict[str, np.ndarray]:
    """Batch ``index`` of ``split`` (a pure function of seed, split, index)."""

  def train_batch(self, step: int) -> Dict[str, np.ndarray]:
    return self.batch("train", step)

  def eval_batches(self) -> Iterator[Dict[str, np.ndarray]]:
    """The fixed evaluation set: ``num_eval_batches`` batches."""
    for i in range(self.num_eval_batches):
      yield self.batch("eval", i)

  def extra_eval_sets(self) -> Dict[str, List[Dict[str, np.ndarray]]]:
    """Named extra evaluation sets run at the end of training (default none)."""
    return {}

  @abc.abstractmethod
  def describe(self) -> Dict[str, object]:
    """Sizes and settings, for logs and the docs."""


def check_int(name: str, v, minimum: int = 1) -> int:
  """Integer config value >= minimum, or ValueError naming the field."""
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}.")
  return int(v)


def stack(examples: List[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
  """List of per-example dicts -> dict of stacked arrays."""
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
