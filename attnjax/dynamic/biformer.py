"""BiFormer's bi-level routing attention with local context enhancement (Zhu et al., CVPR 2023; arXiv:2303.08810).

"BiFormer: Vision Transformer with Bi-Level Routing Attention".

Tokens on a grid ``[B, *spatial, N, H]`` are cut into ``prod(num_regions)``
regions. Region-level routing: average-pooled region queries and keys (all
heads concatenated, computed on detached q/k by default) give the affinity
``A_r = q_r k_r^T``; each query region keeps its ``topk`` regions. Token
level: every query attends to all tokens of its routed regions; this is
block-sparse attention on the region-major token order (block = region).
LCE adds a depthwise ``side_dwconv x side_dwconv`` convolution of V.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.dynamic.gather import layout_attention
from attnjax.dynamic.select import expand_block_heads, topk_blocks

__all__ = ["bi_level_routing_attention", "lce", "to_regions", "from_regions",
           "BiLevelRoutingAttention"]


def _grid(spatial, num_regions):
  if isinstance(num_regions, int):
    num_regions = (num_regions,) * len(spatial)
  num_regions = tuple(int(r) for r in num_regions)
  if len(num_regions) != len(spatial):
    raise ValueError(f"num_regions {num_regions} must have one entry per spatial dim "
                     f"{tuple(spatial)}.")
  for L, r in zip(spatial, num_regions):
    if r < 1 or L % r:
      raise ValueError(f"num_regions {num_regions} must divide the spatial shape "
                       f"{tuple(spatial)} (got {r} regions for extent {L}).")
  return num_regions


def to_regions(x, num_regions):
  """[B, *spatial, N, H] -> region-major tokens [B, R * r, N, H] (R regions of r tokens)."""
  spatial = x.shape[1:-2]
  grid = _grid(spatial, num_regions)
  D = len(spatial)
  shape = [x.shape[0]]
  for L, r in zip(spatial, grid):
    shape += [r, L // r]
  xr = x.reshape(tuple(shape) + x.shape[-2:])
  perm = [0] + [1 + 2 * i for i in range(D)] + [2 + 2 * i for i in range(D)] + [2 * D + 1, 2 * D + 2]
  xr = jnp.transpose(xr, perm)
  return xr.reshape((x.shape[0], -1) + x.shape[-2:])


def from_regions(x, spatial, num_regions):
  """Inverse of :func:`to_regions`: [B, R * r, N, H] -> [B, *spatial, N, H]."""
  grid = _grid(spatial, num_regions)
  D = len(spatial)
  sizes = [L // r for L, r in zip(spatial, grid)]
  xr = x.reshape((x.shape[0],) + tuple(grid) + tuple(sizes) + x.shape[-2:])
  perm = [0]
  for i in range(D):
    perm += [1 + i, 1 + D + i]
  perm += [2 * D + 1, 2 * D + 2]
  return jnp.transpose(xr, perm).reshape((x.shape[0],) + tuple(spatial) + x.shape[-2:])


def bi_level_routing_attention(query, key, value, *, num_regions: Union[int, Sequence[int]] = 7,
                               topk: int = 4, scale=None, detach_routing: bool = True,
                               return_regions: bool = False, implementation=None):
  """Bi-level routing attention (no LCE; add :func:`lce` of V separately).

  Args:
    query: [B, *spatial, N, H]; key: [B, *spatial_kv, K, H]; value:
      [B, *spatial_kv, K, Hv]. Self-attention in BiFormer (spatial_kv =
      spatial); for cross-attention the key grid (same rank, any extents) is
      cut into the same number of regions per dim, so query region i routes
      to key regions of the other grid.
    num_regions: regions per spatial dim (7 x 7 in BiFormer), dividing it
      (and the key grid's extents).
    topk: routed regions per query region (<= number of regions).
    scale: default ``(N * H) ** -0.5``, the paper code's full-qk-dim scale
      (kept "for consistency with old models"); pass ``H ** -0.5`` for the usual one.
    detach_routing: routing sees stop_gradient(q, k), as the released code.

  Returns:
    out [B, *spatial, N, Hv] (and region indices [B, R, topk] when asked).
  """
  spatial, spatial_kv = query.shape[1:-2], key.shape[1:-2]
  if value.shape[1:-2] != spatial_kv or len(spatial_kv) != len(spatial):
    raise ValueError(f"key {key.shape} and value {value.shape} must share a spatial shape of "
                     f"the query's rank (query {query.shape}).")
  N, H, K = query.shape[-2], query.shape[-1], key.shape[-2]
  qf, kf, vf = (to_regions(x, num_regions) for x in (query, key, value))
  R = math.prod(_grid(spatial, num_regions))
  r, r_kv = qf.shape[1] // R, kf.shape[1] // R
  if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= R:
    raise ValueError(f"topk must be an int in [1, {R}] (the number of regions), got {topk!r}.")
  qs, ks = (jax.lax.stop_gradient(qf), jax.lax.stop_gradient(kf)) if detach_routing else (qf, kf)
  B = query.shape[0]
  q_r = qs.astype(jnp.float32).reshape(B, R, r, K, N // K, H).mean(axis=(2, 4)).reshape(B, R, K * H)
  k_r = ks.astype(jnp.float32).reshape(B, R, r_kv, K * H).mean(axis=2)
  affinity = jnp.einsum("bic,bjc->bij", q_r, k_r)[:, None]  # [B, 1, R, R]
  idx, cnt = topk_blocks(affinity, topk)
  idx_n, cnt_n = expand_block_heads(idx, N), expand_block_heads(cnt, N)
  scale = (N * H) ** -0.5 if scale is None else scale
  out = layout_attention(qf, kf, vf, idx_n, cnt_n, block_q=r, block_kv=r_kv, causal=False,
                         scale=scale, implementation=implementation)
  out = from_regions(out, spatial, num_regions)
  return (out, idx[:, 0]) if return_regions else out


def lce(value, kernel, bias=None):
  """Local context enhancement: depthwise convolution of V over the spatial grid ("SAME").

  Args:
    value: [B, *spatial, K, Hv].
    kernel: [*window, K * Hv] depthwise filter (5 x 5 in BiFormer).
    bias: optional [K * Hv].

  Returns:
    [B, *spatial, K, Hv].
  """
  spatial = value.shape[1:-2]
  C = value.shape[-2] * value.shape[-1]
  if len(spatial) not in (1, 2):
    raise ValueError(f"lce supports 1 or 2 spatial dims, got value {value.shape}.")
  if kernel.shape[-1] != C or kernel.ndim != len(spatial) + 1:
    raise ValueError(f"kernel must have shape [*window, K*Hv={C}] with {len(spatial)} window "
                     f"dims, got {kernel.shape}.")
  x = value.reshape(value.shape[:-2] + (C,))
  dn = jax.lax.conv_dimension_numbers(x.shape, kernel[..., None, :].shape,
                                      ("NHWC", "HWIO", "NHWC") if len(spatial) == 2 else
                                      ("NWC", "WIO", "NWC"))
  y = jax.lax.conv_general_dilated(x, kernel[..., None, :].astype(x.dtype), (1,) * len(spatial),
                                   "SAME", dimension_numbers=dn, feature_group_count=C)
  if bias is not None:
    y = y + bias
  return y.reshape(value.shape)


class BiLevelRoutingAttention(nn.Module):
  """BiFormer's attention block on a feature map x [B, Hs, Ws, C] (or [B, L, C]).

  qkv by one linear map, bi-level routing attention, LCE (depthwise conv of
  V), output projection. ``head_dim`` 32 as BiFormer.
  """
  dim: int
  num_heads: Optional[int] = None
  head_dim: int = 32
  num_regions: Union[int, Tuple[int, ...]] = 7
  topk: int = 4
  side_dwconv: int = 5

  @nn.compact
  def __call__(self, x):
    heads = self.num_heads or max(1, self.dim // self.head_dim)
    if self.dim % heads:
      raise ValueError(f"dim={self.dim} must be divisible by num_heads={heads}.")
    hd = self.dim // heads
    qkv = nn.Dense(3 * self.dim, name="qkv")(x)
    q, k, v = (t.reshape(x.shape[:-1] + (heads, hd)) for t in jnp.split(qkv, 3, axis=-1))
    out = bi_level_routing_attention(q, k, v, num_regions=self.num_regions, topk=self.topk,
                                     scale=self.dim ** -0.5)
    if self.side_dwconv:
      window = (self.side_dwconv,) * (x.ndim - 2)
      kern = self.param("lce_kernel", nn.initializers.lecun_normal(), window + (self.dim,))
      bias = self.param("lce_bias", nn.initializers.zeros, (self.dim,))
      out = out + lce(v, kern, bias)
    return nn.Dense(self.dim, name="out")(out.reshape(x.shape[:-1] + (self.dim,)))
