"""MoH head mixtures and DiTCtrl KV-sharing."""
import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks
from attnjax.core.reference import reference_attention
from attnjax.variants import (MoHAttention, kv_shared_attention, mask_guided_kv_sharing, moh_balance_loss,
                              moh_gates, token_attention_mask)


def test_moh_routed_gates_have_k_nonzeros_summing_to_k_and_balance_at_uniform():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 6)).astype(np.float32)
  w_r = rng.standard_normal((6, 4)).astype(np.float32)
  uniform = np.full((100, 4), 0.25, np.float32)
  f = np.tile(np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]], np.float32), (50, 1))
  (gates, _), balance = jax.jit(lambda x, w_r, uniform, f: (
      moh_gates(x, jnp.zeros((6, 2)), w_r, jnp.zeros((6, 2)), shared_heads=2, routed_topk=2),
      moh_balance_loss(uniform, f)))(x, w_r, uniform, f)
  gates = np.asarray(gates)
  routed = gates[..., 2:]  # alpha = 1 for zero balance weights
  assert ((routed > 0).sum(-1) == 2).all()
  np.testing.assert_allclose(routed.sum(-1), 2.0, atol=1e-5)
  np.testing.assert_allclose(gates[..., :2], 1.0, atol=1e-6)  # shared: 2 * uniform softmax
  np.testing.assert_allclose(balance, 2.0, atol=1e-6)  # = k at perfect balance


def test_moh_all_shared_with_zero_router_is_standard_mha():
  x = np.random.default_rng(2).standard_normal((1, 5, 8)).astype(np.float32)
  layer = MoHAttention(num_heads=4, head_dim=2, shared_heads=4, routed_topk=0, implementation="reference")

  def run(x):
    params = layer.init(jax.random.PRNGKey(3), x)
    out, loss = layer.apply(params, x)
    p = params["params"]
    q, k, v = (jnp.einsum("btd,dnh->btnh", x, p[n]["kernel"]) + p[n]["bias"] for n in ("query", "key", "value"))
    heads = reference_attention(q, k, v, mask=masks.Causal())
    return out, loss, jnp.einsum("btnh,nhd->btd", heads, p["out"]["kernel"]) + p["out"]["bias"]
  out, loss, ref = jax.jit(run)(x)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  assert float(loss) == 0.0


def _qkv(L=10, seed=4):
  rng = np.random.default_rng(seed)
  return tuple(rng.standard_normal((1, L, 2, 4)).astype(np.float32) for _ in range(3))


def test_kv_sharing_identity_and_mask_guided_reduces_to_sharing():
  q, k, v = _qkv()
  ones = np.ones((1, 6), np.float32)
  shared, ref, out = jax.jit(lambda q, k, v: (
      kv_shared_attention(q, k, v), reference_attention(q, k, v),
      mask_guided_kv_sharing(q, k, v, ones, ones, text_len=4)))(q, k, v)
  np.testing.assert_allclose(shared, ref, atol=1e-5)
  np.testing.assert_allclose(out[:, 4:], shared[:, 4:], atol=1e-5)


def test_mask_guided_branches_only_use_allowed_values():
  q, k, _ = _qkv()
  v = np.zeros((1, 10, 2, 4), np.float32)
  v[:, 4:7] = 1.0  # foreground source video tokens carry 1
  m_src = np.array([[1, 1, 1, 0, 0, 0]], np.float32)
  v[:, :4] = 1.0  # text keys too
  out = jax.jit(lambda q, k, v: mask_guided_kv_sharing(q, k, v, m_src, jnp.ones((1, 6)),
                                                       text_len=4))(q, k, v)
  np.testing.assert_allclose(out[:, 4:], 1.0, atol=1e-5)  # fg branch: convex combination of 1s


def test_token_attention_mask_picks_high_attention_video_tokens():
  text_len, frames, hw = 2, 2, 3
  L = text_len + frames * hw
  probs = np.full((1, 1, L, L), 0.01, np.float32)
  probs[0, 0, text_len + 1, 0] = probs[0, 0, text_len + 5, 0] = 0.9
  m = jax.jit(lambda p: token_attention_mask(p, [0], text_len=text_len, frames=frames,
                                             thres=0.3))(probs)
  np.testing.assert_array_equal(m, [[0, 1, 0, 0, 0, 1]])
