"""Flax layers of the linear engine: Agent Attention, Titans (MAC, MAG, MAL), TNL."""
import jax
import numpy as np
import pytest

import attnjax.linear as L


def test_agent_layer_uses_its_bias():
  layer = L.AgentAttention(2, num_agents=4, hw=(4, 4))
  x = np.random.default_rng(0).standard_normal((1, 16, 8)).astype(np.float32)

  def run(x):
    params = layer.init(jax.random.PRNGKey(1), x)
    bumped = jax.tree_util.tree_map_with_path(
        lambda path, p: p + 0.1 * np.arange(p.size).reshape(p.shape)
        if "ak_pool_bias" in jax.tree_util.keystr(path) else p, params)
    return layer.apply(params, x), layer.apply(bumped, x)
  out, out_bumped = jax.jit(run)(x)
  assert out.shape == x.shape and np.all(np.isfinite(out))
  assert not np.allclose(out_bumped, out)


@pytest.mark.parametrize("make", [
    lambda: L.TitansMAG(2, window=(3, 0), chunk_size=4),
    lambda: L.TitansMAL(2, window=(3, 0), chunk_size=4),
    lambda: L.TitansMAC(2, segment=4, num_persistent=2),
    lambda: L.TNLTokenMixer(2, layer_idx=1, num_layers=2, chunk_size=4)])
def test_causal_layers_are_causal(make):
  layer = make()
  x = np.random.default_rng(0).standard_normal((1, 10, 8)).astype(np.float32)

  def run(x):
    params = layer.init(jax.random.PRNGKey(1), x)
    return layer.apply(params, x), layer.apply(params, x.at[:, 6:].add(1.0))
  y, y2 = map(np.asarray, jax.jit(run)(x))
  assert y.shape == x.shape and np.all(np.isfinite(y))
  np.testing.assert_allclose(y[:, :6], y2[:, :6], rtol=1e-5, atol=1e-5)
  assert not np.allclose(y[:, 6:], y2[:, 6:])
