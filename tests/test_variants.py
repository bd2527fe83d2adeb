"""MoH head mixtures and DiTCtrl KV-sharing."""
import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks
from attnjax.core.reference import reference_attention
from attnjax.variants import (MoHAttention, kv_shared_attention, mask_guided_kv_sharing, moh_balance_loss,
                              moh_gates, token_attention_mask)


def test_moh_routed_gates_have_k_nonzeros_summing_to_k_and_balance_at_uniform():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 6))
  w_r = jax.random.normal(jax.random.PRNGKey(1), (6, 4))
  gates, probs = moh_gates(x, jnp.zeros((6, 2)), w_r, jnp.zeros((6, 2)), shared_heads=2, routed_topk=2)
  routed = gates[..., 2:]  # alpha = 1 for zero balance weights
  assert ((np.asarray(routed) > 0).sum(-1) == 2).all()
  np.testing.assert_allclose(routed.sum(-1), 2.0, atol=1e-5)
  np.testing.assert_allclose(gates[..., :2], 1.0, atol=1e-6)  # shared: 2 * uniform softmax
  uniform = jnp.full((100, 4), 0.25)
  f = jnp.tile(jnp.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]), (50, 1))
  np.testing.assert_allclose(moh_balance_loss(uniform, f), 2.0, atol=1e-6)  # = k at perfect balance


def test_moh_all_shared_with_zero_router_is_standard_mha():
  x = jax.random.normal(jax.random.PRNGKey(2), (1, 5, 8))
  layer = MoHAttention(num_heads=4, head_dim=2, shared_heads=4, routed_topk=0, implementation="reference")
  params = layer.init(jax.random.PRNGKey(3), x)
  out, loss = layer.apply(params, x)
  p = params["params"]
  q, k, v = (jnp.einsum("btd,dnh->btnh", x, p[n]["kernel"]) + p[n]["bias"] for n in ("query", "key", "value"))
  heads = reference_attention(q, k, v, mask=masks.Causal())
  ref = jnp.einsum("btnh,nhd->btd", heads, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(out, ref, atol=1e-5)
  assert float(loss) == 0.0


def _qkv(L=10, seed=4):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  return tuple(jax.random.normal(x, (1, L, 2, 4)) for x in k)


def test_kv_sharing_identity_and_mask_guided_reduces_to_sharing():
  q, k, v = _qkv()
  np.testing.assert_allclose(kv_shared_attention(q, k, v), reference_attention(q, k, v), atol=1e-5)
  ones = jnp.ones((1, 6))
  out = mask_guided_kv_sharing(q, k, v, ones, ones, text_len=4)
  np.testing.assert_allclose(out[:, 4:], kv_shared_attention(q, k, v)[:, 4:], atol=1e-5)


def test_mask_guided_branches_only_use_allowed_values():
  q, k, _ = _qkv()
  v = jnp.zeros((1, 10, 2, 4)).at[:, 4:7].set(1.0)  # foreground source video tokens carry 1
  m_src = jnp.array([[1, 1, 1, 0, 0, 0]], jnp.float32)
  v = v.at[:, :4].set(1.0)  # text keys too
  out = mask_guided_kv_sharing(q, k, v, m_src, jnp.ones((1, 6)), text_len=4)
  np.testing.assert_allclose(out[:, 4:], 1.0, atol=1e-5)  # fg branch: convex combination of 1s


def test_token_attention_mask_picks_high_attention_video_tokens():
  text_len, frames, hw = 2, 2, 3
  L = text_len + frames * hw
  probs = jnp.full((1, 1, L, L), 0.01).at[0, 0, text_len + 1, 0].set(0.9).at[0, 0, text_len + 5, 0].set(0.9)
  m = token_attention_mask(probs, [0], text_len=text_len, frames=frames, thres=0.3)
  np.testing.assert_array_equal(m, [[0, 1, 0, 0, 0, 1]])
