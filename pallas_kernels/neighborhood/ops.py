"""Differentiable fused neighborhood attention (jax.custom_vjp over the kernels; NATTEN FNA, arXiv:2403.04690).

``na_pallas`` permutes [B, *spatial, N, H] tokens into tile-contiguous order
(pad + reshape, no gather), runs the GPU (Triton) or TPU (Mosaic) kernels and
permutes back. On CPU the kernels run in interpret mode.

A relative position bias enters the kernels as a small per-class table
(:mod:`pallas_kernels.neighborhood.bias`), built from rpb by a static jnp
gather; the custom VJP returns the table's gradient and autodiff of that
gather carries it to rpb.

Before anything is traced into a compiled kernel, the resource model
(:mod:`pallas_kernels.neighborhood.resources`) prices the configuration
against the placed target's on-chip memory: it picks the GPU sub-blocks and
refuses (ValueError) a tile or blocks that cannot fit.
"""
from __future__ import annotations

import functools

import jax

from attnjax.core import flash as F
from attnjax.core import placement
from attnjax.plan.neighborhood import from_tiles, plans, to_tiles
from pallas_kernels.neighborhood import gpu, resources, tpu
from pallas_kernels.neighborhood.bias import bias_plan, class_table, table_grad
from pallas_kernels.neighborhood.plan import block_plan
from pallas_kernels.targets.budgets import target_of_device

BACKENDS = ("gpu", "tpu")


def _module(backend):
  return gpu if backend == "gpu" else tpu


def _interpret(backend, interpret, *arrays):
  if interpret is not None:
    return interpret
  return placement.pallas_backend(*arrays) != backend


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _core(q, k, v, table, cfg):
  """Tiled q [B,N,L,H], k/v [B,K,L,H|Hv], table None or [N, C, tq, tq] float32."""
  out, lse = _fwd(q, k, v, table, cfg)[0]
  return out, lse


def _bias(table, plan_key):
  return None if table is None else (table, bias_plan(*plan_key))


def _kernel_args(backend, kcfg, kind):
  """Per-kernel keyword arguments of the chosen configuration."""
  if kcfg is None:
    return {}
  if backend == "tpu":  # the compiler holds each kernel to the model's price
    return {"vmem_limit": kcfg.need[0] if kind == "fwd" else kcfg.need[1:]}
  blocks = kcfg.gpu if isinstance(kcfg, resources.Config) else kcfg
  return {"blocks": blocks[0] if kind == "fwd" else blocks[1:]}


def _fwd(q, k, v, table, cfg):
  plan_key, scale, backend, interpret, kcfg = cfg
  plan = block_plan(*plan_key)
  out, lse = _module(backend).forward(q, k, v, plan, scale=scale, interpret=interpret,
                                      bias=_bias(table, plan_key),
                                      **_kernel_args(backend, kcfg, "fwd"))
  return (out, lse), (q, k, v, table, out, lse)


def _bwd(cfg, res, cts):
  plan_key, scale, backend, interpret, kcfg = cfg
  q, k, v, table, out, lse = res
  do, dlse = cts
  plan = block_plan(*plan_key)
  delta = F.delta(out, do, dlse)   # an lse cotangent folded in (see attnjax.core.flash)
  bias = _bias(table, plan_key)
  dq, dk, dv, ds = _module(backend).backward(q, k, v, do.astype(q.dtype), lse, delta, plan,
                                             scale=scale, interpret=interpret, bias=bias,
                                             **_kernel_args(backend, kcfg, "bwd"))
  return dq, dk, dv, None if bias is None else table_grad(ds, bias[1])


_core.defvjp(_fwd, _bwd)


def kernel_config(query, key, value, *, plan, tile_shape, backend, rpb, interpret,
                  gpu_blocks=None):
  """The checked kernel configuration of a call (None for the interpreter's defaults).

  Compiled kernels: :func:`resources.configure` for the target of the placed
  device (ValueError when the tile or the forced blocks cannot fit). Interpret
  mode has no budget: ``gpu_blocks`` (one GpuBlocks or a (fwd, dq, dkv) tuple)
  are used as given, whole tiles without them.
  """
  if gpu_blocks is not None and backend != "gpu":
    raise ValueError("gpu_blocks applies to the GPU kernels only (the TPU block is the tile).")
  if interpret:
    if gpu_blocks is None:
      return None
    return (gpu_blocks,) * 3 if isinstance(gpu_blocks, resources.GpuBlocks) else tuple(gpu_blocks)
  target = target_of_device(placement.target_device(query, key, value))
  lists = (plan.num_blocks, plan.kv_list.shape[1], plan.q_list.shape[1])
  return resources.configure(backend, target, tile_shape, query.shape[-1], value.shape[-1],
                             query.dtype, rpb is not None, gpu_blocks=gpu_blocks, lists=lists)


def na_pallas(query, key, value, *, kernel_size, dilation, is_causal, scale, tile_shape,
              rpb=None, backend=None, interpret=None, gpu_blocks=None):
  """Fused neighborhood attention.

  Args:
    query: [B, *spatial, N, H]; key: [B, *spatial, K, H]; value: [B, *spatial, K, Hv].
    kernel_size, dilation, is_causal, tile_shape: normalised per-dimension tuples
      (validated by :func:`attnjax.neighborhood.neighborhood_attention`).
    scale: logit scale (python float).
    rpb: optional relative position bias [N, 2*k1-1, ..., 2*kD-1] (per query
      head; NATTEN indexing ``y' - x' + k - 1`` per dimension in within-group
      coordinates, as :func:`attnjax.neighborhood.api.dense_rpb`); differentiable.
      The kernels read it as a table [N, C, tq, tq] of the C distinct bias
      blocks (tq = prod(tile_shape), C small: one block per tile distance);
      the backward holds the per-pair logits gradient [B, N, num_pairs, tq, tq]
      float32 (num_pairs: visited block pairs, ``block_plan(...).visited_blocks``,
      plus one spare slot per query block without key blocks) before summing it
      into the table's gradient.
    backend: "gpu" (Triton) or "tpu" (Mosaic); default: the platform's, and the
      GPU kernel on CPU.
    interpret: force interpret mode (default: on CPU only).
    gpu_blocks: GPU only: force the kernels' sub-blocks (one
      :class:`resources.GpuBlocks` or a (fwd, dq, dkv) tuple); default: the
      largest that fit the target's shared memory. Compiled kernels raise a
      ValueError (need and budget) for blocks, or a TPU tile, that cannot fit.

  Returns:
    (out [B, *spatial, N, Hv] in the query dtype, lse [B, *spatial, N] float32).
  """
  if backend is None:
    backend = "tpu" if placement.pallas_backend(query, key, value) == "tpu" else "gpu"
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}.")
  D = query.ndim - 3
  spatial = tuple(query.shape[1:1 + D])
  if rpb is not None:
    expected = (query.shape[-2],) + tuple(2 * k - 1 for k in kernel_size)
    if tuple(rpb.shape) != expected:
      raise ValueError(f"rpb must have shape [N, 2*k1-1, ...] = {expected} for kernel_size "
                       f"{tuple(kernel_size)}, got {tuple(rpb.shape)}.")
  plan_key = (spatial, tuple(kernel_size), tuple(dilation), tuple(is_causal),
              tuple(tile_shape))
  ps = plans(*plan_key)
  interp = _interpret(backend, interpret, query, key, value)
  kcfg = kernel_config(query, key, value, plan=block_plan(*plan_key), tile_shape=tile_shape,
                       backend=backend, rpb=rpb, interpret=interp, gpu_blocks=gpu_blocks)
  if backend == "tpu" and interp is True:
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    interp = pltpu.InterpretParams()

  def to_blocks(x):  # [B, *spatial, h, c] -> [B, h, L, c]
    t = to_tiles(x, ps)
    return t.reshape((t.shape[0], -1) + t.shape[3:]).transpose(0, 2, 1, 3)

  q, k, v = to_blocks(query), to_blocks(key), to_blocks(value)
  cfg = (plan_key, float(scale), backend, interp, kcfg)
  table = None if rpb is None else class_table(rpb, plan_key, bias_plan(*plan_key))
  out, lse = _core(q, k, v, table, cfg)
  G = block_plan(*plan_key).num_blocks
  B, N, L = lse.shape
  tq = L // G
  out = from_tiles(out.transpose(0, 2, 1, 3).reshape(B, G, tq, N, -1), ps)
  lse = from_tiles(lse.transpose(0, 2, 1).reshape(B, G, tq, N), ps)
  return out.astype(query.dtype), lse
