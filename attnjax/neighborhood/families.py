"""Parameter-free neighborhood families for the layer registry (NATTEN 1D; spec P2-23).

``na1d``: each token attends to a window of ``kernel_size`` tokens (NATTEN
semantics: shifted at the borders when non-causal, ``[i - k + 1, i]`` when
causal) on sequence models.
"""
from __future__ import annotations

import jax
import numpy as np

from attnjax.core.reference import reference_attention
from attnjax.masks.neighborhood import Neighborhood
from attnjax.neighborhood.api import na1d


def _is_default(positions, length):
  if positions is None:
    return True
  if isinstance(positions, jax.core.Tracer):
    return False
  p = np.asarray(positions)
  return p.shape[-1] == length and bool(np.all(p == np.arange(length)))


def na1d_family(query, key, value, *, causal, q_positions=None, k_positions=None,
                segment_ids=None, kernel_size=7, dilation=1, implementation=None, **options):
  """Registry entry: 1D neighborhood self-attention on [B, T, N, H] (T == S).

  Options: ``kernel_size`` (default 7), ``dilation``, ``implementation`` and
  the other keyword arguments of :func:`attnjax.neighborhood.na1d`. With
  non-default (or traced) positions or segment ids the dense reference path
  evaluates the same neighborhood predicate on the given positions (window in
  position space, keys of other segments masked).
  """
  T, S = query.shape[1], key.shape[1]
  if T != S:
    raise ValueError(f"na1d is self-attention: query length T={T} must equal key length S={S}.")
  if segment_ids is None and _is_default(q_positions, T) and _is_default(k_positions, S):
    return na1d(query, key, value, kernel_size=kernel_size, dilation=dilation,
                is_causal=causal, implementation=implementation, **options)
  if options:
    raise NotImplementedError(
        f"options {sorted(options)} are not supported by na1d with explicit positions or "
        "segment ids (dense reference path).")
  mask = Neighborhood((T,), kernel_size, dilation, causal)
  return reference_attention(query, key, value, mask=mask, q_positions=q_positions,
                             k_positions=k_positions, segment_ids=segment_ids)


FAMILIES = {"na1d": na1d_family}
