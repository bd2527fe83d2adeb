"""Block-sparse engine (XLA path) against the dense reference: forward, gradients, lse."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from attnjax import masks as M
from attnjax import scores as SC
from attnjax.block_sparse import (block_sparse_attention, block_sparse_attention_indices,
                                  fast_attention)
from attnjax.block_sparse import plan as P
from attnjax.core.reference import reference_attention
from attnjax.masks import layout as LY


def qkv(B, T, S, N, K, H=8, Hv=None, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  Hv = H if Hv is None else Hv
  return (jax.random.normal(ks[0], (B, T, N, H), dtype),
          jax.random.normal(ks[1], (B, S, K, H), dtype),
          jax.random.normal(ks[2], (B, S, K, Hv), dtype))


def _loss(fn, **kw):
  def f(q, k, v):
    out = fn(q, k, v, **kw)
    w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    return (out.astype(jnp.float32) * w).sum()
  return f


def run_with_grads(fn, q, k, v, **kw):
  """(out, lse, (dq, dk, dv)) of ``fn`` in one jitted call (loss: cos-weighted sum)."""
  def f(q_, k_, v_):
    (o, lse), vjp = jax.vjp(lambda a, b, c: fn(a, b, c, return_lse=True, **kw), q_, k_, v_)
    w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape).astype(o.dtype)
    return o, lse, vjp((w, jnp.zeros_like(lse)))
  return jax.jit(f)(q, k, v)


def check(q, k, v, atol=2e-5, grads=True, **kw):
  """fast_attention == reference (forward, lse, dq/dk/dv)."""
  o, lse, g1 = run_with_grads(fast_attention, q, k, v, **kw)
  r, rl, g2 = run_with_grads(reference_attention, q, k, v, **kw)
  np.testing.assert_allclose(o, r, atol=atol, rtol=atol)
  fin = np.isfinite(np.asarray(rl))
  assert (np.isfinite(np.asarray(lse)) == fin).all()
  np.testing.assert_allclose(np.where(fin, lse, 0), np.where(fin, rl, 0), atol=atol, rtol=atol)
  assert np.isfinite(np.asarray(o)).all()
  if grads:
    for a, b, name in zip(g1, g2, "qkv"):
      assert np.isfinite(np.asarray(a)).all(), name
      np.testing.assert_allclose(a, b, atol=atol * 10, rtol=atol * 10, err_msg=f"d{name}")


# -- the four CAB patterns, GQA/MQA ------------------------------------------------------
@pytest.mark.parametrize("T,S,causal,N,K", [(64, 64, False, 4, 4), (64, 64, True, 4, 2),
                                            (32, 96, False, 4, 1), (48, 96, True, 4, 2)])
def test_cab_patterns_gqa(T, S, causal, N, K):
  q, k, v = qkv(2, T, S, N, K)
  check(q, k, v, mask=M.Causal() if causal else None)


def test_blocked_masks_multi_block(monkeypatch):
  """Several blocks per axis (small block target): full, partial and empty blocks."""
  monkeypatch.setattr(P, "choose_blocks", functools.partial(P.choose_blocks, target=16))
  q, k, v = qkv(1, 64, 64, 4, 2, Hv=4)
  for mask in (M.SlidingWindow(12, 3), M.Causal() & M.SlidingWindow(20), M.SinkWindow(4, 9)):
    check(q, k, v, mask=mask)


def test_padding_lengths(monkeypatch):
  """Lengths that no block divides are padded; padded keys never leak."""
  monkeypatch.setattr(P, "choose_blocks", functools.partial(P.choose_blocks, target=16))
  q, k, v = qkv(1, 40, 72, 2, 1)
  check(q, k, v, mask=M.Causal())
  check(q, k, v, mask=None, grads=False)


def test_segment_ids_bias_and_array_mask():
  q, k, v = qkv(2, 64, 64, 4, 2)
  seg = jnp.array([[0] * 20 + [1] * 44, [0] * 64])
  check(q, k, v, mask=M.Causal(), segment_ids=seg)
  arr = jax.random.bernoulli(jax.random.PRNGKey(1), 0.6, (2, 1, 64, 64))
  check(q, k, v, mask=arr)
  check(q, k, v, mask=np.asarray(arr) & np.tril(np.ones((64, 64), bool)))


def test_bias_gradient():
  q, k, v = qkv(1, 32, 32, 2, 2)
  bias = jax.random.normal(jax.random.PRNGKey(3), (1, 2, 32, 32))
  row_bias = jax.random.normal(jax.random.PRNGKey(4), (32,))   # broadcast [S]

  def loss(fn, b):
    return _loss(fn, mask=M.Causal(), bias=b)(q, k, v)
  for b in (bias, row_bias):
    g1 = jax.jit(jax.grad(lambda b_: loss(fast_attention, b_)))(b)
    g2 = jax.grad(lambda b_: loss(reference_attention, b_))(b)
    np.testing.assert_allclose(g1, g2, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("score", [SC.SoftCap(3.0), SC.Sink(jnp.array([-1.0, 0.5])),
                                   SC.ReLU(), SC.Softplus(), SC.Selective(jnp.float32(0.3))])
def test_score_variants(score):
  q, k, v = qkv(1, 32, 32, 2, 1)
  fast = jax.jit(lambda q_, k_, v_, s_: fast_attention(q_, k_, v_, mask=M.Causal(), score=s_))
  np.testing.assert_allclose(fast(q, k, v, score),
                             reference_attention(q, k, v, mask=M.Causal(), score=score),
                             atol=2e-5, rtol=2e-5)

  def loss(fn):
    return lambda q_, s_: _loss(fn, mask=M.Causal(), score=s_)(q_, k, v)
  g1 = jax.jit(jax.grad(loss(fast_attention), (0, 1)))(q, score)
  g2 = jax.grad(loss(reference_attention), (0, 1))(q, score)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_reweight_score_not_supported():
  q, k, v = qkv(1, 16, 16, 2, 2)
  with pytest.raises(NotImplementedError, match="re-weight"):
    fast_attention(q, k, v, score=SC.lssar(2.0))


def test_fully_masked_rows_zero():
  q, k, v = qkv(1, 16, 32, 2, 2)
  mask = M.KeyRange(40, 50)    # no key at those positions
  o, lse = fast_attention(q, k, v, mask=mask | M.QueryRange(20, 24), return_lse=True)
  r = reference_attention(q, k, v, mask=mask | M.QueryRange(20, 24))
  np.testing.assert_allclose(o, r, atol=1e-5)
  assert np.isfinite(np.asarray(o)).all()
  assert np.isneginf(np.asarray(lse)[:, :4]).all()
  g = jax.grad(lambda q_: fast_attention(q_, k, v, mask=mask).sum())(q)
  assert np.isfinite(np.asarray(g)).all() and not np.asarray(g).any()


def test_custom_positions_and_vmap():
  q, k, v = qkv(2, 32, 32, 2, 1)
  qp = jnp.array(np.random.RandomState(0).permutation(32), jnp.int32)
  kp = jnp.arange(32, dtype=jnp.int32) * 2 - 10
  check(q, k, v, mask=M.SlidingWindow(8, 2), q_positions=qp, k_positions=kp)
  f = jax.vmap(lambda a, b, c: fast_attention(a[None], b[None], c[None], mask=M.Causal())[0])
  np.testing.assert_allclose(f(q, k, v), reference_attention(q, k, v, mask=M.Causal()),
                             atol=2e-5)


def _naive(q, k, v, vis):
  """Same-dtype naive attention (for the tolerance rule)."""
  k = jnp.repeat(k, q.shape[2] // k.shape[2], 2)
  v = jnp.repeat(v, q.shape[2] // v.shape[2], 2)
  s = jnp.einsum("btnh,bsnh->bnts", q, k) * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  s = jnp.where(vis, s, -jnp.inf)
  p = jax.nn.softmax(s, -1).astype(q.dtype)
  return jnp.einsum("bnts,bsnh->btnh", p, v)


def _f64_attention(q, k, v, vis):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, 2), np.repeat(v, G, 2)
  s = np.einsum("btnh,bsnh->bnts", q, k) * q.shape[-1] ** -0.5
  s = np.where(vis, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_tolerance_rule(dtype, monkeypatch):
  monkeypatch.setattr(P, "choose_blocks", functools.partial(P.choose_blocks, target=16))
  q, k, v = qkv(1, 64, 64, 4, 2, dtype=dtype)
  vis = np.tril(np.ones((64, 64), bool))
  exact = _f64_attention(q, k, v, vis)
  out = jax.jit(lambda a, b, c: fast_attention(a, b, c, mask=M.Causal()))(q, k, v)
  assert out.dtype == dtype
  err = np.abs(np.asarray(out, np.float64) - exact).max()
  naive_err = np.abs(np.asarray(_naive(q, k, v, vis), np.float64) - exact).max()
  assert err <= 2 * naive_err + 1e-3, (err, naive_err)
  g = jax.jit(jax.grad(
      lambda a: fast_attention(a, k, v, mask=M.Causal()).astype(jnp.float32).sum()))(q)
  gr = jax.jit(jax.grad(lambda a: reference_attention(
      a.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
      mask=M.Causal()).sum()))(q)
  gn = jax.jit(jax.grad(lambda a: _naive(a, k, v, vis).astype(jnp.float32).sum()))(q)
  gerr = np.abs(np.asarray(g, np.float64) - np.asarray(gr, np.float64)).max()
  nerr = np.abs(np.asarray(gn, np.float64) - np.asarray(gr, np.float64)).max()
  assert gerr <= 2 * nerr + 1e-3, (gerr, nerr)


# -- layouts -------------------------------------------------------------------------------
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2 ** 16), per_head=st.booleans(), gqa=st.booleans())
def test_random_layouts(seed, per_head, gqa):
  rng = np.random.RandomState(seed)
  N, K, T, bq, bk = 4, (2 if gqa else 4), 32, 8, 16
  heads = N if per_head else 1
  bm = rng.rand(heads, T // bq, T // bk) < 0.5
  lay = LY.layout_from_block_mask(bm, T, T, bq, bk)
  q, k, v = qkv(1, T, T, N, K, seed=seed % 7)
  vis = np.kron(np.broadcast_to(bm, (N,) + bm.shape[1:]), np.ones((bq, bk), bool))
  dense = jnp.asarray(vis)[None]
  o, _, g1 = run_with_grads(lambda a, b, c, **kw: block_sparse_attention(a, b, c, lay, **kw),
                            q, k, v)
  r, _, g2 = run_with_grads(lambda a, b, c, **kw: reference_attention(a, b, c, mask=dense, **kw),
                            q, k, v)
  np.testing.assert_allclose(o, r, atol=2e-5)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_layout_with_partial_blocks_and_merge_q():
  m = M.S2(4, block_size=8, local_blocks=2, vert_stride=3)
  lay = m.block_layout(64, 64, 8, 8, 4)
  q, k, v = qkv(1, 64, 64, 4, 4)
  o, lse = block_sparse_attention(q, k, v, lay, return_lse=True)
  r, rl = reference_attention(q, k, v, mask=m, return_lse=True)
  np.testing.assert_allclose(o, r, atol=2e-5)
  np.testing.assert_allclose(lse, rl, atol=2e-5)


def test_runtime_indices_forward_backward():
  B, T, N, K, bq, bk, kk = 2, 64, 4, 2, 16, 16, 2
  q, k, v = qkv(B, T, T, N, K)
  nq = T // bq
  idx = jnp.stack([jnp.arange(nq), jnp.maximum(jnp.arange(nq) - 2, 0)], -1)
  idx = jnp.broadcast_to(idx, (B, K, nq, kk)).astype(jnp.int32)
  cnt = jnp.broadcast_to(jnp.where(jnp.arange(nq) >= 2, 2, 1), (B, K, nq)).astype(jnp.int32)
  vis = np.zeros((B, N, T, T), bool)
  for b in range(B):
    for n in range(N):
      for r in range(nq):
        for j in range(int(cnt[b, n // 2, r])):
          c = int(idx[b, n // 2, r, j])
          vis[b, n, r * bq:(r + 1) * bq, c * bk:(c + 1) * bk] = True
  vis &= np.tril(np.ones((T, T), bool))
  f = jax.jit(lambda a, b_, c, i, n: block_sparse_attention_indices(
      a, b_, c, i, n, block_q=bq, block_kv=bk, mask=M.Causal()))
  np.testing.assert_allclose(f(q, k, v, idx, cnt),
                             reference_attention(q, k, v, mask=jnp.asarray(vis)), atol=2e-5)
  np.testing.assert_allclose(
      block_sparse_attention_indices(q, k, v, idx, cnt, block_q=bq, block_kv=bk,
                                     mask=M.Causal(), implementation="reference"),
      reference_attention(q, k, v, mask=jnp.asarray(vis)), atol=1e-6)
  g1 = jax.grad(lambda a, b_, c: f(a, b_, c, idx, cnt).sum(), (0, 1, 2))(q, k, v)
  g2 = jax.grad(lambda a, b_, c: reference_attention(a, b_, c, mask=jnp.asarray(vis)).sum(),
                (0, 1, 2))(q, k, v)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_grouped_tiles_lanes_and_slots(monkeypatch):
  """k-blocks grouped 2-3 per tile (ragged last groups), rows split over lanes (several
  slot groups): forward, lse and gradients incl. a bias, segments and row-count scores."""
  monkeypatch.setattr(P, "choose_blocks", functools.partial(P.choose_blocks, target=16))
  monkeypatch.setattr(P, "TILE_KEYS", 48)         # groups of 3 blocks of 16
  monkeypatch.setattr(P, "STEP_BUDGET", 1 << 15)  # several lanes: rows split, 2 slot groups
  q, k, v = qkv(2, 80, 80, 4, 2, Hv=4)
  bias = jax.random.normal(jax.random.PRNGKey(5), (1, 4, 80, 80))
  seg = jnp.array([[0] * 30 + [1] * 50, [0] * 80])
  for mask in (M.SlidingWindow(40, 5), M.S2(4, block_size=16, local_blocks=1, vert_stride=2)):
    check(q, k, v, mask=mask)
  check(q, k, v, mask=M.Causal(), segment_ids=seg)
  check(q, k, v, mask=M.SinkWindow(4, 30), score=SC.Softplus())
  g1 = jax.jit(jax.grad(lambda b_: _loss(fast_attention, mask=M.Causal(), bias=b_)(q, k, v)))
  g2 = jax.grad(lambda b_: _loss(reference_attention, mask=M.Causal(), bias=b_)(q, k, v))
  np.testing.assert_allclose(g1(bias), g2(bias), atol=2e-5, rtol=1e-4)


def test_runtime_indices_grouped(monkeypatch):
  """Run-time lists cut into groups of 2 k-blocks (k = 5: a ragged last group; counts
  below k), split over several lanes."""
  monkeypatch.setattr(P, "TILE_KEYS", 16)
  monkeypatch.setattr(P, "STEP_BUDGET", 1 << 9)
  B, T, N, K, bq, bk, kk = 1, 64, 2, 2, 8, 8, 5
  q, k, v = qkv(B, T, T, N, K)
  nq = T // bq
  rng = np.random.RandomState(0)
  idx = np.stack([rng.permutation(nq)[:kk] for _ in range(B * K * nq)]).reshape(B, K, nq, kk)
  cnt = rng.randint(1, kk + 1, size=(B, K, nq))
  idx, cnt = jnp.asarray(idx, jnp.int32), jnp.asarray(cnt, jnp.int32)
  f = lambda impl: (lambda a, b_, c: block_sparse_attention_indices(
      a, b_, c, idx, cnt, block_q=bq, block_kv=bk, implementation=impl).sum())
  np.testing.assert_allclose(jax.jit(f(None))(q, k, v), f("reference")(q, k, v), rtol=1e-5)
  w = jnp.cos(jnp.arange(B * T * N * 8.0)).reshape(B, T, N, 8)
  g = lambda impl: jax.grad(lambda a, b_, c: (block_sparse_attention_indices(
      a, b_, c, idx, cnt, block_q=bq, block_kv=bk, implementation=impl) * w).sum(),
                            (0, 1, 2))(q, k, v)
  for a, b in zip(jax.jit(lambda: g(None))(), g("reference")):
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_runtime_indices_pallas_dispatch():
  """implementation='pallas' runs the Pallas kernels (interpret mode here) on the lists."""
  pytest.importorskip("pallas_kernels.block_sparse")
  q, k, v = qkv(1, 32, 32, 2, 1)
  idx = jnp.asarray([[[[0, 0], [0, 1], [2, 0], [3, 1]]]], jnp.int32)
  cnt = jnp.asarray([[[1, 2, 2, 2]]], jnp.int32)
  kw = dict(block_q=8, block_kv=8, mask=M.Causal())
  out = block_sparse_attention_indices(q, k, v, idx, cnt, implementation="pallas", **kw)
  ref = block_sparse_attention_indices(q, k, v, idx, cnt, implementation="reference", **kw)
  np.testing.assert_allclose(out, ref, atol=2e-5)


# -- bad input -------------------------------------------------------------------------------
def test_bad_layout_and_blocks():
  q, k, v = qkv(1, 32, 32, 4, 2)
  lay = M.Causal().block_layout(64, 64, 16, 16)
  with pytest.raises(ValueError, match="q_len=64"):
    block_sparse_attention(q, k, v, lay)
  lay3 = LY.layout_from_block_mask(np.ones((3, 2, 2), bool), 32, 32, 16, 16)
  with pytest.raises(ValueError, match="num_heads=3"):
    block_sparse_attention(q, k, v, lay3)
  with pytest.raises(ValueError, match="block_q=12 does not divide"):
    block_sparse_attention_indices(q, k, v, jnp.zeros((1, 2, 2, 1), jnp.int32), block_q=12,
                                   block_kv=16)
  with pytest.raises(ValueError, match="kv_block_indices"):
    block_sparse_attention_indices(q, k, v, jnp.zeros((1, 3, 2, 1), jnp.int32), block_q=16,
                                   block_kv=16)
  with pytest.raises(ValueError, match="implementation"):
    fast_attention(q, k, v, implementation="cuda")


def test_choose_group_equal_groups_and_full_width_for_tall_tiles():
  # equal groups of the longest row, at most TILE_KEYS // bk blocks
  assert P.choose_group(np.array([13, 4]), 64) == 7          # 7 + 6, not 8 + 5
  assert P.choose_group(np.array([1, 1]), 64) == 1
  # tiles of >= WIDE_TILE_ROWS rows take the full width when it pads <= 25% more
  assert P.choose_group(np.array([13, 4]), 64, rows=256) == 8   # 16 + 8 vs 14 + 7
  assert P.choose_group(np.array([7]), 64, rows=256) == 8
  assert P.choose_group(np.array([6]), 64, rows=256) == 6       # 8 would pad 33%
  assert P.choose_group(np.array([13]), 64, rows=64) == 7
