"""The reference oracle, lse merging and input validation (the attention contract)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax.core import validation as V
from attnjax.core.merge import merge_attention
from attnjax.core.reference import reference_attention
from attnjax.masks import Causal, SlidingWindow


def _qkv(B=2, T=5, S=7, N=4, K=2, H=8, Hv=None, dtype=np.float32, seed=0):
  """NumPy inputs (no device compile to build them)."""
  rng = np.random.default_rng(seed)
  Hv = H if Hv is None else Hv
  f = lambda *shape: rng.standard_normal(shape).astype(np.float32).astype(dtype)
  return f(B, T, N, H), f(B, S, K, H), f(B, S, K, Hv)


def _jit(fn, *args):
  """fn(*args) compiled as one program (eager op-by-op dispatch compiles every op)."""
  return jax.jit(fn)(*args)


def _naive(q, k, v, mask, scale=None):
  """NumPy float64 attention with an explicit [N, T, S] or [B, N, T, S] mask."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  N, K = q.shape[2], k.shape[2]
  k = np.repeat(k, N // K, axis=2)
  v = np.repeat(v, N // K, axis=2)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  s = np.einsum("btnh,bsnh->bnts", q, k) * scale
  s = np.where(mask, s, -np.inf)
  m = np.max(s, -1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0)
  p = np.exp(s - m)
  den = p.sum(-1, keepdims=True)
  p = p / np.where(den > 0, den, 1)
  return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("T,S,causal", [(6, 6, False), (6, 6, True), (4, 9, False), (4, 9, True)])
def test_reference_four_cab_patterns_match_float64(T, S, causal):
  q, k, v = _qkv(T=T, S=S)
  mask = Causal() if causal else None
  out = _jit(lambda q, k, v: reference_attention(q, k, v, mask=mask), q, k, v)
  dense = Causal().to_dense(T, S, 4) if causal else np.ones((4, T, S), bool)
  np.testing.assert_allclose(out, _naive(q, k, v, dense[None]), atol=2e-6)
  if causal and T < S:  # bottom-right alignment: the last query sees every key
    assert dense[0, -1].all() and dense[0, 0].sum() == S - T + 1


def test_reference_matches_jax_dot_product_attention_with_bias_and_mask():
  q, k, v = _qkv(N=4, K=4)
  rng = np.random.default_rng(3)
  bias = rng.standard_normal((1, 4, 5, 7)).astype(np.float32)
  mask = rng.random((2, 1, 5, 7)) < 0.7
  mask[..., 0] = True
  ours, theirs = _jit(lambda q, k, v, bias, mask: (
      reference_attention(q, k, v, mask=mask, bias=bias),
      jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask)), q, k, v, bias, mask)
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_fully_masked_rows_are_zero_with_minus_inf_lse_and_finite_grads():
  q, k, v = _qkv()
  mask = np.ones((5, 7), bool)
  mask[2] = False
  (out, lse), g = _jit(lambda q, k, v: (
      reference_attention(q, k, v, mask=mask, return_lse=True),
      jax.grad(lambda q: reference_attention(q, k, v, mask=mask).sum())(q)), q, k, v)
  assert np.all(np.asarray(out[:, 2]) == 0) and np.all(np.isneginf(lse[:, 2]))
  assert np.all(np.isfinite(g))


def test_segment_ids_block_other_documents():
  q, k, v = _qkv(T=6, S=6)
  seg = np.array([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 2, 2]], np.int32)
  out = _jit(lambda q, k, v, seg: reference_attention(q, k, v, segment_ids=seg, mask=Causal()),
             q, k, v, seg)
  dense = (np.asarray(seg)[:, None, :, None] == np.asarray(seg)[:, None, None, :]) & np.tril(np.ones((6, 6), bool))
  np.testing.assert_allclose(out, _naive(q, k, v, dense), atol=2e-6)


def test_merge_of_two_key_halves_equals_unsplit():
  q, k, v = _qkv(S=8)
  kpos = np.arange(8)

  def run(q, k, v):
    o, lse = reference_attention(q, k, v, mask=SlidingWindow(3, 1), return_lse=True)
    o1, l1 = reference_attention(q, k[:, :3], v[:, :3], mask=SlidingWindow(3, 1),
                                 k_positions=kpos[:3], q_positions=np.arange(5) + 3,
                                 return_lse=True)
    o2, l2 = reference_attention(q, k[:, 3:], v[:, 3:], mask=SlidingWindow(3, 1),
                                 k_positions=kpos[3:], q_positions=np.arange(5) + 3,
                                 return_lse=True)
    return o, lse, merge_attention(o1, l1, o2, l2)
  o, lse, (om, lm) = _jit(run, q, k, v)
  lse = np.asarray(lse)
  np.testing.assert_allclose(om, o, atol=2e-6)
  np.testing.assert_allclose(np.where(np.isfinite(lse), lm, 0), np.where(np.isfinite(lse), lse, 0), atol=2e-6)


def test_merge_of_two_empty_rows_is_zero():
  o = np.ones((1, 2, 1, 3), np.float32)
  lse = np.full((1, 2, 1), -np.inf, np.float32)
  om, lm = _jit(lambda o, lse: merge_attention(o, lse, o, lse), o, lse)
  assert np.all(np.asarray(om) == 0) and np.all(np.isneginf(lm))


def test_bfloat16_error_is_close_to_naive_bfloat16():
  q, k, v = _qkv(dtype=jnp.bfloat16)
  exact = _naive(q, k, v, np.ones((1, 4, 5, 7), bool))
  out, naive_bf16 = _jit(lambda q, k, v: (
      reference_attention(q, k, v),
      jax.nn.dot_product_attention(q, jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2))), q, k, v)
  assert out.dtype == jnp.bfloat16
  err = np.abs(np.asarray(out, np.float64) - exact).max()
  err_naive = np.abs(np.asarray(naive_bf16, np.float64) - exact).max()
  assert err <= 2 * err_naive + 1e-3


def test_jit_vmap_grad():
  q, k, v = _qkv()
  f = jax.jit(lambda q, k, v: reference_attention(q, k, v, mask=Causal()))
  # jit and op-by-op (eager) execution agree
  np.testing.assert_allclose(f(q, k, v), reference_attention(q, k, v, mask=Causal()), atol=1e-6)
  vm = jax.jit(jax.vmap(lambda q, k, v: reference_attention(q[None], k[None], v[None],
                                                            mask=Causal())[0]))(q, k, v)
  np.testing.assert_allclose(vm, f(q, k, v), atol=1e-6)
  g = jax.jit(jax.grad(lambda v: f(q, k, v).sum()))(v)
  assert g.shape == v.shape and np.all(np.isfinite(g))


@pytest.mark.parametrize("shapes,match", [
    (((2, 5, 4), (2, 7, 2, 8), (2, 7, 2, 8)), "query must have rank 4"),
    (((2, 5, 4, 8), (3, 7, 2, 8), (3, 7, 2, 8)), "batch sizes differ"),
    (((2, 5, 4, 8), (2, 7, 2, 8), (2, 6, 2, 8)), "key and value lengths differ"),
    (((2, 5, 4, 8), (2, 7, 2, 4), (2, 7, 2, 8)), "head_dim differ"),
    (((2, 5, 4, 8), (2, 7, 3, 8), (2, 7, 3, 8)), "multiple of key/value heads"),
])
def test_bad_shapes_raise_value_error_naming_argument(shapes, match):
  q, k, v = (np.zeros(s, np.float32) for s in shapes)
  with pytest.raises(ValueError, match=match):
    reference_attention(q, k, v)


def test_bad_masks_positions_segments_and_windows():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="mask of shape"):
    reference_attention(q, k, v, mask=jnp.ones((5, 6), bool))
  with pytest.raises(ValueError, match="q_positions"):
    reference_attention(q, k, v, q_positions=jnp.arange(4))
  with pytest.raises(ValueError, match="needs T == S"):
    reference_attention(q, k, v, segment_ids=jnp.zeros((2, 5), jnp.int32))
  with pytest.raises(ValueError, match="kv_segment_ids"):
    reference_attention(q, k, v, segment_ids=(jnp.zeros((2, 5), jnp.int32), jnp.zeros((2, 6), jnp.int32)))
  with pytest.raises(ValueError, match="left must be an integer >= 0"):
    SlidingWindow(-1)
  with pytest.raises(ValueError, match="implementation must be one of"):
    attnjax.attention(q, k, v, implementation="cuda")


def test_default_positions_are_bottom_right_aligned():
  qp, kp = V.default_positions(3, 5)
  assert list(np.asarray(qp)) == [2, 3, 4] and list(np.asarray(kp)) == [0, 1, 2, 3, 4]


def test_reference_rejects_per_head_mask_built_for_another_head_count():
  from attnjax.masks import S2
  q, k, v = _qkv(T=8, S=8, N=4, K=4)
  with pytest.raises(ValueError, match="num_heads=4 does not match S2"):
    reference_attention(q, k, v, mask=S2(num_heads=2, block_size=2, local_blocks=1, vert_stride=2))
