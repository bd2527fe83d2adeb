"""Per-layer attention choice shared by the pretrained architectures."""
from __future__ import annotations

from typing import Any, Mapping, Sequence, Tuple, Union

__all__ = ["LayerAttention", "layer_attention"]

#: (family name, options as sorted (key, value) pairs): hashable, one per layer.
LayerAttention = Tuple[str, Tuple[Tuple[str, Any], ...]]


def layer_attention(attention: Union[str, Sequence[str]],
                    attention_options: Union[None, Mapping, Sequence[Mapping]],
                    num_layers: int) -> Tuple[LayerAttention, ...]:
  """One (family, options) per layer.

  ``attention`` is a family name of ``attnjax.layers.list_families()`` for
  every layer, or a sequence of ``num_layers`` names (e.g. two "dense" layers
  and the rest "sliding_window"); ``attention_options`` is one mapping for
  every layer, a sequence of ``num_layers`` mappings, or None.
  """
  names = (attention,) * num_layers if isinstance(attention, str) else tuple(attention)
  if len(names) != num_layers or not all(isinstance(n, str) and n for n in names):
    raise ValueError(f"attention must be a family name or {num_layers} names (one per "
                     f"layer), got {attention!r}.")
  if attention_options is None or isinstance(attention_options, Mapping):
    opts = (dict(attention_options or {}),) * num_layers
  else:
    opts = tuple(dict(o or {}) for o in attention_options)
    if len(opts) != num_layers:
      raise ValueError(f"attention_options must be one mapping or {num_layers} mappings "
                       f"(one per layer), got {len(opts)}.")
  return tuple((n, tuple(sorted(o.items()))) for n, o in zip(names, opts))
