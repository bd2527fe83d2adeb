"""``make_attention_fn``: attnjax attention inside Flax's own attention modules.

The returned function has the signature Flax calls ``attention_fn`` with
(flax 0.12): ``flax.linen.MultiHeadDotProductAttention`` passes ``mask``,
``dropout_rng``, ``dropout_rate``, ``broadcast_dropout``, ``deterministic``,
``dtype``, ``precision``, ``force_fp32_for_softmax``, the two einsum hooks
(and ``module`` when sowing weights), keeping only the keywords the function
declares; ``flax.nnx.MultiHeadAttention`` passes ``mask``, ``dropout_rng``,
``dropout_rate``, ``broadcast_dropout``, ``deterministic``, ``dtype``,
``precision``, ``module`` and ``is_causal``.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from attnjax import api
from attnjax.core import validation as V
from attnjax.core.dropout import BroadcastKey
from attnjax.core.reference import reference_attention
from attnjax.layers.dropout import check_dropout_rate
from attnjax.masks import Mask

__all__ = ["make_attention_fn"]


def make_attention_fn(mask=None, score=None, implementation: Optional[str] = None, *,
                      scale=None):
  """Returns an ``attention_fn`` for ``flax.linen.MultiHeadDotProductAttention``
  and ``flax.nnx.MultiHeadAttention``.

  Args:
    mask: None or an ``attnjax.masks.Mask``, evaluated on attnjax's default
      bottom-right aligned positions (``q_pos = arange(T) + S - T``); it is
      ANDed with the boolean ``mask`` array Flax passes.
    score: an ``attnjax.scores`` variant (default softmax).
    implementation: "reference" | "xla" | "pallas" | None (``attnjax.attention``).
    scale: logit scale (default 1/sqrt(H)).

  The function takes query [..., T, N, H], key [..., S, K, H], value
  [..., S, K, Hv] (any number of batch dimensions; GQA when K < N), a
  boolean ``mask`` broadcastable to [..., N, T, S] (True = attend) and an
  optional additive ``bias`` of the same layout, and returns [..., T, N, Hv].
  ``is_causal`` (nnx) is top-left aligned as in ``jax.nn.dot_product_attention``.
  One deliberate difference from Flax's default: a query row that sees no key
  (e.g. a padded query) returns zeros, where Flax returns the uniform average
  of all values.
  Attention-weight dropout (``dropout_rate > 0`` and not ``deterministic``,
  Flax's ``dropout_rng`` and ``broadcast_dropout``) is ``attnjax.attention``'s
  dropout on every backend (the XLA engine and the Pallas kernels regenerate
  the mask per tile, the reference draws the same mask): one mask per batch
  element and head with ``broadcast_dropout=False``, one [T, S] mask
  (``attnjax.core.dropout.BroadcastKey``) with ``broadcast_dropout=True``.
  The masks come from attnjax's counter-based generator, not Flax's
  ``jax.random.bernoulli`` draws (same distribution, other bits). Custom einsum hooks raise
  ``NotImplementedError``;
  ``precision`` and ``force_fp32_for_softmax`` are accepted and have no
  effect (attnjax always accumulates in float32). When Flax asks to sow the
  attention weights (``module`` given), the dense reference path is used and
  the weights [..., N, T, S] are sown as ``attention_weights``.
  """
  if mask is not None and not isinstance(mask, Mask):
    raise TypeError(
        f"mask must be an attnjax.masks.Mask or None (array masks come from Flax's call), "
        f"got {type(mask).__name__}.")
  mask_obj = mask

  def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                   dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                   precision=None, module=None, force_fp32_for_softmax=False,
                   qk_attn_weights_einsum=None, attn_weights_value_einsum=None,
                   is_causal=False):
    del precision, force_fp32_for_softmax
    fused = {}
    if check_dropout_rate(dropout_rate) > 0.0 and not deterministic:
      if dropout_rng is None:
        raise ValueError("dropout_rate > 0 and deterministic=False need a dropout_rng.")
      fused = dict(dropout_rate=float(dropout_rate),
                   dropout_rng=BroadcastKey(dropout_rng) if broadcast_dropout else dropout_rng)
    if qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None:
      raise NotImplementedError(
          "custom qk_attn_weights_einsum / attn_weights_value_einsum are not supported by "
          "attnjax's attention_fn.")
    if dtype is not None:
      query, key, value = (x.astype(dtype) for x in (query, key, value))
    if query.ndim < 3:
      raise ValueError(f"query must have shape [..., T, N, H], got {query.shape}.")
    batch = query.shape[:-3]
    for name, x in (("key", key), ("value", value)):
      if x.shape[:-3] != batch:
        raise ValueError(f"{name} batch dimensions {x.shape[:-3]} differ from query's "
                         f"{batch} (query {query.shape}, {name} {x.shape}).")
    q, k, v = (x.reshape((-1,) + x.shape[-3:]) for x in (query, key, value))
    d = V.check_qkv(q, k, v)
    arr = None
    if mask is not None:
      arr = _flatten_batch("mask", jnp.asarray(mask).astype(bool), batch, d)
    if is_causal:
      tl = (jnp.arange(d.S)[None, :] <= jnp.arange(d.T)[:, None])[None, None]
      arr = tl if arr is None else arr & tl
    b = None if bias is None else _flatten_batch("bias", jnp.asarray(bias), batch, d)
    q_pos, k_pos = V.default_positions(d.T, d.S)
    m = api.combine_mask(mask_obj, arr, d.N, q_pos, k_pos)
    if module is not None:
      out, weights = reference_attention(q, k, v, mask=m, bias=b, scale=scale, score=score,
                                         return_probs=True, **fused)
      _sow(module, weights.reshape(batch + weights.shape[1:]))
    else:
      out = api.attention(q, k, v, mask=m, bias=b, scale=scale, score=score,
                          implementation=implementation, **fused)
    return out.reshape(batch + out.shape[1:])

  return attention_fn


def _flatten_batch(name, x, batch, d):
  """[..., N|1, T|1, S|1] broadcast over the batch dims and flattened to [B, ...]."""
  nb = len(batch)
  if x.ndim > nb + 3:
    raise ValueError(f"{name} of shape {x.shape} has more dimensions than "
                     f"[..., N, T, S] with batch dims {batch}.")
  x = x.reshape((1,) * (nb + 3 - x.ndim) + x.shape)
  try:
    x = jnp.broadcast_to(x, batch + x.shape[nb:])
  except ValueError as e:
    raise ValueError(f"{name} of shape {x.shape} does not broadcast to batch dims {batch}.") from e
  x = x.reshape((-1,) + x.shape[nb:])
  V.check_broadcastable(name, x, (d.B, d.N, d.T, d.S))
  return x




def _sow(module, weights):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  if isinstance(module, nnx.Module):
    module.sow(nnx.Intermediate, "attention_weights", weights)
  else:
    module.sow("intermediates", "attention_weights", weights)
