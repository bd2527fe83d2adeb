"""scikit-learn's digits images (8x8, 10 classes; bundled with scikit-learn, no network).

1,797 grey-level images with values 0-16, scaled to [0, 1]. A permutation
seeded by ``seed`` splits them into 1,437 training and 360 test images
(80/20). Each image becomes ``(8 / patch_size)**2`` tokens of
``patch_size**2`` pixel features, in raster order (``patch_size=1``: 64
pixel tokens; 2: 16 tokens of 4 features). Training batch ``s`` is slice
``s % steps_per_epoch`` of the permutation seeded by (seed, epoch); the
evaluation set is the whole test split in fixed batches (the last one padded
with zero-weight rows).
"""
from __future__ import annotations

import functools

import numpy as np

from experiments.tasks import base

NUM_TEST = 360


@functools.lru_cache(maxsize=1)
def _load():
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  return (d.images.astype(np.float32) / 16.0), d.target.astype(np.int32)


def patchify(images: np.ndarray, patch_size: int) -> np.ndarray:
  """[N, 8, 8] -> [N, (8/p)^2, p*p] raster-order patches."""
  n, h, w = images.shape
  p = patch_size
  x = images.reshape(n, h // p, p, w // p, p).transpose(0, 1, 3, 2, 4)
  return x.reshape(n, (h // p) * (w // p), p * p)


class Digits(base.Task):
  """Encoder classification of 8x8 digit images (kind "classify", float inputs)."""
  name = "digits"
  kind = "classify"
  num_classes = 10

  def __init__(self, seed, batch_size, eval_batches, patch_size=2):
    super().__init__(seed, batch_size, eval_batches)
    if patch_size not in (1, 2, 4, 8):
      raise ValueError(f"task.patch_size must be 1, 2, 4 or 8 (dividing 8), got {patch_size!r}.")
    images, labels = _load()
    perm = np.random.default_rng(np.random.SeedSequence([self.seed, 99])).permutation(len(labels))
    x = patchify(images, patch_size)
    self.test_x, self.test_y = x[perm[:NUM_TEST]], labels[perm[:NUM_TEST]]
    self.train_x, self.train_y = x[perm[NUM_TEST:]], labels[perm[NUM_TEST:]]
    self.seq_len, self.input_dim = x.shape[1], x.shape[2]
    self.steps_per_epoch = max(1, len(self.train_y) // self.batch_size)
    self.num_eval_batches = -(-NUM_TEST // self.batch_size)

  def batch(self, split, index):
    if split == "train":
      epoch, i = divmod(int(index), self.steps_per_epoch)
      order = base.rng_for(self.seed, "train", epoch).permutation(len(self.train_y))
      sel = order[i * self.batch_size:(i + 1) * self.batch_size]
      return {"inputs": self.train_x[sel], "labels": self.train_y[sel],
              "weights": np.ones(len(sel), np.float32)}
    lo = int(index) * self.batch_size
    sel = np.arange(lo, lo + self.batch_size)
    valid = sel < NUM_TEST
    sel = np.where(valid, sel, 0)
    return {"inputs": self.test_x[sel], "labels": self.test_y[sel],
            "weights": valid.astype(np.float32)}

  def describe(self):
    return {"task": self.name, "images_train": int(len(self.train_y)), "images_test": NUM_TEST,
            "tokens": self.seq_len, "features": self.input_dim}
