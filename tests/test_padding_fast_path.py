"""Per-batch sequence lengths on the block-sparse XLA path (no dense mask, padded blocks skipped)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import masks as M
from attnjax.block_sparse import api as A
from attnjax.block_sparse import padding as PD
from attnjax.block_sparse import plan as P
from attnjax.core import reference as R
from attnjax.core import validation as V

# (B, T, S, N, K, H, mask, q_len, kv_len): causal GQA over 3 x 3 blocks of 128 with an
# empty sequence; a sliding window with T != S (5 k-blocks of 64) and key lengths only.
CASES = {
    "causal_gqa": (3, 384, 384, 4, 2, 16, M.Causal(), [384, 130, 0], [384, 130, 0]),
    "window_cross_keys": (2, 128, 320, 4, 1, 16, M.SlidingWindow(64), None, [320, 7]),
}


def _qkv(B, T, S, N, K, H):
  ks = jax.random.split(jax.random.PRNGKey(B * T + S), 3)
  return (jax.random.normal(ks[0], (B, T, N, H)), jax.random.normal(ks[1], (B, S, K, H)),
          jax.random.normal(ks[2], (B, S, K, H)))


def _dense_mask(d, mask, q_len, kv_len):
  """The explicit dense [B, N|1, T, S] visibility the call means (default positions)."""
  q_pos, k_pos = V.default_positions(d.T, d.S)
  vis = R.dense_visibility(mask, d, jnp.asarray(q_pos), jnp.asarray(k_pos), None)
  lens = PD.full_lengths(None if q_len is None else jnp.asarray(q_len, jnp.int32),
                         None if kv_len is None else jnp.asarray(kv_len, jnp.int32),
                         d.B, d.T, d.S)
  return vis & PD.lengths_mask(lens, d.T, d.S)


@pytest.mark.parametrize("name", sorted(CASES))
def test_lengths_match_the_reference_with_the_dense_mask(name):
  B, T, S, N, K, H, mask, ql, kl = CASES[name]
  q, k, v = _qkv(B, T, S, N, K, H)
  d = V.check_qkv(q, k, v)
  ql_ = None if ql is None else jnp.asarray(ql, jnp.int32)
  kl_ = None if kl is None else jnp.asarray(kl, jnp.int32)
  dense = _dense_mask(d, mask, ql, kl)

  def loss(fn):
    def f(q, k, v):
      o = fn(q, k, v)
      return (o * jnp.cos(o)).sum(), o
    return jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True))

  (_, got), g_got = loss(lambda q, k, v: attnjax.attention(
      q, k, v, mask=mask, query_seq_lengths=ql_, key_value_seq_lengths=kl_,
      implementation="xla"))(q, k, v)
  (_, want), g_want = loss(lambda q, k, v: R.reference_attention(q, k, v, mask=dense))(q, k, v)
  np.testing.assert_allclose(got, want, atol=2e-5)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(a, b, atol=5e-5)
  assert np.isfinite(np.asarray(got)).all() and all(np.isfinite(np.asarray(g)).all()
                                                    for g in g_got)
  if ql is not None:   # padded query rows are zeros
    for b, L in enumerate(ql):
      assert not np.asarray(got[b, L:]).any()


def test_padded_call_does_not_reach_the_reference_and_explain_names_xla(monkeypatch):
  q, k, v = _qkv(2, 128, 128, 2, 2, 8)
  lens = jnp.asarray([128, 40], jnp.int32)
  fn = lambda q, k, v: attnjax.dot_product_attention(
      q, k, v, is_causal=True, local_window_size=(32, 0), query_seq_lengths=lens,
      key_value_seq_lengths=lens)
  want = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(32, 0),
                                      query_seq_lengths=lens, key_value_seq_lengths=lens)

  def boom(*a, **kw):
    raise AssertionError("the dense reference ran")
  monkeypatch.setattr(A, "reference_attention", boom)
  decisions = attnjax.explain(fn, q, k, v)
  assert [dc.backend for dc in decisions] == ["xla"]
  got = jax.jit(fn)(q, k, v)
  valid = (np.arange(128)[None, :] < np.asarray(lens)[:, None])[..., None, None]
  np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0), atol=2e-5)


def test_compacted_items_skip_the_padded_blocks():
  # causal, 8 q-blocks x 8 k-blocks of 64: a sequence of 130 tokens keeps the items
  # of q-blocks 0..2 and k-blocks 0..2 only (6 of 36 causal blocks)
  bm = M.Causal().block_layout(512, 512, 64, 64, 1).block_mask
  plan = P.make_plan(bm, 1, 1, 64, 64, 1)
  n = 0
  for s in plan.scheds:
    _, dyn = PD.compact(s, jnp.int32(130), jnp.int32(130), bq=64, bk=64, nq=8)
    kv = np.asarray(dyn.kb)[np.asarray(dyn.valid)]
    qb = np.asarray(dyn.qb)[np.asarray(dyn.valid)]
    assert (qb <= 2).all() and (kv[np.asarray(dyn.kval)[np.asarray(dyn.valid)]] <= 2).all()
    n += int(np.asarray(dyn.kval)[np.asarray(dyn.valid)].sum())
  assert n == 6


def test_pallas_runs_lengths_as_the_xla_path_does():
  q, k, v = _qkv(1, 64, 64, 2, 2, 8)
  run = lambda impl: attnjax.attention(q, k, v, mask=M.Causal(),
                                       key_value_seq_lengths=np.array([9]), implementation=impl)
  np.testing.assert_allclose(run("pallas"), run("xla"), atol=2e-5)
