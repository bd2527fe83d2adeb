"""MultiHeadAttention's per-call additive bias and its sown attention weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import masks
from attnjax.layers import MultiHeadAttention

B, T, D, N = 2, 8, 16, 2
X = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
# ALiBi: -slope_n * (i - j), one [1, N, T, T] bias for the batch
ALIBI = (-jnp.array([0.5, 0.25])[:, None, None]
         * (jnp.arange(T)[:, None] - jnp.arange(T)[None, :]))[None]
VALID = jnp.arange(T)[None] < jnp.array([[T], [5]])


def _layer(**kw):
  return MultiHeadAttention(num_heads=N, num_kv_heads=1, causal=True, **kw)


PARAMS = _layer().init(jax.random.PRNGKey(1), X[:1, :2])


def _qkv(params, x):
  p = params["params"]
  proj = lambda n: jnp.einsum("btd,dnh->btnh", x, p[n]["kernel"]) + p[n]["bias"]
  return proj("query"), proj("key"), proj("value")


def _out(params, o):
  p = params["params"]["out"]
  return jnp.einsum("btnh,nhd->btd", o, p["kernel"]) + p["bias"]


def test_bias_reaches_dense_and_block_sparse_fast_paths():
  swa = dict(attention="sliding_window", attention_options={"window": 4})

  def run(p, x):
    return (_layer().apply(p, x, bias=ALIBI, mask=VALID),
            _layer(**swa).apply(p, x, bias=ALIBI, input_lengths=jnp.array([T, 5])),
            _layer(**swa, implementation="reference").apply(p, x, bias=ALIBI, mask=VALID))

  dense, swa_fast, swa_ref = jax.jit(run)(PARAMS, X)
  q, k, v = _qkv(PARAMS, X)
  want = _out(PARAMS, attnjax.reference_attention(
      q, k, v, bias=ALIBI, mask=masks.Causal() & masks.SlidingWindow(3, 0)))
  np.testing.assert_allclose(swa_fast[0], want[0], atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(swa_fast[1, :5], swa_ref[1, :5], atol=2e-5, rtol=2e-5)
  want = _out(PARAMS, attnjax.reference_attention(q, k, v, bias=ALIBI, mask=masks.Causal()))
  np.testing.assert_allclose(dense[0], want[0], atol=2e-5, rtol=2e-5)
  assert np.abs(dense[0] - _out(PARAMS, attnjax.reference_attention(
      q, k, v, mask=masks.Causal()))[0]).max() > 1e-3           # the bias changed it


@pytest.mark.parametrize("family", ["na1d", "linear"])
def test_families_without_a_bias_argument_raise(family):
  with pytest.raises(ValueError, match=f"'{family}' takes no additive bias"):
    _layer(attention=family).apply(PARAMS, X, bias=ALIBI)


def test_sown_weights_are_the_dense_reference_and_leave_the_output_alone():
  m = _layer()

  def run(p, x):
    plain = m.apply(p, x, mask=VALID, bias=ALIBI)
    out, state = m.apply(p, x, mask=VALID, bias=ALIBI, sow_weights=True,
                         mutable=["intermediates"])
    return plain, out, state["intermediates"]["attention_weights"][0]

  plain, out, weights = jax.jit(run)(PARAMS, X)
  np.testing.assert_allclose(out, plain, atol=1e-6)
  q, k, v = _qkv(PARAMS, X)
  _, want = attnjax.reference_attention(q, k, v, bias=ALIBI, return_probs=True,
                                        mask=jnp.tril(jnp.ones((T, T), bool)) & VALID[:, None, None])
  assert weights.shape == (B, N, T, T)
  np.testing.assert_allclose(weights, want, atol=1e-6)
  assert np.abs(weights[1, :, :, 5:]).max() == 0.0          # padded keys get no weight


def test_sown_weights_are_taken_before_dropout_and_need_the_dense_family():
  m = _layer(dropout_rate=0.5)
  _, state = m.apply(PARAMS, X, deterministic=False, sow_weights=True,
                     mutable=["intermediates"], rngs={"dropout": jax.random.PRNGKey(2)})
  weights = state["intermediates"]["attention_weights"][0]
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)  # rows still sum to one
  with pytest.raises(ValueError, match="sow_weights=True needs the attention weights.*'na1d'"):
    _layer(attention="na1d").apply(PARAMS, X, sow_weights=True, mutable=["intermediates"])
