"""Per-layer attention choice: family names from the config -> (family, options) per layer.

A layer's attention is a family name of the layer registry
(``attnjax.layers.list_families()``) or a *variant* below (a registered
family with fixed options, e.g. ``s2_homo``). Options come, lowest priority
first, from ``PRESETS`` (small-model sizes; a preset key the family does not
accept is skipped, so presets never break a family), the variant,
``model.family_options.<family>`` and, for layers of ``model.attention``,
``model.attention_options``.
"""
from __future__ import annotations

import inspect
from typing import Dict, List, Tuple

#: Option presets for the small models of ``configs/`` (sequences of 64-512
#: tokens); the layers' own defaults target long sequences. S2 follows the
#: DKernel pattern (spec P2-10) scaled down: 16-token blocks, 2 local blocks,
#: stride 4.
PRESETS: Dict[str, Dict[str, object]] = {
    "sliding_window": {"window": 32, "window_size": 32},
    "s2": {"block_size": 16, "local_blocks": 2, "vert_stride": 4},
    "based": {"window": 32, "feature_dim": 16},
    "na1d": {"kernel_size": 33},
}

#: Name -> (registered family, options): variants usable wherever a family is.
VARIANTS: Dict[str, Tuple[str, Dict[str, object]]] = {
    "s2_homo": ("s2", {"homo_head": True}),
}


def available() -> List[str]:
  """Registered families and the variants whose base family is registered."""
  from attnjax.layers import registry  # pylint: disable=g-import-not-at-top
  fams = sorted(registry.list_families())
  return fams + sorted(v for v, (base, _) in VARIANTS.items() if base in fams)


def _accepted(fn, options: Dict[str, object]) -> Dict[str, object]:
  """The subset of ``options`` that ``fn`` takes as keyword arguments."""
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return {}
  named = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
  # Only keys the family names explicitly are safe to guess (not via **kwargs).
  return {k: v for k, v in options.items() if k in params and params[k].kind in named}


def preset_options(name: str) -> Dict[str, object]:
  """The ``PRESETS`` entries that family (or variant) ``name`` takes; {} if unknown."""
  from attnjax.layers import registry  # pylint: disable=g-import-not-at-top
  base = VARIANTS.get(name, (name, {}))[0]
  fn = registry.list_families().get(base)
  return {} if fn is None else _accepted(fn, PRESETS.get(base, {}))


def _to_dict(x) -> Dict[str, object]:
  if x is None:
    return {}
  return dict(x.to_dict() if hasattr(x, "to_dict") else x)


def layer_family_names(model_cfg) -> List[str]:
  """The family (or variant) name of each layer, from the schedule fields."""
  n = int(model_cfg.num_layers)
  explicit = tuple(model_cfg.get("layer_attention", ()) or ())
  if explicit:
    if len(explicit) != n:
      raise ValueError(
          f"config.model.layer_attention has {len(explicit)} entries, expected one per layer "
          f"(config.model.num_layers={n}).")
    return [str(x) for x in explicit]
  names = [str(model_cfg.attention)] * n
  dense_layers = tuple(model_cfg.get("dense_layers", ()) or ())
  for i in dense_layers:
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
      raise ValueError(
          f"config.model.dense_layers entry {i!r} is not a layer index in [0, {n}).")
    names[i] = str(model_cfg.dense_attention)
  every = int(model_cfg.get("dense_every", 0) or 0)
  if every < 0:
    raise ValueError(f"config.model.dense_every must be >= 0, got {every}.")
  if every:
    for i in range(n):
      if (i + 1) % every == 0:
        names[i] = str(model_cfg.dense_attention)
  return names


def resolve(model_cfg) -> List[Tuple[str, Dict[str, object]]]:
  """(registered family, options) for each layer; ValueError naming the config field.

  Raises:
    ValueError: a name is neither a registered family nor a variant.
  """
  from attnjax.layers import registry  # pylint: disable=g-import-not-at-top
  fams = registry.list_families()
  family_options = _to_dict(model_cfg.get("family_options"))
  attention_options = _to_dict(model_cfg.get("attention_options"))
  use_presets = bool(model_cfg.get("use_presets", True))
  field = ("config.model.layer_attention" if model_cfg.get("layer_attention")
           else "config.model.attention")
  out = []
  for i, name in enumerate(layer_family_names(model_cfg)):
    base, variant_opts = VARIANTS.get(name, (name, {}))
    if base not in fams:
      if name == str(model_cfg.get("dense_attention", "dense")) and name != model_cfg.attention:
        field = "config.model.dense_attention"
      raise ValueError(
          f"{field}: unknown attention family {name!r} (layer {i}); available: "
          f"{available()}.")
    opts = dict(_accepted(fams[base], PRESETS.get(base, {}))) if use_presets else {}
    opts.update(variant_opts)
    opts.update(_to_dict(family_options.get(base)))
    if name != base:
      opts.update(_to_dict(family_options.get(name)))
    if name == str(model_cfg.attention):
      opts.update(attention_options)
    out.append((base, opts))
  return out
