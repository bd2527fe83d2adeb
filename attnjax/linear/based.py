"""BASED: Taylor linear attention plus a short exact sliding window (Arora et al., 2024; arXiv:2402.18668).

"Simple linear attention language models balance the recall-throughput tradeoff".

BASED's released models place the two mixers in different layers (linear
attention at layers 1, 6, 11, ...; sliding window at 2, 7, 12, ...). This op
returns both branches on the same q, k, v, summed (or either one alone), so a
layer can use the pair or a model can alternate them.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import jax.numpy as jnp

from attnjax.linear.api import linear_attention
from attnjax.block_sparse.families import sliding_window_attention

BRANCHES = ("sum", "linear", "window")


def window_sides(window, causal: bool) -> Tuple[int, int]:
  """(left, right) of a window given as None (BASED's 64), an int w or a pair.

  An int w means (w, 0) when causal and (w, w) otherwise; (W - 1, 0) gives
  W keys. A causal window must have right == 0.
  """
  if window is None:
    window = 64
  if isinstance(window, (tuple, list)):
    if len(window) != 2:
      raise ValueError(f"window must be an int or a pair (left, right), got {window!r}.")
    left, right = window
  else:
    left, right = window, (0 if causal else window)
  for name, w in (("left window", left), ("right window", right)):
    if isinstance(w, bool) or not isinstance(w, int) or w < 0:
      raise ValueError(f"{name} must be an integer >= 0, got {w!r} (window={window!r}).")
  if causal and right != 0:
    raise ValueError(f"causal=True needs a right window of 0, got window={window!r}.")
  return left, right


def based_attention(query, key, value, *, causal: bool = True,
                    window: Union[int, Tuple[int, int], None] = None, feature_map="taylor",
                    eps: float = 1e-12, chunk_size: int = 64, branch: str = "sum",
                    scale: Optional[float] = None, implementation: Optional[str] = None,
                    key_mask=None):
  """BASED attention.

  Args:
    query: [B, T, N, H] (H = d' = 16 in BASED, giving 273 Taylor features);
      key: [B, S, K, H]; value: [B, S, K, Hv].
    causal: causal (bottom-right aligned) or not, for both branches.
    window: (left, right) of the softmax window; None gives the paper's
      "window 64": (64, 0) when causal, (64, 64) otherwise. The released 360M/1.3B configs use window_size 256
      mapped to (128, 0) [the flash-attn window (W // 2, 0)].
    feature_map: of the linear branch (Taylor: phi(q).phi(k) = 1 + s + s^2 / 2).
    eps: the linear branch's normaliser epsilon (1e-12 as BASED).
    branch: "sum" (linear + window), "linear" or "window".
    The window branch runs on the block-sparse engine
    (``attnjax.block_sparse.sliding_window_attention``), whose cost follows
    the band of visited blocks.
    key_mask: optional bool [B, S], False = padded key, removed from both
      branches: its features and value are zeroed in the linear branch
      (``linear_attention``'s ``key_mask``) and it sits in a segment no query
      belongs to in the window branch, whose fast path skips it.
  Returns:
    [B, T, N, Hv] in query.dtype.
  """
  if branch not in BRANCHES:
    raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}.")
  out = None
  if branch in ("sum", "linear"):
    out = linear_attention(query, key, value, feature_map=feature_map, causal=causal,
                           normalize=True, eps=eps, chunk_size=chunk_size,
                           implementation=implementation, key_mask=key_mask)
  if branch in ("sum", "window"):
    left, right = window_sides(window, causal)
    segs = None
    if key_mask is not None:
      segs = (jnp.zeros(query.shape[:2], jnp.int32), jnp.where(jnp.asarray(key_mask), 0, -1))
    local = sliding_window_attention(query, key, value, left=left, right=right, causal=causal,
                                     scale=scale, segment_ids=segs)
    out = local if out is None else out + local
  return out
