"""Element math shared by the GPU and TPU neighborhood kernels (NATTEN FNA, arXiv:2403.04690).

The fine mask and masked logits are the neighborhood's own; the online
softmax, finalisation and backward tile math are :mod:`attnjax.core.flash`'s,
which the kernels call directly.
"""
from __future__ import annotations

import jax.numpy as jnp

from attnjax.core.flash import NEG_INF, dot_nt


def fine_mask(q_lo, q_hi, k_coord):
  """Per-dimension window bounds and key coordinates -> bool [tq, tk].

  ``q_lo``, ``q_hi``: length-D lists of int32 [tq, 1] (the query's half-open
  window); ``k_coord``: length-D list of int32 [1, tk] key coordinates, all in
  within-group coordinates. A key is visible iff it lies in the window in
  every dimension (blocks never mix dilation groups). Lists rather than
  [tq, D] arrays: the Triton lowering cannot slice values.
  """
  mask = None
  for lo, hi, c in zip(q_lo, q_hi, k_coord):
    m = (c >= lo) & (c < hi)
    mask = m if mask is None else mask & m
  return mask


def masked_logits(q, k, mask, scale, bias=None):
  """Scaled q k^T (+ bias [tq, tk] float32) with invisible pairs at -inf."""
  s = dot_nt(q, k) * scale
  if bias is not None:
    s = s + bias
  return jnp.where(mask, s, NEG_INF)
