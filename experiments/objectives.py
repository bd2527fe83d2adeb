"""Losses and metric sums of the two task kinds, computed inside jit.

Metrics are returned as sums with their denominators (``<name>_num``,
``<name>_den``) so that averages over several batches, or over the steps of a
logging window, are exact.
"""
from __future__ import annotations

import math
from typing import Dict

import jax.numpy as jnp
import optax


def lm_sums(logits, batch, sequence_accuracy: bool = False) -> Dict[str, jnp.ndarray]:
  """logits [B, T, V]; batch targets [B, T], weights [B, T] (+ copy_weights).

  ``sequence_accuracy`` adds the fraction of examples whose every weighted
  target is predicted (exact match, e.g. a whole passkey).
  """
  w = batch["weights"].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                       batch["targets"])
  correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
  out = {"loss_num": (ce * w).sum(), "loss_den": w.sum(),
         "accuracy_num": (correct * w).sum(), "accuracy_den": w.sum()}
  if sequence_accuracy:
    has = (w.sum(-1) > 0).astype(jnp.float32)
    seq_ok = jnp.all((correct > 0) | (w == 0), axis=-1).astype(jnp.float32) * has
    out["seq_accuracy_num"] = seq_ok.sum()
    out["seq_accuracy_den"] = has.sum()
  if "copy_weights" in batch:
    cw = batch["copy_weights"].astype(jnp.float32)
    out["copy_accuracy_num"] = (correct * cw).sum()
    out["copy_accuracy_den"] = cw.sum()
  return out


def classify_sums(logits, batch) -> Dict[str, jnp.ndarray]:
  """logits [B, C]; batch labels [B], weights [B]."""
  w = batch["weights"].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                       batch["labels"])
  correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
  return {"loss_num": (ce * w).sum(), "loss_den": w.sum(),
          "accuracy_num": (correct * w).sum(), "accuracy_den": w.sum()}


def loss_from_sums(sums) -> jnp.ndarray:
  return sums["loss_num"] / jnp.maximum(sums["loss_den"], 1.0)


def finalize(sums: Dict[str, float], extra=()) -> Dict[str, float]:
  """Sums -> averages; adds bits_per_byte (= loss / ln 2) when asked."""
  out = {}
  for k in sums:
    if k.endswith("_num"):
      name = k[:-4]
      den = float(sums[name + "_den"])
      out[name] = float(sums[k]) / den if den > 0 else float("nan")
  if "bits_per_byte" in extra:
    out["bits_per_byte"] = out["loss"] / math.log(2.0)
  return out
