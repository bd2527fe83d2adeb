"""A padding mask reaches every family the layer offers it to, on the fast paths."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.layers import MultiHeadAttention

FAMILIES = {
    "dense": None,
    "sliding_window": {"window": 16},
    "longformer": None,
    "bigbird": None,
    "s2": {"block_size": 16, "local_blocks": 1, "vert_stride": 2},
    "streaming": None,
    "block_local": {"block_size": 16},
}


def _setup(family, impl=None):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 32))
  valid = jnp.arange(64)[None] < jnp.array([[40], [64]])
  make = lambda impl: MultiHeadAttention(num_heads=4, num_kv_heads=2, causal=True,
                                         attention=family, attention_options=FAMILIES[family],
                                         implementation=impl)
  params = make(None).init(jax.random.PRNGKey(1), x)
  return x, valid, params, make


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_key_padding_mask_matches_the_reference_and_ignores_padded_tokens(family):
  x, valid, params, make = _setup(family)
  fast = jax.jit(lambda p, x, m: make(None).apply(p, x, mask=m))
  got = fast(params, x, valid)
  want = make("reference").apply(params, x, mask=valid)
  np.testing.assert_allclose(got, want, atol=3e-5, rtol=3e-5)
  # Flax's [B, 1, 1, S] form is the same mask; padded tokens do not reach real rows
  np.testing.assert_allclose(fast(params, x, valid[:, None, None]), got, atol=1e-6)
  moved = fast(params, x.at[0, 40:].set(7.0), valid)
  np.testing.assert_allclose(moved[0, :40], got[0, :40], atol=1e-5)
  grads = jax.grad(lambda p: jnp.sum(fast(p, x, valid) ** 2))(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))


def test_a_mask_with_a_query_axis_needs_the_dense_family():
  x, valid, params, make = _setup("sliding_window")
  mask = valid[:, None, None, :] & jnp.tril(jnp.ones((64, 64), bool))[None, None]
  with pytest.raises(ValueError, match=r"key-padding mask of shape \[B, S\].*'dense'"):
    make(None).apply(params, x, mask=mask)


def test_families_without_padding_support_say_so():
  x = jnp.zeros((1, 32, 16))
  layer = MultiHeadAttention(num_heads=2, causal=True, attention="linear")
  params = layer.init(jax.random.PRNGKey(0), x)
  with pytest.raises(NotImplementedError, match="'linear' does not take a padding mask"):
    layer.apply(params, x, mask=jnp.ones((1, 32), bool))
