"""The dense oracle on rows that see no key: zeros forward, finite gradients; NaN still propagates."""
import jax
import jax.numpy as jnp
import numpy as np

import attnjax
from attnjax import masks


def _inputs():
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 2, 16))
  k = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 2, 16))
  return q, k


def test_rows_removed_by_a_minus_inf_bias_have_finite_gradients_equal_to_xla():
  q, k = _inputs()
  bias = jnp.zeros((1, 1, 8, 8)).at[:, :, 2, :].set(-jnp.inf)
  grads = {}
  for impl in ("reference", "xla"):
    loss = lambda q, k, v, b, impl=impl: jnp.sum(
        jnp.sin(attnjax.attention(q, k, v, bias=b, implementation=impl)))
    grads[impl] = jax.grad(loss, (0, 1, 2, 3))(q, k, q, bias)
  for got in grads["reference"]:
    assert np.all(np.isfinite(np.asarray(got)))
  for got, want in zip(grads["reference"][:3], grads["xla"][:3]):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  out = attnjax.attention(q, k, q, bias=bias, implementation="reference")
  assert np.all(np.asarray(out[0, 2]) == 0.0)


def test_rows_with_no_visible_key_have_zero_gradient_and_minus_inf_lse():
  q, k = _inputs()
  mask = jnp.ones((1, 1, 8, 8), bool).at[:, :, 5, :].set(False)
  f = lambda q, k: attnjax.attention(q, k, k, mask=mask, return_lse=True,
                                     implementation="reference")
  out, lse = f(q, k)
  assert np.all(np.asarray(lse[0, 5]) == -np.inf) and np.all(np.asarray(out[0, 5]) == 0)
  dq, dk = jax.grad(lambda q, k: jnp.sum(f(q, k)[0]) + jnp.sum(
      jnp.where(jnp.isfinite(f(q, k)[1]), f(q, k)[1], 0.0)), (0, 1))(q, k)
  assert np.all(np.isfinite(np.asarray(dq))) and np.all(np.isfinite(np.asarray(dk)))
  assert np.all(np.asarray(dq[0, 5]) == 0.0)


def test_a_nan_key_still_makes_the_rows_that_see_it_nan():
  q, k = _inputs()
  k = k.at[0, 3, 0, 0].set(jnp.nan)
  out = attnjax.attention(q, k, q, mask=masks.Causal(), implementation="reference")
  nan_rows = np.isnan(np.asarray(out[0, :, 0])).any(-1)
  np.testing.assert_array_equal(nan_rows, np.arange(8) >= 3)
