"""HiLo attention: local-window Hi-Fi heads + pooled global Lo-Fi heads (LITv2, Pan et al., NeurIPS 2022; arXiv:2205.13213).

"Fast Vision Transformers with HiLo Attention".

``alpha`` of the heads (Lo-Fi) attend from every position to ``s x s``
average-pooled keys/values; the rest (Hi-Fi) attend inside non-overlapping
``s x s`` windows. Each branch has its own projections; outputs are
concatenated [Hi-Fi, Lo-Fi] along channels (no extra mixing projection).
"""
from __future__ import annotations

import jax.numpy as jnp

from attnjax.api import attention
from attnjax.core import validation as V
from attnjax.neighborhood.halo import window_attention


def avg_pool(x, window):
  """[B, X, Y, C] -> [B, X/s, Y/s, C] mean over non-overlapping s x s windows."""
  B, X, Y, C = x.shape
  return x.reshape(B, X // window, window, Y // window, window, C).mean(axis=(2, 4))


def pooled_kv_attention(query, key_pooled, value_pooled, *, scale=None, return_lse=False,
                        implementation=None):
  """Every query attends to all pooled keys (HiLo Lo-Fi).

  Args:
    query: [B, X, Y, N, H]; key_pooled: [B, x, y, K, H]; value_pooled: [B, x, y, K, Hv].

  Returns:
    [B, X, Y, N, Hv] (and lse [B, X, Y, N]).
  """
  B, X, Y = query.shape[:3]
  flat = lambda t: t.reshape((t.shape[0], -1) + t.shape[-2:])
  res = attention(flat(query), flat(key_pooled), flat(value_pooled), scale=scale,
                  return_lse=return_lse, implementation=implementation)
  if return_lse:
    o, l = res
    return o.reshape((B, X, Y) + o.shape[-2:]), l.reshape(B, X, Y, -1)
  return res.reshape((B, X, Y) + res.shape[-2:])


def hilo_heads(num_heads: int, alpha: float, window: int):
  """(Lo-Fi heads, Hi-Fi heads): ``int(num_heads * alpha)`` Lo-Fi; all Lo-Fi if window == 1."""
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
  lo = num_heads if window == 1 else int(num_heads * alpha)
  return lo, num_heads - lo


def _dense(x, p):
  y = x @ p["kernel"].astype(x.dtype)
  return y + p["bias"].astype(x.dtype) if "bias" in p else y


def hilo_attention(x, params, *, num_heads, alpha=0.9, window=2, implementation=None):
  """HiLo attention on a feature map.

  Args:
    x: [B, X, Y, C] with X, Y multiples of ``window``; C % num_heads == 0.
    params: dict of dense layers ``{"kernel": [in, out], "bias": [out]}``:
      ``hifi_qkv`` (C -> 3*Nh*d), ``hifi_proj`` (Nh*d -> Nh*d), ``lofi_q``
      (C -> Nl*d), ``lofi_kv`` (C -> 2*Nl*d), ``lofi_proj`` (Nl*d -> Nl*d);
      branches with zero heads are absent.
    num_heads: total heads N (head_dim d = C / N).
    alpha: Lo-Fi share of the heads (LITv2 default 0.9).
    window: s, Hi-Fi window and Lo-Fi pooling size (LITv2 default 2).

  Returns:
    [B, X, Y, (Nh + Nl) * d] = [Hi-Fi, Lo-Fi] concatenated.
  """
  if getattr(x, "ndim", None) != 4:
    raise ValueError(f"x must have shape [B, X, Y, C], got {getattr(x, 'shape', None)}.")
  B, X, Y, C = x.shape
  V.check_positive_int("window", window)
  if C % num_heads:
    raise ValueError(f"channels C={C} must be a multiple of num_heads={num_heads}.")
  if X % window or Y % window:
    raise ValueError(f"spatial shape {(X, Y)} must be a multiple of window={window}.")
  d = C // num_heads
  n_lo, n_hi = hilo_heads(num_heads, alpha, window)
  outs = []
  if n_hi:
    qkv = _dense(x, params["hifi_qkv"]).reshape(B, X, Y, 3, n_hi, d)
    o = window_attention(qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :], window)
    outs.append(_dense(o.reshape(B, X, Y, n_hi * d), params["hifi_proj"]))
  if n_lo:
    q = _dense(x, params["lofi_q"]).reshape(B, X, Y, n_lo, d)
    xp = avg_pool(x, window) if window > 1 else x
    kv = _dense(xp, params["lofi_kv"]).reshape(xp.shape[:3] + (2, n_lo, d))
    o = pooled_kv_attention(q, kv[..., 0, :, :], kv[..., 1, :, :],
                            implementation=implementation)
    outs.append(_dense(o.reshape(B, X, Y, n_lo * d), params["lofi_proj"]))
  return jnp.concatenate(outs, axis=-1) if len(outs) > 1 else outs[0]
