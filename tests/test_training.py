"""Adversarial training of attention scores (AT/iAT, VAT/iVAT)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.training import adversarial_attention_perturbation, attention_vat_loss


def _model(scores, h, w):
  """Attention pooling classifier: scores [B,T], h [B,T,D] -> logits [B,C]."""
  return jnp.einsum("bt,btd->bd", jax.nn.softmax(scores, -1), h) @ w


def _setup():
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  scores = jax.random.normal(k[0], (4, 6))
  h = jax.random.normal(k[1], (4, 6, 5))
  w = jax.random.normal(k[2], (5, 3))
  y = jnp.array([0, 1, 2, 1])
  def loss(a):
    return -jnp.sum(jax.nn.log_softmax(_model(a, h, w))[jnp.arange(4), y])
  return scores, h, w, loss


@pytest.mark.parametrize("mode", ["at", "iat"])
def test_perturbation_norm_and_zero_epsilon(mode):
  scores, _, _, loss = _setup()
  r = adversarial_attention_perturbation(loss, scores, epsilon=0.5, mode=mode)
  np.testing.assert_allclose(jnp.linalg.norm(r, axis=-1), 0.5, atol=1e-5)
  r0 = adversarial_attention_perturbation(loss, scores, epsilon=0.0, mode=mode)
  np.testing.assert_allclose(loss(scores + r0), loss(scores), rtol=1e-6)


def test_at_direction_beats_random_directions():
  scores, _, _, loss = _setup()
  r = adversarial_attention_perturbation(loss, scores, epsilon=0.05, mode="at")
  rnd = jax.random.normal(jax.random.PRNGKey(5), (16,) + scores.shape)
  rnd = 0.05 * rnd / jnp.linalg.norm(rnd, axis=-1, keepdims=True)
  assert float(loss(scores + r)) > float(jnp.max(jax.vmap(lambda d: loss(scores + d))(rnd)))


def test_mask_keeps_padding_unperturbed_and_bad_mode():
  scores, _, _, loss = _setup()
  mask = jnp.arange(6)[None, :] < jnp.array([6, 4, 5, 3])[:, None]
  r = adversarial_attention_perturbation(loss, scores, epsilon=1.0, mode="iat", mask=mask)
  assert float(jnp.abs(jnp.where(mask, 0, r)).max()) == 0.0
  with pytest.raises(ValueError, match="mode"):
    adversarial_attention_perturbation(loss, scores, epsilon=1.0, mode="fgsm")


@pytest.mark.parametrize("mode", ["vat", "ivat"])
def test_vat_loss_nonnegative_zero_at_zero_eps_and_differentiable(mode):
  scores, h, w, _ = _setup()
  f = lambda a: _model(a, h, w)
  l0 = attention_vat_loss(f, scores, jax.random.PRNGKey(1), epsilon=0.0, mode=mode)
  assert abs(float(l0)) < 1e-6
  l = attention_vat_loss(f, scores, jax.random.PRNGKey(1), epsilon=1.0, mode=mode)
  assert float(l) > 0
  g = jax.grad(lambda a: attention_vat_loss(f, a, jax.random.PRNGKey(1), epsilon=1.0, mode=mode))(scores)
  assert np.all(np.isfinite(g))


def test_head_ablation_patching_and_head_restricted_training():
  import optax
  from attnjax.layers import MultiHeadAttention
  from attnjax.training import head_gradient_mask, mask_updates
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
  layer = MultiHeadAttention(num_heads=4, num_kv_heads=2, causal=True)
  params = layer.init(jax.random.PRNGKey(1), x)
  apply = jax.jit(layer.apply)   # one program per argument structure, not eager op by op
  y, st = jax.jit(functools.partial(layer.apply, mutable=["intermediates"]))(params, x)
  heads = st["intermediates"]["head_outputs"][0]
  np.testing.assert_allclose(apply(params, x, head_mask=jnp.ones(4)), y, atol=1e-6)
  # zeroing head 1 equals deleting its slice of W_o
  p = params["params"]
  w_o = p["out"]["kernel"].at[1].set(0.0)
  manual = jnp.einsum("btnh,nhd->btd", heads, w_o) + p["out"]["bias"]
  np.testing.assert_allclose(apply(params, x, head_mask=jnp.array([1, 0, 1, 1])), manual, atol=1e-5)
  # patching a run's own activations back in is the identity
  np.testing.assert_allclose(apply(params, x, head_mask=jnp.zeros(4), head_replacement=heads), y,
                             atol=1e-5)
  # only heads 0 and 1 (KV head 0) train
  mask = {"params": head_gradient_mask(p, [0, 1], num_heads=4)}
  tx = optax.chain(mask_updates(mask), optax.sgd(0.1))
  grads = jax.jit(jax.grad(lambda prm: jnp.sum(layer.apply(prm, x) ** 2)))(params)
  upd, _ = tx.update(grads, tx.init(params), params)
  u = upd["params"]
  assert float(jnp.abs(u["query"]["kernel"][:, 2:]).max()) == 0.0
  assert float(jnp.abs(u["query"]["kernel"][:, :2]).max()) > 0.0
  assert float(jnp.abs(u["key"]["kernel"][:, 1]).max()) == 0.0
  assert float(jnp.abs(u["out"]["kernel"][2:]).max()) == 0.0 and float(jnp.abs(u["out"]["bias"]).max()) == 0.0
