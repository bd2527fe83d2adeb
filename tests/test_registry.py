"""The family registry: one declaration per family, option checks, user families, naming table."""
from __future__ import annotations

import inspect
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import block_sparse, dynamic, linear, neighborhood
from attnjax.core import registry as core
from attnjax.layers import registry
from attnjax.layers.options import option_names
from experiments import families as experiment_families

NAMING = pathlib.Path(__file__).resolve().parents[1] / "docs" / "naming.md"
ENGINES = {"block_sparse": block_sparse, "linear": linear, "neighborhood": neighborhood,
           "dynamic": dynamic}


def _declared():
  registry.list_families()   # imports the engines
  return core.declared()


def _qkv(t=8, s=8):
  q = jnp.ones((1, t, 2, 4), jnp.float32)
  k = v = jnp.ones((1, s, 2, 4), jnp.float32)
  return q, k, v


def test_every_family_has_one_declaration():
  specs = _declared()
  listed = registry.list_families()
  engine = {n: f for pkg in ENGINES.values() for n, f in pkg.FAMILIES.items()}
  assert set(specs) == set(engine) | {"dense"}
  for name, spec in specs.items():
    assert name == spec.name or name in spec.aliases
    assert listed[name] is spec.fn is registry.get_family(name)
    assert registry.family_spec(name) is spec
    assert spec.padding in core.PADDING_ROUTES + (None,)
    assert getattr(spec.fn, "key_padding", None) == spec.padding
    assert spec.fn.supports_kv_cache == spec.supports_kv_cache
    # the signature is the declaration: every option by name, nothing forwarded unseen
    params = inspect.signature(spec.fn).parameters
    assert not any(p.kind is p.VAR_KEYWORD for p in params.values()), name
    assert option_names(spec.fn) == (list(spec.options), True)
  # each family is declared in exactly one module (aliases share the declaration)
  modules = {}
  for spec in specs.values():
    modules.setdefault(spec.name, set()).add(spec.module)
  assert all(len(m) == 1 for m in modules.values())
  assert specs["longlora"] is specs["shifted_group"]


@pytest.mark.parametrize("name", ["dense", "sliding_window", "s2", "linear", "based", "na1d",
                                  "hip", "bi_level_routing"])
def test_unknown_option_raises_naming_it(name):
  fn = registry.get_family(name)
  with pytest.raises(ValueError) as err:
    fn(*_qkv(), causal=True, windw=3)
  text = str(err.value)
  assert f"attention family {name!r} has no option 'windw'" in text
  for option in registry.family_spec(name).options:
    assert option in text.split("it accepts", 1)[1]


def test_declaration_errors():
  def forwards(query, key, value, *, causal, q_positions=None, k_positions=None,
               segment_ids=None, **kw):
    return query
  with pytest.raises(ValueError, match="declare the options it forwards"):
    core.declare("x", forwards)
  with pytest.raises(ValueError, match="does not take"):
    core.declare("x", lambda query, key, value, *, causal, q_positions=None, k_positions=None,
                 segment_ids=None: query, options=("window",))
  with pytest.raises(ValueError, match="padding must be one of"):
    core.declare("x", forwards, options=("a",), padding="lengths")
  with pytest.raises(ValueError, match="declared twice"):
    core.family("sliding_window", options=("a",))(forwards)
  assert "x" not in core.declared()


def test_user_registered_family():
  def doubled(query, key, value, *, causal, q_positions=None, k_positions=None,
              segment_ids=None, factor=1.0):
    return factor * registry.dense_family(query, key, value, causal=causal,
                                          q_positions=q_positions, k_positions=k_positions)

  registry.register_family("test_registry_plain", doubled)
  assert registry.get_family("test_registry_plain") is doubled
  assert registry.family_spec("test_registry_plain").options == ("factor",)
  registry.register_family("test_registry_declared", doubled, supports_kv_cache=True,
                           padding="segment_ids")
  fn = registry.get_family("test_registry_declared")
  assert fn.supports_kv_cache and fn.key_padding == "segment_ids"
  with pytest.raises(ValueError, match="'test_registry_declared' has no option 'factr'"):
    fn(*_qkv(), causal=True, factr=2.0)
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (1, 8, 2, 4)) for i in range(3))
  got, want = jax.jit(lambda q, k, v: (
      fn(q, k, v, causal=True, factor=2.0),
      registry.get_family("dense")(q, k, v, causal=True)))(q, k, v)
  np.testing.assert_allclose(got, 2 * want, rtol=1e-5, atol=1e-5)


def _documented_options():
  names = set()
  for line in NAMING.read_text().split("## Where a function")[0].splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if line.startswith("|") and len(cells) == 4:
      names.update(re.findall(r"`(\w+)`", cells[1]))
  return names


def test_naming_table_lists_every_declared_option():
  documented = _documented_options()
  declared = {o for spec in _declared().values() for o in spec.options}
  assert declared - documented == set(), "options missing from docs/naming.md"
  assert {"causal", "q_positions", "k_positions", "segment_ids"} <= documented


def test_presets_and_variants_use_declared_options():
  """Nothing a preset or variant sets is dropped: every key is a declared option."""
  specs = _declared()
  for name, preset in experiment_families.PRESETS.items():
    assert set(preset) <= set(specs[name].options), name
    assert experiment_families.preset_options(name) == preset
  for name, (base, options) in experiment_families.VARIANTS.items():
    assert set(options) <= set(specs[base].options), name
