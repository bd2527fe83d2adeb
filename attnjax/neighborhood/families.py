"""Parameter-free neighborhood families for the layer registry (NATTEN 1D; arXiv:2403.04690).

``na1d``: each token attends to a window of ``kernel_size`` tokens (NATTEN
semantics: shifted at the borders when non-causal, ``[i - k + 1, i]`` when
causal) on sequence models.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.api import attention
from attnjax.core.registry import families_of, family
from attnjax.masks.neighborhood import Neighborhood
from attnjax.neighborhood.api import na1d


def _static_default(positions, length):
  """True/False when ``positions`` is known now; None when it is traced."""
  if positions is None:
    return True
  if isinstance(positions, jax.core.Tracer):
    return None
  p = np.asarray(positions)
  return p.shape[-1] == length and bool(np.all(p == np.arange(length)))


@family("na1d", padding="segment_ids")
def na1d_family(query, key, value, *, causal, q_positions=None, k_positions=None,
                segment_ids=None, kernel_size=7, dilation=1, implementation=None,
                scale=None):
  """Registry entry: 1D neighborhood self-attention on [B, T, N, H] (T == S).

  Options: ``kernel_size`` (default 7), ``dilation``, ``implementation``,
  ``scale``. Positions are token indices: with the default positions
  (``arange(T)``) the tiled neighborhood path runs. Explicit positions or
  segment ids run the same neighborhood predicate as an attnjax Mask on the
  block-sparse engine (``attnjax.attention``; keys of other segments masked).
  Positions traced under jit are checked at run time: ``lax.cond`` picks the
  tiled path when they equal ``arange(T)``, the masked path otherwise.

  Key padding (the layer passes it as segment ids) is the neighborhood mask AND
  the key-padding mask: each query keeps the window it has in the padded
  sequence of length T, less its padded keys. The window does not shift back
  inside the real length L, so a non-causal query within
  ``(kernel_size // 2) * dilation`` tokens of the padding sees fewer keys than
  in the unpadded sequence; causal windows ``[i - (k - 1) d, i]`` never reach
  the right padding and equal the unpadded ones.
  """
  T, S = query.shape[1], key.shape[1]
  if T != S:
    raise NotImplementedError(f"na1d is defined for self-attention only "
                              f"(its pattern has no cross-attention form): query length T={T} must equal key length S={S}.")
  fast = lambda: na1d(query, key, value, kernel_size=kernel_size, dilation=dilation,
                      is_causal=causal, scale=scale, implementation=implementation)
  mask = Neighborhood((T,), kernel_size, dilation, causal)
  # The same neighborhood as a Mask on the block-sparse engine: it takes explicit
  # positions and segment ids (only the blocks the windows touch are visited).
  masked = lambda: attention(query, key, value, mask=mask, scale=scale,
                             q_positions=q_positions, k_positions=k_positions,
                             segment_ids=segment_ids, implementation=implementation)
  if segment_ids is not None:
    return masked()
  known = [_static_default(q_positions, T), _static_default(k_positions, S)]
  if all(known):
    return fast()
  if False in known:
    return masked()
  ar = jnp.arange(T, dtype=jnp.int32)
  ok = jnp.asarray(True)
  for p in (q_positions, k_positions):
    if p is not None:
      ok = ok & jnp.all(jnp.asarray(p) == ar)
  return jax.lax.cond(ok, fast, masked)


FAMILIES = families_of(__name__)
