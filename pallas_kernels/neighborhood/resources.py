"""On-chip memory model of the fused neighborhood kernels, checked before compiling.

Every kernel configuration is priced in bytes of the memory the compiler
allocates per program (TPU: scoped VMEM of one pallas_call; GPU: shared memory
of one Triton program) and compared with the target's budget
(:mod:`pallas_kernels.targets.budgets`, target of the placed device). The GPU
chooser picks the largest sub-blocks that fit; a configuration that cannot fit
(a forced ``tile_shape`` on TPU, forced blocks on GPU, or a head dim too wide
for the smallest blocks) raises a ValueError naming the tile and block sizes,
the need and the budget, before Mosaic or Triton ever see it.

Letters: tq queries (and keys) per tile of the plan, bq/bk query rows/keys per
GPU program step, H/Hv head dims, s the input itemsize, D spatial dims.

TPU (Mosaic): every input and output block is double-buffered, scratch is
single; a VMEM array is laid out in (8 * 4 / s, 128) tiles, so a [tq, 1] lse
block or a [tq, D] window-bound block occupies tq x 128 words. The kernels'
[tq, tq] float32 intermediates (logits, probabilities, dS, a mask compare per
spatial dim) and the [tq, H] float32 matmul products come on top. Each
kernel is compiled with
``vmem_limit_bytes`` equal to its priced need, so the compiler itself checks
the model on every compile (it would report a scoped-VMEM OOM); the budget is
the whole VMEM of the generation less a small reserve. Measured (the smallest
limit that compiles, bisected): 24.2 MiB priced for a 1024-query bf16 dq
kernel on v6e, which needs between 12.1 and 18.1 MiB; 15.6 MiB priced for a
float32 H=2048 dk/dv kernel on v5e, which needs more than 12.5 MiB. The
scalar-prefetched block lists live in SMEM (``tpu_smem_bytes``).

GPU (Triton): shared memory holds the dot operands and the conversion scratch.
Measured on sm_80 and sm_90 (the thunk dump of compiled programs): the tiles
re-read every loop step (k, v in the forward and dq programs; q, dO in the
dk/dv programs) get ``num_stages`` buffers on sm_90 (wgmma reads operands
from shared memory) and one on sm_80; the tiles loaded once (q, dO; k, v) one
buffer; the [bq, bk] probability tile one (its layout conversion); a bias
tile [bq, bk] float32 one, and the dq program's dS store a second; plus
reduction scratch. The model sums these upper bounds.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Tuple

import numpy as np

from pallas_kernels.targets import budgets as _budgets

KINDS = ("fwd", "dq", "dkv")
#: [tq, tq] float32 intermediates a TPU kernel may hold in VMEM besides its blocks
#: (logits, probabilities, dP/dS), plus one per spatial dim for the fine mask
_TPU_INTERMEDIATES = 3
#: GPU block sizes tried, largest first (Triton dots need >= 16 rows and columns)
_GPU_SIZES = (128, 64, 32, 16)
#: largest bq * bk the GPU chooser starts from (keeps the [bq, bk] tiles in registers)
_GPU_MAX_AREA = 128 * 64


def _pow2_at_least_16(n: int) -> int:
  return max(16, 1 << (int(n) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class GpuBlocks:
  """Block configuration of one GPU kernel.

  Attributes:
    block_q: bq, query rows per program (fwd, dq) or per loop step (dk/dv).
    block_k: bk, keys per loop step (fwd, dq) or key rows per program (dk/dv).
    num_warps, num_stages: Triton parameters.
    pad_heads: zero-pad head dims to powers of two >= 16 (Triton blocks).
  """
  block_q: int
  block_k: int
  num_warps: int = 4
  num_stages: int = 2
  pad_heads: bool = False

  def head_dims(self, H: int, Hv: int) -> Tuple[int, int]:
    """(H, Hv) as the kernels see them (padded when ``pad_heads``)."""
    if not self.pad_heads:
      return H, Hv
    return _pow2_at_least_16(H), _pow2_at_least_16(Hv)


@dataclasses.dataclass(frozen=True)
class Problem:
  """What the memory of a neighborhood kernel depends on.

  Attributes:
    tile_shape: per-dimension tile; tq = prod(tile_shape).
    H, Hv: head dims of q/k and v.
    itemsize: bytes per q/k/v element.
    rpb: a relative position bias is added (and its gradient written).
  """
  tile_shape: Tuple[int, ...]
  H: int
  Hv: int
  itemsize: int
  rpb: bool

  @property
  def tq(self) -> int:
    return math.prod(self.tile_shape)

  @property
  def D(self) -> int:
    return len(self.tile_shape)


@dataclasses.dataclass(frozen=True)
class Config:
  """The checked configuration of the three kernels of one call.

  Attributes:
    backend: "tpu" or "gpu".
    target: compile target name the budget came from (None: no budget known).
    need: bytes per kernel (fwd, dq, dkv); VMEM on TPU, shared memory on GPU.
    budget: bytes available per kernel (0: unchecked).
    gpu: GPU only: the (fwd, dq, dkv) :class:`GpuBlocks`.
  """
  backend: str
  target: Optional[str]
  need: Tuple[int, int, int]
  budget: int
  gpu: Optional[Tuple[GpuBlocks, GpuBlocks, GpuBlocks]] = None


# -- TPU ---------------------------------------------------------------------------
def _vmem(rows: int, cols: int, itemsize: int) -> int:
  """Bytes of a [rows, cols] VMEM array in (8 * 4 / itemsize, 128) tiles."""
  sub = 8 * max(1, 4 // itemsize)
  return -(-rows // sub) * sub * -(-cols // 128) * 128 * itemsize


def tpu_vmem_bytes(kind: str, p: Problem) -> int:
  """Scoped VMEM one TPU kernel ('fwd', 'dq' or 'dkv') needs for a problem.

  Blocks double-buffered, scratch once, ``_TPU_INTERMEDIATES + D`` [tq, tq]
  float32 values (the fine mask compares per spatial dim) and the float32
  [tq, H|Hv] product of every matmul that updates an accumulator (forward:
  p v; dq: dS k; dk/dv: dS^T q and p^T dO).
  """
  tq, H, Hv, s, D = p.tq, p.H, p.Hv, p.itemsize, p.D
  q, kv = _vmem(tq, H, s), _vmem(tq, H, s) + _vmem(tq, Hv, s)
  col = _vmem(tq, 1, 4)  # lse, delta, m, l: [tq, 1] float32
  meta = 2 * _vmem(tq, D, 4) + _vmem(D, tq, 4)  # q_lo, q_hi, k_coord
  square = _vmem(tq, tq, 4)
  bias = square if p.rpb else 0
  acc_q, acc_v = _vmem(tq, H, 4), _vmem(tq, Hv, 4)
  if kind == "fwd":
    blocks = q + kv + meta + bias + _vmem(tq, Hv, s) + col
    scratch = 2 * col + acc_v
    products = acc_v
  elif kind == "dq":
    blocks = q + kv + meta + bias + _vmem(tq, Hv, s) + 2 * col + q + (square if p.rpb else 0)
    scratch = products = acc_q
  elif kind == "dkv":
    blocks = q + kv + meta + bias + _vmem(tq, Hv, s) + 2 * col + kv
    scratch = products = acc_q + acc_v
  else:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
  return 2 * blocks + scratch + products + (_TPU_INTERMEDIATES + D) * square


# -- GPU ---------------------------------------------------------------------------
def _gpu_buffers(target: Optional[str], num_stages: int) -> int:
  """Shared buffers of a tile re-loaded every loop step (measured per target)."""
  if target == "sm80":
    return 1
  return max(1, num_stages)  # sm_90 and unknown GPUs: one per stage


def gpu_shared_bytes(kind: str, p: Problem, blocks: GpuBlocks,
                     target: Optional[str]) -> int:
  """Shared memory one GPU program of ``kind`` needs with ``blocks``."""
  H, Hv = blocks.head_dims(p.H, p.Hv)
  s, bq, bk = p.itemsize, blocks.block_q, blocks.block_k
  nb = _gpu_buffers(target, blocks.num_stages)
  rows_q, rows_k = bq * (H + Hv) * s, bk * (H + Hv) * s  # (q, dO) and (k, v) tiles
  prob, bias = bq * bk * s, bq * bk * 4
  scratch = 32 * max(bq, bk) + 1024
  if kind == "fwd":
    return bq * H * s + nb * rows_k + prob + (bias if p.rpb else 0) + scratch
  if kind == "dq":
    return rows_q + nb * rows_k + prob + (2 * bias if p.rpb else 0) + scratch
  if kind == "dkv":
    return rows_k + nb * rows_q + prob + (bias if p.rpb else 0) + scratch
  raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")


def _warps(bq: int, bk: int, H: int, Hv: int) -> int:
  return 8 if max(bq, bk) * max(H, Hv) >= 128 * 64 else 4


def gpu_candidates(kind: str, tq: int, H: int, Hv: int, pad: bool):
  """GpuBlocks of a kernel in the chooser's order of preference.

  Largest bq * bk first (at most ``_GPU_MAX_AREA``), then the larger block on
  the program's own axis (bq for fwd/dq, bk for dk/dv), then two stages
  before one.
  """
  sizes = [b for b in _GPU_SIZES if b <= tq and tq % b == 0]
  own = (lambda c: c[0]) if kind in ("fwd", "dq") else (lambda c: c[1])
  pairs = [(bq, bk) for bq in sizes for bk in sizes if bq * bk <= _GPU_MAX_AREA]
  pairs.sort(key=lambda c: (-c[0] * c[1], -own(c)))
  Hp, Hvp = (_pow2_at_least_16(H), _pow2_at_least_16(Hv)) if pad else (H, Hv)
  return [GpuBlocks(bq, bk, _warps(bq, bk, Hp, Hvp), stages, pad)
          for bq, bk in pairs for stages in (2, 1)]


# -- checks ------------------------------------------------------------------------
#: VMEM left to the compiler below the whole VMEM (v5p and v6e keep 72 KiB of
#: theirs: a probe kernel's scratch OOMs at 63.94 of 64 MiB and 127.94 of 128 MiB)
_VMEM_RESERVE = 128 << 10


def budget_bytes(backend: str, target: Optional[str]) -> Tuple[int, Optional[str]]:
  """(bytes per kernel, the target whose budget it is) for a placed target.

  TPU: the whole VMEM less ``_VMEM_RESERVE`` (the kernels set
  ``vmem_limit_bytes`` to their need), or the default scoped limit where the
  whole VMEM is not recorded. GPU: the opt-in shared memory per block. A
  target without a budget (an unknown TPU generation or GPU) gets the smallest
  budget of its platform's known targets; (0, None) when none is known.
  """
  def of(b):
    if b is None or b.platform != backend:
      return 0
    if backend == "gpu":
      return int(b.shared_bytes)
    whole = int(getattr(b, "vmem_max_bytes", 0) or 0)
    return whole - _VMEM_RESERVE if whole > _VMEM_RESERVE else int(b.vmem_bytes)
  if of(_budgets.budget(target)):
    return of(_budgets.budget(target)), target
  known = [(of(b), k) for k, b in _budgets.BUDGETS.items() if of(b)]
  return min(known) if known else (0, None)


#: SMEM a neighborhood kernel uses besides its prefetched lists (an upper bound)
_SMEM_RESERVE = 16 << 10


def smem_budget_bytes(target: Optional[str]) -> int:
  """SMEM for scalar-prefetched operands on a TPU target (smallest known if unknown)."""
  b = _budgets.budget(target)
  if b is not None and b.platform == "tpu" and getattr(b, "smem_bytes", 0):
    return int(b.smem_bytes)
  known = [int(getattr(b, "smem_bytes", 0) or 0) for b in _budgets.BUDGETS.values()
           if b.platform == "tpu"]
  return min([k for k in known if k], default=0)


def tpu_smem_bytes(kind: str, lists: Tuple[int, int, int], rpb: bool) -> int:
  """SMEM of a TPU kernel's scalar-prefetched int32 block lists, plus its own use.

  ``lists`` = (G, W, Wq): tiles, CSR and CSC list widths. Each prefetched
  vector occupies whole 128-word rows (measured: three vectors of n words fit
  while 3 * ceil(n / 128) * 128 <= the single-vector maximum), and the kernel
  keeps ``_SMEM_RESERVE`` for itself (measured on v5e, a 3D forward with lists
  of 261,632 words, the probe kernel's maximum, fails; 6.5 KiB less compiles).
  """
  G, W, Wq = lists
  lengths = {"fwd": [G * W, G] + [G * W] * rpb,
             "dq": [G * W, G] + [G * W] * (2 * rpb),
             "dkv": [G * Wq, G] + [G * Wq] * rpb}[kind]
  return sum(-(-n // 128) * 128 * 4 for n in lengths) + _SMEM_RESERVE


def _describe(p: Problem, dtype_name: str) -> str:
  return (f"tile_shape {tuple(p.tile_shape)} ({p.tq} queries per tile), head dims "
          f"H={p.H}, Hv={p.Hv}, {dtype_name}{', rpb' if p.rpb else ''}")


def _fits_message(kind, p, dtype_name, what, need, budget, target, hint):
  where = target if target is not None else "the smallest known target"
  return (f"neighborhood {kind} kernel with {_describe(p, dtype_name)}{what} needs "
          f"{need:,} bytes of {'VMEM' if hint == 'tpu' else 'shared memory'}, more than "
          f"the {budget:,}-byte budget of {where}: "
          + ("use a smaller tile_shape." if hint == "tpu"
             else "use smaller blocks, a smaller head dim or tile_shape."))


def configure_tpu(p: Problem, target: Optional[str], dtype_name: str = "",
                  lists: Optional[Tuple[int, int, int]] = None) -> Config:
  """Checks the three TPU kernels of a tile (the tile is the TPU block).

  ``lists`` = (G, W, Wq) of the block plan, for the SMEM of the block lists.
  """
  budget, where = budget_bytes("tpu", target)
  need = tuple(tpu_vmem_bytes(k, p) for k in KINDS)
  if budget:
    for kind, n in zip(KINDS, need):
      if n > budget:
        raise ValueError(_fits_message(kind, p, dtype_name, "", n, budget, where, "tpu"))
  smem = smem_budget_bytes(target)
  if lists is not None and smem:
    for kind in KINDS:
      n = tpu_smem_bytes(kind, lists, p.rpb)
      if n > smem:
        raise ValueError(
            f"neighborhood {kind} kernel: the scalar-prefetched block lists of {lists[0]:,} "
            f"tiles ({_describe(p, dtype_name)}) need {n:,} bytes of SMEM, more than the "
            f"{smem:,}-byte budget of {where or 'the smallest known target'}: use a larger "
            "tile_shape (fewer tiles) or split the batch of tokens.")
  return Config("tpu", where, need, budget)


def _check_gpu_shapes(p: Problem):
  tq = p.tq
  if tq < 16 or tq & (tq - 1):
    raise ValueError(
        f"the compiled GPU neighborhood kernels need a power-of-two tile of at least 16 "
        f"queries (Triton blocks), got tile_shape {tuple(p.tile_shape)} ({tq} queries).")


def configure_gpu(p: Problem, target: Optional[str], dtype_name: str = "",
                  blocks: Optional[Sequence[GpuBlocks]] = None) -> Config:
  """Chooses (or, when ``blocks`` = (fwd, dq, dkv) is given, checks) the GPU blocks."""
  _check_gpu_shapes(p)
  budget, where = budget_bytes("gpu", target)
  pad = (p.H & (p.H - 1)) != 0 or (p.Hv & (p.Hv - 1)) != 0 or min(p.H, p.Hv) < 16
  chosen, need = [], []
  for i, kind in enumerate(KINDS):
    if blocks is not None:
      b = blocks[i]
      if (p.tq % b.block_q or p.tq % b.block_k or min(b.block_q, b.block_k) < 16
          or b.block_q & (b.block_q - 1) or b.block_k & (b.block_k - 1)):
        raise ValueError(
            f"GPU blocks must be powers of two >= 16 dividing the tile's {p.tq} queries, "
            f"got block_q={b.block_q}, block_k={b.block_k} for the {kind} kernel.")
      b = dataclasses.replace(b, pad_heads=pad)
      n = gpu_shared_bytes(kind, p, b, where)
      if budget and n > budget:
        raise ValueError(_fits_message(
            kind, p, dtype_name, f" and blocks (bq={b.block_q}, bk={b.block_k}, "
            f"{b.num_stages} stage(s))", n, budget, where, "gpu"))
    else:
      b, n = _choose_gpu(kind, p, pad, budget, where, dtype_name)
    chosen.append(b)
    need.append(n)
  return Config("gpu", where, tuple(need), budget, tuple(chosen))


def _choose_gpu(kind, p, pad, budget, where, dtype_name):
  cands = gpu_candidates(kind, p.tq, p.H, p.Hv, pad)
  for b in cands:
    n = gpu_shared_bytes(kind, p, b, where)
    if not budget or n <= budget:
      return b, n
  b = cands[-1]
  raise ValueError(_fits_message(
      kind, p, dtype_name, f" even with the smallest blocks (bq={b.block_q}, "
      f"bk={b.block_k}, 1 stage)", gpu_shared_bytes(kind, p, b, where), budget, where, "gpu"))


def configure(backend: str, target: Optional[str], tile_shape, H: int, Hv: int, dtype,
              rpb: bool, gpu_blocks=None, lists: Optional[Tuple[int, int, int]] = None
              ) -> Config:
  """The checked :class:`Config` of a call (see the module docstring).

  Args:
    backend: "tpu" or "gpu".
    target: compile target of the placed device (``budgets.target_of_device``).
    tile_shape: per-dimension tile of the plan.
    H, Hv: head dims; dtype: q/k/v dtype; rpb: with a relative position bias.
    gpu_blocks: GPU only: None (chosen), one :class:`GpuBlocks` for all three
      kernels, or a (fwd, dq, dkv) tuple.
    lists: TPU only: (G, W, Wq) of the block plan (tiles, CSR and CSC list
      widths) to check the SMEM of the prefetched lists; None skips that check.
  """
  dtype = np.dtype(dtype)
  p = Problem(tuple(int(t) for t in tile_shape), int(H), int(Hv), dtype.itemsize, bool(rpb))
  if backend == "tpu":
    if gpu_blocks is not None:
      raise ValueError("gpu_blocks applies to the GPU kernels only (the TPU block is the tile).")
    return configure_tpu(p, target, dtype.name, lists)
  if isinstance(gpu_blocks, GpuBlocks):
    gpu_blocks = (gpu_blocks,) * 3
  return configure_gpu(p, target, dtype.name, gpu_blocks)
