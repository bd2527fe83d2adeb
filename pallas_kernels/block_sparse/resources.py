"""On-chip memory of the block-sparse kernels, checked before anything compiles.

Each kernel configuration (block sizes, GPU tiles, head dims, dtypes, list
lengths) has a need per pallas_call that this module computes from the shapes
alone and compares with the target's budget (``pallas_kernels.targets.budgets``):

- TPU (Mosaic): VMEM = the double-buffered blocks of every operand, padded to
  (sublane, 128-lane) tiles, plus the scratch accumulators, plus the
  [block_q, block_kv] float32 intermediates of the step (logits, weights and,
  backward, their gradients). Above the compiler's default scoped limit the
  kernels ask for more (``vmem_limit_bytes``) up to the physical VMEM, less a
  reserve. SMEM holds the scalar-prefetched block lists: lists longer than the
  budget are cut into several pallas_calls (``list_chunks``).
- GPU (Triton): shared memory = the software-pipelined K/V (forward, dQ) or
  Q/dO (dK/dV) tiles, the resident tile of the other side and the [tile_q,
  tile_k] operands of the later matmuls (plus two stages of the bias and
  mask-array tiles, an estimate not fitted to Triton). The coefficients are fitted to what
  Triton itself requested for 36 (head dim, dtype, tile) configurations of
  each kernel on sm_80 (head dims 128/256, bfloat16/float32, tiles 32-128):
  the model is never below Triton's figure there and at most ~1.6x above it
  (float32 dK/dV), so it may refuse a few tiles that would fit.

``fit(cfg, target)`` returns the configuration the kernels run (raised VMEM
limit, list chunk size, GPU tiles that fit when the caller did not force
them) or raises ValueError naming the blocks, the need and the budget.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Tuple

import numpy as np

from pallas_kernels.targets import budgets as BG

#: float32 [block_q, block_kv] values a TPU kernel step keeps live (logits and
#: weights forward; logits, weights, dP and dS backward).
TPU_STEP_VALUES = {"forward": 3, "dq": 4, "dkv": 4}
#: VMEM kept free when the kernels raise their scoped limit (internal scratch).
TPU_VMEM_RESERVE = 8 << 20
#: SMEM words kept free for the kernels' own scalars and the arrays' padding.
TPU_SMEM_RESERVE = 4096

__all__ = ["tpu_vmem_need", "gpu_shared_need", "list_entries", "list_chunks", "fit",
           "choose_tpu_blocks", "tpu_aligned_blocks", "choose_gpu_tiles", "describe"]


def _itemsize(dtype) -> int:
  return int(np.dtype(dtype).itemsize)


def _tile_bytes(rows: int, cols: int, itemsize: int) -> int:
  """Bytes of a [rows, cols] VMEM buffer: rows padded to the sublane tile
  (8 for 32-bit, 16 for 16-bit, 32 for 8-bit), cols to 128 lanes."""
  sub = 8 * max(1, 4 // itemsize)
  return -(-rows // sub) * sub * -(-cols // 128) * 128 * itemsize


def _side_bytes(cfg, q_rows: int, k_cols: int) -> int:
  """Position and segment-id blocks (int32): q-side [rows, 1], k-side [1, cols]."""
  n_q = int(cfg.has_q_pos) + int(cfg.has_segments)
  n_k = int(cfg.has_k_pos) + int(cfg.has_segments)
  return n_q * _tile_bytes(q_rows, 1, 4) + n_k * _tile_bytes(1, k_cols, 4)


def _pair_bytes(cfg, rows: int, cols: int) -> int:
  """Bias (counted as float32) and mask-array (int8) tiles: [rows|1, cols|1] each."""
  total = 0
  for shape, isz in ((getattr(cfg, "bias_shape", None), 4),
                     (getattr(cfg, "mask_shape", None), 1)):
    if shape is not None:
      total += _tile_bytes(rows if shape[2] > 1 else 1, cols if shape[3] > 1 else 1, isz)
  return total


def tpu_vmem_need(cfg, in_dtype) -> Dict[str, int]:
  """VMEM bytes of the forward, dQ and dK/dV kernels of a TPU configuration.

  Args:
    cfg: the ``common.KernelConfig`` (block sizes, head dims, side inputs,
      bias / mask-array tiles; with a bias the dQ kernel may also write the
      [block_q, block_kv] float32 logit-gradient tile).
    in_dtype: dtype of q/k/v (and of dO and the gradients).

  Returns:
    {"forward": bytes, "dq": bytes, "dkv": bytes}.
  """
  bq, bk = cfg.block_q, cfg.block_kv
  side = _side_bytes(cfg, bq, bk) + _pair_bytes(cfg, bq, bk)
  ds = _tile_bytes(bq, bk, 4) if getattr(cfg, "bias_shape", None) is not None else 0
  return tpu_need_bytes(bq, bk, cfg.H, cfg.Hv, _itemsize(in_dtype), _itemsize(cfg.out_dtype),
                        side, ds)


def tpu_need_bytes(bq, bk, H, Hv, isz, osz, side, ds=0) -> Dict[str, int]:
  """VMEM bytes per kernel ({"forward", "dq", "dkv"}) at blocks (bq, bk), head dims H/Hv,
  input/output itemsizes isz/osz, ``side`` bytes of side operands, ``ds`` of a dS tile."""
  t = _tile_bytes
  vec = t(bq, 1, 4)                          # lse / delta / m / l: [bq, 1] float32
  step = lambda name: TPU_STEP_VALUES[name] * t(bq, bk, 4)
  fwd_blocks = t(bq, H, isz) + t(bk, H, isz) + t(bk, Hv, isz) + side + t(bq, Hv, osz) + vec
  fwd = 2 * fwd_blocks + 2 * vec + t(bq, Hv, 4) + step("forward")
  grad_in = (t(bq, H, isz) + t(bk, H, isz) + t(bk, Hv, isz) + t(bq, Hv, isz) + 2 * vec
             + side)
  dq = 2 * (grad_in + t(bq, H, isz) + ds) + t(bq, H, 4) + step("dq")
  dkv = 2 * (grad_in + t(bk, H, isz) + t(bk, Hv, isz)) + t(bk, H, 4) + t(bk, Hv, 4) + step("dkv")
  return {"forward": fwd, "dq": dq, "dkv": dkv}


def _pow2_at_least(n: int, lo: int = 16) -> int:
  return max(lo, 1 << max(0, int(n) - 1).bit_length())


def gpu_shared_need(cfg, in_dtype, tiles=None) -> Dict[str, int]:
  """Shared-memory bytes of the forward, dQ and dK/dV Triton kernels.

  Args:
    cfg: the ``common.KernelConfig``; ``tiles`` (default ``cfg.tiles``) are
      ((fwd_q, fwd_k), (dq_q, dq_k), (dkv_q, dkv_k)).
    in_dtype: dtype of q/k/v.

  Returns:
    {"forward": bytes, "dq": bytes, "dkv": bytes}; head dims are counted
    padded to a power of two >= 16, as the kernels pad them.
  """
  tiles = tiles or cfg.tiles
  isz = _itemsize(in_dtype)
  width = _pow2_at_least(cfg.H) + _pow2_at_least(cfg.Hv)
  (fq, fk), (dqq, dqk), (kq, kk) = tiles
  fwd = isz * (5 * fk * width // 2 + fq * fk + fq * _pow2_at_least(cfg.H))
  dq = isz * (2 * dqk * width + dqq * width + 2 * dqq * dqk)
  dkv = isz * (kq * width + kk * width + min(kq, kk) * width) + 4 * kq * kk
  # bias / mask-array tiles, loaded in the pipelined loops: two stages each
  fwd += 2 * _pair_bytes(cfg, fq, fk)
  dq += 2 * _pair_bytes(cfg, dqq, dqk)
  dkv += 2 * _pair_bytes(cfg, kq, kk)
  return {"forward": fwd, "dq": dq, "dkv": dkv}


def list_entries(rows: int, width: int, list_heads: int) -> int:
  """SMEM words of one pallas_call's lists: codes [Hl*rows*width] + counts [Hl*rows]."""
  return list_heads * rows * (width + 1)


def _list_heads(cfg) -> int:
  return cfg.layout_heads * (cfg.B if cfg.lists_batched else 1)


def list_chunks(cfg, n: int, width: int) -> List[Tuple[int, int]]:
  """[(start, stop)] block ranges whose lists fit ``cfg.smem_list_entries`` words.

  ``n`` blocks (q-blocks for the forward/dQ lists, k-blocks for the dK/dV
  lists) of ``width`` entries each, for every list head. One chunk covers all
  blocks when there is no limit. Raises ValueError when even one block's
  lists (all heads) exceed the limit.
  """
  limit = cfg.smem_list_entries
  per_block = list_entries(1, width, _list_heads(cfg))
  if getattr(cfg, "has_lengths", False):
    # counts are per batch element, and the lengths [2B] are prefetched too
    per_block += _list_heads(cfg) * (cfg.B - 1)
    limit = max(1, limit - 2 * cfg.B) if limit else limit
  if getattr(cfg, "dropout_rate", 0.0) > 0 and limit:
    # the per-(batch, head) dropout keys [B, N, 2] are prefetched with the lists
    limit = max(1, limit - 2 * cfg.B * cfg.N)
  if not limit or per_block * n <= limit:
    return [(0, n)]
  rows = limit // per_block
  if rows < 1:
    raise ValueError(
        f"the block lists of one block ({_list_heads(cfg)} list heads x {width + 1} "
        f"entries = {per_block} words) exceed the TPU's SMEM budget of {limit} words: "
        "use larger blocks or fewer list heads.")
  return [(a, min(n, a + rows)) for a in range(0, n, rows)]


def describe(cfg) -> str:
  tiles = f", GPU tiles {cfg.tiles}" if cfg.tiles else ""
  return (f"blocks (block_q={cfg.block_q}, block_kv={cfg.block_kv}){tiles}, head dims "
          f"H={cfg.H}, Hv={cfg.Hv}")


def _fit_tpu(cfg, budget: BG.Budget, in_dtype):
  need = tpu_vmem_need(cfg, in_dtype)
  top = max(need.values())
  limit = None
  if top > budget.vmem_bytes:
    ceiling = budget.vmem_max_bytes - TPU_VMEM_RESERVE
    if top > ceiling:
      worst = max(need, key=need.get)
      raise ValueError(
          f"block-sparse TPU kernels with {describe(cfg)}, {np.dtype(in_dtype).name}: the "
          f"{worst} kernel needs about {top / 2**20:.1f} MiB of VMEM; the target has "
          f"{budget.vmem_max_bytes / 2**20:.0f} MiB ({ceiling / 2**20:.0f} MiB usable by one "
          "kernel): use smaller blocks.")
    limit = int(min(ceiling, -(-int(top * 1.25) // (1 << 20)) << 20))
  smem = max(0, budget.smem_bytes // 4 - TPU_SMEM_RESERVE)
  return dataclasses.replace(cfg, vmem_limit_bytes=limit, smem_list_entries=smem)


def choose_gpu_tiles(cfg, budget: BG.Budget, in_dtype):
  """Largest default-shaped tiles whose shared memory fits, per kernel.

  Starts from the compiled defaults (forward 128 x 64, dQ 128 x 32, dK/dV
  32 x 128, each capped by the layout blocks) and halves the longer side of
  a kernel's tile (the pipelined side on a tie) until it fits, down to 16.
  """
  tiles = [(min(cfg.block_q, 128), min(cfg.block_kv, 64)),
           (min(cfg.block_q, 128), min(cfg.block_kv, 32)),
           (min(cfg.block_q, 32), min(cfg.block_kv, 128))]
  for idx, name in enumerate(("forward", "dq", "dkv")):
    while gpu_shared_need(cfg, in_dtype, tuple(tiles))[name] > budget.shared_bytes:
      tq, tk = tiles[idx]
      if max(tq, tk) <= 16:
        break
      halve_q = tq > tk or (tq == tk and name == "dkv")
      tiles[idx] = (tq // 2, tk) if halve_q else (tq, tk // 2)
  return tuple(tiles)


def _fit_gpu(cfg, budget: BG.Budget, in_dtype, tiles_forced: bool):
  if not tiles_forced:
    cfg = dataclasses.replace(cfg, tiles=choose_gpu_tiles(cfg, budget, in_dtype))
  need = gpu_shared_need(cfg, in_dtype)
  worst = max(need, key=need.get)
  if need[worst] > budget.shared_bytes:
    raise ValueError(
        f"block-sparse GPU kernels with {describe(cfg)}, {np.dtype(in_dtype).name}: the "
        f"{worst} kernel needs about {need[worst]} B of shared memory per block; the target "
        f"allows {budget.shared_bytes} B: use smaller tiles (tiles=...).")
  return cfg


def fit(cfg, target: Optional[str], in_dtype, tiles_forced: bool = False):
  """The configuration the kernels run on ``target``, or ValueError if it cannot fit.

  Interpret mode and unknown targets are returned unchanged (nothing to check).
  """
  budget = BG.budget(target)
  if cfg.interpret or budget is None:
    return cfg
  if budget.platform == "tpu":
    return _fit_tpu(cfg, budget, in_dtype)
  return _fit_gpu(cfg, budget, in_dtype, tiles_forced)


#: What the compiled TPU kernels need of their blocks: block_q % 8, block_kv % 128.
TPU_BLOCK_ALIGN = (8, 128)


def tpu_aligned_blocks(block_q: int, block_kv: int) -> Tuple[int, int]:
  """The least multiples of (block_q, block_kv) the compiled TPU kernels accept."""
  return math.lcm(block_q, TPU_BLOCK_ALIGN[0]), math.lcm(block_kv, TPU_BLOCK_ALIGN[1])


#: (block_q, block_kv) the TPU kernels may use, largest first.
TPU_BLOCKS = ((512, 1024), (512, 512), (256, 512), (256, 256), (128, 256), (128, 128))


def choose_tpu_blocks(T: int, S: int, H: int, Hv: int, itemsize: int,
                      target: Optional[str]) -> Optional[Tuple[int, int]]:
  """Largest TPU blocks dividing (T, S) whose kernels fit the default scoped VMEM.

  Returns None when no candidate divides the lengths (the caller then keeps
  its own choice, which ``fit`` checks).
  """
  budget = BG.budget(target)
  for bq, bk in TPU_BLOCKS:
    if T % bq or S % bk:
      continue
    if budget is None:
      return bq, bk
    if max(tpu_need_bytes(bq, bk, H, Hv, itemsize, 4, 0).values()) <= budget.vmem_bytes:
      return bq, bk
  return None
