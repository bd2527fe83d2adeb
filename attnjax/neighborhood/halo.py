"""HaloNets blocked local attention with a halo (Vaswani et al., CVPR 2021; arXiv:2103.12731).

"Scaling Local Self-Attention for Parameter Efficient Visual Backbones".

The map is cut into non-overlapping ``b x b`` query blocks; every query of a
block attends to the same ``(b + 2h) x (b + 2h)`` region: the block plus an
``h``-pixel halo. With ``h = 0`` this is non-overlapping window attention
(Swin/HiLo Hi-Fi windows).

Attention downsampling (``stride = s``) follows timm's ``HaloAttn`` (the widely
used port; its author notes the paper's exact layer is not public): the query
is a strided 1x1 projection, i.e. only the pixels ``(s*i, s*j)`` are queries,
each block keeps ``(b/s)^2`` of them and they attend to their block's full
window, so the output is ``[X/s, Y/s]``. ``avg_down=True`` is timm's other
option: stride-1 attention followed by ``s x s`` average pooling of the output.
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


def halo_mask(height, width, block_size, halo, pad_mode="mask", stride=1):
  """Dense oracle bool [(H/s)*(W/s), H*W] (row-major tokens) of :func:`halo_attention`.

  Row ``i * (W/s) + j`` is the strided query at pixel ``(s*i, s*j)``. With
  ``pad_mode='zero'`` the zero-padded halo keys are real keys and have no
  token index, so this oracle only describes ``pad_mode='mask'``.
  """
  s = V.check_positive_int("stride", stride)
  if height % s or width % s:
    raise ValueError(f"stride={s} must divide the map shape {(height, width)}.")
  qy, qx = np.divmod(np.arange((height // s) * (width // s)), width // s)
  qy, qx = qy * s, qx * s
  ky, kx = np.divmod(np.arange(height * width), width)

  def near(qc, kc):  # key coordinate inside the query block's haloed extent
    lo = (qc // block_size) * block_size - halo
    return (kc[None, :] >= lo[:, None]) & (kc[None, :] < lo[:, None] + block_size + 2 * halo)

  return near(qy, ky) & near(qx, kx)


def halo_rel_bias(q, rel_pos, block_size, halo, stride=1):
  """Factorised relative logits q.r_h[dy] + q.r_w[dx] for the blocked layout.

  Args:
    q: [B, nbh, nbw, b/s, b/s, N, H] blocked (strided) queries; query ``i``
      of a block sits at pixel ``s * i`` of the block.
    rel_pos: pair (rel_h [2w-1, H], rel_w [2w-1, H]), w = b + 2 * halo, shared
      by heads; entry ``(key - query) + w - 1`` in image coordinates.
    stride: s, the query stride inside the block (divides ``block_size``).

  Returns:
    [B, nbh, nbw, N, (b/s)^2, w*w] float32 logits (unscaled, as timm's HaloAttn).
  """
  rel_h, rel_w = rel_pos
  bq, w = block_size // stride, block_size + 2 * halo
  # window key j sits at block offset j - halo; query i at block offset s * i
  idx = np.arange(w)[None, :] - stride * np.arange(bq)[:, None] - halo + w - 1  # [bq, w]
  qf = q.astype(jnp.float32)
  rh = rel_h.astype(jnp.float32)[jnp.asarray(idx)]  # [bq, w, H]
  rw = rel_w.astype(jnp.float32)[jnp.asarray(idx)]
  lh = jnp.einsum("...yxnh,yjh->...nyxj", qf, rh)  # [..., n, bq, bq, w]
  lw = jnp.einsum("...yxnh,xjh->...nyxj", qf, rw)
  out = lh[..., :, None] + lw[..., None, :]  # [..., n, by, bx, wy, wx]
  sh = out.shape
  return out.reshape(sh[:-4] + (bq * bq, w * w))


def _check_args(query, key, value, b, h, s, avg_down, pad_mode, return_lse):
  """Validates the arguments; returns (Dims, X, Y, query already strided?)."""
  for name, x in (("query", query), ("key", key), ("value", value)):
    if getattr(x, "ndim", None) != 5:
      raise ValueError(f"{name} must have shape [B, X, Y, heads, head_dim], got "
                       f"{getattr(x, 'shape', None)}.")
  X, Y = key.shape[1:3]
  if value.shape[1:3] != (X, Y):
    raise ValueError(f"value {value.shape} must share the key's spatial shape {(X, Y)}.")
  if not isinstance(avg_down, (bool, np.bool_)):
    raise ValueError(f"avg_down must be a bool, got {avg_down!r}.")
  if pad_mode not in ("mask", "zero"):
    raise ValueError(f"pad_mode must be 'mask' or 'zero', got {pad_mode!r}.")
  if X % b or Y % b:
    raise ValueError(f"spatial shape {(X, Y)} must be a multiple of block_size={b}.")
  if avg_down:
    if X % s or Y % s:
      raise ValueError(f"with avg_down, stride={s} must divide the spatial shape {(X, Y)}.")
    if return_lse:
      raise ValueError("return_lse is undefined with avg_down=True: the output is a mean "
                       "of s*s attention rows, which have no single log-sum-exp.")
  elif b % s:
    raise ValueError(f"stride={s} must divide block_size={b} (the strided queries are "
                     f"taken inside each block); avg_down=True accepts any stride that "
                     f"divides the map.")
  strided = False
  if query.shape[1:3] != (X, Y):
    strided = s > 1 and not avg_down and query.shape[1:3] == (X // s, Y // s)
    if not strided:
      want = f"{(X, Y)}" + (f" or the strided {(X // s, Y // s)}"
                            if s > 1 and not avg_down else "")
      raise ValueError(f"query spatial shape {query.shape[1:3]} must be the key's {want}.")
  flat = lambda x: x.reshape((x.shape[0], -1) + x.shape[-2:])
  return V.check_qkv(flat(query), flat(key), flat(value)), X, Y, strided


def halo_attention(query, key, value, *, block_size=8, halo=3, rel_pos=None,
                   pad_mode="mask", stride=1, avg_down=False, scale=None,
                   return_lse=False):
  """Blocked local attention with a halo, optionally strided (attention downsampling).

  Args:
    query: [B, X, Y, N, H], or with ``stride = s > 1`` (not ``avg_down``)
      optionally the already strided queries [B, X/s, Y/s, N, H] (the query
      map at pixels ``(s*i, s*j)``, e.g. a projection of ``x[:, ::s, ::s]``);
      the two shapes cannot coincide when s > 1.
    key: [B, X, Y, K, H]; value: [B, X, Y, K, Hv] (N % K == 0); X and Y
      multiples of ``block_size``.
    block_size: b, the query block side (timm/paper default 8).
    halo: h >= 0, extra key pixels on every side (default 3, window 14).
    rel_pos: optional pair (rel_h [2w-1, H], rel_w [2w-1, H]) of relative
      position embeddings (factorised 2D relative logits, added unscaled),
      indexed by ``(key - query) + w - 1`` in pixel coordinates. A strided
      query uses its true pixel ``(s*i, s*j)``; timm instead indexes it by its
      position on the strided grid (``i`` rather than ``s*i`` inside the block).
    pad_mode: 'mask' (default: halo pixels outside the map are not attended)
      or 'zero' (timm: they are zero keys/values that still take softmax
      mass). Which one the paper used is not stated; masking is the clean
      definition.
    stride: s >= 1. Output pixel (i, j) is the query at input pixel
      (s*i, s*j) attending to the window of its b x b block; s must divide b.
      Cost is (X/s)(Y/s) queries x w^2 keys.
    avg_down: instead, stride-1 attention followed by s x s average pooling
      of the output (timm's ``avg_down``, pool 2x2 with its stride 2); needs
      only s | X, Y; costs the full-resolution attention; no lse.
    scale: logit scale, default H ** -0.5.
    return_lse: also return lse [B, X/s, Y/s, N] float32.

  Returns:
    out [B, X/s, Y/s, N, Hv] in the query dtype (and lse).
  """
  b = V.check_positive_int("block_size", block_size)
  h = V.check_positive_int("halo", halo, minimum=0)
  s = V.check_positive_int("stride", stride)
  d, X, Y, strided = _check_args(query, key, value, b, h, s, avg_down, pad_mode, return_lse)
  w = b + 2 * h
  if rel_pos is not None:
    if (len(rel_pos) != 2 or any(tuple(np.shape(r)) != (2 * w - 1, d.H) for r in rel_pos)):
      raise ValueError(f"rel_pos must be a pair of [2w-1, H] = [{2 * w - 1}, {d.H}] tables "
                       f"(w = block_size + 2*halo = {w}), got shapes "
                       f"{[np.shape(r) for r in rel_pos]}.")
  scale = V.check_scale(scale, d.H)
  qs = 1 if avg_down else s  # query stride inside a block
  if qs > 1 and not strided:
    query = query[:, ::qs, ::qs]
  o, lse = _blocked(query, key, value, b, h, qs, rel_pos, pad_mode, scale)
  if avg_down and s > 1:
    B, N, Hv = d.B, d.N, d.Hv
    o = o.reshape(B, X // s, s, Y // s, s, N, Hv).mean(axis=(2, 4))
  out = o.astype(query.dtype)
  return (out, lse) if return_lse else out


def _blocked(query, key, value, b, h, s, rel_pos, pad_mode, scale):
  """Core on strided queries [B, X/s, Y/s, N, H]; float32 (out, lse)."""
  B, X, Y, K, H = key.shape
  N, Hv, Gq, bq = query.shape[3], value.shape[-1], query.shape[3] // K, b // s
  w = b + 2 * h
  nbx, nby = X // b, Y // b
  qb = query.reshape(B, nbx, bq, nby, bq, N, H).transpose(0, 1, 3, 2, 4, 5, 6)
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
  q5 = qb.reshape(B, nbx, nby, bq * bq, K, Gq, H)
  sc = jnp.einsum("bxytkgh,bxyukh->bxykgtu", q5, kw, preferred_element_type=jnp.float32)
  sc = sc * scale
  if rel_pos is not None:
    rb = halo_rel_bias(qb, rel_pos, b, h, s)  # [B, nbx, nby, N, bq*bq, w*w]
    sc = sc + rb.reshape(B, nbx, nby, K, Gq, bq * bq, w * w)
  if pad_mode == "mask" and h > 0:
    vx = (ix >= h) & (ix < X + h)  # [nbx, w]
    vy = (iy >= h) & (iy < Y + h)
    valid = (vx[:, None, :, None] & vy[None, :, None, :]).reshape(nbx, nby, w * w)
    sc = jnp.where(jnp.asarray(valid)[None, :, :, None, None, None, :], sc, -jnp.inf)
  lse = jax.nn.logsumexp(sc, axis=-1)
  p = jnp.exp(sc - lse[..., None])
  o = jnp.einsum("bxykgtu,bxyukh->bxytkgh", p, vw)
  o = o.reshape(B, nbx, nby, bq, bq, N, Hv).transpose(0, 1, 3, 2, 4, 5, 6)
  o = o.reshape(B, X // s, Y // s, N, Hv)
  lse = lse.reshape(B, nbx, nby, N, bq, bq).transpose(0, 1, 4, 2, 5, 3)
  return o, lse.reshape(B, X // s, Y // s, N)


def window_attention(query, key, value, window, *, scale=None, return_lse=False):
  """Non-overlapping ``window x window`` attention (HiLo Hi-Fi, Swin windows).

  [B, X, Y, N, H] inputs; equals :func:`halo_attention` with ``halo=0``.
  """
  return halo_attention(query, key, value, block_size=window, halo=0, scale=scale,
                        return_lse=return_lse)
