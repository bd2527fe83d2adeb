"""Small shared helpers of attnjax.vision: argument checks, PyTorch-style inits, 1-D/2-D convs."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def check_rank(name: str, x, rank: int, letters: str):
  """Raises ValueError unless ``x`` has rank ``rank`` (``letters`` names the axes)."""
  if getattr(x, "ndim", None) != rank:
    raise ValueError(f"{name} must have rank {rank} {letters}, got shape {getattr(x, 'shape', None)}.")


def check_shape(name: str, x, shape, letters: str):
  """Raises ValueError unless ``x.shape == shape``."""
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f"{name} must have shape {letters}={tuple(shape)}, got {tuple(x.shape)}.")


def is_concrete(x) -> bool:
  """True when ``x`` holds values (not a tracer), so value checks can run eagerly."""
  return not isinstance(x, jax.core.Tracer)


def torch_uniform(fan_in: int):
  """PyTorch's default conv/linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(max(fan_in, 1))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def conv1d_same(x, kernel, *, groups: int = 1):
  """Cross-correlation over the length axis with zero 'same' padding.

  x [B, L, Cin]; kernel [k, Cin // groups, Cout] (k odd) -> [B, L, Cout].
  """
  k = kernel.shape[0]
  if k % 2 != 1:
    raise ValueError(f"kernel size must be odd for 'same' padding, got {k}.")
  return jax.lax.conv_general_dilated(
      x, kernel.astype(x.dtype), window_strides=(1,), padding=((k // 2, k // 2),),
      dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups)


def group_norm(x, groups: int, scale, bias, *, eps: float = 1e-5):
  """GroupNorm over channels-last x [B, *L, C]: statistics over *L and C/groups channels.

  Biased variance (as torch.nn.GroupNorm); scale/bias [C].
  """
  C = x.shape[-1]
  if groups < 1 or C % groups:
    raise ValueError(f"groups must divide the channel count C={C}, got {groups}.")
  xg = x.reshape(x.shape[:-1] + (groups, C // groups))
  axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
  mean = jnp.mean(xg, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
  y = ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)
  return y * scale + bias


def layer_norm(x, scale, bias, *, eps: float = 1e-5):
  """LayerNorm over the last axis with scale/bias [D]."""
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias
