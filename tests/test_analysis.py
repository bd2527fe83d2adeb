"""Inference-time edits (VAR, ACT, #20) and head tools (retrieval heads, VHR, ablation)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import analysis as A
from attnjax.core.reference import reference_attention
from attnjax.masks import Causal


def _probs(seed=0, B=1, N=2, T=6, causal=True):
  logits = jax.random.normal(jax.random.PRNGKey(seed), (B, N, T, T)) * 2
  if causal:
    logits = jnp.where(np.tril(np.ones((T, T), bool)), logits, -jnp.inf)
  return jax.nn.softmax(logits, -1)


def test_var_redistribution_oracles():
  p = _probs()
  sink = jnp.array([1, 0, 0, 0, 0, 0], bool)
  img = jnp.array([0, 1, 1, 1, 0, 0], bool)
  out = A.redistribute_attention(p, sink_mask=sink, target_mask=img, p=0.6)
  np.testing.assert_allclose(out.sum(-1), p.sum(-1), atol=1e-6)           # rows keep their sum
  tgt = jnp.where(img, 1.0, 0.0)
  has_tgt = (p * tgt).sum(-1) > 0  # row 0 sees no image token: left unchanged
  np.testing.assert_allclose(out[..., 0], jnp.where(has_tgt, 0.6, 1.0) * p[..., 0], atol=1e-7)
  gained = ((out - p) * tgt).sum(-1)
  budget = 0.4 * p[..., 0]
  np.testing.assert_allclose(np.where(has_tgt, gained, budget), budget, atol=1e-6)  # exactly B moved
  np.testing.assert_allclose(A.redistribute_attention(p, sink_mask=sink, target_mask=img, p=1.0), p, atol=1e-7)
  rows = A.image_centric_rows(p, img, sink, rho=0.5, min_mass=0.2)
  assert rows.shape == (1, 2, 6) and rows.dtype == bool
  with pytest.raises(ValueError, match="p must be in"):
    A.redistribute_attention(p, sink_mask=sink, target_mask=img, p=1.5)


def test_var_sink_detector_thresholds_rms_normalised_dims():
  h = jnp.ones((1, 3, 8)).at[0, 1, 5].set(1000.0)
  np.testing.assert_array_equal(A.find_sink_tokens(h, [5], tau=2.0), [[False, True, False]])


def test_act_oracles_on_planted_mid_sequence_sink():
  T = 8
  logits = jax.random.normal(jax.random.PRNGKey(1), (1, 1, T, T))
  logits = logits.at[..., 0].add(3.0).at[..., 4].add(4.0)
  p = jax.nn.softmax(jnp.where(np.tril(np.ones((T, T), bool)), logits, -jnp.inf), -1)
  sinks = A.find_hidden_sinks(p, threshold=0.1)
  assert bool(sinks[0, 0, 4]) and not bool(sinks[0, 0, 0])  # BOS sink kept, mid sink found
  out = A.act_calibrate(p, threshold=0.1, beta=0.4)
  np.testing.assert_allclose(out.sum(-1), p.sum(-1), atol=1e-6)
  np.testing.assert_allclose(out[..., 5:, 4], 0.4 * p[..., 5:, 4], atol=1e-7)
  np.testing.assert_allclose(out[..., 0, :], p[..., 0, :])
  np.testing.assert_allclose(A.act_calibrate(p, beta=1.0), p, atol=1e-7)
  np.testing.assert_allclose(A.act_calibrate(p, threshold=10.0), p, atol=1e-7)  # no sink -> identity


def test_boost_is_identity_at_zero_and_monotone_through_hooked_attention():
  k = jax.random.split(jax.random.PRNGKey(2), 3)
  q, kk, v = (jax.random.normal(x, (1, 5, 2, 4)) for x in k)
  sel = jnp.array([0, 1, 0, 1, 0], bool)
  masses = []
  for alpha in (0.0, 1.0, 2.0):
    hook = lambda l, a=alpha: A.boost_token_attention(l, sel, jnp.array([1.0, 0.5]), alpha=a)
    out, probs = reference_attention(q, kk, v, mask=Causal(), logits_hook=hook, return_probs=True)
    masses.append(float(jnp.where(sel, probs, 0).sum()))
    if alpha == 0.0:
      np.testing.assert_allclose(out, reference_attention(q, kk, v, mask=Causal()), atol=1e-6)
  assert masses[0] < masses[1] < masses[2]
  edited = A.hooked_attention(q, kk, v, mask=Causal(), head_out_hook=lambda o: A.scale_heads(o, jnp.array([2.0, 1.0])))
  base = reference_attention(q, kk, v, mask=Causal())
  np.testing.assert_allclose(edited[:, :, 0], 2 * base[:, :, 0], atol=1e-6)
  np.testing.assert_allclose(edited[:, :, 1], base[:, :, 1], atol=1e-6)


def test_retrieval_score_counts_only_copies_from_the_needle():
  T = 10
  ids = jnp.arange(T) + 100
  probs = jnp.zeros((2, 3, T)).at[0, 1, 6].set(1.0).at[1, 2, 2].set(1.0).at[0, 0, 7].set(1.0)
  score = A.retrieval_score_step(probs, gen_token=106, input_ids=ids, needle_span=(5, 9))
  expected = np.zeros((2, 3))
  expected[0, 1] = 0.25
  np.testing.assert_allclose(score, expected)
  total = sum(A.retrieval_score_step(jnp.zeros((1, 1, T)).at[0, 0, j].set(1.0), 100 + j, ids, (5, 9))
              for j in range(5, 9))
  np.testing.assert_allclose(total, [[1.0]])  # a perfect copy head scores 1 after |needle| steps


def test_top1_index_matches_argmax_of_probs():
  k = jax.random.split(jax.random.PRNGKey(3), 2)
  q = jax.random.normal(k[0], (2, 4, 8))
  key = jax.random.normal(k[1], (2, 9, 2, 8))
  idx = A.top1_attention_index(q, key)
  logits = jnp.einsum("bnh,bsnh->bns", q, jnp.repeat(key, 2, 2))
  np.testing.assert_array_equal(idx, jnp.argmax(logits, -1))


def test_head_tools():
  o = jnp.ones((1, 2, 3, 4))
  np.testing.assert_allclose(A.apply_head_mask(o, jnp.array([1, 0, 1]))[:, :, 1], 0)
  np.testing.assert_allclose(A.apply_head_mask(o, jnp.array([1, 0, 1]), replacement=5.0)[:, :, 1], 5)
  assert float(A.head_divergence(o, o).max()) == 0.0
  np.testing.assert_array_equal(A.select_top_heads(jnp.array([[0.1, 0.9], [0.5, 0.2]]), 0.5),
                                [[False, True], [True, False]])
  with pytest.raises(ValueError, match="head_mask"):
    A.apply_head_mask(o, jnp.ones(4))


def test_sink_metrics_uniform_attention_gives_one_over_n():
  T = 5
  p = jnp.full((1, 2, T, T), 1.0 / T)
  m = A.sink_metrics(p, value=jnp.ones((1, T, 1, 3)), residual=jnp.ones((1, T, 4)))
  np.testing.assert_allclose(m["sink_mass"], [0.2, 0.2], atol=1e-7)
  np.testing.assert_allclose(m["value_norm_ratio"], [1.0], atol=1e-6)


def test_rope_shift_deviation_small_in_float32_and_growing_in_bfloat16():
  k = jax.random.split(jax.random.PRNGKey(9), 2)
  q, kk = jax.random.normal(k[0], (4, 64)), jax.random.normal(k[1], (4, 64))
  offsets = [0, 1024, 65536]
  f32 = A.rope_shift_deviation(q, kk, offsets=offsets, dtype=jnp.float32)
  bf16 = A.rope_shift_deviation(q, kk, offsets=offsets, dtype=jnp.bfloat16)
  assert float(f32[0]) == 0.0 and float(bf16[0]) == 0.0
  assert float(f32.max()) < 5e-3  # float32 angle rounding only
  assert float(bf16[2]) > 10 * float(f32[2]) and float(bf16[2]) > float(bf16[1]) > 0
