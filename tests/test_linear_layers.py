"""Flax layers of the linear engine: Agent Attention and Titans (MAC, MAG, MAL)."""
import jax
import numpy as np
import pytest

import attnjax.linear as L


def test_agent_layer_with_bias_differentiates():
  layer = L.AgentAttention(2, num_agents=4, hw=(4, 4))
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 8))
  params = layer.init(jax.random.PRNGKey(1), x)
  out = layer.apply(params, x)
  assert out.shape == x.shape and np.all(np.isfinite(out))
  g = jax.grad(lambda p: layer.apply(p, x).sum())(params)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(g))
  assert np.any(np.asarray(g["params"]["ak_pool_bias"]) != 0)


@pytest.mark.parametrize("make", [
    lambda: L.TitansMAG(2, window=(3, 0), chunk_size=4),
    lambda: L.TitansMAL(2, window=(3, 0), chunk_size=4),
    lambda: L.TitansMAC(2, segment=4, num_persistent=2)])
def test_titans_layers_are_causal(make):
  layer = make()
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 10, 8))
  params = layer.init(jax.random.PRNGKey(1), x)
  y = layer.apply(params, x)
  assert y.shape == x.shape and np.all(np.isfinite(y))
  y2 = layer.apply(params, x.at[:, 6:].add(1.0))
  np.testing.assert_allclose(y[:, :6], y2[:, :6], rtol=1e-5, atol=1e-5)
  assert not np.allclose(y[:, 6:], y2[:, 6:])
