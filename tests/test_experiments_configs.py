"""Every config file loads, with and without a family argument, and passes the start-up checks."""
import importlib.util
import os

import pytest

from experiments import config_checks, families
from experiments.tasks import make_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("lm_stdlib", "mqar", "passkey", "digits", "listops", "bigram_backcopy")


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name + ".py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", ["", "dense", "dense+dense1"])
def test_config_is_valid(name, arg):
  c = _load(name).get_config(arg)
  config_checks.check_config(c)
  task = make_task(c.task, c.seed)
  assert (task.kind == "lm") == (c.model.kind == "decoder_lm")
  layers = families.resolve(c.model)
  assert len(layers) == c.model.num_layers
  if arg == "dense+dense1":
    assert c.model.dense_layers == (0,)


def test_schedules_and_variants():
  c = _load("lm_stdlib").get_config("dense")
  c.model.num_layers = 4
  c.model.dense_every = 2
  c.model.dense_attention = "dense"
  assert families.layer_family_names(c.model) == ["dense"] * 4
  c.model.layer_attention = ("dense", "dense", "dense", "dense")
  assert [f for f, _ in families.resolve(c.model)] == ["dense"] * 4
  c.model.layer_attention = ("dense", "dense", "dense", "nope")
  with pytest.raises(ValueError, match=r"config.model.layer_attention: unknown attention family 'nope' \(layer 3\)"):
    families.resolve(c.model)


def test_presets_only_fill_options_a_family_names():
  def fam(q, k, v, *, causal, window=8, **kw):
    return q
  assert families.accepted_options(fam, {"window": 32, "window_size": 32}) == {"window": 32}
