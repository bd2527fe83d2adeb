"""attnjax.models.generate with unroll_layers=True (layers unrolled, stacked params split once)
decodes the same greedy tokens as the scanned layers, for a padded batch of prompts."""
import jax
import numpy as np

from attnjax import models


def test_generate_unrolled_layers_equals_scanned_layers():
  c = models.LlamaConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4,
                         num_kv_heads=2, head_dim=8, intermediate_size=64,
                         max_position_embeddings=64)
  model = models.LlamaDecoder(c)
  params = model.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))["params"]
  assert "layers" in params                              # stacked: the scanned layout
  prompts = [[3, 9, 4, 1, 7], [5, 2], [8, 8, 1, 6, 2, 9, 11]]
  scanned = np.asarray(models.generate(model, params, prompts, 6))
  unrolled = np.asarray(models.generate(model, params, prompts, 6, unroll_layers=True))
  np.testing.assert_array_equal(unrolled, scanned)
