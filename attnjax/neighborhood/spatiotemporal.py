"""Spatio-temporal attention layouts of PredFormer and video helpers of MagicInfinite.

PredFormer (Tang et al., "PredFormer: Transformers Are Effective Spatial-Temporal
Predictive Learners", arXiv:2410.04733) and temporal sliding-window denoising of
MagicInfinite ("MagicInfinite: Generating Infinite Talking Videos with Your Words and
Voice", arXiv:2503.05978).

Tokens are [B, T, S, N, H]: T frames of S spatial tokens. "full" attends over
all T*S tokens, "spatial" within each frame, "temporal" along time at each
spatial location. Factorised modes equal block-diagonal masks on the flattened
sequence.
"""
from __future__ import annotations

from typing import List, Tuple

import jax.numpy as jnp
import numpy as np

from attnjax.api import attention
from attnjax.neighborhood.api import na3d

MODES = ("full", "spatial", "temporal")


def spatiotemporal_attention(query, key, value, *, mode="full", scale=None,
                             return_lse=False, implementation=None):
  """PredFormer attention variants (plain non-causal softmax MHA).

  Args:
    query: [B, T, S, N, H]; key: [B, T, S, K, H]; value: [B, T, S, K, Hv].
    mode: "full" (all T*S tokens), "spatial" (within a frame) or "temporal"
      (same spatial token across frames).

  Returns:
    [B, T, S, N, Hv] (and lse [B, T, S, N]).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  for name, x in (("query", query), ("key", key), ("value", value)):
    if getattr(x, "ndim", None) != 5:
      raise ValueError(f"{name} must have shape [B, T, S, heads, head_dim], got "
                       f"{getattr(x, 'shape', None)}.")
  if key.shape[:3] != query.shape[:3] or value.shape[:3] != query.shape[:3]:
    raise ValueError(f"key {key.shape} and value {value.shape} must share the query's "
                     f"[B, T, S] = {query.shape[:3]}.")
  B, T, S = query.shape[:3]
  if mode == "full":
    fold = lambda x: x.reshape((B, T * S) + x.shape[3:])
  elif mode == "spatial":
    fold = lambda x: x.reshape((B * T, S) + x.shape[3:])
  else:
    fold = lambda x: x.transpose(0, 2, 1, 3, 4).reshape((B * S, T) + x.shape[3:])
  res = attention(fold(query), fold(key), fold(value), scale=scale, return_lse=return_lse,
                  implementation=implementation)
  o, l = res if return_lse else (res, None)

  def unfold(y):
    if mode == "temporal":
      return y.reshape((B, S, T) + y.shape[2:]).swapaxes(1, 2)
    return y.reshape((B, T, S) + y.shape[2:])
  return (unfold(o), unfold(l)) if return_lse else unfold(o)


def sliding_window_denoise_plan(num_frames: int, window: int, overlap: int
                                ) -> List[Tuple[int, int]]:
  """Overlapping temporal windows ``[(start, end), ...]`` covering ``num_frames``.

  Windows have ``window`` frames and advance by ``window - overlap``; the last
  one is aligned to the end (all windows are full when num_frames >= window).
  MagicInfinite does not publish its window/overlap sizes.
  """
  for name, v in (("num_frames", num_frames), ("window", window)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name} must be a positive int, got {v!r}.")
  if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or not (
      0 <= overlap < window):
    raise ValueError(f"overlap must be an int in [0, window={window}), got {overlap!r}.")
  if window >= num_frames:
    return [(0, num_frames)]
  stride = window - overlap
  starts = list(range(0, num_frames - window, stride)) + [num_frames - window]
  return [(s, s + window) for s in sorted(set(starts))]


def blend_weights(plan, num_frames: int) -> np.ndarray:
  """[len(plan), num_frames] linear cross-fade weights; every frame's weights sum to 1."""
  w = np.zeros((len(plan), num_frames), np.float64)
  for i, (s, e) in enumerate(plan):
    ramp = np.ones(e - s)
    if i > 0:  # fade in over the overlap with the previous window
      ov = plan[i - 1][1] - s
      if ov > 0:
        ramp[:ov] = np.minimum(ramp[:ov], (np.arange(ov) + 1) / (ov + 1))
    if i + 1 < len(plan):  # fade out over the overlap with the next window
      ov = e - plan[i + 1][0]
      if ov > 0:
        ramp[-ov:] = np.minimum(ramp[-ov:], 1 - (np.arange(ov) + 1) / (ov + 1))
    w[i, s:e] = ramp
  total = w.sum(0)
  return (w / total).astype(np.float32)


def blend_overlaps(chunks, plan, num_frames: int):
  """Cross-fades per-window results into one sequence.

  Args:
    chunks: sequence of arrays [B, end - start, ...], one per window of ``plan``.
    plan: output of :func:`sliding_window_denoise_plan`.
    num_frames: total frames T.

  Returns:
    [B, T, ...]: sum over windows of linear cross-fade weight * chunk.
  """
  if len(chunks) != len(plan):
    raise ValueError(f"got {len(chunks)} chunks for a plan of {len(plan)} windows.")
  for c, (s, e) in zip(chunks, plan):
    if c.shape[1] != e - s:
      raise ValueError(f"chunk of shape {c.shape} does not match window ({s}, {e}).")
  w = blend_weights(plan, num_frames)
  c0 = chunks[0]
  out = jnp.zeros((c0.shape[0], num_frames) + c0.shape[2:], jnp.float32)
  for i, (c, (s, e)) in enumerate(zip(chunks, plan)):
    wi = jnp.asarray(w[i, s:e]).reshape((1, e - s) + (1,) * (c.ndim - 2))
    out = out.at[:, s:e].add(c.astype(jnp.float32) * wi)
  return out.astype(c0.dtype)


def temporal_window_attention(query, key, value, *, window, is_causal=False,
                              spatial_kernel=None, **kwargs):
  """Sliding-window attention over time for video tokens [B, T, X, Y, N, H].

  A 3D neighborhood with kernel ``(window, *spatial_kernel)``; by default
  ``spatial_kernel`` is the full frame (every token sees all of its frame and
  of the ``window`` frames around it, or before it when ``is_causal``).
  Extra keyword arguments go to :func:`attnjax.neighborhood.neighborhood_attention`.
  """
  if getattr(query, "ndim", None) != 6:
    raise ValueError(f"query must have shape [B, T, X, Y, N, H], got "
                     f"{getattr(query, 'shape', None)}.")
  sk = tuple(query.shape[2:4]) if spatial_kernel is None else tuple(spatial_kernel)
  return na3d(query, key, value, kernel_size=(window,) + sk,
              is_causal=(bool(is_causal), False, False), **kwargs)
