"""Selection toolkit and gather paths of attnjax.dynamic."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax.core import validation as V
from attnjax.dynamic import gather as G
from attnjax.dynamic import select as S

CAUSAL = attnjax.masks.Causal()


def _qkv(B=1, T=32, N=4, K=2, H=8, S_=None, seed=0):
  rng = np.random.default_rng(seed)
  S_ = T if S_ is None else S_
  f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return f(B, T, N, H), f(B, S_, K, H), f(B, S_, K, H)


def _value_and_grads(fn, q, k, v):
  """(out, grads of a fixed random projection of out) in one jitted call."""
  return jax.jit(_vg(fn))(q, k, v)


def _vg(fn):
  def f(a, b, c):
    out = fn(a, b, c)
    w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    return jnp.sum(out * w), out
  g = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)
  return lambda a, b, c: (lambda r: (r[0][1], r[1]))(g(a, b, c))


def assert_same(fn, ref_fn, q, k, v, atol=2e-5, extra=None):
  """Forward and gradients of fn equal those of ref_fn (both in one compiled call).

  Returns fn's output and gradients, and with ``extra`` also extra(q, k, v), computed
  in the same compiled call."""
  (out, grads), (ref, ref_grads), more = jax.jit(lambda a, b, c: (
      _vg(fn)(a, b, c), _vg(ref_fn)(a, b, c), extra and extra(a, b, c)))(q, k, v)
  np.testing.assert_allclose(out, ref, atol=atol, rtol=1e-4)
  for a, b in zip(grads, ref_grads):
    np.testing.assert_allclose(a, b, atol=atol * 5, rtol=1e-3)
  return (out, grads) if extra is None else (out, grads, more)


def test_pool_blocks():
  x = jnp.arange(8.0).reshape(1, 8, 1, 1)
  np.testing.assert_allclose(S.pool_blocks(x, 4)[0, :, 0, 0], [1.5, 5.5])
  np.testing.assert_allclose(S.pool_blocks(x, 4, method="max")[0, :, 0, 0], [3, 7])
  np.testing.assert_allclose(S.pool_blocks(x, 4, method="min")[0, :, 0, 0], [0, 4])
  with pytest.raises(ValueError, match="block=3"):
    S.pool_blocks(x, 3)
  with pytest.raises(ValueError, match="method"):
    S.pool_blocks(x, 4, method="sum")


def test_topk_blocks_causal_padding_and_errors():
  scores = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4, 4)), jnp.float32)
  valid = np.tril(np.ones((4, 4), bool))[None, None]
  (idx, cnt), (forced, _) = jax.jit(lambda scores: (
      S.topk_blocks(scores, 2, valid=valid),
      S.topk_blocks(scores, 2, valid=valid, force=jnp.eye(4, dtype=bool)[None, None])))(scores)
  assert idx.shape == (2, 3, 4, 2) and idx.dtype == jnp.int32
  np.testing.assert_array_equal(cnt[0, 0], [1, 2, 2, 2])
  np.testing.assert_array_equal(idx[:, :, 0], 0)  # row 0: [0, pad=0]
  i, c = np.asarray(idx), np.asarray(cnt)
  for b, h, r in np.ndindex(2, 3, 4):
    sel = i[b, h, r, :c[b, h, r]]
    assert (np.diff(sel) > 0).all() and (sel <= r).all()
    best = np.argsort(-np.where(np.asarray(valid[0, 0, r]), np.asarray(scores[b, h, r]), -np.inf))
    assert set(sel) == set(best[:c[b, h, r]])
  assert (np.asarray(forced)[..., 3, :] == 3).any(-1).all()
  with pytest.raises(ValueError, match="larger than the number of key blocks"):
    S.topk_blocks(scores, 5)
  with pytest.raises(ValueError, match="positive Python int"):
    S.topk_blocks(scores, 0)


def test_topk_blocks_no_retrace():
  traces = []

  @jax.jit
  def f(s):
    traces.append(1)
    return S.topk_blocks(s, 3)

  for seed in range(3):
    f(jnp.asarray(np.random.default_rng(seed).standard_normal((1, 2, 4, 6)), jnp.float32))
  assert len(traces) == 1


def test_gather_attention_matches_masked_reference():
  q, k, v = _qkv()
  T = q.shape[1]
  idx = np.argsort(np.random.default_rng(3).random((1, T, 4, T)), -1)[..., :6].astype(np.int32)
  valid = idx <= np.arange(T)[None, :, None, None]
  mask = jax.jit(S.token_indices_to_mask, static_argnums=1)(idx, T, valid)
  fn = lambda a, b, c: G.gather_attention(a, b, c, idx, valid=valid)
  ref = lambda a, b, c: attnjax.reference_attention(a, b, c, mask=mask)
  assert_same(fn, ref, q, k, v)
  out, lse = jax.jit(lambda a, b, c: G.gather_attention(a, b, c, idx, valid=np.zeros_like(valid),
                                                         return_lse=True))(q, k, v)
  assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(lse))
  with pytest.raises(ValueError, match="indices must have shape"):
    G.gather_attention(q, k, v, idx[:, :4])


@pytest.mark.parametrize("heads", ["N", "K"])
def test_block_gather_matches_restricted_reference(heads):
  q, k, v = _qkv()
  d = V.check_qkv(q, k, v)
  H = d.N if heads == "N" else d.K
  scores = jnp.asarray(np.random.default_rng(1).standard_normal((1, H, 4, 4)), jnp.float32)

  def layout(scores):
    valid = S.block_validity(*S.normalize_positions(None, None, d), 8, 8, causal=True)
    idx, cnt = S.topk_blocks(scores, 2, valid=valid)
    mask = S.block_layout_to_mask(idx, cnt, 32, 32, 8, 8, d.N) & CAUSAL.to_dense(32, 32)[None]
    return idx, cnt, mask
  idx, cnt, mask = jax.jit(layout)(scores)
  fn = lambda a, b, c: G.block_gather_attention(a, b, c, idx, cnt, block_q=8, block_kv=8,
                                                causal=True)
  ref = lambda a, b, c: attnjax.reference_attention(a, b, c, mask=mask)
  assert_same(fn, ref, q, k, v)


def test_block_gather_all_blocks_equals_dense_decode_positions():
  q, k, v = _qkv(T=8, S_=32)
  d = V.check_qkv(q, k, v)
  qp = np.arange(8) + 20  # a partly filled cache: keys beyond 27 are future
  idx = np.broadcast_to(np.arange(4, dtype=np.int32), (1, 4, 1, 4))
  cnt = np.full((1, 4, 1), 4, np.int32)
  out, ref = jax.jit(lambda q, k, v: (
      G.block_gather_attention(q, k, v, idx, cnt, block_q=8, block_kv=8, causal=True,
                               q_positions=qp),
      attnjax.reference_attention(q, k, v, mask=CAUSAL, q_positions=qp)))(q, k, v)
  np.testing.assert_allclose(out, ref, atol=2e-5)
  with pytest.raises(ValueError, match="block_kv=5"):
    G.block_gather_attention(q, k, v, idx, cnt, block_q=8, block_kv=5)
  del d


def test_attention_mass_recall_full_and_planted():
  q, k, _ = _qkv(T=64, N=2, K=2)
  q, k = np.asarray(q), np.array(k)
  full = (np.broadcast_to(np.arange(8, dtype=np.int32), (1, 2, 8, 8)),
          np.full((1, 2, 8), 8, np.int32))
  # Planted: key block 2 carries almost all the last query's mass; recall = its true mass.
  k_planted = k.copy()
  k_planted[:, 16:24] = q[:, -1:, :, :] * 10
  sel = (np.full((1, 2, 8, 1), 2, np.int32), np.ones((1, 2, 8), np.int32))
  tok = np.broadcast_to(np.arange(64, dtype=np.int32), (1, 64, 2, 64))

  def run(q, k, kp):
    return (S.attention_mass_recall(q, k, full, block_q=8, block_kv=8),
            S.attention_mass_recall(q, kp, sel, block_q=8, block_kv=8, causal=False,
                                    reduce=False),
            attnjax.reference_attention(q, kp, kp, return_lse=True, return_probs=True)[2],
            S.attention_mass_recall(q, kp, tok))
  recall_full, per, probs, recall_tok = map(np.asarray, jax.jit(run)(q, k, k_planted))
  assert abs(float(recall_full) - 1) < 1e-5
  np.testing.assert_allclose(per[0], probs[0, :, :, 16:24].sum(-1).T, atol=1e-5)
  assert per.shape == (1, 64, 2) and float(per[0, -1].min()) > 0.95
  assert abs(float(recall_tok) - 1) < 1e-5


def _pooled_scores_numpy(q, k, bq, bkv, per_kv_head):
  B, T, N, H = q.shape
  K = k.shape[2]
  qp = np.asarray(q).reshape(B, T // bq, bq, N, H).mean(2)
  kp = np.asarray(k).reshape(B, k.shape[1] // bkv, bkv, K, H).mean(2)
  if per_kv_head:
    qp = qp.reshape(B, T // bq, K, N // K, H).mean(3)
  else:
    kp = np.repeat(kp, N // K, axis=2)
  return np.einsum("bqnh,bknh->bnqk", qp, kp)


@pytest.mark.parametrize("per_kv_head", [False, True])
def test_pooled_topk_blocks_matches_numpy_topk_and_keeps_the_diagonal(per_kv_head):
  q, k, _ = _qkv(B=2, T=64, N=4, K=2, H=8, seed=3)
  bq, bkv, kb = 8, 8, 3
  idx, cnt = map(np.asarray, jax.jit(lambda q, k: S.pooled_topk_blocks(
      q, k, kb, block_q=bq, block_kv=bkv, per_kv_head=per_kv_head))(q, k))
  heads = 2 if per_kv_head else 4
  assert idx.shape == (2, heads, 8, kb) and cnt.shape == (2, heads, 8)
  sc = _pooled_scores_numpy(q, k, bq, bkv, per_kv_head)
  for b in range(2):
    for h in range(heads):
      for i in range(8):
        n = int(cnt[b, h, i])
        assert n == min(kb, i + 1)
        chosen = set(np.asarray(idx[b, h, i, :n]).tolist())
        assert i in chosen  # the diagonal block is forced
        others = np.argsort(-sc[b, h, i, :i])[:n - 1]
        assert chosen == {i} | set(int(j) for j in others)


def test_pooled_topk_blocks_non_causal_and_cross_lengths():
  q, k, _ = _qkv(B=1, T=32, N=2, K=2, H=8, S_=48, seed=4)
  idx, cnt = jax.jit(lambda q, k: S.pooled_topk_blocks(q, k, 6, block_q=8, block_kv=8,
                                                       causal=False))(q, k)
  assert idx.shape == (1, 2, 4, 6)
  np.testing.assert_array_equal(np.asarray(cnt), 6)
  np.testing.assert_array_equal(np.sort(np.asarray(idx), -1),
                                np.broadcast_to(np.arange(6), (1, 2, 4, 6)))
  with pytest.raises(ValueError, match="block"):
    S.pooled_topk_blocks(q, k, 2, block_q=7, block_kv=8)


def test_pooled_topk_blocks_forces_the_query_blocks_own_key_blocks():
  q, k, _ = _qkv(B=1, T=64, N=2, K=2, H=8, seed=5)
  idx, cnt = map(np.asarray, jax.jit(lambda q, k: S.pooled_topk_blocks(q, k, 5, block_q=32,
                                                                       block_kv=8))(q, k))
  for h in range(2):
    for i in range(2):
      chosen = set(np.asarray(idx[0, h, i, :int(cnt[0, h, i])]).tolist())
      assert set(range(4 * i, 4 * i + 4)) <= chosen  # the 4 key blocks inside q-block i
