"""On-chip memory the linear-attention kernels need, checked before anything is compiled.

A configuration is (C = chunk size, F = feature width, E = value width, both
after the wrapper's padding); the kernels always see float32 tiles (the
public API feature-maps and casts before the engine), so the input dtype
does not change the need. Every kernel is checked against its target's
budget (``pallas_kernels.targets.budgets``); a configuration that cannot fit
raises a ValueError naming C, F, E, the bytes needed and the budget instead
of a Mosaic or Triton crash.

TPU (grid (B, N, T / C), blocks double-buffered by the pipeline), bytes:
  2 * (blocks of one step) + 4 F E (state scratch)
  + 4 (k C^2 + 2 C (F + E) + 2 F E) (values the compiler keeps in VMEM),
with k = 1 for the forward and dq kernels and 2 for dk/dv (two [C, C]
products); the (C, 1) decay column is counted at 128 lanes. The value term
bounds the scoped allocations Mosaic reports at C = 2048 and 4096; the
largest accepted configurations (C = 768, 512, 256 at F = E = 128, 256, 512
on 16 MiB, C = 1536, 1024, 512 on 32 MiB) compile.

GPU (Triton; one program per (batch, head, state slab), see gpu.py): with
W the unsplit width and S the slab width of the kernel, and s pipeline stages,
  shared = (s - 1) (4 C (2 W + S + 1) + 1024) + 4 C max(F, E) + 4 S max(C, W)
(each stage buffers the chunk's three tiles and decay column; the rest is a
[C, max(F, E)] operand and the [W, S] state slab or a [C, S] tile staged for
the tensor cores), and a register estimate of the live float32 values
  registers = 4 (C^2 + C (2 W + S) + W S)
that may reach twice the register file (ptxas spills the rest; beyond that
its allocation fails). Both were fitted to the shared memory Triton reports
for every kernel, with and without decay, at C = 32..128 and widths 64..512
on sm_80 and sm_90 (the estimate is never below the reported need), and to
the register allocation failures at C = 256; s is 2 when that fits, else 1.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax

from attnjax.core import placement
from pallas_kernels.targets import budgets

GPU_KERNELS = ("forward", "dq", "dk", "dv")
TPU_KERNELS = ("forward", "dq", "dkv")
SLAB_FLOATS = 8192  # a program's state slab [W, S] holds at most this many floats
_SPILL_FACTOR = 2
_FALLBACK = {"gpu": "sm80", "tpu": "tpu_v5e"}  # smallest budgets, for unknown devices


@dataclasses.dataclass(frozen=True)
class GpuPlan:
  """How one GPU kernel runs: slab width, Triton warps and pipeline stages, estimated bytes."""
  kind: str
  block: int
  num_warps: int
  num_stages: int
  shared_bytes: int
  register_bytes: int


def placed_target(*arrays) -> Optional[str]:
  """The compile target of the placed device ('tpu_v4', 'sm90', ...), None if unknown."""
  device = placement.target_device(*arrays)
  if device is None and placement.pallas_backend(*arrays) == jax.default_backend():
    device = jax.devices()[0]  # placed by the default backend alone
  return budgets.target_of_device(device)


def _budget(target: Optional[str], platform: str):
  known = budgets.budget(target)
  if known is not None and known.platform == platform:
    return target, known
  name = _FALLBACK[platform]
  return name, budgets.budget(name)


def _config(chunk, f, e):
  return f"chunk_size C={chunk}, features F={f}, value width E={e} (after padding)"


def split_widths(kind: str, f: int, e: int):
  """(unsplit width W, split width) of a GPU kernel: forward and dv split E, dq and dk split F."""
  if kind not in GPU_KERNELS:
    raise ValueError(f"kind must be one of {GPU_KERNELS}, got {kind!r}.")
  return (f, e) if kind in ("forward", "dv") else (e, f)


def slab_block(kind: str, f: int, e: int) -> int:
  """Slab width S: the split axis cut so that the [W, S] state slab holds <= SLAB_FLOATS."""
  full, split = split_widths(kind, f, e)
  return min(split, max(16, SLAB_FLOATS // full))


def gpu_shared_bytes(chunk: int, f: int, e: int, kind: str, stages: int) -> int:
  """Estimated shared memory of one GPU program (see the module docstring)."""
  full, _ = split_widths(kind, f, e)
  s = slab_block(kind, f, e)
  per_stage = 4 * chunk * (2 * full + s + 1) + 1024
  return (stages - 1) * per_stage + 4 * chunk * max(f, e) + 4 * s * max(chunk, full)


def gpu_register_bytes(chunk: int, f: int, e: int, kind: str) -> int:
  """Estimated bytes of float32 values one GPU program keeps live."""
  full, _ = split_widths(kind, f, e)
  s = slab_block(kind, f, e)
  return 4 * (chunk * chunk + chunk * (2 * full + s) + full * s)


def gpu_plan(kind: str, chunk: int, f: int, e: int, target: Optional[str],
             interpret: bool = False) -> GpuPlan:
  """The GpuPlan of one kernel; raises ValueError when the configuration cannot fit the target."""
  block = slab_block(kind, f, e)
  warps = 4 if chunk <= 64 else 8
  regs = gpu_register_bytes(chunk, f, e, kind)
  if interpret:
    return GpuPlan(kind, block, warps, 1, gpu_shared_bytes(chunk, f, e, kind, 1), regs)
  name, bud = _budget(target, "gpu")
  for stages in (2, 1):
    shared = gpu_shared_bytes(chunk, f, e, kind, stages)
    if shared <= bud.shared_bytes:
      break
  else:
    raise ValueError(
        f"linear attention GPU {kind} kernel with {_config(chunk, f, e)} needs about {shared} "
        f"bytes of shared memory per block, more than the {bud.shared_bytes} bytes of {name}: "
        "use a smaller chunk_size or head dimension.")
  reg_budget = _SPILL_FACTOR * 4 * bud.registers
  if regs > reg_budget:
    raise ValueError(
        f"linear attention GPU {kind} kernel with {_config(chunk, f, e)} needs about {regs} "
        f"bytes of registers for its live float32 values, more than the {reg_budget} bytes "
        f"({_SPILL_FACTOR} x the {bud.registers} 32-bit registers per block of {name}, "
        "the rest spilled): use a smaller chunk_size.")
  return GpuPlan(kind, block, warps, stages, shared, regs)


def _tile(rows: int, cols: int) -> int:
  """float32 bytes of a [rows, cols] VMEM tile, padded to (8, 128)."""
  return 4 * (-(-rows // 8) * 8) * (-(-cols // 128) * 128)


def tpu_vmem_bytes(kind: str, chunk: int, f: int, e: int, has_decay: bool = True) -> int:
  """Estimated scoped VMEM of one TPU kernel (see the module docstring)."""
  if kind not in TPU_KERNELS:
    raise ValueError(f"kind must be one of {TPU_KERNELS}, got {kind!r}.")
  cf, ce, fe = _tile(chunk, f), _tile(chunk, e), _tile(f, e)
  dec = _tile(chunk, 1) if has_decay else 0
  blocks = {"forward": 2 * cf + 2 * ce + 2 * fe,   # q, k, v, o; s0, final state
            "dq": 2 * cf + 2 * ce + fe,            # do, k, v, dq; s0
            "dkv": 3 * cf + 3 * ce + 2 * fe}[kind]  # q, k, v, do, dk, dv; dsf, ds0
  products = 2 if kind == "dkv" else 1
  values = 4 * (products * chunk * chunk + 2 * chunk * (f + e) + 2 * f * e)
  return 2 * (blocks + dec) + fe + values


def check_tpu(chunk: int, f: int, e: int, target: Optional[str], has_decay: bool = True) -> int:
  """Largest VMEM need of the TPU kernels; raises ValueError above the target's scoped VMEM."""
  name, bud = _budget(target, "tpu")
  worst = max(TPU_KERNELS, key=lambda k: tpu_vmem_bytes(k, chunk, f, e, has_decay))
  need = tpu_vmem_bytes(worst, chunk, f, e, has_decay)
  if need > bud.vmem_bytes:
    raise ValueError(
        f"linear attention TPU {worst} kernel with {_config(chunk, f, e)} needs about {need} "
        f"bytes of VMEM, more than the {bud.vmem_bytes} bytes of scoped VMEM on {name}: "
        "use a smaller chunk_size or head dimension.")
  return need


def check_gpu(chunk: int, f: int, e: int, target: Optional[str]) -> None:
  """Plans every GPU kernel, raising ValueError for the first that cannot fit."""
  for kind in GPU_KERNELS:
    gpu_plan(kind, chunk, f, e, target)
