"""Flax Linen layers of the neighborhood engine: NATTEN (arXiv:2403.04690), HaloNets
(arXiv:2103.12731), HiLo (arXiv:2205.13213), PredFormer blocks (arXiv:2410.04733); thin
wrappers over the pure functions.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from attnjax.neighborhood.api import neighborhood_attention
from attnjax.neighborhood.halo import halo_attention
from attnjax.neighborhood.hilo import hilo_attention, hilo_heads
from attnjax.neighborhood.spatiotemporal import spatiotemporal_attention


def _qkv(x, num_heads, num_kv_heads, head_dim, use_bias, dtype):
  dense = lambda n, name: nn.DenseGeneral((n, head_dim), use_bias=use_bias, dtype=dtype,
                                          name=name)(x)
  return dense(num_heads, "query"), dense(num_kv_heads, "key"), dense(num_kv_heads, "value")


def _out(o, features, dtype):
  return nn.DenseGeneral(features, axis=(-2, -1), dtype=dtype, name="out")(o)


class NeighborhoodAttention(nn.Module):
  """NATTEN-style neighborhood self-attention on [B, *spatial, C] (1D/2D/3D).

  ``kernel_size`` entries may be None (= the full extent of that dimension),
  e.g. ``(3, None, None)`` on [B, T, X, Y, C] is temporal sliding-window
  attention over whole frames (video tokens).
  """
  num_heads: int
  kernel_size: Union[int, Sequence[Optional[int]]]
  dilation: Union[int, Sequence[int]] = 1
  is_causal: Union[bool, Sequence[bool]] = False
  num_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  use_rpb: bool = False
  use_bias: bool = True
  implementation: Optional[str] = None
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x):
    C = x.shape[-1]
    spatial = x.shape[1:-1]
    hd = self.head_dim or C // self.num_heads
    ks = self.kernel_size
    ks = tuple(n if k is None else k for n, k in zip(
        spatial, ks if isinstance(ks, (tuple, list)) else (ks,) * len(spatial)))
    q, k, v = _qkv(x, self.num_heads, self.num_kv_heads or self.num_heads, hd,
                   self.use_bias, self.dtype)
    rpb = None
    if self.use_rpb:
      rpb = self.param("rpb", nn.initializers.truncated_normal(0.02),
                       (self.num_heads,) + tuple(2 * kk - 1 for kk in ks))
    o = neighborhood_attention(q, k, v, kernel_size=ks, dilation=self.dilation,
                               is_causal=self.is_causal, rpb=rpb,
                               implementation=self.implementation)
    return _out(o, C, self.dtype)


class HaloAttention(nn.Module):
  """HaloNets blocked local self-attention on [B, X, Y, C] (relative logits optional).

  ``stride > 1`` is attention downsampling: the output is [B, X/s, Y/s, C]; the
  query is projected only at the strided pixels ``x[:, ::s, ::s]`` (timm's
  strided 1x1 query projection) while keys/values cover the full map.
  ``avg_down=True`` runs stride-1 attention and average-pools the heads' output
  s x s before the output projection (the projection is affine, so this equals
  pooling after it).
  """
  num_heads: int
  block_size: int = 8
  halo: int = 3
  use_rel_pos: bool = True
  pad_mode: str = "mask"
  stride: int = 1
  avg_down: bool = False
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x):
    C = x.shape[-1]
    hd = C // self.num_heads
    s = self.stride
    q_src = x[:, ::s, ::s] if (isinstance(s, int) and s > 1 and not self.avg_down
                               and self.block_size % s == 0) else x
    dense = lambda src, name: nn.DenseGeneral((self.num_heads, hd), use_bias=False,
                                              dtype=self.dtype, name=name)(src)
    q, k, v = dense(q_src, "query"), dense(x, "key"), dense(x, "value")
    rel = None
    if self.use_rel_pos:
      w = self.block_size + 2 * self.halo
      init = nn.initializers.normal(hd ** -0.5)
      rel = (self.param("rel_h", init, (2 * w - 1, hd)),
             self.param("rel_w", init, (2 * w - 1, hd)))
    o = halo_attention(q, k, v, block_size=self.block_size, halo=self.halo, rel_pos=rel,
                       pad_mode=self.pad_mode, stride=self.stride, avg_down=self.avg_down)
    return _out(o, C, self.dtype)


class HiLoAttention(nn.Module):
  """LITv2 HiLo attention on [B, X, Y, C] (alpha: Lo-Fi head share; window s)."""
  num_heads: int
  alpha: float = 0.9
  window: int = 2
  qkv_bias: bool = True

  @nn.compact
  def __call__(self, x):
    C = x.shape[-1]
    d = C // self.num_heads
    n_lo, n_hi = hilo_heads(self.num_heads, self.alpha, self.window)
    params = {}

    def dense(name, i, o, bias=True):
      p = {"kernel": self.param(f"{name}_kernel", nn.initializers.lecun_normal(), (i, o))}
      if bias:
        p["bias"] = self.param(f"{name}_bias", nn.initializers.zeros, (o,))
      params[name] = p
    if n_hi:
      dense("hifi_qkv", C, 3 * n_hi * d, self.qkv_bias)
      dense("hifi_proj", n_hi * d, n_hi * d)
    if n_lo:
      dense("lofi_q", C, n_lo * d, self.qkv_bias)
      dense("lofi_kv", C, 2 * n_lo * d, self.qkv_bias)
      dense("lofi_proj", n_lo * d, n_lo * d)
    return hilo_attention(x, params, num_heads=self.num_heads, alpha=self.alpha,
                          window=self.window)


class SpatioTemporalAttention(nn.Module):
  """PredFormer attention on [B, T, S, C]: mode "full" | "spatial" | "temporal"."""
  num_heads: int
  mode: str = "full"
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x):
    C = x.shape[-1]
    q, k, v = _qkv(x, self.num_heads, self.num_heads, C // self.num_heads, True, self.dtype)
    return _out(spatiotemporal_attention(q, k, v, mode=self.mode), C, self.dtype)


class GatedTransformerBlock(nn.Module):
  """PredFormer "Gated Transformer" block: pre-LN attention + pre-LN SwiGLU (hidden 4C).

  Dropout and DropPath of the paper's TaxiBJ configs are not included.
  """
  num_heads: int
  mode: str = "full"
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, x):
    C = x.shape[-1]
    x = x + SpatioTemporalAttention(self.num_heads, self.mode)(nn.LayerNorm()(x))
    h = nn.LayerNorm()(x)
    gate = nn.silu(nn.Dense(self.mlp_ratio * C, name="w_gate")(h))
    return x + nn.Dense(C, name="w_out")(gate * nn.Dense(self.mlp_ratio * C, name="w_x")(h))


class PredFormerLayer(nn.Module):
  """A sequence of gated blocks following ``pattern`` over [B, T, S, C].

  Letters: T = temporal, S = spatial, F = full; "TSST" is PredFormer's
  Quadruplet layer, "TS"/"ST" Binary, "TST"/"STS" Triplet; FacTS is
  ``"T" * n + "S" * n``.
  """
  num_heads: int
  pattern: str = "TSST"

  @nn.compact
  def __call__(self, x):
    modes = {"T": "temporal", "S": "spatial", "F": "full"}
    for i, c in enumerate(self.pattern):
      if c not in modes:
        raise ValueError(f"pattern letters must be T, S or F, got {self.pattern!r}.")
      x = GatedTransformerBlock(self.num_heads, modes[c], name=f"block_{i}_{c}")(x)
    return x
