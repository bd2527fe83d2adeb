"""Byte-level language modelling on the Python standard library's own source files.

The corpus is read from the running interpreter (no network): every ``*.py``
file under ``sysconfig.get_paths()["stdlib"]`` (the directory holding
``os.py``), walked in sorted order, skipping ``site-packages``,
``dist-packages``, ``__pycache__`` and, by default, the test suites
(directories named ``test``, ``tests``, ``idle_test``). Each file is assigned
to the validation split when ``crc32(relative path) % 100 < eval_percent``
(default 5), so the split does not depend on the file order or the machine.
Files are joined with a ``\\x00`` byte (never present in source files) into
one byte stream per split; the vocabulary is the 256 byte values.

Size (CPython 3.11.7): without the test suites 734 files / 12.1 MB
(train 679 files, 11.26 MB; validation 55 files, 0.86 MB); with
``include_tests=True`` 1,790 files / 31.5 MB (train 30.1 MB, validation
1.4 MB). The exact numbers depend on the interpreter version and are
reported by :meth:`StdlibLM.describe`.

Training batch ``s`` takes ``batch_size`` windows of ``seq_len + 1`` bytes at
offsets drawn from a generator seeded with (seed, "train", s); evaluation
batch ``i`` from (seed, "eval", i) over the validation stream. Bits per byte
= loss (nats per byte) / ln 2.
"""
from __future__ import annotations

import functools
import os
import sysconfig
import zlib
from typing import Dict, List, Tuple

import numpy as np

from experiments.tasks import base

SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__")
TEST_DIRS = ("test", "tests", "idle_test")
SEPARATOR = b"\x00"


def stdlib_dir() -> str:
  """The standard library directory of the running interpreter."""
  path = sysconfig.get_paths().get("stdlib") or os.path.dirname(os.__file__)
  if not os.path.isfile(os.path.join(path, "os.py")):
    path = os.path.dirname(os.__file__)
  return path


def list_files(root: str, include_tests: bool = False) -> List[str]:
  """Sorted relative paths of the ``*.py`` files of the corpus."""
  skip = SKIP_DIRS + (() if include_tests else TEST_DIRS)
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in skip)
    for f in sorted(filenames):
      if f.endswith(".py"):
        out.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
  return sorted(out)


def is_eval_file(rel_path: str, eval_percent: int) -> bool:
  return zlib.crc32(rel_path.encode("utf-8")) % 100 < eval_percent


@functools.lru_cache(maxsize=4)
def load_corpus(include_tests: bool = False, eval_percent: int = 5,
                max_bytes: int = 0) -> Tuple[np.ndarray, np.ndarray, Dict[str, int]]:
  """(train bytes uint8 [N], eval bytes uint8 [M], stats). ``max_bytes`` > 0 caps the train stream."""
  root = stdlib_dir()
  files = list_files(root, include_tests)
  if not files:
    raise RuntimeError(f"no *.py files found under the standard library directory {root!r}.")
  parts = {True: [], False: []}
  counts = {True: 0, False: 0}
  for rel in files:
    with open(os.path.join(root, rel), "rb") as f:
      data = f.read()
    ev = is_eval_file(rel, eval_percent)
    parts[ev].append(data)
    counts[ev] += 1
  train = np.frombuffer(SEPARATOR.join(parts[False]), np.uint8)
  evals = np.frombuffer(SEPARATOR.join(parts[True]), np.uint8)
  if max_bytes and max_bytes > 0:
    train = train[:max_bytes]
  stats = {"files_train": counts[False], "files_eval": counts[True],
           "bytes_train": int(train.size), "bytes_eval": int(evals.size)}
  return train, evals, stats


class StdlibLM(base.Task):
  """Byte-level causal LM on the standard library sources (vocab 256)."""
  name = "stdlib_lm"
  kind = "lm"
  vocab_size = 256
  num_classes = 256
  extra_metrics = ("bits_per_byte",)

  def __init__(self, seed, batch_size, eval_batches, seq_len=128, include_tests=False,
               eval_percent=5, max_bytes=0):
    super().__init__(seed, batch_size, eval_batches)
    self.seq_len = base.check_int("task.seq_len", seq_len, 2)
    self.eval_percent = base.check_int("task.eval_percent", eval_percent, 1)
    if self.eval_percent >= 100:
      raise ValueError(f"task.eval_percent must be in [1, 99], got {eval_percent}.")
    self.include_tests = bool(include_tests)
    self.train_data, self.eval_data, self.stats = load_corpus(
        self.include_tests, self.eval_percent, int(max_bytes))
    for split, arr in (("train", self.train_data), ("eval", self.eval_data)):
      if arr.size < self.seq_len + 2:
        raise ValueError(
            f"task.seq_len={self.seq_len} is longer than the {split} stream "
            f"({arr.size} bytes); lower task.seq_len or raise task.max_bytes.")

  def batch(self, split, index):
    data = self.train_data if split == "train" else self.eval_data
    rng = base.rng_for(self.seed, split, index)
    starts = rng.integers(0, data.size - self.seq_len - 1, size=self.batch_size)
    idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
    window = data[idx].astype(np.int32)
    return {"inputs": window[:, :-1], "targets": window[:, 1:],
            "weights": np.ones((self.batch_size, self.seq_len), np.float32)}

  def describe(self):
    return {"task": self.name, "root": "sysconfig stdlib", "seq_len": self.seq_len,
            "vocab": 256, **self.stats}
