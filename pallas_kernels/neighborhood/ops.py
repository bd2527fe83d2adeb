"""Differentiable fused neighborhood attention (jax.custom_vjp over the kernels; spec P2-23).

``na_pallas`` permutes [B, *spatial, N, H] tokens into tile-contiguous order
(pad + reshape, no gather), runs the GPU (Triton) or TPU (Mosaic) kernels and
permutes back. On CPU the kernels run in interpret mode.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attnjax.neighborhood.tiling import plans
from attnjax.neighborhood.xla import from_tiles, to_tiles
from pallas_kernels.neighborhood import gpu, tpu
from pallas_kernels.neighborhood.plan import block_plan

BACKENDS = ("gpu", "tpu")


def _module(backend):
  return gpu if backend == "gpu" else tpu


def _interpret(backend, interpret):
  if interpret is not None:
    return interpret
  return jax.default_backend() == "cpu"


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _core(q, k, v, cfg):
  out, lse = _fwd(q, k, v, cfg)[0]
  return out, lse


def _fwd(q, k, v, cfg):
  plan_key, scale, backend, interpret = cfg
  plan = block_plan(*plan_key)
  out, lse = _module(backend).forward(q, k, v, plan, scale=scale, interpret=interpret)
  return (out, lse), (q, k, v, out, lse)


def _bwd(cfg, res, cts):
  plan_key, scale, backend, interpret = cfg
  q, k, v, out, lse = res
  do, dlse = cts
  plan = block_plan(*plan_key)
  # d lse / d s = p, so an lse cotangent shifts delta: ds = p * (dp - delta + dlse)
  delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  delta = delta - dlse.astype(jnp.float32)
  return _module(backend).backward(q, k, v, do.astype(q.dtype), lse, delta, plan,
                                   scale=scale, interpret=interpret)


_core.defvjp(_fwd, _bwd)


def na_pallas(query, key, value, *, kernel_size, dilation, is_causal, scale, tile_shape,
              backend=None, interpret=None):
  """Fused neighborhood attention.

  Args:
    query: [B, *spatial, N, H]; key: [B, *spatial, K, H]; value: [B, *spatial, K, Hv].
    kernel_size, dilation, is_causal, tile_shape: normalised per-dimension tuples
      (validated by :func:`attnjax.neighborhood.neighborhood_attention`).
    scale: logit scale (python float).
    backend: "gpu" (Triton) or "tpu" (Mosaic); default: the platform's, and the
      GPU kernel on CPU.
    interpret: force interpret mode (default: on CPU only).

  Returns:
    (out [B, *spatial, N, Hv] in the query dtype, lse [B, *spatial, N] float32).
  """
  if backend is None:
    backend = "tpu" if jax.default_backend() == "tpu" else "gpu"
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}.")
  D = query.ndim - 3
  spatial = tuple(query.shape[1:1 + D])
  plan_key = (spatial, tuple(kernel_size), tuple(dilation), tuple(is_causal),
              tuple(tile_shape))
  ps = plans(*plan_key)
  interp = _interpret(backend, interpret)
  if backend == "tpu" and interp is True:
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    interp = pltpu.InterpretParams()

  def to_blocks(x):  # [B, *spatial, h, c] -> [B, h, L, c]
    t = to_tiles(x, ps)
    return t.reshape((t.shape[0], -1) + t.shape[3:]).transpose(0, 2, 1, 3)

  q, k, v = to_blocks(query), to_blocks(key), to_blocks(value)
  cfg = (plan_key, float(scale), backend, interp)
  out, lse = _core(q, k, v, cfg)
  G = block_plan(*plan_key).num_blocks
  B, N, L = lse.shape
  tq = L // G
  out = from_tiles(out.transpose(0, 2, 1, 3).reshape(B, G, tq, N, -1), ps)
  lse = from_tiles(lse.transpose(0, 2, 1).reshape(B, G, tq, N), ps)
  return out.astype(query.dtype), lse
