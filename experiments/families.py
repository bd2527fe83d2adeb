"""Per-layer attention choice: family names from the config -> (family, options) per layer.

A layer's attention is a family name of the layer registry
(``attnjax.layers.list_families()``) or a *variant* below (a registered
family with fixed options, e.g. ``s2_homo``). Options come, lowest priority
first, from ``PRESETS`` (small-model sizes; every key is a declared option of
its family, which ``tests/test_registry.py`` checks; a key that a
user-registered replacement of the family does not take is skipped), the variant,
``model.family_options.<family>`` and, for layers of ``model.attention``,
``model.attention_options``. :func:`resolve_layers` also records which config
field (or preset) each option came from, so that a bad option is reported
under the name the user wrote (``experiments.config_checks``).
"""
from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Tuple

from attnjax.core.registry import family_spec
from attnjax.layers.options import CALL_ARGS, option_names  # noqa: F401  (re-exported)

#: Option presets for the small models of ``configs/`` (sequences of 64-512
#: tokens); the layers' own defaults target long sequences. S2 follows the
#: DKernel pattern (S2-Attention, arXiv:2407.17678) scaled down: 16-token blocks, 2 local blocks,
#: stride 4.
PRESETS: Dict[str, Dict[str, object]] = {
    "sliding_window": {"window": 32},
    "s2": {"block_size": 16, "local_blocks": 2, "vert_stride": 4},
    "based": {"window": 32},
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


def accepted_options(fn, options: Dict[str, object]) -> Dict[str, object]:
  """The subset of ``options`` that ``fn`` declares (its named options when undeclared)."""
  takes = family_spec(fn).options
  return {k: v for k, v in options.items() if k in takes}


def preset_options(name: str) -> Dict[str, object]:
  """The ``PRESETS`` entries that family (or variant) ``name`` takes; {} if unknown."""
  from attnjax.layers import registry  # pylint: disable=g-import-not-at-top
  base = VARIANTS.get(name, (name, {}))[0]
  fn = registry.list_families().get(base)
  return {} if fn is None else accepted_options(fn, PRESETS.get(base, {}))


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


class Layer(NamedTuple):
  """One layer's attention: the registered family and its options, with their origins."""
  family: str                  # registered family name
  name: str                    # as configured: the family or a variant of it
  options: Dict[str, Any]
  sources: Dict[str, str]      # option -> the config field (or preset) that set it
  field: str                   # the config field that chose ``name``


def _family_field(model_cfg, name: str) -> str:
  if model_cfg.get("layer_attention"):
    return "config.model.layer_attention"
  if name != str(model_cfg.attention):
    return "config.model.dense_attention"
  return "config.model.attention"


def _check_family_options(family_options: Dict[str, Any]) -> None:
  names = available()
  for key in family_options:
    if key not in names:
      raise ValueError(
          f"config.model.family_options.{key}: unknown attention family {key!r}; available: "
          f"{names}.")


def _option_origins(model_cfg, fn, base: str, name: str, use_presets: bool,
                   family_options: Dict[str, Any], attention_options: Dict[str, Any]
                   ) -> List[Tuple[Dict[str, Any], str]]:
  """(options, origin template) pairs of one layer, lowest priority first; ``{}`` is the key."""
  origins = []
  if use_presets:
    origins.append((accepted_options(fn, PRESETS.get(base, {})),
                    f"the {base!r} preset {{}} of experiments.families.PRESETS "
                    "(config.model.use_presets=False turns presets off)"))
  origins.append((VARIANTS.get(name, (name, {}))[1],
                  f"the {{}} of variant {name!r} (experiments.families.VARIANTS)"))
  for key in dict.fromkeys((base, name)):
    origins.append((_to_dict(family_options.get(key)),
                    f"config.model.family_options.{key}.{{}}"))
  if name == str(model_cfg.attention):
    origins.append((attention_options, "config.model.attention_options.{}"))
  return origins


def resolve_layers(model_cfg) -> List[Layer]:
  """Each layer's :class:`Layer`; ValueError naming the config field of a bad family name.

  Raises:
    ValueError: a name (or a ``family_options`` key) is neither a registered
      family nor a variant.
  """
  from attnjax.layers import registry  # pylint: disable=g-import-not-at-top
  fams = registry.list_families()
  family_options = _to_dict(model_cfg.get("family_options"))
  attention_options = _to_dict(model_cfg.get("attention_options"))
  use_presets = bool(model_cfg.get("use_presets", True))
  out = []
  for i, name in enumerate(layer_family_names(model_cfg)):
    base = VARIANTS.get(name, (name, {}))[0]
    field = _family_field(model_cfg, name)
    if base not in fams:
      raise ValueError(
          f"{field}: unknown attention family {name!r} (layer {i}); available: "
          f"{available()}.")
    opts: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    for values, template in _option_origins(model_cfg, fams[base], base, name, use_presets,
                                            family_options, attention_options):
      for k, v in values.items():
        opts[k], sources[k] = v, template.format(k)
    out.append(Layer(base, name, opts, sources, field))
  _check_family_options(family_options)
  return out


def resolve(model_cfg) -> List[Tuple[str, Dict[str, object]]]:
  """(registered family, options) for each layer; ValueError naming the config field.

  Raises:
    ValueError: a name is neither a registered family nor a variant.
  """
  return [(layer.family, layer.options) for layer in resolve_layers(model_cfg)]


