"""ACMIL: gated attention pooling, stochastic top-K masking, branch diversity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.pooling import ACMILHead, branch_diversity_loss, stochastic_topk_mask


def test_stkim_masks_exactly_floor_k_p_of_the_top_k():
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 40))
  out = stochastic_topk_mask(logits, jax.random.PRNGKey(1), k=10, drop_ratio=0.6)
  masked = np.asarray(out) == -1e9
  assert (masked.sum(-1) == 6).all()
  top10 = np.argsort(-np.asarray(logits), -1)[..., :10]
  for b in range(2):
    for m in range(5):
      assert set(np.nonzero(masked[b, m])[0]) <= set(top10[b, m])
  np.testing.assert_array_equal(stochastic_topk_mask(logits, jax.random.PRNGKey(1), drop_ratio=0.0), logits)
  w = jax.nn.softmax(out, -1)
  assert float(jnp.where(masked, w, 0).max()) < 1e-30
  with pytest.raises(ValueError, match="drop_ratio"):
    stochastic_topk_mask(logits, jax.random.PRNGKey(1), drop_ratio=2.0)


def test_diversity_one_for_identical_zero_for_disjoint():
  same = jnp.tile(jnp.array([[0.5, 0.5, 0.0, 0.0]]), (1, 3, 1))
  np.testing.assert_allclose(branch_diversity_loss(same), 1.0, atol=1e-6)
  disjoint = jnp.array([[[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0.5, 0.5]]])
  np.testing.assert_allclose(branch_diversity_loss(disjoint), 0.0, atol=1e-6)


def test_acmil_head_shapes_eval_deterministic_attention_sums_to_one_and_padding():
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 30, 16))
  mask = jnp.arange(30)[None] < jnp.array([30, 20])[:, None]
  head = ACMILHead(num_classes=3, inner_dim=8, hidden=4)
  params = head.init(jax.random.PRNGKey(3), x, mask=mask)
  a = head.apply(params, x, mask=mask)
  b = head.apply(params, x, mask=mask)
  np.testing.assert_array_equal(a["slide_logits"], b["slide_logits"])
  np.testing.assert_allclose(a["attention"].sum(-1), 1.0, atol=1e-5)
  assert float(a["attention"][1, :, 20:].max()) < 1e-30
  assert a["branch_logits"].shape == (2, 5, 3)
  t = head.apply(params, x, mask=mask, train=True, rngs={"dropout": jax.random.PRNGKey(4)})
  assert int(((t["attention"] < 1e-30) & mask[:, None]).sum()) == 2 * 5 * 6
