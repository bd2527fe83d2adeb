"""Flax layers of the linear engine: Agent Attention and Titans (MAG, MAL)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax.linear as L


@pytest.mark.parametrize("make", [
    lambda: L.AgentAttention(2, num_agents=4, hw=(4, 4)),
    lambda: L.AgentAttention(2, num_agents=4),
    lambda: L.TitansMAG(2, window=(3, 0), chunk_size=4),
    lambda: L.TitansMAL(2, window=(3, 0), chunk_size=4)])
def test_layer_runs_and_differentiates(make):
  layer = make()
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 8))
  params = layer.init(jax.random.PRNGKey(1), x)
  out = layer.apply(params, x)
  assert out.shape == x.shape and np.all(np.isfinite(out))
  g = jax.grad(lambda p: layer.apply(p, x).sum())(params)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(g))


def test_titans_layers_are_causal():
  layer = L.TitansMAL(2, window=(3, 0), chunk_size=4)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 12, 8))
  params = layer.init(jax.random.PRNGKey(1), x)
  y = layer.apply(params, x)
  y2 = layer.apply(params, x.at[:, 7:].add(1.0))
  np.testing.assert_allclose(y[:, :7], y2[:, :7], rtol=1e-5, atol=1e-5)
