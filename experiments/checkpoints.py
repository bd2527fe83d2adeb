"""Orbax checkpoints with resume, integrity checks and clear errors.

Layout: ``<workdir>/checkpoints/<step>/{state,meta}``. ``meta`` (JSON) holds
the config fingerprint of the model and optimizer and a SHA-256 digest of
every leaf of the state (its path, dtype, shape and raw bytes), computed
before the save and checked after every restore: any changed bit of any
value is reported instead of training on (orbax's own reads catch only some
damage: a flipped bit in a stored array often restores without error).
Writes are atomic (orbax writes a temporary directory and renames it), so a
run killed mid-save leaves the previous checkpoints intact. Nothing here deletes or overwrites an existing step:
a failed restore raises :class:`CheckpointError` before any training step.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint is missing, unreadable, damaged or does not fit the config."""


def digests(state) -> List[List[str]]:
  """[leaf path, SHA-256 hex digest of dtype, shape and raw bytes] per leaf, in tree order."""
  out = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    a = np.ascontiguousarray(jax.device_get(leaf))
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    out.append([jax.tree_util.keystr(path), h.hexdigest()])
  return out


@jax.jit
def _leaf_sums(leaves):
  return [jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(x.astype(jnp.float32)))])
          for x in leaves]


def checksums(state) -> List[float]:
  """Per-leaf sum and sum of squares: the weaker check of checkpoints written without digests."""
  sums = _leaf_sums(jax.tree_util.tree_leaves(state))
  return [float(v) for s in sums for v in np.asarray(s, np.float64)]


def _damage(meta: Dict[str, Any], state) -> Optional[str]:
  """Why ``state`` does not match the digests (or legacy checksums) of ``meta``; None if it does."""
  if "digests" in meta:
    want, got = meta["digests"], digests(state)
    if len(want) != len(got):
      return f"it has {len(got)} arrays, its digests list {len(want)}"
    bad = [g[0] for w, g in zip(want, got) if list(w) != g]
    if bad:
      return (f"the SHA-256 digests of {len(bad)} of its {len(got)} arrays differ from those "
              f"written with it (first: {bad[0]})")
    return None
  want = np.asarray(meta.get("checksums", []), np.float64)
  got = np.asarray(checksums(state), np.float64)
  if want.shape != got.shape or not np.allclose(got, want, rtol=1e-5, atol=1e-6):
    return "its contents do not match the checksums written with it"
  return None


class Checkpointer:
  """Saves and restores the train state of one workdir."""

  def __init__(self, workdir: str, max_to_keep: int = 3):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False))

  def steps(self) -> List[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, meta: Dict[str, Any]) -> None:
    """Writes ``state`` at ``step``; refuses to overwrite an existing step."""
    if step in self.manager.all_steps():
      raise CheckpointError(
          f"checkpoint step {step} already exists in {self.directory}; it is never overwritten.")
    meta = dict(meta, step=int(step), digests=digests(state))
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    self.manager.wait_until_finished()

  def restore(self, abstract_state, fingerprint: Dict[str, Any],
              step: Optional[int] = None) -> Tuple[Any, int]:
    """Restores ``step`` (default: the latest) into the structure of ``abstract_state``.

    Args:
      abstract_state: pytree of ``jax.ShapeDtypeStruct`` (with shardings).
      fingerprint: the config values the checkpoint must match (model,
        optimizer); a mismatch raises instead of loading wrong shapes.
      step: an explicit step, or None for the latest.

    Returns:
      (state, step). Raises CheckpointError with the reason and the steps
      that are available.
    """
    steps = self.steps()
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise CheckpointError(
          f"config.train.restore_step={step}: no such checkpoint in {self.directory}; "
          f"available steps: {steps or 'none'}.")
    newer = [s for s in steps if s > step]
    if newer:
      raise CheckpointError(
          f"config.train.restore_step={step} but newer checkpoints {newer} exist in "
          f"{self.directory}; move them out of the directory first (they are never deleted or "
          "overwritten automatically).")
    hint = (f" Earlier checkpoints: {[s for s in steps if s < step]}; resume from one with "
            f"--config.train.restore_step=<step> after moving step {step} out of "
            f"{self.directory}." if len(steps) > 1 else "")
    path = os.path.join(self.directory, str(step))
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"checkpoint step {step} at {path} could not be read ({type(e).__name__}: "
          f"{_first_line(e)}). It is corrupted, incomplete or written by a different model; "
          f"nothing was overwritten.{hint}") from e
    state, meta = restored["state"], restored["meta"]
    if meta is None:
      raise CheckpointError(f"checkpoint step {step} at {path} has no metadata; "
                            f"nothing was overwritten.{hint}")
    saved_fp = meta.get("fingerprint")
    if saved_fp != fingerprint:
      diffs = sorted(k for k in set(saved_fp or {}) | set(fingerprint)
                     if (saved_fp or {}).get(k) != fingerprint.get(k))
      raise CheckpointError(
          f"checkpoint step {step} at {path} was written with a different config (fields "
          f"{diffs}: saved {[(saved_fp or {}).get(k) for k in diffs]}, now "
          f"{[fingerprint.get(k) for k in diffs]}); use another --workdir or the same config.")
    damage = _damage(meta, state)
    if damage:
      raise CheckpointError(
          f"checkpoint step {step} at {path} is damaged: {damage}; nothing was "
          f"overwritten.{hint}")
    return state, step


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0][:300] if text else ""
