"""CNN feature-gating attention: ULSAM, ELA, CSA and GAAM (four papers, below).

ULSAM ("ULSAM: Ultra-Lightweight Subspace Attention Module for Compact
Convolutional Neural Networks", arXiv:2006.15102), ELA ("ELA: Efficient Local
Attention for Deep Convolutional Neural Networks", arXiv:2403.01123), CSA
("Class Semantics-based Attention for Action Detection", arXiv:2109.02613) and
GAAM ("Gaussian Adaptive Attention is All You Need", arXiv:2401.11143).

Images are NHWC ([B, H, W, C], the Flax convention); 1-D feature sequences are
[B, T, C]. Each method is a pure function of explicit parameters plus a thin
Flax module that owns them.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.vision._common import check_rank, conv1d_same, group_norm, torch_uniform

# ELA presets (kernel size, conv groups per channel count, GroupNorm groups) as
# given in widely used public ports; the paper has no official code and the
# table itself was not confirmed. conv_groups "C" = depthwise, "C/8" = C // 8.
ELA_VARIANTS = {"T": (5, "C", 32), "B": (7, "C", 16), "S": (5, "C/8", 16), "L": (7, "C/8", 16)}


# ----------------------------------------------------------------------------- ULSAM
def ulsam(x, params, *, num_splits: int = 4, dw_norm: Optional[Callable] = None,
          pw_norm: Optional[Callable] = None, return_maps: bool = False):
  """ULSAM subspace attention (Saini et al., "ULSAM: Ultra-Lightweight Subspace Attention Module").

  The C channels are split into ``num_splits`` groups F_m. For each group:
  ``s = ReLU(norm(DW1x1(F_m)))`` -> 3x3 max-pool (stride 1, pad 1) ->
  ``ReLU(norm(PW1x1(s) -> 1 channel))`` -> softmax over all H*W positions =
  A_m; ``out_m = F_m * A_m + F_m``.

  Args:
    x: [B, H, W, C] (NHWC), C % num_splits == 0.
    params: ``dw_kernel`` [C], ``dw_bias`` [C] (depthwise 1x1 conv),
      ``pw_kernel`` [g, C/g], ``pw_bias`` [g] (per-group pointwise conv to one map).
    dw_norm, pw_norm: optional callables applied after each conv (BatchNorm in
      the layer; None = identity, e.g. with inference BN folded into the convs).
    return_maps: also return the maps A [B, H, W, g] (each sums to 1 over H*W).

  Returns:
    out [B, H, W, C] in x's dtype (and A).
  """
  check_rank("x", x, 4, "[B, H, W, C]")
  B, H, W, C = x.shape
  g = num_splits
  if g < 1 or C % g:
    raise ValueError(f"num_splits must divide the channel count C={C}, got {num_splits}.")
  for name, shape in (("dw_kernel", (C,)), ("dw_bias", (C,)), ("pw_kernel", (g, C // g)), ("pw_bias", (g,))):
    if tuple(params[name].shape) != shape:
      raise ValueError(f"params['{name}'] must have shape {shape}, got {tuple(params[name].shape)}.")
  xf = x.astype(jnp.float32)
  s = xf * params["dw_kernel"] + params["dw_bias"]
  s = jax.nn.relu(dw_norm(s) if dw_norm is not None else s)
  s = jax.lax.reduce_window(s, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1),
                            ((0, 0), (1, 1), (1, 1), (0, 0)))
  a = jnp.einsum("bhwgc,gc->bhwg", s.reshape(B, H, W, g, C // g), params["pw_kernel"]) + params["pw_bias"]
  a = jax.nn.relu(pw_norm(a) if pw_norm is not None else a)
  maps = jax.nn.softmax(a.reshape(B, H * W, g), axis=1).reshape(B, H, W, g)
  out = (xf.reshape(B, H, W, g, C // g) * (1.0 + maps[..., None])).reshape(x.shape).astype(x.dtype)
  return (out, maps) if return_maps else out


class ULSAM(nn.Module):
  """ULSAM layer over NHWC feature maps; BatchNorm after both convs.

  BN momentum is 0.9 in the PyTorch convention of the official code, which is
  ``momentum=0.1`` in Flax's (running = 0.1 * running + 0.9 * batch); eps 1e-5.
  Call with ``train=True`` and ``mutable=["batch_stats"]`` while training.
  """
  num_splits: int = 4
  bn_momentum: float = 0.1
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    C = x.shape[-1]
    g = self.num_splits
    if g < 1 or C % g:
      raise ValueError(f"num_splits must divide the channel count C={C}, got {g}.")
    params = {
        "dw_kernel": self.param("dw_kernel", torch_uniform(1), (C,)),
        "dw_bias": self.param("dw_bias", torch_uniform(1), (C,)),
        "pw_kernel": self.param("pw_kernel", torch_uniform(C // g), (g, C // g)),
        "pw_bias": self.param("pw_bias", torch_uniform(C // g), (g,)),
    }
    bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                                   epsilon=self.bn_epsilon, name=name)
    return ulsam(x, params, num_splits=g, dw_norm=bn("bn_dw"), pw_norm=bn("bn_pw"))


# ----------------------------------------------------------------------------- ELA
def efficient_local_attention(x, params, *, gn_groups: int = 16, conv_groups: Optional[int] = None,
                              eps: float = 1e-5, return_gates: bool = False):
  """ELA (Xu & Wan, "ELA: Efficient Local Attention for Deep Convolutional Neural Networks").

  Strip pooling ``z_h = mean_W x`` [B, H, C] and ``z_w = mean_H x`` [B, W, C];
  one shared 1-D conv (no bias, 'same' zero padding) + GroupNorm + sigmoid on
  each; ``out = x * y_h[:, :, None, :] * y_w[:, None, :, :]``. No channel reduction.

  Args:
    x: [B, H, W, C] (NHWC).
    params: ``conv_kernel`` [k, C / conv_groups, C] (k odd; the kernel size is
      read from it), ``gn_scale`` [C], ``gn_bias`` [C].
    gn_groups: GroupNorm groups (must divide C); 16 in ELA-B/S/L, 32 in ELA-T.
    conv_groups: conv groups, default C (depthwise, ELA-T/B); C // 8 in ELA-S/L.
    return_gates: also return (y_h [B, H, C], y_w [B, W, C]).
  """
  check_rank("x", x, 4, "[B, H, W, C]")
  C = x.shape[-1]
  conv_groups = C if conv_groups is None else conv_groups
  if conv_groups < 1 or C % conv_groups:
    raise ValueError(f"conv_groups must divide C={C}, got {conv_groups}.")
  kern = params["conv_kernel"]
  if kern.ndim != 3 or kern.shape[1:] != (C // conv_groups, C):
    raise ValueError(f"params['conv_kernel'] must have shape [k, C/conv_groups, C]=[k, {C // conv_groups}, {C}], "
                     f"got {tuple(kern.shape)}.")
  xf = x.astype(jnp.float32)

  def gate(z):
    return jax.nn.sigmoid(group_norm(conv1d_same(z, kern, groups=conv_groups), gn_groups,
                                     params["gn_scale"], params["gn_bias"], eps=eps))
  y_h = gate(jnp.mean(xf, axis=2))
  y_w = gate(jnp.mean(xf, axis=1))
  out = (xf * y_h[:, :, None, :] * y_w[:, None, :, :]).astype(x.dtype)
  return (out, (y_h, y_w)) if return_gates else out


class EfficientLocalAttention(nn.Module):
  """ELA layer (NHWC). ``variant`` in {"T", "B", "S", "L"} sets (kernel, conv groups, GN groups).

  Default ``variant="B"``: kernel 7, depthwise conv, GroupNorm(16) (the common public port).
  """
  variant: str = "B"
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    if self.variant not in ELA_VARIANTS:
      raise ValueError(f"variant must be one of {sorted(ELA_VARIANTS)}, got {self.variant!r}.")
    k, cg, gn = ELA_VARIANTS[self.variant]
    C = x.shape[-1]
    groups = C if cg == "C" else C // 8
    if groups < 1:
      raise ValueError(f"ELA-{self.variant} needs C >= 8 channels, got C={C}.")
    params = {
        "conv_kernel": self.param("conv_kernel", torch_uniform(k * (C // groups)), (k, C // groups, C)),
        "gn_scale": self.param("gn_scale", nn.initializers.ones, (C,)),
        "gn_bias": self.param("gn_bias", nn.initializers.zeros, (C,)),
    }
    return efficient_local_attention(x, params, gn_groups=gn, conv_groups=groups, eps=self.eps)


# ----------------------------------------------------------------------------- CSA
def class_semantics_attention(r, f, params, *, return_gates: bool = False):
  """CSA (Sridhar et al., "Class Semantics-based Attention for Action Detection").

  Gates for the localisation features F are computed from the class-semantics
  features R: channel gate ``w_c = sigmoid(MLP(mean_T R))`` [B, 1, C_F] and
  temporal gate ``w_t = sigmoid(Conv1d_k(R))`` [B, T, 1];
  ``out = F * w_c + F * w_t`` (sum fusion). Layer sizes and the fusion variant
  follow our reading of the paper and were not confirmed against code.

  Args:
    r: [B, T, C_R]; f: [B, T, C_F].
    params: ``w1`` [C_R, D], ``b1`` [D], ``w2`` [D, C_F], ``b2`` [C_F] (two-layer
      ReLU MLP), ``conv_kernel`` [k, C_R, 1] (k odd = temporal kernel), ``conv_bias`` [1].
  """
  check_rank("r", r, 3, "[B, T, C_R]")
  check_rank("f", f, 3, "[B, T, C_F]")
  if r.shape[:2] != f.shape[:2]:
    raise ValueError(f"r and f must share [B, T], got {r.shape[:2]} and {f.shape[:2]}.")
  rf = r.astype(jnp.float32)
  h = jax.nn.relu(jnp.mean(rf, axis=1) @ params["w1"] + params["b1"])
  w_c = jax.nn.sigmoid(h @ params["w2"] + params["b2"])[:, None, :]
  w_t = jax.nn.sigmoid(conv1d_same(rf, params["conv_kernel"]) + params["conv_bias"])
  ff = f.astype(jnp.float32)
  out = (ff * w_c + ff * w_t).astype(f.dtype)
  return (out, (w_c, w_t)) if return_gates else out


class ClassSemanticsAttention(nn.Module):
  """CSA layer: ``__call__(r [B, T, C_R], f [B, T, C_F]) -> [B, T, C_F]``."""
  temporal_kernel: int = 3
  reduction: int = 4

  @nn.compact
  def __call__(self, r, f):
    CR, CF = r.shape[-1], f.shape[-1]
    D = max(CR // self.reduction, 1)
    k = self.temporal_kernel
    params = {
        "w1": self.param("w1", torch_uniform(CR), (CR, D)), "b1": self.param("b1", torch_uniform(CR), (D,)),
        "w2": self.param("w2", torch_uniform(D), (D, CF)), "b2": self.param("b2", torch_uniform(D), (CF,)),
        "conv_kernel": self.param("conv_kernel", torch_uniform(k * CR), (k, CR, 1)),
        "conv_bias": self.param("conv_bias", torch_uniform(k * CR), (1,)),
    }
    return class_semantics_attention(r, f, params)


# ----------------------------------------------------------------------------- GAAM
def gaussian_adaptive_gate(x, mean_offsets, scales, *, axis: int = -1, num_heads: int = 1,
                           eps: float = 1e-8, padding_value=None, return_weights: bool = False):
  """GAAM (Ioannides et al., "Gaussian Adaptive Attention is All You Need").

  ``x`` is split into ``num_heads`` equal chunks along ``axis``; per chunk:
  ``mu = mean(x)``, ``sigma^2 = var(x) + eps`` (unbiased, as torch.var),
  ``z_g = (x - (mu + delta_g)) / sigma``,
  ``N_g = exp(-z_g^2 / (2 c_g^2)) / sqrt(2 pi c_g^2)``; the mixture is the
  product over the G Gaussians (as in the released code);
  ``w = mix / max(sum(mix), eps)``; ``y = x * w``. Entries equal to
  ``padding_value`` are returned unchanged; they enter mu/sigma as zeros (the
  released code does the same: it is not a masked mean).

  Args:
    x: any rank; ``x.shape[axis]`` divisible by num_heads, chunks of >= 2 entries.
    mean_offsets: delta [num_heads, G]; scales: c [num_heads, G].

  Returns:
    y (x's shape and dtype), and the weights w (float32) when return_weights.
  """
  if x.ndim < 1:
    raise ValueError(f"x must have rank >= 1, got shape {x.shape}.")
  if not -x.ndim <= axis < x.ndim:
    raise ValueError(f"axis {axis} is out of bounds for x of rank {x.ndim}.")
  L = x.shape[axis]
  if num_heads < 1 or L % num_heads or L // num_heads < 2:
    raise ValueError(f"x.shape[axis]={L} must split into num_heads={num_heads} chunks of >= 2 entries.")
  for name, p in (("mean_offsets", mean_offsets), ("scales", scales)):
    if p.ndim != 2 or p.shape[0] != num_heads:
      raise ValueError(f"{name} must have shape [num_heads={num_heads}, G], got {tuple(p.shape)}.")
  if mean_offsets.shape != scales.shape:
    raise ValueError(f"mean_offsets {mean_offsets.shape} and scales {scales.shape} must match.")
  xf = jnp.moveaxis(x.astype(jnp.float32), axis, -1)
  xf = xf.reshape(xf.shape[:-1] + (num_heads, L // num_heads))
  keep = None
  xm = xf
  if padding_value is not None:
    keep = xf != padding_value
    xm = jnp.where(keep, xf, 0.0)
  mu = jnp.mean(xm, -1, keepdims=True)
  sigma = jnp.sqrt(jnp.var(xm, -1, keepdims=True, ddof=1) + eps)
  mix = 1.0
  for gi in range(mean_offsets.shape[1]):
    d = mean_offsets[:, gi, None].astype(jnp.float32)
    c2 = jnp.square(scales[:, gi, None].astype(jnp.float32))
    z = (xf - (mu + d)) / sigma
    mix = mix * jnp.exp(-jnp.square(z) / (2.0 * c2)) / jnp.sqrt(2.0 * math.pi * c2)
  w = mix / jnp.maximum(jnp.sum(mix, -1, keepdims=True), eps)
  y = xf * w if keep is None else jnp.where(keep, xf * w, xf)

  def back(t):
    t = t.reshape(t.shape[:-2] + (L,))
    return jnp.moveaxis(t, -1, axis)
  y = back(y).astype(x.dtype)
  return (y, back(w)) if return_weights else y


class GaussianAdaptiveAttention(nn.Module):
  """GAAM layer: learnable offsets (init 0) and scales (init N(0, 1)) [num_heads, num_gaussians]."""
  num_gaussians: int
  num_heads: int = 1
  axis: int = -1
  padding_value: Optional[float] = None
  eps: float = 1e-8

  @nn.compact
  def __call__(self, x):
    shape = (self.num_heads, self.num_gaussians)
    delta = self.param("mean_offsets", nn.initializers.zeros, shape)
    c = self.param("scales", nn.initializers.normal(1.0), shape)
    return gaussian_adaptive_gate(x, delta, c, axis=self.axis, num_heads=self.num_heads,
                                  eps=self.eps, padding_value=self.padding_value)
