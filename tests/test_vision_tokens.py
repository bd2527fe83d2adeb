"""TAP, ADL, low-rank pooling attention and LSceneLLM-style selection/fusion."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import reference_attention
from attnjax.vision import (LowRankPoolingAttention, TokenAwarePooling, attention_diversification_loss,
                            attention_guided_topk, coarse_fine_attention, dilated_avg_pool,
                            low_rank_pooling_attention, token_aware_avg_pool)

from test_vision_lib import KEY, rnd  # noqa: E402


def test_dilated_pool_matches_numpy_and_saturated_tap_is_identity():
  x = rnd((1, 5, 6, 2), 101)
  xn = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
  want = sum(xn[:, 2 + 2 * i:7 + 2 * i, 2 + 2 * j:8 + 2 * j] for i in (-1, 0, 1) for j in (-1, 0, 1)) / 9
  np.testing.assert_allclose(dilated_avg_pool(x, 2), want, rtol=1e-5, atol=1e-6)
  logits = jnp.zeros((1, 5, 6, 3)).at[..., 0].set(1e4)
  tap = jax.jit(token_aware_avg_pool)
  np.testing.assert_allclose(tap(x, logits), x, rtol=1e-6)
  mix = tap(x, jnp.zeros((1, 5, 6, 2)))
  np.testing.assert_allclose(mix, 0.5 * (x + dilated_avg_pool(x, 1)), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="dilations"):
    token_aware_avg_pool(x, logits, dilations=(0, 1))
  layer = TokenAwarePooling(num_scales=3)
  v = jax.jit(layer.init)(KEY, x)
  y, _ = jax.jit(lambda v, x: layer.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
  assert y.shape == x.shape


def test_adl_one_for_identical_rows_zero_for_orthogonal():
  row = jnp.array([0.5, 0.5, 0.0, 0.0])
  same = jnp.broadcast_to(row, (2, 3, 4, 4))
  adl = jax.jit(attention_diversification_loss, static_argnames="th")
  np.testing.assert_allclose(adl([same, same], th=1.0), 1.0, atol=1e-6)
  # rows concentrated on tokens whose mean mass stays under the threshold -> zero similarity
  p = jnp.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
  np.testing.assert_allclose(adl([p[None]], th=1.5), 0.0, atol=1e-6)
  g = jax.jit(jax.grad(lambda a: attention_diversification_loss([jax.nn.softmax(a, -1)])))(rnd((1, 2, 5, 5), 102))
  assert np.isfinite(np.asarray(g)).all()


def test_low_rank_pooling_columns_sum_to_one_equivariant_and_masked():
  h = rnd((2, 7, 6), 103)
  c = jnp.mean(h, 1)
  U, V, P = rnd((6, 3), 104), rnd((6, 3), 105), rnd((3, 4), 106)
  mask = jnp.arange(7)[None] < jnp.array([7, 4])[:, None]
  lr = jax.jit(lambda h, m: low_rank_pooling_attention(h, c, U, V, P, mask=m))
  M, A = lr(h, mask)
  np.testing.assert_allclose(A.sum(1), 1.0, atol=1e-5)
  assert float(A[1, 4:].max()) == 0.0 and M.shape == (2, 4, 6)
  perm = np.random.default_rng(113).permutation(7)
  M2, A2 = lr(h[:, perm], jnp.ones((2, 7), bool))
  M1, A1 = lr(h, jnp.ones((2, 7), bool))
  np.testing.assert_allclose(A2, A1[:, perm], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(M2, M1, rtol=1e-5, atol=1e-6)
  s = (jax.nn.sigmoid(h @ U) * jax.nn.sigmoid(c @ V)[:, None]) @ P
  np.testing.assert_allclose(A1, jax.nn.softmax(s, axis=1), rtol=1e-5)
  M0, A0 = lr(h, jnp.zeros((2, 7), bool))
  assert float(jnp.abs(M0).max()) == 0.0 and np.isfinite(np.asarray(A0)).all()
  layer = LowRankPoolingAttention(num_heads=2, rank=3)
  v = jax.jit(layer.init)(KEY, h, mask)
  Ml, Al = jax.jit(layer.apply)(v, h, mask)
  assert Ml.shape == (2, 2, 6) and Al.shape == (2, 7, 2)


def test_attention_guided_topk_and_coarse_fine_fusion():
  probs = jax.nn.softmax(rnd((2, 3, 5, 8), 107), -1)
  idx = attention_guided_topk(probs, k=3, query_slice=slice(1, 4))
  want = np.argsort(-np.asarray(probs[:, :, 1:4].mean((1, 2))), axis=-1)[:, :3]
  np.testing.assert_array_equal(idx, want)
  idx_max = attention_guided_topk(probs, k=2, reduce="max")
  np.testing.assert_array_equal(idx_max, np.argsort(-np.asarray(probs.max((1, 2))), -1)[:, :2])
  with pytest.raises(ValueError, match="reduce"):
    attention_guided_topk(probs, k=2, reduce="median")
  q = rnd((2, 3, 2, 4), 108)
  ck, cv = rnd((2, 6, 2, 4), 109), rnd((2, 6, 2, 4), 110)
  fk, fv = rnd((2, 4, 2, 4), 111), rnd((2, 4, 2, 4), 112)
  cf = jax.jit(lambda m: coarse_fine_attention(q, ck, cv, fk, fv, fine_mask=m))
  none = cf(jnp.zeros((2, 4), bool))
  np.testing.assert_allclose(none, jax.jit(reference_attention)(q, ck, cv), rtol=1e-5, atol=1e-6)
  some = cf(jnp.array([[True, False, True, False]] * 2))
  ref = jax.jit(reference_attention)(q, jnp.concatenate([ck, fk[:, ::2]], 1), jnp.concatenate([cv, fv[:, ::2]], 1))
  np.testing.assert_allclose(some, ref, rtol=1e-5, atol=1e-6)
