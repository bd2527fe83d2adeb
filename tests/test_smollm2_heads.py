"""The head-analysis experiment's pieces on a tiny random Llama decoder."""
import jax
import jax.numpy as jnp
import numpy as np

from attnjax.models import LlamaConfig, LlamaDecoder
from attnjax.models.common import stack_layers, unstack_layers
from experiments import smollm2_heads as H

CFG = LlamaConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=48, max_position_embeddings=64)


def _model():
  m = LlamaDecoder(CFG)
  params = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  return m, params


def test_unstack_layers_inverts_stack_layers():
  _, params = _model()
  flat = unstack_layers(params)
  assert sorted(k for k in flat if k.startswith("layer_")) == ["layer_0", "layer_1", "layer_2"]
  back = stack_layers(flat, 3)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_probe_returns_the_model_attention_weights_and_residuals():
  m, params = _model()
  ids = np.arange(1, 17, dtype=np.int32)
  logits, probs, values, resid = H.Probe(m, params)(ids)
  np.testing.assert_allclose(logits, m.apply({"params": params}, ids[None])[0], atol=2e-5)
  assert probs.shape == (3, 4, 16, 16) and values.shape == (3, 16, 2, 8)
  assert resid.shape == (3, 16, 32)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  assert np.all(probs[..., np.triu_indices(16, 1)[0], np.triu_indices(16, 1)[1]] == 0)
  # The last layer's residual, normed and tied to the embedding, gives the logits.
  p = params
  h = resid[-1] / np.sqrt(np.mean(resid[-1] ** 2, -1, keepdims=True) + CFG.rms_norm_eps)
  h = h * np.asarray(p["norm"]["scale"])
  np.testing.assert_allclose(h @ np.asarray(p["embed_tokens"]["embedding"]).T, logits,
                             atol=1e-4)


class _Tok:
  class _E:
    def __init__(self, ids):
      self.ids = ids

  def encode(self, text):
    return self._E([ord(c) % 50 for c in text])


def test_needle_prompt_places_needle_and_answer():
  tok = _Tok()
  hay = np.arange(1000) % 7
  ids, (s, e), start, answer = H.needle_prompt(tok, hay, 300, 0.5)
  assert len(ids) == 300
  np.testing.assert_array_equal(ids[s:e], tok.encode(H.NEEDLE).ids)
  np.testing.assert_array_equal(ids[start:], answer)
  np.testing.assert_array_equal(answer, tok.encode(H.ANSWER).ids)


def test_massive_dims_and_comment_text():
  r = np.ones((2, 5, 600), np.float32)
  r[1, 3, 17] = 5000.0      # RMSNorm value of about sqrt(600) = 24.5 > 20
  assert H.massive_dims(r) == [17]
  assert H.massive_dims(np.ones((1, 3, 8), np.float32)) == []
  src = "x = 1  # no\n    # Return the value of the thing.\n# ok\ny = 2\n"
  assert H.comment_text(src) == "Return the value of the thing."
