"""Which engine's Pallas kernels compile for which target: the evidence defaults use.

``COMPILES[engine]`` lists the targets on which the real compilers accept
that engine's kernels, forward and backward, over the configurations the
compile tests sweep (``tests/test_compile_*.py``, which parametrise over these
sets, so a listed target that stops compiling fails the suite). None of the
kernels has yet run on a TPU or GPU: compiling is necessary for a default,
not proof of speed. ``implementation=None`` therefore picks the block-sparse
kernels only on a listed target; the neighborhood and linear engines keep
their XLA paths as the default everywhere (their kernels are opt-in with
``implementation="pallas"``) until hardware timings exist.
"""
from __future__ import annotations

from typing import Optional

import jax

from pallas_kernels.targets import TARGETS
from pallas_kernels.targets.budgets import target_of_device

ENGINES = ("block_sparse", "neighborhood", "linear")

COMPILES = {
    "block_sparse": frozenset(TARGETS),
    "neighborhood": frozenset(TARGETS),
    # linear: forward + backward (TNL decay, GQA) compile on all seven, v4 included
    # (tests/test_compile_linear.py); configurations too big for a target are refused
    "linear": frozenset(TARGETS),
}

#: engines whose kernels are the default (implementation=None) on a listed target
DEFAULT_ON_ACCELERATOR = frozenset({"block_sparse"})

__all__ = ["ENGINES", "COMPILES", "DEFAULT_ON_ACCELERATOR", "compiles_for", "kernel_is_default"]


def compiles_for(engine: str, device: Optional[jax.Device]) -> bool:
  """Whether ``engine``'s kernels are known to compile for ``device``'s target."""
  if engine not in COMPILES:
    raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}.")
  target = target_of_device(device)
  return target is not None and target in COMPILES[engine]


def kernel_is_default(engine: str, device: Optional[jax.Device]) -> bool:
  """Whether implementation=None runs ``engine``'s kernels on ``device``."""
  return engine in DEFAULT_ON_ACCELERATOR and compiles_for(engine, device)
