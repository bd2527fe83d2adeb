"""Merging partial attention results through their log-sum-exp."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def merge_attention(o1, lse1, o2, lse2):
  """Combines two attentions of the same queries over disjoint key sets.

  Args:
    o1, o2: [B, T, N, Hv] outputs, each normalised over its own keys.
    lse1, lse2: [B, T, N] log-sum-exp of the logits over those keys
      (-inf where a row saw no key).

  Inputs may be jax or NumPy arrays or nested lists. A NaN in an lse (or an
  output) propagates: that row of o and lse is NaN. An lse of +inf is not a
  log-sum-exp of finite logits and raises ValueError when the lse is concrete;
  a traced lse cannot be checked at trace time and gives NaN there.

  Returns:
    (o, lse): the attention over the union of the key sets, in o1's dtype, and
    its float32 lse. Rows empty in both inputs give zeros and lse = -inf.
  """
  o1, lse1, o2, lse2 = (jnp.asarray(x) for x in (o1, lse1, o2, lse2))
  for name, x in (("o1", o1), ("lse1", lse1), ("o2", o2), ("lse2", lse2)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must have a floating dtype, got {x.dtype} (shape {x.shape}).")
  if o1.shape != o2.shape:
    raise ValueError(f"o1 {o1.shape} and o2 {o2.shape} must have the same shape.")
  if lse1.shape != o1.shape[:-1] or lse2.shape != o1.shape[:-1]:
    raise ValueError(
        f"lse1 {lse1.shape} and lse2 {lse2.shape} must have shape [B, T, N]="
        f"{o1.shape[:-1]}.")
  for name, x in (("lse1", lse1), ("lse2", lse2)):
    if not isinstance(x, jax.core.Tracer) and bool(jnp.any(jnp.isposinf(x))):
      raise ValueError(
          f"{name} holds +inf at {np.argwhere(np.isposinf(np.asarray(x)))[0].tolist()} "
          f"(shape {x.shape}); a log-sum-exp is finite, or -inf for a row that saw no key.")
  lse1 = lse1.astype(jnp.float32)
  lse2 = lse2.astype(jnp.float32)
  m = jnp.maximum(lse1, lse2)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  w1 = jnp.exp(lse1 - m_safe)
  w2 = jnp.exp(lse2 - m_safe)
  total = w1 + w2
  lse = jnp.where(total > 0, m_safe + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
  lse = jnp.where(jnp.isnan(total), jnp.nan, lse)  # a NaN lse propagates
  denom = jnp.where(total > 0, total, 1.0)[..., None]
  o = (o1.astype(jnp.float32) * w1[..., None] + o2.astype(jnp.float32) * w2[..., None]) / denom
  return o.astype(o1.dtype), lse
