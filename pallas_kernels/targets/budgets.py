"""On-chip memory budgets per compile target, and the target of a placed device.

The kernels' resource models (one per engine) compare what a block
configuration needs against these numbers before anything is compiled, so
that a configuration that cannot fit is refused with a ValueError naming the
block sizes, the need and the budget, never a Mosaic or Triton crash.

GPU numbers are the ones of the target config files beside this module
(NVIDIA's published limits). TPU numbers are the limits the compiler enforces
in this jax/libtpu version, found by compiling probe kernels on each
generation's topology (``tests/test_compile_budgets.py`` re-checks them).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax

__all__ = ["Budget", "BUDGETS", "budget", "target_of_device"]


@dataclasses.dataclass(frozen=True)
class Budget:
  """On-chip memory one kernel program may use on a target.

  Attributes:
    platform: "tpu" or "gpu".
    vmem_bytes: TPU: scoped VMEM a pallas_call gets by default (its blocks,
      double-buffered, plus scratch). 0 on GPU.
    vmem_max_bytes: TPU: the whole VMEM, the most a pallas_call may ask for
      with ``vmem_limit_bytes``. 0 on GPU.
    smem_bytes: TPU: scalar memory for scalar-prefetch operands and SMEM
      scratch. 0 on GPU.
    shared_bytes: GPU: shared memory one block (CTA) may opt in to. 0 on TPU.
    registers: GPU: 32-bit registers per block. 0 on TPU.
  """
  platform: str
  vmem_bytes: int = 0
  vmem_max_bytes: int = 0
  smem_bytes: int = 0
  shared_bytes: int = 0
  registers: int = 0


_MIB = 1 << 20

# TPU: measured by compiling probe kernels on each generation's deviceless
# topology (jax 0.10.2, libtpu 0.0.42): double-buffered blocks of growing size
# until Mosaic reports a scoped-VMEM OOM (default limit), the same with
# vmem_limit_bytes raised (whole VMEM), and a scalar-prefetched int32 vector
# of growing length until SMEM overflows (v4: 262,016 words; v5e: 261,632;
# the smaller figure is used for every generation).
BUDGETS = {
    "tpu_v4": Budget("tpu", vmem_bytes=16 * _MIB, vmem_max_bytes=16 * _MIB,
                     smem_bytes=261_632 * 4),
    "tpu_v5e": Budget("tpu", vmem_bytes=16 * _MIB, vmem_max_bytes=128 * _MIB,
                      smem_bytes=261_632 * 4),
    "tpu_v5p": Budget("tpu", vmem_bytes=16 * _MIB, vmem_max_bytes=64 * _MIB,
                      smem_bytes=261_632 * 4),
    "tpu_v6e": Budget("tpu", vmem_bytes=32 * _MIB, vmem_max_bytes=128 * _MIB,
                      smem_bytes=261_632 * 4),
    "tpu7x": Budget("tpu", vmem_bytes=32 * _MIB, vmem_max_bytes=64 * _MIB,
                    smem_bytes=261_632 * 4),
    "sm80": Budget("gpu", shared_bytes=166_912, registers=65_536),
    "sm90": Budget("gpu", shared_bytes=232_448, registers=65_536),
}

_TPU_KINDS = {
    "TPU v4": "tpu_v4",
    "TPU v5 lite": "tpu_v5e",
    "TPU v5e": "tpu_v5e",
    "TPU v5": "tpu_v5p",
    "TPU v5p": "tpu_v5p",
    "TPU v6 lite": "tpu_v6e",
    "TPU v6e": "tpu_v6e",
    "TPU7x": "tpu7x",
}


def target_of_device(device: Optional[jax.Device]) -> Optional[str]:
  """The compile target name of a device ('tpu_v5e', 'sm90', ...), None if not one of ours.

  GPUs map by exact compute capability: 8.0 (A100, A30) -> 'sm80', 9.0
  (H100, H200, GH200) -> 'sm90'. Other 8.x cards (8.6, 8.7, 8.9) have about
  100 KiB of shared memory per block, less than sm80's budget, so they and
  every other GPU or unknown TPU generation give None (no kernel default, no
  budget to check against).
  """
  if device is None:
    return None
  platform = str(device.platform).lower()
  if platform == "tpu":
    return _TPU_KINDS.get(str(device.device_kind))
  if platform in ("gpu", "cuda"):
    cc = str(getattr(device, "compute_capability", "") or "")
    return {"8.0": "sm80", "9.0": "sm90"}.get(cc)
  return None


def budget(target: Optional[str]) -> Optional[Budget]:
  """The Budget of a target name, None for an unknown target (no check is made)."""
  if target is None:
    return None
  return BUDGETS.get(target)
