"""Padded batches in ``MultiHeadAttention``: how each attention family takes key padding.

A family declares its route once, with the rest of its declaration
(``@family(name, padding=..., no_padding=...)`` of ``attnjax.core.registry``;
a user-registered function may set the attributes ``key_padding`` and
``no_key_padding`` instead):

- ``"segment_ids"``: a padded key gets a segment no real query belongs to, so
  the fast paths skip it as they skip other documents' keys (the block-sparse
  softmax families, ``na1d``). Given right-padding lengths (the layer's
  ``input_lengths``), a family that also takes ``query_seq_lengths`` /
  ``key_value_seq_lengths`` gets those instead: the block-sparse XLA path
  then drops the padded blocks from its schedule.
- ``"key_mask"``: the family function takes ``key_mask`` [B, S] (the linear
  families: a padded key's features and value are zeroed).
- ``"causal_prefix"``: the causal output at query i reads tokens <= i only,
  so right padding needs nothing; it takes right padding in causal
  self-attention only (other patterns and calls raise).

A family without a route raises ValueError with its ``no_padding`` text (why
it cannot take padding) when it has one. ``"dense"`` takes lengths
directly and a key-padding mask as segment ids (``key_padding_segments``; on
the XLA path about twice as fast as the same mask as a [B, 1, T, S] array
ANDed with causality, which visits every block); other mask arrays stay masks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core.registry import PADDING_ROUTES, family_spec
from attnjax.layers.options import option_names

__all__ = ["ROUTES", "PAD_SEGMENT", "check_lengths", "key_padding_mask", "key_padding_segments",
           "lengths_as_segments", "padding_arguments"]

ROUTES = PADDING_ROUTES
#: The segment of padded keys (no query is in it); padded queries (lengths) get the next one.
PAD_SEGMENT = int(jnp.iinfo(jnp.int32).min)


def check_lengths(lengths, batch: int, length: int):
  """Right-padding lengths: an int array [B] in [0, length], as int32."""
  x = jnp.asarray(lengths)
  if x.shape != (batch,) or not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"input_lengths must be an int array of shape [B]=({batch},), got "
                     f"{x.dtype} {x.shape}.")
  try:
    bad = np.asarray(x)
  except jax.errors.TracerArrayConversionError:
    bad = None
  if bad is not None and (bad.min(initial=0) < 0 or bad.max(initial=0) > length):
    raise ValueError(f"input_lengths must lie in [0, {length}] (the padded length), got "
                     f"{bad.tolist()}.")
  return x.astype(jnp.int32)


def key_padding_mask(family: str, mask, batch: int, seq: int):
  """A key-padding mask [B, S] or Flax's [B, 1, 1, S] (True = a real key) as bool [B, S]."""
  if not hasattr(mask, "shape") or isinstance(mask, (str, bytes)):
    raise ValueError(
        f"attention family {family!r} defines its own pattern; the layer's mask= may only be "
        f"a key-padding array [B, S] or [B, 1, 1, S] there, got {type(mask).__name__}.")
  # NumPy stays NumPy: a concrete mask can be checked while tracing (causal_prefix)
  mask = mask if isinstance(mask, np.ndarray) else jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(f"mask must be boolean (True = a real key), got dtype {mask.dtype}.")
  if mask.ndim == 4 and mask.shape[1:3] == (1, 1):
    mask = mask[:, 0, 0]
  if mask.shape != (batch, seq):
    raise ValueError(
        f"attention family {family!r} takes a key-padding mask of shape [B, S]=({batch}, "
        f"{seq}) or [B, 1, 1, S]; got {mask.shape}. A mask that differs per query or head "
        "needs the 'dense' family.")
  return mask


def _segments(segment_ids, batch: int, q_len: int, kv_len: int):
  """(q [B, T], kv [B, S]) int32 segment ids, zeros when None."""
  if segment_ids is None:
    return jnp.zeros((batch, q_len), jnp.int32), jnp.zeros((batch, kv_len), jnp.int32)
  if isinstance(segment_ids, (tuple, list)):
    q, k = segment_ids
    return jnp.asarray(q, jnp.int32), jnp.asarray(k, jnp.int32)
  s = jnp.asarray(segment_ids, jnp.int32)
  return s, s


def key_padding_segments(key_mask, segment_ids, batch: int, q_len: int, kv_len: int,
                         pair: bool = False):
  """Segment ids in which padded keys (``key_mask`` False) are in no query's segment.

  Self-attention ids (one array, T == S) stay one array unless ``pair``: a
  padded token is then in the padding segment as a query too and sees only
  padded keys (families that read documents from segment ids, e.g. "anchor",
  need one array). With ``pair`` the queries keep their segments, so a padded
  query row sees the real keys, as with a key-padding mask array.
  """
  q, k = _segments(segment_ids, batch, q_len, kv_len)
  k = jnp.where(key_mask, k, PAD_SEGMENT)
  if not pair and q_len == kv_len and not isinstance(segment_ids, (tuple, list)):
    return k
  return q, k


def lengths_as_segments(segment_ids, q_lengths, kv_lengths, batch: int, q_len: int,
                        kv_len: int):
  """Right-padding lengths [B] as segment ids (for a path that takes no lengths).

  Keys at index >= ``kv_lengths[b]`` get a segment no query has; queries at
  index >= ``q_lengths[b]`` one no key has (they see nothing and return
  zeros, as with lengths). None lengths are the full lengths; returns
  ``segment_ids`` unchanged when both are None.
  """
  if q_lengths is None and kv_lengths is None:
    return segment_ids
  q, k = _segments(segment_ids, batch, q_len, kv_len)
  if kv_lengths is not None:
    k = jnp.where(jnp.arange(kv_len)[None] < jnp.asarray(kv_lengths)[:, None], k, PAD_SEGMENT)
  if q_lengths is not None:
    q = jnp.where(jnp.arange(q_len)[None] < jnp.asarray(q_lengths)[:, None], q,
                  PAD_SEGMENT + 1)
  return q, k


def _check_right_padding(family: str, key_mask):
  """ValueError unless ``key_mask`` is concrete and each row is True then False."""
  try:
    m = np.asarray(key_mask)
  except jax.errors.TracerArrayConversionError:
    raise ValueError(
        f"attention family {family!r} takes right padding only (its causal output at a query "
        "reads earlier tokens only), and a traced mask cannot be checked to be right padding: "
        "pass the lengths as input_lengths=[B] instead of mask=.") from None
  if np.any(m[:, 1:] & ~m[:, :-1]):
    raise ValueError(
        f"attention family {family!r} takes right padding only (its causal output at a query "
        "reads earlier tokens only, so only padding after the last real token leaves the real "
        "outputs unchanged); the mask has a padded key before a real one.")


def _no_padding(family: str, fn, why: str = ""):
  reason = why or family_spec(fn, family).no_padding or (
      "it declares no key-padding route (declare padding= as one of "
      f"{ROUTES}, or set the function's key_padding attribute)")
  return ValueError(f"attention family {family!r} cannot take a key-padding mask "
                    f"(mask= or input_lengths=): {reason}")


def padding_arguments(family: str, fn, *, key_mask, lengths, segment_ids, causal: bool,
                      self_attn: bool, batch: int, q_len: int, kv_len: int):
  """How ``fn`` runs a padded batch: ``(segment_ids, extra keyword arguments)``.

  Args:
    key_mask: bool [B, S] (True = a real key) or None.
    lengths: int32 [B] right-padding lengths of a self-attention batch, or None.
    segment_ids: the call's segment ids (None, [B, T] or a pair).
  Raises ValueError (naming the family and why) when ``fn`` cannot take it.
  """
  spec = family_spec(fn, family)
  route = spec.padding
  if route not in ROUTES:
    raise _no_padding(family, fn)
  takes_lengths = "key_value_seq_lengths" in option_names(fn)[0]
  if route == "segment_ids" and lengths is not None and takes_lengths:
    extra = dict(query_seq_lengths=lengths, key_value_seq_lengths=lengths)
    if key_mask is None:
      return segment_ids, extra
    return key_padding_segments(key_mask, segment_ids, batch, q_len, kv_len), extra
  if route == "causal_prefix":
    if not (causal and self_attn):
      why = "it takes right padding in causal self-attention only."
      raise _no_padding(family, fn, "" if not causal and spec.no_padding else why)
    if key_mask is not None:
      _check_right_padding(family, key_mask)
    return segment_ids, {}
  if lengths is not None:
    from_lengths = jnp.arange(kv_len)[None] < lengths[:, None]
    key_mask = from_lengths if key_mask is None else key_mask & from_lengths
  if route == "segment_ids":
    return key_padding_segments(key_mask, segment_ids, batch, q_len, kv_len), {}
  return segment_ids, {"key_mask": key_mask}
