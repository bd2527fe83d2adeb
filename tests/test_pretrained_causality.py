"""Every attention family of experiments.pretrained_eval's table is causal: no output moves when
later queries, keys or values change (attnjax.analysis.causality), so perplexity and passkey
scores cannot read the tokens they predict."""
import jax
import pytest

from attnjax.analysis.causality import check_causal_cross, check_causal_self
from attnjax.layers import registry
from experiments import pretrained_methods as pm
from experiments.pretrained_families import method_specs, register_local_families

T = 256
SPECS = [s for s in method_specs(128, T, 4)]


@pytest.mark.parametrize("name,family,options", [(s[0], s[1], s[2]) for s in SPECS],
                         ids=[s[0].split("(")[0] for s in SPECS])
def test_table_family_is_causal(name, family, options):
  register_local_families()
  pm.register_families()
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(ks[0], (1, T, 4, 16))
  k = jax.random.normal(ks[1], (1, T, 2, 16))
  v = jax.random.normal(ks[2], (1, T, 2, 16))
  fam = registry.get_family(family)
  fn = jax.jit(lambda q, k, v: fam(q, k, v, causal=True, **options))
  splits = [37, 100, 201]            # inside query blocks and chunks, not on their edges
  for check in (check_causal_self, check_causal_cross):
    res = check(fn, q, k, v, splits=splits)
    assert res.ok, (name, check.__name__, res)
