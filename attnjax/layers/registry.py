"""Attention families by name, for config-driven layers: a view on the declarations.

Every family is declared once, where it is written, with the decorator
``attnjax.core.registry.family`` (name, options, KV-cache support, key-padding
route); a family is a parameter-free function

    fn(query, key, value, *, causal: bool, q_positions=None, k_positions=None,
       segment_ids=None, **options) -> out [B, T, N, Hv]

and an option it does not declare raises ValueError naming the option, the
family and the accepted ones. Option names follow one spelling per concept:
the table in ``docs/naming.md``. The engine packages (``ENGINE_PACKAGES``) are
imported on the first lookup (they import helpers of this package, e.g.
rotary embeddings, so they cannot be imported when it is); an engine that
fails to import raises there. ``"dense"`` (``attnjax.attention`` with an
optional ``Causal()`` mask) is declared here. :func:`register_family` adds a
user's function for this process; an undeclared function describes itself
with the attributes ``supports_kv_cache`` (it honours ``q_positions`` /
``k_positions`` over a partly filled cache), ``key_padding`` and
``no_key_padding`` (``attnjax.layers.padding``), or passes the same
keywords as the decorator to ``register_family``.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Optional
import jax.numpy as jnp
from attnjax import api
from attnjax.core import registry as core
from attnjax.core import validation as V
from attnjax.core.reference import reference_attention
from attnjax.layers.padding import lengths_as_segments
from attnjax.masks import Causal, Mask

__all__ = ["ENGINE_PACKAGES", "FamilySpec", "dense_family", "family_spec", "get_family",
           "list_families", "register_family"]

FamilySpec = core.FamilySpec

#: Packages whose modules declare families (imported on the first lookup).
ENGINE_PACKAGES = (
    "attnjax.block_sparse",
    "attnjax.linear",
    "attnjax.neighborhood",
    "attnjax.dynamic",
)

_USER: Dict[str, Callable] = {}


@core.family("dense", supports_kv_cache=True)
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



def _causal_and_array(mask, query, key, q_positions, k_positions):
  """A boolean mask array [.., T, S] and causality by positions, as one array."""
  d = V.Dims(query.shape[0], query.shape[1], key.shape[1], query.shape[2], key.shape[2],
             query.shape[3], query.shape[3])
  q_pos, k_pos = V.check_positions(q_positions, k_positions, d)
  qp = q_pos[:, None] if q_pos.ndim == 1 else q_pos[:, None, :, None]
  kp = k_pos[None, :] if k_pos.ndim == 1 else k_pos[:, None, None, :]
  return jnp.asarray(mask, bool) & (kp <= qp)


def register_family(name: str, fn: Callable, **declaration) -> None:
  """Adds (or replaces) a family under ``name`` for this process.

  ``declaration``: the keywords of ``attnjax.core.registry.family``
  (``options``, ``supports_kv_cache``, ``padding``, ``no_padding``); given any,
  ``fn`` is checked as a declared family is. Without them ``fn`` is used as it
  is and describes itself by its attributes.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"family name must be a non-empty string, got {name!r}.")
  if not callable(fn):
    raise TypeError(f"family {name!r} must be callable, got {type(fn).__name__}.")
  _USER[name] = core.declare(name, fn, **declaration) if declaration else fn


def _engine_families() -> Dict[str, Callable]:
  for pkg in ENGINE_PACKAGES:
    importlib.import_module(pkg)
  return {name: spec.fn for name, spec in core.declared().items()}


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


def family_spec(name: str) -> FamilySpec:
  """The declaration of family ``name`` (read from its attributes when undeclared)."""
  return core.family_spec(get_family(name), name)
