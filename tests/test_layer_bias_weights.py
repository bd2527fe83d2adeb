"""MultiHeadAttention's per-call additive bias and its sown attention weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax.layers import MultiHeadAttention

B, T, D, N = 2, 8, 16, 2
X = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
# ALiBi: -slope_n * (i - j), one [1, N, T, T] bias for the batch
ALIBI = (-jnp.array([0.5, 0.25])[:, None, None]
         * (jnp.arange(T)[:, None] - jnp.arange(T)[None, :]))[None]
VALID = jnp.arange(T)[None] < jnp.array([[T], [5]])


def _layer(**kw):
  return MultiHeadAttention(num_heads=N, num_kv_heads=1, causal=True, **kw)


PARAMS = jax.jit(_layer().init)(jax.random.PRNGKey(1), X[:1, :2])


def _qkv(params, x):
  p = params["params"]
  proj = lambda n: jnp.einsum("btd,dnh->btnh", x, p[n]["kernel"]) + p[n]["bias"]
  return proj("query"), proj("key"), proj("value")


def _out(params, o):
  p = params["params"]["out"]
  return jnp.einsum("btnh,nhd->btd", o, p["kernel"]) + p["bias"]


def test_bias_reaches_dense_and_block_sparse_fast_paths():
  swa = dict(attention="sliding_window", attention_options={"window": 4})
  causal = jnp.tril(jnp.ones((T, T), bool))

  def run(p, x):
    q, k, v = _qkv(p, x)
    ref = lambda mask, bias: _out(p, attnjax.reference_attention(q, k, v, bias=bias, mask=mask))
    return (_layer().apply(p, x, bias=ALIBI, mask=VALID),
            _layer(**swa).apply(p, x, bias=ALIBI, mask=VALID),
            ref(causal & VALID[:, None, None], ALIBI),
            ref(jnp.triu(causal, -3) & VALID[:, None, None], ALIBI),
            ref(causal & VALID[:, None, None], None))

  dense, swa_fast, dense_ref, swa_ref, unbiased = jax.jit(run)(PARAMS, X)
  for got, want in ((dense, dense_ref), (swa_fast, swa_ref)):
    np.testing.assert_allclose(got[0], want[0], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(got[1, :5], want[1, :5], atol=2e-5, rtol=2e-5)
  assert np.abs(dense[0] - unbiased[0]).max() > 1e-3           # the bias changed it


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
    q, k, v = _qkv(p, x)
    _, want = attnjax.reference_attention(
        q, k, v, bias=ALIBI, return_probs=True,
        mask=jnp.tril(jnp.ones((T, T), bool)) & VALID[:, None, None])
    return plain, out, state["intermediates"]["attention_weights"][0], want

  plain, out, weights, want = jax.jit(run)(PARAMS, X)
  np.testing.assert_allclose(out, plain, atol=1e-6)
  assert weights.shape == (B, N, T, T)
  np.testing.assert_allclose(weights, want, atol=1e-6)
  assert np.abs(weights[1, :, :, 5:]).max() == 0.0          # padded keys get no weight


def test_sown_weights_are_taken_before_dropout_and_need_the_dense_family():
  m = _layer(dropout_rate=0.5)
  _, state = jax.jit(lambda p, x: m.apply(
      p, x, deterministic=False, sow_weights=True, mutable=["intermediates"],
      rngs={"dropout": jax.random.PRNGKey(2)}))(PARAMS, X)
  weights = state["intermediates"]["attention_weights"][0]
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)  # rows still sum to one
  with pytest.raises(ValueError, match="sow_weights=True needs the attention weights.*'na1d'"):
    jax.eval_shape(lambda x: _layer(attention="na1d").apply(PARAMS, x, sow_weights=True,
                                                            mutable=["intermediates"]), X)
