"""Region-masked cross-attention of MagicInfinite ("MagicInfinite: Generating Infinite Talking
Videos with Your Words and Voice", arXiv:2503.05978).

MagicInfinite conditions video tokens on text and on one audio stream per
speaker, and uses region-specific masks so that a speaker's audio drives only
that speaker's face region while the text steers the whole frame. The paper
publishes no code and states the masks at the level of "region-specific
masks ... balance global textual control and local audio guidance"; the
reading implemented here (the project's, not the paper's wording):

- every query (video) token carries a region id (``-1``: in no region);
- every conditioning token carries a region id or ``-1`` for *global*
  (text, reference-image tokens: visible to every query);
- query i may attend to conditioning token j iff ``region[j] == -1`` or
  ``region[j] == region[i]``; one softmax over everything it may see.

A query token that sees no key (outside every region, with no global keys)
gets a zero output, i.e. no update from this layer: the spec's oracle ("video
tokens outside a speaker's mask get no audio update").

It runs on the block-sparse engine as ``Documents() | KeyIn(global keys)``
with the region ids as run-time segment ids, so the fast ("xla"/"pallas")
paths take it (``attnjax.explain`` shows which); the dense mask
:func:`region_cross_mask` is the oracle for tests.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.api import attention
from attnjax.core import validation as V
from attnjax.masks import Documents, KeyIn

__all__ = ["region_masked_cross_attention", "region_cross_mask", "region_ids_from_masks"]

_OUTSIDE_Q = -1   # a query in no region
_GLOBAL_K = -2    # the segment of global keys (never equal to a query's)


def _static_key_regions(key_regions, S: int) -> np.ndarray:
  if isinstance(key_regions, jax.core.Tracer):
    raise TypeError(
        "key_regions must be static (a tuple, list or NumPy array of S ints): which "
        "conditioning tokens are global is part of the block layout, fixed at trace time.")
  kr = np.asarray(key_regions)
  if kr.shape != (S,) or not np.issubdtype(kr.dtype, np.integer):
    raise ValueError(f"key_regions must be S={S} integers (region id, or -1 for a global "
                     f"token), got dtype {kr.dtype} with shape {kr.shape}.")
  return kr.astype(np.int32)


def _query_regions(query_regions, B: int, T: int):
  qr = jnp.asarray(query_regions)
  if qr.shape != (B, T):
    raise ValueError(f"query_regions must have shape [B, T]=({B}, {T}), got {qr.shape}.")
  if qr.dtype == jnp.bool_:
    return jnp.where(qr, 0, _OUTSIDE_Q).astype(jnp.int32)
  if not jnp.issubdtype(qr.dtype, jnp.integer):
    raise TypeError(f"query_regions must be integer region ids or a boolean mask, got dtype "
                    f"{qr.dtype}.")
  return jnp.where(qr >= 0, qr, _OUTSIDE_Q).astype(jnp.int32)


def region_cross_mask(query_regions, key_regions):
  """The dense boolean mask of :func:`region_masked_cross_attention`.

  Args:
    query_regions: int [B, T] (region id, < 0 for none) or bool [B, T] (region 0).
    key_regions: int [S] (region id, < 0 for global).

  Returns:
    bool [B, 1, T, S]: True where query i may attend to key j.
  """
  qr = jnp.asarray(query_regions)
  qr = jnp.where(qr, 0, -1) if qr.dtype == jnp.bool_ else qr
  kr = jnp.asarray(key_regions)
  allowed = (kr[None, None, :] < 0) | ((qr[:, :, None] >= 0) & (qr[:, :, None] == kr[None, None]))
  return allowed[:, None]


def region_ids_from_masks(region_masks):
  """Region ids [B, L] from per-region boolean masks [B, R, *spatial] (e.g. face masks).

  ``L = prod(spatial)`` in row-major order (flatten video tokens [F, X, Y] the
  same way). A token in several regions takes the first; in none, -1.
  """
  m = jnp.asarray(region_masks, bool)
  if m.ndim < 3:
    raise ValueError(f"region_masks must have shape [B, R, *spatial], got {m.shape}.")
  m = m.reshape(m.shape[0], m.shape[1], -1)
  first = jnp.argmax(m, axis=1).astype(jnp.int32)
  return jnp.where(jnp.any(m, axis=1), first, _OUTSIDE_Q)


def region_masked_cross_attention(query, key, value, query_regions, key_regions, *,
                                  scale=None, return_lse=False, implementation=None):
  """Cross-attention where each conditioning token is global or tied to one region.

  Args:
    query: [B, T, N, H] video tokens (flatten [F, X, Y] to T).
    key: [B, S, K, H], value: [B, S, K, Hv] conditioning tokens (e.g. text
      tokens then each speaker's audio tokens); N % K == 0.
    query_regions: int [B, T]: the region of each query token (e.g. the
      speaker whose face it lies in; :func:`region_ids_from_masks`), negative
      for none; or bool [B, T] for a single region 0. May be traced.
    key_regions: static int [S] (tuple, list or NumPy array): the region a
      conditioning token speaks to, or -1 for a global token seen by every
      query. Static because the global keys are part of the block layout.
    scale: logit scale (default 1/sqrt(H)).
    return_lse: also return the lse [B, T, N] (for ``merge_attention``).
    implementation: as ``attnjax.attention``; None picks the fastest backend.

  Returns:
    [B, T, N, Hv] (and lse). A query that sees no key gets zeros (lse -inf).
  """
  query, key, value = V.as_arrays(query, key, value)
  d = V.check_qkv(query, key, value)
  kr = _static_key_regions(key_regions, d.S)
  qr = _query_regions(query_regions, d.B, d.T)
  is_global = kr < 0
  if is_global.all():   # text only: plain dense cross-attention
    return attention(query, key, value, scale=scale, return_lse=return_lse,
                     implementation=implementation)
  k_seg = jnp.broadcast_to(jnp.asarray(np.where(is_global, _GLOBAL_K, kr)), (d.B, d.S))
  mask = Documents()
  if is_global.any():
    mask = mask | KeyIn(tuple(int(j) for j in np.nonzero(is_global)[0]))
  return attention(query, key, value, mask=mask, segment_ids=(qr, k_seg), scale=scale,
                   return_lse=return_lse, implementation=implementation)
