"""HaloNets blocked local attention with a halo (Vaswani et al., CVPR 2021; spec P2-25).

The map is cut into non-overlapping ``b x b`` query blocks; every query of a
block attends to the same ``(b + 2h) x (b + 2h)`` region: the block plus an
``h``-pixel halo. With ``h = 0`` this is non-overlapping window attention
(Swin/HiLo Hi-Fi windows).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import validation as V


def _window_index(n, b, h):
  """Static [nb, w] padded coordinates of each block's window (w = b + 2h)."""
  nb = n // b
  return np.arange(nb)[:, None] * b + np.arange(b + 2 * h)[None, :]


def halo_mask(height, width, block_size, halo, pad_mode="mask"):
  """Dense oracle bool [H*W, H*W] (row-major tokens) of :func:`halo_attention`.

  With ``pad_mode='zero'`` the zero-padded halo keys are real keys and have no
  token index, so this oracle only describes ``pad_mode='mask'``.
  """
  yy, xx = np.divmod(np.arange(height * width), width)
  by, bx = yy // block_size, xx // block_size
  ok_y = np.abs(yy[None, :] - (by[:, None] * block_size + (block_size - 1) / 2)) <= (
      (block_size - 1) / 2 + halo)
  ok_x = np.abs(xx[None, :] - (bx[:, None] * block_size + (block_size - 1) / 2)) <= (
      (block_size - 1) / 2 + halo)
  return ok_y & ok_x


def halo_rel_bias(q, rel_pos, block_size, halo):
  """Factorised relative logits q.r_h[dy] + q.r_w[dx] for the blocked layout.

  Args:
    q: [B, nbh, nbw, b, b, N, H] blocked queries.
    rel_pos: pair (rel_h [2w-1, H], rel_w [2w-1, H]), w = b + 2 * halo, shared
      by heads; entry ``(key - query) + w - 1`` in image coordinates.

  Returns:
    [B, nbh, nbw, N, b*b, w*w] float32 logits (unscaled, as timm's HaloAttn).
  """
  rel_h, rel_w = rel_pos
  b, w = block_size, block_size + 2 * halo
  # relative index of window key j to block query i: j - (i + halo) + w - 1
  idx = np.arange(w)[None, :] - np.arange(b)[:, None] - halo + w - 1  # [b, w]
  qf = q.astype(jnp.float32)
  rh = rel_h.astype(jnp.float32)[jnp.asarray(idx)]  # [b, w, H]
  rw = rel_w.astype(jnp.float32)[jnp.asarray(idx)]
  lh = jnp.einsum("...yxnh,yjh->...nyxj", qf, rh)  # [..., n, b, b, w]
  lw = jnp.einsum("...yxnh,xjh->...nyxj", qf, rw)
  out = lh[..., :, None] + lw[..., None, :]  # [..., n, by, bx, wy, wx]
  s = out.shape
  return out.reshape(s[:-4] + (b * b, w * w))


def halo_attention(query, key, value, *, block_size=8, halo=3, rel_pos=None,
                   pad_mode="mask", scale=None, return_lse=False):
  """Blocked local attention with a halo.

  Args:
    query: [B, X, Y, N, H]; key: [B, X, Y, K, H]; value: [B, X, Y, K, Hv]
      (N % K == 0); X and Y multiples of ``block_size``.
    block_size: b, the query block side (timm/paper default 8).
    halo: h >= 0, extra key pixels on every side (default 3, window 14).
    rel_pos: optional pair (rel_h [2w-1, H], rel_w [2w-1, H]) of relative
      position embeddings (factorised 2D relative logits, added unscaled).
    pad_mode: 'mask' (default: halo pixels outside the map are not attended)
      or 'zero' (timm: they are zero keys/values that still take softmax
      mass). Which one the paper used is not stated; masking is the clean
      definition.
    scale: logit scale, default H ** -0.5.
    return_lse: also return lse [B, X, Y, N] float32.

  Returns:
    out [B, X, Y, N, Hv] in the query dtype (and lse).
  """
  for name, x in (("query", query), ("key", key), ("value", value)):
    if getattr(x, "ndim", None) != 5:
      raise ValueError(f"{name} must have shape [B, X, Y, heads, head_dim], got "
                       f"{getattr(x, 'shape', None)}.")
  if key.shape[1:3] != query.shape[1:3] or value.shape[1:3] != query.shape[1:3]:
    raise ValueError(f"key {key.shape} and value {value.shape} must share the query's "
                     f"spatial shape {query.shape[1:3]}.")
  flat = lambda x: x.reshape((x.shape[0], -1) + x.shape[-2:])
  d = V.check_qkv(flat(query), flat(key), flat(value))
  b = V.check_positive_int("block_size", block_size)
  h = V.check_positive_int("halo", halo, minimum=0)
  if pad_mode not in ("mask", "zero"):
    raise ValueError(f"pad_mode must be 'mask' or 'zero', got {pad_mode!r}.")
  X, Y = query.shape[1:3]
  if X % b or Y % b:
    raise ValueError(f"spatial shape {(X, Y)} must be a multiple of block_size={b}.")
  w = b + 2 * h
  if rel_pos is not None:
    if (len(rel_pos) != 2 or any(tuple(np.shape(r)) != (2 * w - 1, d.H) for r in rel_pos)):
      raise ValueError(f"rel_pos must be a pair of [2w-1, H] = [{2 * w - 1}, {d.H}] tables "
                       f"(w = block_size + 2*halo = {w}), got shapes "
                       f"{[np.shape(r) for r in rel_pos]}.")
  scale = V.check_scale(scale, d.H)
  B, N, K, Gq = d.B, d.N, d.K, d.N // d.K
  nbx, nby = X // b, Y // b
  qb = query.reshape(B, nbx, b, nby, b, N, d.H).transpose(0, 1, 3, 2, 4, 5, 6)
  pad = ((0, 0), (h, h), (h, h), (0, 0), (0, 0))
  ix, iy = _window_index(X, b, h), _window_index(Y, b, h)

  def windows(x):  # [B, X, Y, K, c] -> [B, nbx, nby, w*w, K, c]
    rest = x.shape[3:]
    x = jnp.pad(x, pad)
    x = jnp.take(x, jnp.asarray(ix.reshape(-1)), axis=1)  # [B, nbx*w, Yp, K, c]
    x = jnp.take(x, jnp.asarray(iy.reshape(-1)), axis=2)  # [B, nbx*w, nby*w, K, c]
    x = x.reshape((B, nbx, w, nby, w) + rest).transpose(0, 1, 3, 2, 4, 5, 6)
    return x.reshape((B, nbx, nby, w * w) + rest)

  kw, vw = windows(key), windows(value).astype(jnp.float32)
  q5 = qb.reshape(B, nbx, nby, b * b, K, Gq, d.H)
  s = jnp.einsum("bxytkgh,bxyukh->bxykgtu", q5, kw, preferred_element_type=jnp.float32)
  s = s * scale
  if rel_pos is not None:
    rb = halo_rel_bias(qb, rel_pos, b, h)  # [B, nbx, nby, N, b*b, w*w]
    s = s + rb.reshape(B, nbx, nby, K, Gq, b * b, w * w)
  if pad_mode == "mask" and h > 0:
    vx = (ix >= h) & (ix < X + h)  # [nbx, w]
    vy = (iy >= h) & (iy < Y + h)
    valid = (vx[:, None, :, None] & vy[None, :, None, :]).reshape(nbx, nby, w * w)
    s = jnp.where(jnp.asarray(valid)[None, :, :, None, None, None, :], s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)
  p = jnp.exp(s - lse[..., None])
  o = jnp.einsum("bxykgtu,bxyukh->bxytkgh", p, vw)
  o = o.reshape(B, nbx, nby, b, b, N, d.Hv).transpose(0, 1, 3, 2, 4, 5, 6)
  out = o.reshape(B, X, Y, N, d.Hv).astype(query.dtype)
  if not return_lse:
    return out
  lse = lse.reshape(B, nbx, nby, N, b, b).transpose(0, 1, 4, 2, 5, 3).reshape(B, X, Y, N)
  return out, lse


def window_attention(query, key, value, window, *, scale=None, return_lse=False):
  """Non-overlapping ``window x window`` attention (HiLo Hi-Fi, Swin windows).

  [B, X, Y, N, H] inputs; equals :func:`halo_attention` with ``halo=0``.
  """
  return halo_attention(query, key, value, block_size=window, halo=0, scale=scale,
                        return_lse=return_lse)
