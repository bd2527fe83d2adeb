"""HyperZ.Z.W operator: context-dependent long convolutions from coordinate hyper-kernels (arXiv:2401.17948).

Zhang et al., "HyperZ.Z.W Operator Connects Slow-Fast Networks for Full Context
Interaction" (Terminator; arXiv:2401.17948). A coordinate-based slow net (a SIREN-style MLP on a
[-1, 1] grid) generates a hyper-kernel W; the fast net forms the
context-dependent kernel ``W * Z`` and convolves Z with it (global, via FFT).
Not an attention mechanism in the QK sense. Tensors are channels-last
[B, *spatial, C]. Only the global form is implemented; the local k x k
hyper-kernels and the full Terminator network are absent.
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def fft_long_conv(z, kernel):
  """Depthwise circular convolution over all spatial axes via FFT.

  ``out[b, n, c] = sum_m z[b, m, c] * kernel[(n - m) mod L, c]`` (n, m
  multi-indices).

  Args:
    z: [B, *spatial, C].
    kernel: [*k_spatial, C] or [B, *k_spatial, C] with every k_spatial <= the
      spatial size; a smaller kernel is zero-padded at the end (anchored at 0).

  Returns:
    [B, *spatial, C] float32.
  """
  if z.ndim < 3:
    raise ValueError(f"z must be [B, *spatial, C] with at least one spatial axis, got {z.shape}.")
  spatial = z.shape[1:-1]
  if kernel.ndim == z.ndim - 1:
    kernel = kernel[None]
  if kernel.ndim != z.ndim or kernel.shape[-1] != z.shape[-1] or kernel.shape[0] not in (1, z.shape[0]):
    raise ValueError(f"kernel must be [*spatial, C] or [B, *spatial, C] matching z {z.shape}, got {kernel.shape}.")
  if any(k > s for k, s in zip(kernel.shape[1:-1], spatial)):
    raise ValueError(f"kernel spatial size {kernel.shape[1:-1]} exceeds z's {spatial}.")
  axes = tuple(range(1, z.ndim - 1))
  zf = jnp.fft.rfftn(z.astype(jnp.float32), s=spatial, axes=axes)
  kf = jnp.fft.rfftn(kernel.astype(jnp.float32), s=spatial, axes=axes)
  return jnp.fft.irfftn(zf * kf, s=spatial, axes=axes)


def hyper_zzw(z, w, *, form: str = "conv"):
  """HyperZ.Z.W: ``form="conv"``: ``Z (*) (W . Z)`` (global context-dependent kernel, circular);
  ``form="elementwise"`` (the "2E" form): ``(Z . W) . Z``.

  z: [B, *spatial, C]; w: [*spatial, C] or [B, *spatial, C] (same spatial size as z).
  """
  if w.shape[-(z.ndim - 1):] != z.shape[1:]:
    raise ValueError(f"w must have z's spatial and channel shape {z.shape[1:]}, got {w.shape}.")
  k = w.astype(jnp.float32) * z.astype(jnp.float32)
  if form == "conv":
    return fft_long_conv(z, k)
  if form == "elementwise":
    return k * z.astype(jnp.float32)
  raise ValueError(f"form must be 'conv' or 'elementwise', got {form!r}.")


def coordinate_grid(shape: Sequence[int]):
  """Coordinates [*shape, len(shape)] on a uniform [-1, 1] grid (a size-1 axis gets 0)."""
  axes = [jnp.linspace(-1.0, 1.0, n) if n > 1 else jnp.zeros((1,)) for n in shape]
  return jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1)


def coordinate_kernel(coords, mlp: Callable):
  """The slow net: a hyper-kernel ``mlp(coords)`` [*spatial, C] from coordinates [*spatial, d]."""
  return mlp(coords)


class SirenMLP(nn.Module):
  """SIREN coordinate MLP: ``sin(omega0 * Dense(x))`` layers then a linear output (Sitzmann et al. init)."""
  features: int
  hidden: int = 32
  depth: int = 2
  omega0: float = 30.0

  @nn.compact
  def __call__(self, x):
    d_in = x.shape[-1]
    for i in range(self.depth):
      bound = 1.0 / d_in if i == 0 else (6.0 / self.hidden) ** 0.5 / self.omega0
      init = lambda key, shape, dtype=jnp.float32, b=bound: jax.random.uniform(key, shape, dtype, -b, b)
      x = jnp.sin(self.omega0 * nn.Dense(self.hidden, kernel_init=init, name=f"layer_{i}")(x))
      d_in = self.hidden
    return nn.Dense(self.features, name="out")(x)


class HyperZZW(nn.Module):
  """Global HyperZ.Z.W layer: a SIREN slow net generates W on z's grid; returns ``hyper_zzw(z, W)``.

  ``__call__(z [B, *spatial, C]) -> [B, *spatial, C]`` float32.
  """
  hidden: int = 32
  depth: int = 2
  form: str = "conv"

  @nn.compact
  def __call__(self, z):
    coords = coordinate_grid(z.shape[1:-1])
    w = coordinate_kernel(coords, SirenMLP(z.shape[-1], self.hidden, self.depth, name="slow_net"))
    return hyper_zzw(z, w, form=self.form)
