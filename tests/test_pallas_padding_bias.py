"""Pallas block-sparse kernels with per-batch lengths, an additive bias and boolean mask arrays.

The TPU kernel (TPU interpret mode) and the GPU kernel (``interpret=True``)
are compared with the dense oracle given the equivalent boolean mask
(Mask & mask array & lengths), forward and gradients (dq, dk, dv and the
bias's). Shapes are small: each case jits one forward + backward.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import masks as M
from attnjax import reference_attention
from attnjax.masks.layout import PARTIAL, layout_from_block_mask
from pallas_kernels.block_sparse import block_sparse_pallas
from pallas_kernels.block_sparse import lists as L
from pallas_kernels.block_sparse import tpu as tpu_kernels


def _inputs(B, T, S, N, K, H, dtype, seed):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (B, S, K, H), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (B, S, K, H), jnp.float32).astype(dtype)
  g = jax.random.normal(ks[3], (B, T, N, H), jnp.float32).astype(dtype)
  return q, k, v, g


def _lengths_mask(q_len, kv_len, T, S):
  q_len, kv_len = np.asarray(q_len), np.asarray(kv_len)
  return ((np.arange(T)[None, :, None] < q_len[:, None, None])
          & (np.arange(S)[None, None, :] < kv_len[:, None, None]))[:, None]


def _vjp(fn, q, k, v, bias, g, g_lse=None):
  """(out, lse or None, (dq, dk, dv, dbias)) of fn(q, k, v, bias) through one jit."""
  def go(q, k, v, bias):
    res, pull = jax.vjp(fn, q, k, v, bias)
    if isinstance(res, tuple):
      return res, pull((g, g_lse))
    return (res, None), pull(g)
  (out, lse), grads = jax.jit(go)(q, k, v, bias)
  return out, lse, grads


def _close(name, got, want, atol, rtol=1e-4):
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=atol, rtol=rtol, err_msg=name)


def _assert_padded_rows(out, lse, grads, q_len):
  """Query rows past q_len: zero output, lse = -inf, zero dq; everything finite elsewhere."""
  for b, n in enumerate(np.asarray(q_len)):
    assert np.all(np.asarray(out[b, n:], np.float32) == 0), b
    if lse is not None:
      assert np.all(np.isneginf(np.asarray(lse[b, n:]))), b
    assert np.all(np.asarray(grads[0][b, n:], np.float32) == 0), b
  for x in grads:
    assert np.isfinite(np.asarray(x, np.float32)).all()


def test_tpu_kernel_causal_self_gqa_lengths_bias_key_padding_float32():
  # 2 x 2 blocks of 64: (1, 0) full, diagonal partial. Batch 0: all queries, keys
  # cut inside k-block 0 (the full block (1, 0) becomes a masked boundary block and
  # k-block 1 is skipped); batch 1: queries cut inside q-block 1, all keys.
  B, T, N, K, H = 2, 128, 4, 2, 16
  q, k, v, g = _inputs(B, T, T, N, K, H, jnp.float32, seed=0)
  q_len, kv_len = np.array([128, 90], np.int32), np.array([40, 128], np.int32)
  rng = np.random.default_rng(0)
  bias = jnp.asarray(rng.normal(size=(1, N, T, T)), jnp.float32)
  keep = rng.random((B, 1, 1, T)) < 0.85
  keep[..., :64] = True        # key padding only in k-block 1 (partial blocks there)
  mask = M.Causal()
  layout = mask.block_layout(T, T, 64, 64, 1)
  assert layout.num_full == 1
  dense = (np.asarray(mask.to_dense(T, T, 1))[None] & keep & _lengths_mask(q_len, kv_len, T, T))
  g_lse = jax.random.normal(jax.random.PRNGKey(9), (B, T, N), jnp.float32)

  kern = lambda q, k, v, b: block_sparse_pallas(
      q, k, v, layout, mask=mask, bias=b, mask_array=keep, query_seq_lengths=q_len,
      key_value_seq_lengths=kv_len, return_lse=True, backend="tpu", interpret=True)
  ref = lambda q, k, v, b: reference_attention(q, k, v, mask=dense, bias=b, return_lse=True)
  out, lse, grads = _vjp(kern, q, k, v, bias, g, g_lse)
  r_out, r_lse, r_grads = _vjp(ref, q, k, v, bias, g, g_lse)
  _close("out", out, r_out, 2e-5)
  _close("lse", lse, r_lse, 2e-5)
  for name, a, b in zip(("dq", "dk", "dv", "dbias"), grads, r_grads):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    _close(name, a, b, 5e-5)
  _assert_padded_rows(out, lse, grads, q_len)
  # keys past kv_len get no gradient
  assert np.all(np.asarray(grads[1][0, 40:]) == 0) and np.all(np.asarray(grads[2][0, 40:]) == 0)


def _naive_error(q, k, v, bias, dense, g, out, grads_ref):
  """Largest error of a naive same-dtype implementation (the bfloat16 yardstick)."""
  def naive(q, k, v, bias):
    G = q.shape[2] // k.shape[2]
    kk, vv = jnp.repeat(k, G, 2), jnp.repeat(v, G, 2)
    s = jnp.einsum("btnh,bsnh->bnts", q, kk) * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    s = jnp.where(dense, s + bias.astype(q.dtype), -jnp.inf)
    m = jnp.max(s, -1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0))
    p = p / jnp.maximum(jnp.sum(p, -1, keepdims=True), jnp.asarray(1e-30, q.dtype))
    return jnp.einsum("bnts,bsnh->btnh", p.astype(q.dtype), vv)
  n_out, _, n_grads = _vjp(naive, q, k, v, bias, g)
  return [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
          for a, b in zip((n_out,) + tuple(n_grads), (out,) + tuple(grads_ref))]


def test_gpu_kernel_non_causal_cross_mask_array_key_bias_bfloat16():
  # T != S, no Mask object: a per-head boolean array [1, N, T, S] and a key bias
  # [B, 1, 1, S]; q_len 0 for batch 0 (every row empty), kv_len cuts k-block 1.
  B, T, S, N, K, H = 2, 64, 128, 4, 2, 16
  q, k, v, g = _inputs(B, T, S, N, K, H, jnp.bfloat16, seed=1)
  q_len, kv_len = np.array([0, 50], np.int32), np.array([128, 77], np.int32)
  rng = np.random.default_rng(1)
  keep = rng.random((1, N, T, S)) < 0.7
  bias = jnp.asarray(rng.normal(size=(B, 1, 1, S)), jnp.bfloat16)
  layout = layout_from_block_mask(np.full((1, 2, 2), PARTIAL, np.int8), T, S, 32, 64)
  dense = keep & _lengths_mask(q_len, kv_len, T, S)

  kern = lambda q, k, v, b: block_sparse_pallas(
      q, k, v, layout, bias=b, mask_array=keep, query_seq_lengths=q_len,
      key_value_seq_lengths=kv_len, backend="gpu", interpret=True)
  ref = lambda q, k, v, b: reference_attention(q, k, v, mask=dense, bias=b)
  out, _, grads = _vjp(kern, q, k, v, bias, g)
  r_out, _, r_grads = _vjp(ref, q, k, v, bias, g)
  tols = _naive_error(q, k, v, bias, dense, g, r_out, r_grads)
  for name, a, b, tol in zip(("out", "dq", "dk", "dv", "dbias"), (out,) + tuple(grads),
                             (r_out,) + tuple(r_grads), tols):
    assert a.dtype == jnp.bfloat16 and a.shape == b.shape, name
    err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
    assert err <= 2 * tol + 2e-3, (name, err, tol)
  _assert_padded_rows(out, None, grads, q_len)


def test_attention_pallas_causal_cross_numpy_inputs_full_bias():
  # Through attnjax.attention (the dispatcher's Pallas branch, TPU kernel in interpret
  # mode on CPU) with NumPy inputs: causal cross attention (T < S, bottom-right
  # aligned), a [B, N, T, S] bias and lengths with a 0 and a full one.
  B, T, S, N, K, H = 2, 64, 128, 2, 1, 16
  q, k, v, g = (np.asarray(x) for x in _inputs(B, T, S, N, K, H, jnp.float32, seed=2))
  bias = np.random.default_rng(2).normal(size=(B, N, T, S)).astype(np.float32)
  q_len, kv_len = np.array([64, 30], np.int32), np.array([0, 100], np.int32)
  fn = lambda impl: (lambda q, k, v, b: attnjax.attention(
      q, k, v, mask=M.Causal(), bias=b, query_seq_lengths=q_len,
      key_value_seq_lengths=kv_len, return_lse=True, implementation=impl))
  g_lse = np.zeros((B, T, N), np.float32)
  out, lse, grads = _vjp(fn("pallas"), q, k, v, bias, g, g_lse)
  r_out, r_lse, r_grads = _vjp(fn("reference"), q, k, v, bias, g, g_lse)
  _close("out", out, r_out, 2e-5)
  _close("lse", lse, r_lse, 2e-5)
  for name, a, b in zip(("dq", "dk", "dv", "dbias"), grads, r_grads):
    _close(name, a, b, 5e-5)
  _assert_padded_rows(out, lse, grads, q_len)
  assert np.all(np.asarray(out[0]) == 0)          # kv_len 0: nothing to see
  assert np.abs(np.asarray(out[1, :30])).max() > 0


def test_blocks_past_the_lengths_are_not_visited():
  # The kernels' per-batch counts of visited list entries (no kernel runs).
  mask = M.Causal()
  layout = mask.block_layout(256, 256, 64, 64, 1)          # 4 x 4 blocks, lower triangle
  lists = tpu_kernels.prepare_lists(layout)
  cfg = type("Cfg", (), dict(block_q=64, block_kv=64))
  lens = (jnp.asarray([256, 100, 0]), jnp.asarray([256, 65, 256]))
  fwd = L.tpu_length_counts(cfg, lists["fwd_code"], lists["fwd_counts"], 4, 4, lens,
                            True).reshape(3, 4)
  np.testing.assert_array_equal(fwd, [[1, 2, 3, 4], [1, 2, 0, 0], [0, 0, 0, 0]])
  bwd = L.tpu_length_counts(cfg, lists["bwd_code"], lists["bwd_counts"], 4, 4, lens,
                            False).reshape(3, 4)
  np.testing.assert_array_equal(bwd, [[4, 3, 2, 1], [2, 1, 0, 0], [0, 0, 0, 0]])
  # GPU rows: (full blocks inside both lengths, full blocks kept, partial blocks kept)
  rows = L.gpu_prepare_lists(layout)["fwd_rows"]
  got = np.asarray(L.gpu_length_rows(cfg, rows, lens, True))[:, 0, :, :3]
  np.testing.assert_array_equal(got[0], [[0, 0, 1], [1, 1, 1], [2, 2, 1], [3, 3, 1]])
  np.testing.assert_array_equal(got[1], [[0, 0, 1], [0, 1, 1], [0, 0, 0], [0, 0, 0]])
  assert not got[2].any()


def test_bad_lengths_bias_and_mask_array_are_refused_by_name():
  q, k, v, _ = _inputs(2, 32, 32, 2, 1, 16, jnp.float32, seed=3)
  layout = M.Causal().block_layout(32, 32, 16, 16)
  run = lambda **kw: block_sparse_pallas(q, k, v, layout, backend="gpu", interpret=True, **kw)
  with pytest.raises(ValueError, match="query_seq_lengths"):
    run(query_seq_lengths=np.array([3, 4, 5]))
  with pytest.raises(ValueError, match="key_value_seq_lengths"):
    run(key_value_seq_lengths=np.array([3.0, 4.0]))
  with pytest.raises(ValueError, match="bias"):
    run(bias=np.zeros((2, 2, 32, 31), np.float32))
  with pytest.raises(TypeError, match="mask_array"):
    run(mask_array=np.ones((32, 32), np.float32))
