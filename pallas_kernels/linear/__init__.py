"""Pallas kernels for chunked linear attention (Lightning Attention-2, arXiv:2401.04658).

``forward`` / ``backward`` are the "pallas" backend of attnjax.linear.engine. The TPU (Mosaic) variant runs on TPU, the GPU (Triton)
variant on GPU; on CPU either runs in interpret mode (GPU variant by default,
`set_variant("tpu")` selects the other). Both call the same per-chunk
arithmetic (attnjax.core.chunk_math).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import placement
from pallas_kernels.linear import gpu, resources, tpu

VARIANTS = {"gpu": gpu, "tpu": tpu}
_CHOICE = {"variant": None}


def set_variant(name: Optional[str]) -> None:
  """Forces the "gpu" or "tpu" kernel variant (None = by platform)."""
  if name not in (None, "gpu", "tpu"):
    raise ValueError(f"variant must be None, 'gpu' or 'tpu', got {name!r}.")
  _CHOICE["variant"] = name


def current_variant(*arrays) -> str:
  """The forced variant, else the placed device's ("gpu" off TPU)."""
  if _CHOICE["variant"] is not None:
    return _CHOICE["variant"]
  return "tpu" if placement.pallas_backend(*arrays) == "tpu" else "gpu"


def _layout(*arrays):
  """(kernel module, interpret flag, feature/value padding rule, target name or None).

  On hardware the feature and value widths are padded with zeros: to a
  multiple of 128 lanes on TPU, to a power of two >= 16 on GPU (Triton tiles).
  """
  name = current_variant(*arrays)
  interpret = placement.pallas_backend(*arrays) != name
  rule = None if interpret else name
  target = None if interpret else resources.placed_target(*arrays)
  return VARIANTS[name], interpret, rule, target


def _padded_size(size, rule):
  if rule is None:
    return size
  if rule == "tpu":
    return -(-size // 128) * 128
  return max(16, 1 << (size - 1).bit_length())


def _pad_last(x, rule, axis=-1):
  size = x.shape[axis]
  extra = _padded_size(size, rule) - size
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def _chunk_cumsum(g, chunk):
  b, n, t = g.shape
  return jnp.cumsum(g.reshape(b, n, t // chunk, chunk), axis=-1).reshape(b, n, t)


def _check(chunk, f, e, rule, target, has_decay):
  """Refuses (ValueError) a chunk size the kernel cannot tile or a configuration too big for the target.

  f and e are the padded widths; every kernel of the forward and backward
  pass is checked here, so a refusal comes before any compile.
  """
  if rule == "gpu":
    if chunk < 16 or chunk & (chunk - 1):
      raise ValueError(f"chunk_size must be a power of two >= 16 for the GPU kernel, got {chunk}.")
    resources.check_gpu(chunk, f, e, target)
  if rule == "tpu":
    if chunk % 8:
      raise ValueError(f"chunk_size must be a multiple of 8 for the TPU kernel, got {chunk}.")
    resources.check_tpu(chunk, f, e, target, has_decay)


def forward(q, k, v, g, s0, chunk, has_decay):
  """The linear engine's "pallas" forward (``attnjax.linear.engine`` shapes)."""
  mod, interpret, m, target = _layout(q)
  f, e = q.shape[-1], v.shape[-1]
  _check(chunk, _padded_size(f, m), _padded_size(e, m), m, target, has_decay)
  q, k, v = _pad_last(q, m), _pad_last(k, m), _pad_last(v, m)
  s0 = _pad_last(_pad_last(s0, m, -2), m)
  bcum = _chunk_cumsum(g, chunk) if has_decay else None
  o, sf = mod.forward(q, k, v, bcum, s0, chunk=chunk, has_decay=has_decay, interpret=interpret,
                      target=target)
  return o[..., :e], sf[..., :f, :e]


def backward(q, k, v, g, s0, do, ds_final, chunk, has_decay):
  """The linear engine's "pallas" backward (``attnjax.linear.engine`` shapes)."""
  mod, interpret, m, target = _layout(q)
  f, e = q.shape[-1], v.shape[-1]
  _check(chunk, _padded_size(f, m), _padded_size(e, m), m, target, has_decay)
  q, k, v, do = (_pad_last(x, m) for x in (q, k, v, do))
  s0, ds_final = (_pad_last(_pad_last(x, m, -2), m) for x in (s0, ds_final))
  bcum = _chunk_cumsum(g, chunk) if has_decay else None
  dq, dk, dv, ds0 = mod.backward(q, k, v, bcum, s0, do, ds_final, chunk=chunk,
                                 has_decay=has_decay, interpret=interpret, target=target)
  return dq[..., :f], dk[..., :f], dv[..., :e], ds0[..., :f, :e]

