"""Per-layer attention choice shared by the pretrained architectures."""
from __future__ import annotations

from typing import Any, Mapping, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

__all__ = ["LayerAttention", "layer_attention", "scans_layers", "stack_layers"]

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


def scans_layers(config) -> bool:
  """Whether a model runs its layers as one ``nn.scan`` (params stacked under "layers").

  True when ``config.scan_layers`` and every layer has the same attention
  family and options: the layer is traced and compiled once instead of
  ``num_layers`` times. Otherwise the layers are unrolled as "layer_0", ...
  """
  specs = layer_attention(config.attention, config.attention_options, config.num_layers)
  return bool(config.scan_layers) and len(set(specs)) == 1


def unstack_layers(params, num_layers=None):
  """{"layers": stacked (leading axis L)} -> {"layer_0": p0, ...}; other params unchanged.

  The names an unrolled decoder (``scan_layers=False``) reads; params without
  "layers" are returned as they are. ``num_layers`` defaults to the leading axis.
  """
  if "layers" not in params:
    return params
  if num_layers is None:
    num_layers = jax.tree.leaves(params["layers"])[0].shape[0]
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(num_layers):
    out[f"layer_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["layers"])
  return out


def stack_layers(params, num_layers: int):
  """Per-layer params {"layer_0": p0, ...} -> {"layers": stack(p0, ...)} (leading axis L)."""
  layers = [params[f"layer_{i}"] for i in range(num_layers)]
  out = {k: v for k, v in params.items() if not k.startswith("layer_")}
  out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return out
