"""OAT box encoding, NiNformer, visual search maps and MEDUSA gates (four papers, below).

OAT box positional encoding ("OAT: Object-Level Attention Transformer for Gaze
Scanpath Prediction", arXiv:2407.13335), the NiNformer block ("NiNformer: A
Network in Network Transformer with Token Mixing Generated Gating Function",
arXiv:2403.02411), eccNET-style visual search maps ("Visual Search Asymmetry:
Deep Nets and Humans Share Similar Inherent Biases", arXiv:2106.02953) and
MEDUSA's shared multi-scale attention gates ("MEDUSA: Multi-scale
Encoder-Decoder Self-Attention for Medical Image Analysis", arXiv:2110.06063).
Images are NHWC.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.api import attention
from attnjax.vision._common import check_rank, layer_norm


# ----------------------------------------------------------------------------- OAT
def box_positional_encoding(boxes, dim: int, *, temperature: float = 10000.0, scale: float = 2 * math.pi):
  """Sinusoidal encoding of object boxes (OAT, "Object-Level Attention Transformer for Gaze Scanpath Prediction").

  Each box (x0, y0, x1, y1) normalised to [0, 1] is described by its centre
  and size (cx, cy, w, h); each of the four gets dim/4 channels
  ``[sin(scale * p * f_j), cos(scale * p * f_j)]``, ``f_j = temperature^(-2j/(dim/4))``.
  The dot product of two encodings is a sum of cos(scale * f_j * (p - p')),
  so it depends only on the boxes' displacement (and size difference). The
  exact frequencies of OAT were not confirmed; these are DETR's.

  Args:
    boxes: [..., 4]; dim: multiple of 8.

  Returns:
    [..., dim] float32.
  """
  if boxes.shape[-1] != 4:
    raise ValueError(f"boxes must have shape [..., 4] (x0, y0, x1, y1), got {boxes.shape}.")
  if dim % 8:
    raise ValueError(f"dim must be a multiple of 8 (sin/cos pairs for 4 box values), got {dim}.")
  b = boxes.astype(jnp.float32)
  vals = jnp.stack([(b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2,
                    b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]], axis=-1)  # [..., 4]
  q = dim // 4
  freqs = temperature ** (-jnp.arange(0, q, 2, dtype=jnp.float32) / q)  # [q/2]
  ang = scale * vals[..., None] * freqs  # [..., 4, q/2]
  enc = jnp.stack([jnp.sin(ang), jnp.cos(ang)], axis=-1)  # [..., 4, q/2, 2]
  return enc.reshape(boxes.shape[:-1] + (dim,))


# ----------------------------------------------------------------------------- NiNformer
def _ffn(x, p):
  return jax.nn.gelu(x @ p["w1"] + p["b1"], approximate=False) @ p["w2"] + p["b2"]


def ninformer_block(x, params, *, eps: float = 1e-5):
  """NiNformer block (Abdullah & Aydin, "NiNformer: A Network in Network Transformer ...").

  As the released code: ``z = LN(x)``; the gate ``G = Mixer(z)`` is an inner
  MLP-Mixer block (token-mixing FFN over T then channel FFN, each with
  LayerNorm and residual); ``x = x + Linear(z) * G``; ``x = x + FFN(LN(x))``
  with the same outer LayerNorm used twice. O(T) in the sequence for a fixed
  T-sized token MLP (the token FFN has T inputs, so T is fixed per model).

  Args:
    x: [B, T, D].
    params: ``norm`` {scale, bias} [D]; ``proj`` {w [D, D], b [D]};
      ``mixer`` {``token_norm``, ``token_ffn`` {w1 [T, Ht], b1, w2 [Ht, T], b2},
      ``channel_norm``, ``channel_ffn`` {w1 [D, Hc], b1, w2 [Hc, D], b2}};
      ``ffn`` {w1 [D, Hf], b1, w2 [Hf, D], b2}.
  """
  check_rank("x", x, 3, "[B, T, D]")
  T = x.shape[1]
  if params["mixer"]["token_ffn"]["w1"].shape[0] != T:
    raise ValueError(f"the token-mixing FFN was built for {params['mixer']['token_ffn']['w1'].shape[0]} "
                     f"tokens, got T={T}.")
  xf = x.astype(jnp.float32)
  norm = lambda t: layer_norm(t, params["norm"]["scale"], params["norm"]["bias"], eps=eps)
  m = params["mixer"]
  z = norm(xf)
  t_in = layer_norm(z, m["token_norm"]["scale"], m["token_norm"]["bias"], eps=eps)
  g = z + jnp.swapaxes(_ffn(jnp.swapaxes(t_in, 1, 2), m["token_ffn"]), 1, 2)
  g = g + _ffn(layer_norm(g, m["channel_norm"]["scale"], m["channel_norm"]["bias"], eps=eps), m["channel_ffn"])
  xf = xf + (z @ params["proj"]["w"] + params["proj"]["b"]) * g
  xf = xf + _ffn(norm(xf), params["ffn"])
  return xf.astype(x.dtype)


class NiNformerBlock(nn.Module):
  """NiNformer block layer over x [B, T, D] (T fixed at init); hidden width ``ffn_dim`` everywhere."""
  ffn_dim: int

  @nn.compact
  def __call__(self, x):
    check_rank("x", x, 3, "[B, T, D]")
    _, T, D = x.shape
    if self.has_variable("params", "token_ffn_w1"):
      T0 = self.get_variable("params", "token_ffn_w1").shape[0]
      if T0 != T:
        raise ValueError(f"x has T={T} tokens but the token-mixing FFN was built for {T0} tokens.")
    F = self.ffn_dim
    dense = nn.initializers.lecun_normal()

    def ln(name, d):
      return {"scale": self.param(f"{name}_scale", nn.initializers.ones, (d,)),
              "bias": self.param(f"{name}_bias", nn.initializers.zeros, (d,))}

    def ffn(name, d, h):
      return {"w1": self.param(f"{name}_w1", dense, (d, h)), "b1": self.param(f"{name}_b1", nn.initializers.zeros, (h,)),
              "w2": self.param(f"{name}_w2", dense, (h, d)), "b2": self.param(f"{name}_b2", nn.initializers.zeros, (d,))}
    params = {"norm": ln("norm", D),
              "proj": {"w": self.param("proj_w", dense, (D, D)), "b": self.param("proj_b", nn.initializers.zeros, (D,))},
              "mixer": {"token_norm": ln("token_norm", D), "token_ffn": ffn("token_ffn", T, F),
                        "channel_norm": ln("channel_norm", D), "channel_ffn": ffn("channel_ffn", D, F)},
              "ffn": ffn("ffn", D, F)}
    return ninformer_block(x, params)


# ----------------------------------------------------------------------------- visual search
def target_correlation_map(search_feats, target_feats):
  """Top-down attention map: cross-correlation of the search features with the target features as kernel.

  ``map[b, y, x] = sum_{dy, dx, c} search[b, y + dy - h//2, x + dx - w//2, c] * target[b, dy, dx, c]``
  (zero padding, 'same' output), as eccNET (Gupta et al., "Visual Search
  Asymmetry: Deep Nets and Humans Share Similar Inherent Biases").

  Args:
    search_feats: [B, H, W, C]; target_feats: [B, h, w, C] (h, w odd, <= H, W).

  Returns:
    [B, H, W] float32.
  """
  check_rank("search_feats", search_feats, 4, "[B, H, W, C]")
  check_rank("target_feats", target_feats, 4, "[B, h, w, C]")
  B, H, W, C = search_feats.shape
  _, h, w, Ct = target_feats.shape
  if target_feats.shape[0] != B or Ct != C or h % 2 == 0 or w % 2 == 0 or h > H or w > W:
    raise ValueError(f"target_feats must be [B={B}, h, w, C={C}] with odd h <= {H}, w <= {W}, "
                     f"got {target_feats.shape}.")

  def one(s, t):
    return jax.lax.conv_general_dilated(
        s[None].astype(jnp.float32), t[..., None].astype(jnp.float32), (1, 1),
        ((h // 2, h // 2), (w // 2, w // 2)), dimension_numbers=("NHWC", "HWIO", "NHWC"))[0, ..., 0]
  return jax.vmap(one)(search_feats, target_feats)


def eccentricity_pool(feats, fixation, slope: float, *, mode: str = "max", max_radius=None):
  """Eccentricity-dependent pooling: the window grows linearly with the distance to the fixation.

  Output pixel p pools the (2r+1)x(2r+1) window around p (clipped at the
  image border) with ``r(p) = floor(slope * |p - fixation|)``, capped at
  ``max_radius`` (default max(H, W)); r = 0 at the fixation leaves it
  unchanged. ``mode`` "max" or "avg" (mean over in-image pixels).

  Args:
    feats: [B, H, W, C]; fixation: [B, 2] (row, col) in pixels.

  Returns:
    [B, H, W, C] float32.
  """
  check_rank("feats", feats, 4, "[B, H, W, C]")
  B, H, W, C = feats.shape
  if fixation.shape != (B, 2):
    raise ValueError(f"fixation must have shape [B, 2]=({B}, 2) (row, col), got {fixation.shape}.")
  if slope < 0:
    raise ValueError(f"slope must be >= 0, got {slope}.")
  if mode not in ("max", "avg"):
    raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}.")
  rmax = max(H, W) if max_radius is None else int(max_radius)
  f = feats.astype(jnp.float32)
  pools = []
  for r in range(rmax + 1):
    win, pad = (1, 2 * r + 1, 2 * r + 1, 1), ((0, 0), (r, r), (r, r), (0, 0))
    if mode == "max":
      pools.append(jax.lax.reduce_window(f, -jnp.inf, jax.lax.max, win, (1,) * 4, pad))
    else:
      tot = jax.lax.reduce_window(f, 0.0, jax.lax.add, win, (1,) * 4, pad)
      cnt = jax.lax.reduce_window(jnp.ones((1, H, W, 1)), 0.0, jax.lax.add, win, (1,) * 4, pad)
      pools.append(tot / cnt)
  stack = jnp.stack(pools, axis=-1)  # [B, H, W, C, R+1]
  yy, xx = jnp.meshgrid(jnp.arange(H, dtype=jnp.float32), jnp.arange(W, dtype=jnp.float32), indexing="ij")
  fx = fixation.astype(jnp.float32)
  ecc = jnp.sqrt((yy - fx[:, 0, None, None]) ** 2 + (xx - fx[:, 1, None, None]) ** 2)
  r = jnp.clip(jnp.floor(slope * ecc), 0, rmax).astype(jnp.int32)  # [B, H, W]
  idx = jnp.broadcast_to(r[..., None, None], (B, H, W, C, 1))
  return jnp.take_along_axis(stack, idx, axis=-1)[..., 0]


# ----------------------------------------------------------------------------- MEDUSA
class MultiScaleAttentionGates(nn.Module):
  """MEDUSA's single-body attention (Aboutalebi et al., "MEDUSA: Multi-scale Encoder-Decoder Self-Attention").

  One multi-head self-attention over the tokens of x [B, h, w, D]; its heads
  are split into ``len(channels)`` groups, group s is projected to
  ``channels[s]`` gate channels, passed through a sigmoid, bilinearly resized
  to feature map s and multiplied into it. ``__call__(x, feature_maps)``
  returns the gated maps (same shapes as ``feature_maps``, each [B, H_s, W_s, channels[s]]).
  Head grouping and the gate form are our reading of the paper.
  """
  num_heads: int
  head_dim: int
  channels: Sequence[int]

  @nn.compact
  def __call__(self, x, feature_maps):
    check_rank("x", x, 4, "[B, h, w, D]")
    S = len(self.channels)
    if len(feature_maps) != S or self.num_heads % S:
      raise ValueError(f"need one feature map per scale ({S}) and num_heads={self.num_heads} divisible by it, "
                       f"got {len(feature_maps)} maps.")
    B, h, w, _ = x.shape
    tok = x.reshape(B, h * w, -1)
    N, H = self.num_heads, self.head_dim
    q, k, v = (nn.DenseGeneral((N, H), name=n)(tok) for n in ("query", "key", "value"))
    heads = attention(q, k, v).reshape(B, h, w, S, N // S * H)
    out = []
    for s, (fmap, c) in enumerate(zip(feature_maps, self.channels)):
      if fmap.shape[-1] != c:
        raise ValueError(f"feature_maps[{s}] must have {c} channels, got shape {fmap.shape}.")
      g = jax.nn.sigmoid(nn.Dense(c, name=f"gate_{s}")(heads[..., s, :]))
      g = jax.image.resize(g, (B,) + fmap.shape[1:3] + (c,), method="bilinear")
      out.append((fmap * g).astype(fmap.dtype))
    return out
