"""Inference-time edits (VAR, ACT, #20) and head tools (retrieval heads, VHR, ablation)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import analysis as A
from attnjax.core.reference import reference_attention
from attnjax.masks import Causal


def _normal(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _probs(seed=0, B=1, N=2, T=6, causal=True):
  """NumPy softmax probabilities (no device compile to build them)."""
  logits = _normal(seed, (B, N, T, T)) * 2
  if causal:
    logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def test_var_redistribution_oracles():
  p = _probs()
  sink = np.array([1, 0, 0, 0, 0, 0], bool)
  img = np.array([0, 1, 1, 1, 0, 0], bool)
  out, out1, rows = map(np.asarray, jax.jit(lambda p: (
      A.redistribute_attention(p, sink_mask=sink, target_mask=img, p=0.6),
      A.redistribute_attention(p, sink_mask=sink, target_mask=img, p=1.0),
      A.image_centric_rows(p, img, sink, rho=0.5, min_mass=0.2)))(p))
  np.testing.assert_allclose(out.sum(-1), p.sum(-1), atol=1e-6)           # rows keep their sum
  tgt = np.where(img, 1.0, 0.0)
  has_tgt = (p * tgt).sum(-1) > 0  # row 0 sees no image token: left unchanged
  np.testing.assert_allclose(out[..., 0], np.where(has_tgt, 0.6, 1.0) * p[..., 0], atol=1e-7)
  gained = ((out - p) * tgt).sum(-1)
  budget = 0.4 * p[..., 0]
  np.testing.assert_allclose(np.where(has_tgt, gained, budget), budget, atol=1e-6)  # exactly B moved
  np.testing.assert_allclose(out1, p, atol=1e-7)
  assert rows.shape == (1, 2, 6) and rows.dtype == bool
  with pytest.raises(ValueError, match="p must be in"):
    A.redistribute_attention(p, sink_mask=sink, target_mask=img, p=1.5)


def test_var_sink_detector_thresholds_rms_normalised_dims():
  h = np.ones((1, 3, 8), np.float32)
  h[0, 1, 5] = 1000.0
  np.testing.assert_array_equal(jax.jit(lambda h: A.find_sink_tokens(h, [5], tau=2.0))(h),
                                [[False, True, False]])


def test_act_oracles_on_planted_mid_sequence_sink():
  T = 8
  logits = _normal(1, (1, 1, T, T))
  logits[..., 0] += 3.0
  logits[..., 4] += 4.0

  def run(logits):
    p = jax.nn.softmax(jnp.where(np.tril(np.ones((T, T), bool)), logits, -jnp.inf), -1)
    return (p, A.find_hidden_sinks(p, threshold=0.1), A.act_calibrate(p, threshold=0.1, beta=0.4),
            A.act_calibrate(p, beta=1.0), A.act_calibrate(p, threshold=10.0))
  p, sinks, out, beta1, high = map(np.asarray, jax.jit(run)(logits))
  assert bool(sinks[0, 0, 4]) and not bool(sinks[0, 0, 0])  # BOS sink kept, mid sink found
  np.testing.assert_allclose(out.sum(-1), p.sum(-1), atol=1e-6)
  np.testing.assert_allclose(out[..., 5:, 4], 0.4 * p[..., 5:, 4], atol=1e-7)
  np.testing.assert_allclose(out[..., 0, :], p[..., 0, :])
  np.testing.assert_allclose(beta1, p, atol=1e-7)
  np.testing.assert_allclose(high, p, atol=1e-7)  # no sink -> identity


def test_boost_is_identity_at_zero_and_monotone_through_hooked_attention():
  q, kk, v = (_normal(s, (1, 5, 2, 4)) for s in (2, 3, 4))
  sel = np.array([0, 1, 0, 1, 0], bool)

  def run(q, kk, v):
    boosted = []
    for alpha in (0.0, 1.0, 2.0):
      hook = lambda l, a=alpha: A.boost_token_attention(l, sel, jnp.array([1.0, 0.5]), alpha=a)
      boosted.append(reference_attention(q, kk, v, mask=Causal(), logits_hook=hook,
                                         return_probs=True))
    edited = A.hooked_attention(q, kk, v, mask=Causal(),
                                head_out_hook=lambda o: A.scale_heads(o, jnp.array([2.0, 1.0])))
    return boosted, edited, reference_attention(q, kk, v, mask=Causal())
  boosted, edited, base = jax.jit(run)(q, kk, v)
  masses = [float(np.where(sel, np.asarray(probs), 0).sum()) for _, probs in boosted]
  np.testing.assert_allclose(boosted[0][0], base, atol=1e-6)  # alpha = 0: identity
  assert masses[0] < masses[1] < masses[2]
  np.testing.assert_allclose(edited[:, :, 0], 2 * base[:, :, 0], atol=1e-6)
  np.testing.assert_allclose(edited[:, :, 1], base[:, :, 1], atol=1e-6)


def test_retrieval_score_counts_only_copies_from_the_needle():
  T = 10
  ids = np.arange(T, dtype=np.int32) + 100
  probs = np.zeros((2, 3, T), np.float32)
  probs[0, 1, 6] = probs[1, 2, 2] = probs[0, 0, 7] = 1.0
  one_hot = np.eye(T, dtype=np.float32)[5:9, None, None]  # [4, 1, 1, T]: attends to key j
  score, total = jax.jit(lambda probs, one_hot: (
      A.retrieval_score_step(probs, gen_token=106, input_ids=ids, needle_span=(5, 9)),
      sum(A.retrieval_score_step(one_hot[i], 100 + j, ids, (5, 9))
          for i, j in enumerate(range(5, 9)))))(probs, one_hot)
  expected = np.zeros((2, 3))
  expected[0, 1] = 0.25
  np.testing.assert_allclose(score, expected)
  np.testing.assert_allclose(total, [[1.0]])  # a perfect copy head scores 1 after |needle| steps


def test_top1_index_matches_argmax_of_probs():
  q = _normal(3, (2, 4, 8))
  key = _normal(4, (2, 9, 2, 8))
  idx = jax.jit(A.top1_attention_index)(q, key)
  logits = np.einsum("bnh,bsnh->bns", q, np.repeat(key, 2, 2))
  np.testing.assert_array_equal(idx, np.argmax(logits, -1))


def test_head_tools():
  o = np.ones((1, 2, 3, 4), np.float32)
  masked, replaced, div, top = jax.jit(lambda o: (
      A.apply_head_mask(o, jnp.array([1, 0, 1])),
      A.apply_head_mask(o, jnp.array([1, 0, 1]), replacement=5.0), A.head_divergence(o, o),
      A.select_top_heads(jnp.array([[0.1, 0.9], [0.5, 0.2]]), 0.5)))(o)
  np.testing.assert_allclose(masked[:, :, 1], 0)
  np.testing.assert_allclose(replaced[:, :, 1], 5)
  assert float(np.max(div)) == 0.0
  np.testing.assert_array_equal(top, [[False, True], [True, False]])
  with pytest.raises(ValueError, match="head_mask"):
    A.apply_head_mask(o, np.ones(4, np.float32))


def test_sink_metrics_uniform_attention_gives_one_over_n():
  T = 5
  p = np.full((1, 2, T, T), 1.0 / T, np.float32)
  m = jax.jit(lambda p: A.sink_metrics(p, value=jnp.ones((1, T, 1, 3)),
                                       residual=jnp.ones((1, T, 4))))(p)
  np.testing.assert_allclose(m["sink_mass"], [0.2, 0.2], atol=1e-7)
  np.testing.assert_allclose(m["value_norm_ratio"], [1.0], atol=1e-6)


def test_rope_shift_deviation_small_in_float32_and_growing_in_bfloat16():
  q, kk = _normal(9, (4, 64)), _normal(10, (4, 64))
  offsets = [0, 1024, 65536]
  f32, bf16 = map(np.asarray, jax.jit(lambda q, kk: [
      A.rope_shift_deviation(q, kk, offsets=offsets, dtype=dt)
      for dt in (jnp.float32, jnp.bfloat16)])(q, kk))
  assert float(f32[0]) == 0.0 and float(bf16[0]) == 0.0
  assert float(f32.max()) < 5e-3  # float32 angle rounding only
  assert float(bf16[2]) > 10 * float(f32[2]) and float(bf16[2]) > float(bf16[1]) > 0
