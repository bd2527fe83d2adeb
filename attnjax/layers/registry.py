"""Attention families by name, for config-driven layers.

Each engine package exposes ``FAMILIES: dict[str, callable]`` in its
``__init__``; a family is a parameter-free function

    fn(query, key, value, *, causal: bool, q_positions=None, k_positions=None,
       segment_ids=None, **options) -> out [B, T, N, Hv]

The engine packages are imported on the first lookup (they import helpers of
this package, e.g. rotary embeddings, so they cannot be imported when it is);
an engine that fails to import raises there. ``"dense"``
(``attnjax.attention`` with an optional ``Causal()`` mask) is always present.
A family that handles a KV cache correctly (it honours ``q_positions`` /
``k_positions`` for causality over a partly filled cache) sets the attribute
``supports_kv_cache = True`` on its function.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Optional
import jax.numpy as jnp
from attnjax import api
from attnjax.core import validation as V
from attnjax.core.reference import reference_attention
from attnjax.layers.padding import lengths_as_segments
from attnjax.masks import Causal, Mask

__all__ = ["ENGINE_PACKAGES", "get_family", "list_families", "register_family", "dense_family"]

#: Packages searched for a ``FAMILIES`` dict, in this order (first name wins).
ENGINE_PACKAGES = (
    "attnjax.block_sparse",
    "attnjax.linear",
    "attnjax.neighborhood",
    "attnjax.dynamic",
    "attnjax.decoding",
    "attnjax.vision",
)

_USER: Dict[str, Callable] = {}


def dense_family(query, key, value, *, causal: bool, q_positions=None, k_positions=None,
                 segment_ids=None, mask=None, score=None, bias=None, scale=None,
                 implementation=None, probs_hook=None, query_seq_lengths=None,
                 key_value_seq_lengths=None, dropout_rate=0.0, dropout_rng=None):
  """``attnjax.attention`` with ``Causal()`` (and ``mask``) when ``causal``.

  Shapes: query [B, T, N, H], key [B, S, K, H], value [B, S, K, Hv] ->
  [B, T, N, Hv]. ``mask`` is an ``attnjax.masks.Mask`` or a boolean array
  broadcastable to [B, N, T, S]; ``score`` an ``attnjax.scores`` variant;
  ``bias`` an additive float array broadcastable to [B, N, T, S];
  ``query_seq_lengths`` / ``key_value_seq_lengths`` int [B] (right padding,
  as ``attnjax.attention``: the XLA path skips the padded blocks).
  ``dropout_rate`` / ``dropout_rng``: attention dropout of ``attnjax.attention``
  (one mask per batch element and head, regenerated per tile on the XLA path;
  the reference draws the same mask).
  ``probs_hook`` (``f(probs [B, N, T, S]) -> probs``, e.g. Flax-style dropout
  with one mask shared by the batch and heads) needs the weights, so it runs
  the dense reference (``attnjax.reference_attention``, lengths as segment
  ids): implementation must be None or "reference", other backends raise
  NotImplementedError.
  """
  if causal:
    if mask is None:
      mask = Causal()
    elif isinstance(mask, Mask):
      mask = Causal() & mask
    else:
      mask = _causal_and_array(mask, query, key, q_positions, k_positions)
  if probs_hook is not None:
    if implementation not in (None, "reference"):
      raise NotImplementedError(
          f"probs_hook (e.g. attention dropout) needs the attention weights, which only the "
          f"dense reference materialises; implementation={implementation!r} cannot apply it. "
          "Use implementation=None or 'reference'.")
    segment_ids = lengths_as_segments(segment_ids, query_seq_lengths, key_value_seq_lengths,
                                      query.shape[0], query.shape[1], key.shape[1])
    return reference_attention(query, key, value, mask=mask, score=score, bias=bias,
                               scale=scale, q_positions=q_positions, k_positions=k_positions,
                               segment_ids=segment_ids, probs_hook=probs_hook,
                               dropout_rate=dropout_rate, dropout_rng=dropout_rng)
  return api.attention(query, key, value, mask=mask, score=score, bias=bias, scale=scale,
                       q_positions=q_positions, k_positions=k_positions,
                       segment_ids=segment_ids, query_seq_lengths=query_seq_lengths,
                       key_value_seq_lengths=key_value_seq_lengths,
                       implementation=implementation, dropout_rate=dropout_rate,
                       dropout_rng=dropout_rng)


dense_family.supports_kv_cache = True


def _causal_and_array(mask, query, key, q_positions, k_positions):
  """A boolean mask array [.., T, S] and causality by positions, as one array."""
  d = V.Dims(query.shape[0], query.shape[1], key.shape[1], query.shape[2], key.shape[2],
             query.shape[3], query.shape[3])
  q_pos, k_pos = V.check_positions(q_positions, k_positions, d)
  qp = q_pos[:, None] if q_pos.ndim == 1 else q_pos[:, None, :, None]
  kp = k_pos[None, :] if k_pos.ndim == 1 else k_pos[:, None, None, :]
  return jnp.asarray(mask, bool) & (kp <= qp)


def register_family(name: str, fn: Callable) -> None:
  """Adds (or replaces) a family under ``name`` for this process."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"family name must be a non-empty string, got {name!r}.")
  if not callable(fn):
    raise TypeError(f"family {name!r} must be callable, got {type(fn).__name__}.")
  _USER[name] = fn


def _engine_families() -> Dict[str, Callable]:
  found: Dict[str, Callable] = {}
  for pkg in ENGINE_PACKAGES:
    fams = getattr(importlib.import_module(pkg), "FAMILIES", None)
    for name, fn in dict(fams or {}).items():
      found.setdefault(name, fn)
  return found


def list_families() -> Dict[str, Callable]:
  """All families available now: ``"dense"``, the engines' and registered ones."""
  out = {"dense": dense_family}
  for name, fn in _engine_families().items():
    out.setdefault(name, fn)
  out.update(_USER)
  return out


def get_family(name: str) -> Callable:
  """The family function registered under ``name``; ValueError listing the choices."""
  if name == "dense" and "dense" not in _USER:
    return dense_family
  fams = list_families()
  fn: Optional[Callable] = fams.get(name)
  if fn is None:
    raise ValueError(f"unknown attention family {name!r}; available: {sorted(fams)}.")
  return fn
