"""Decode paths (contiguous, paged), RazorAttention compression, allocator simulation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import decoding as D
from attnjax.core.reference import reference_attention
from attnjax.masks import Causal


def _rand(shape, seed):
  """NumPy inputs (no device compile to build them)."""
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_decode_ignores_garbage_beyond_lengths_and_matches_prefix_attention():
  B, L, K, H = 2, 12, 2, 8
  k, v = _rand((B, L, K, H), 0), _rand((B, L, K, H), 1)
  q = _rand((B, 2, 4, H), 2)
  lengths = np.array([7, 12], np.int32)

  def run(q, k, v, lengths):
    garbage = k.at[0, 7:].set(1e4), v.at[0, 7:].set(-1e4)
    refs = [reference_attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], mask=Causal())
            for b, n in enumerate([7, 12])]
    return D.decode_attention(q, k, v, lengths), D.decode_attention(q, *garbage, lengths), refs
  out, out_garbage, refs = jax.jit(run)(q, k, v, lengths)
  np.testing.assert_allclose(out_garbage, out, atol=1e-5)
  for b, ref in enumerate(refs):
    np.testing.assert_allclose(out[b:b + 1], ref, atol=1e-5)
  with pytest.raises(ValueError, match="lengths"):
    D.decode_attention(q, k, v, jnp.array([3]))


def test_paged_equals_contiguous_for_random_block_tables():
  B, page, pages_per_seq, K, H = 2, 4, 3, 1, 8
  k, v = _rand((B, page * pages_per_seq, K, H), 3), _rand((B, page * pages_per_seq, K, H), 4)
  q = _rand((B, 1, 2, H), 5)
  perm = np.random.default_rng(0).permutation(B * pages_per_seq + 2)[:B * pages_per_seq]
  table = perm.reshape(B, pages_per_seq)
  k_pages = np.zeros((B * pages_per_seq + 2, page, K, H), np.float32)
  v_pages = np.zeros((B * pages_per_seq + 2, page, K, H), np.float32)
  k_pages[table.reshape(-1)] = k.reshape(-1, page, K, H)
  v_pages[table.reshape(-1)] = v.reshape(-1, page, K, H)
  lengths = np.array([9, 12], np.int32)
  paged, contiguous = jax.jit(lambda *a: (D.paged_decode_attention(q, *a, table, lengths),
                                          D.decode_attention(q, k, v, lengths)))(k_pages, v_pages)
  np.testing.assert_allclose(paged, contiguous, atol=1e-6)


def test_razor_exact_when_nothing_dropped_and_when_dropped_keys_are_identical():
  B, S, K, H = 1, 16, 2, 8
  k, v = _rand((B, S, K, H), 6), _rand((B, S, K, H), 7)
  q = _rand((B, 1, 4, H), 8)
  def run(q, k, v):
    full = reference_attention(q, k, v)
    none_dropped = D.razor_compress(k, v, jnp.array([True, True]))
    keep = D.razor_keep_mask(S, jnp.array([True, False]), num_sink=2, ratio=4.0)
    same = jnp.where((~keep).T[None, :, :, None], k[:, :1], k)  # dropped keys identical
    comp = D.razor_compress(same, v, jnp.array([True, False]), num_sink=2, ratio=4.0)
    return (D.razor_decode_attention(q, none_dropped), full, D.razor_decode_attention(q, comp),
            reference_attention(q, same, v), comp.kept_fraction)
  out, full, out_comp, ref_comp, frac = jax.jit(run)(q, k, v)
  np.testing.assert_allclose(out, full, atol=1e-5)
  np.testing.assert_allclose(out_comp, ref_comp, atol=1e-5)
  frac = np.asarray(frac)
  assert frac[0] == 1.0 and frac[1] == pytest.approx((2 + 4 + 1) / 16)


def test_allocator_fragmentation_shrinks_with_smaller_pages():
  trace = [(i, 50 + 7 * i, 20 + i) for i in range(16)]
  big = D.simulate_trace(trace, page_bytes=4096, bytes_per_token=64)
  small = D.simulate_trace(trace, page_bytes=512, bytes_per_token=64)
  assert small["mean_fragmentation"] < big["mean_fragmentation"]
  assert small["alloc_calls"] > big["alloc_calls"]


def test_duo_attention_heads_and_mixing():
  B, T, K, H = 1, 12, 2, 8
  q = _rand((B, T, 4, H), 10)
  k, v = _rand((B, T, K, H), 11), _rand((B, T, K, H), 12)
  from attnjax.masks import SinkWindow

  def run(q, k, v):
    full = reference_attention(q, k, v, mask=Causal())
    stream = reference_attention(q, k, v, mask=SinkWindow(2, 3))
    return (D.duo_attention(q, k, v, retrieval_heads=(True, False), sink=2, recent=3), full,
            stream, D.duo_attention(q, k, v, retrieval_heads=(False, False), sink=4, recent=8),
            D.mix_heads(full, stream, jnp.ones(2)),
            D.mix_heads(full, stream, jnp.array([0.5, 0.25])),
            D.select_retrieval_heads(jnp.array([0.9, 0.2, 0.6, 0.1]), streaming_fraction=0.5))
  out, full, stream, wide, ones, mid, heads = map(np.asarray, jax.jit(run)(q, k, v))
  np.testing.assert_allclose(out[:, :, :2], full[:, :, :2], atol=1e-5)
  np.testing.assert_allclose(out[:, :, 2:], stream[:, :, 2:], atol=1e-5)
  np.testing.assert_allclose(wide, full, atol=1e-5)  # sink + recent >= L -> full attention
  np.testing.assert_allclose(ones, full)
  np.testing.assert_allclose(mid[:, :, 2:], 0.25 * full[:, :, 2:] + 0.75 * stream[:, :, 2:], atol=1e-6)
  np.testing.assert_array_equal(heads, [True, False, True, False])
  with pytest.raises(ValueError, match="retrieval_heads"):
    D.duo_attention(q, k, v, retrieval_heads=(True,))


def test_sink_recent_cache_matches_streaming_mask_with_constant_bytes():
  B, T, K, H = 1, 11, 1, 4
  q = _rand((B, T, 2, H), 13)
  k, v = _rand((B, T, K, H), 14), _rand((B, T, K, H), 15)
  from attnjax.masks import SinkWindow
  ref = np.asarray(jax.jit(lambda q, k, v: reference_attention(q, k, v, mask=SinkWindow(2, 3)))(
      q, k, v))
  cache = D.SinkRecentKVCache.create(B, K, H, sink=2, recent=3)
  nbytes = cache.nbytes
  step = jax.jit(lambda c, kt, vt, qt: (lambda c2: (c2, c2.attend(qt)))(c.append(kt, vt)))
  for t in range(T):
    cache, o = step(cache, k[:, t], v[:, t], q[:, t])
    np.testing.assert_allclose(o, ref[:, t], atol=1e-5)
  assert cache.nbytes == nbytes


def test_tokenselect_full_budget_is_exact_and_votes_are_head_permutation_invariant():
  B, L, K, H = 1, 40, 2, 8
  k, v = _rand((B, L, K, H), 20), _rand((B, L, K, H), 21)
  q = _rand((B, 1, 4, H), 22)
  lengths = np.array([L], np.int32)
  perm = np.array([1, 0, 3, 2])  # swap heads within each KV group

  def run(q, k, v):
    idx = D.tokenselect_indices(q, k, n_init=4, n_local=8, top_k=28)
    return (idx, D.sparse_decode_attention(q, k, v, idx, lengths),
            D.decode_attention(q, k, v, lengths),
            D.tokenselect_indices(q, k, n_init=2, n_local=4, top_k=6),
            D.tokenselect_indices(q[:, :, perm], k, n_init=2, n_local=4, top_k=6))
  idx, sparse, dense, small, small_perm = map(np.asarray, jax.jit(run)(q, k, v))
  np.testing.assert_array_equal(idx[0], np.arange(L))
  np.testing.assert_allclose(sparse, dense, atol=1e-5)
  assert small.shape == (1, 12) and set(range(2)) <= set(small[0]) and 39 in small[0]
  np.testing.assert_array_equal(small_perm, small)


def test_tokenselect_single_head_picks_its_own_top_logits_and_cache_reuse():
  B, L, H = 1, 30, 4
  k = _rand((B, L, 1, H), 23)
  q = _rand((B, 1, 1, H), 24)
  def run(q, k):
    idx = D.tokenselect_indices(q, k, n_init=0, n_local=0, top_k=5)
    cache = D.SelectionCache(jnp.mean(q, 1), idx)
    return (idx, cache.select(q, k, n_init=0, n_local=0, top_k=5)[2],
            cache.select(q, k, threshold=1.5, n_init=0, n_local=0, top_k=5)[2])
  idx, hit, miss = jax.jit(run)(q, k)
  logits = np.einsum("bh,blh->bl", q[:, 0, 0], k[:, :, 0])
  np.testing.assert_array_equal(np.sort(np.argsort(-logits[0])[:5]), idx[0])
  assert bool(hit[0])
  assert not bool(miss[0])  # threshold above 1: never reuses


def test_tidal_decode_budget_full_equals_full_attention_and_indices_persist():
  B, L, K, H = 1, 16, 2, 8
  k, v = _rand((B, L, K, H), 25), _rand((B, L, K, H), 26)
  q = _rand((B, 1, 4, H), 27)
  lengths = np.array([12], np.int32)
  sched = D.TidalSchedule(full_layers=(0,), select_layers=(1, 3))
  assert [sched.role(i) for i in range(5)] == ["full", "select", "sparse", "select", "sparse"]
  same = []

  def run(q, k, v):
    out, idx = D.tidal_decode_step(q, k, v, lengths, role="select", k=L)
    sparse, idx2 = D.tidal_decode_step(q, k, v, lengths, role="sparse", indices=idx)
    same.append(idx2 is idx)
    return (D.decode_attention(q, k, v, lengths), out, sparse,
            D.tidal_decode_step(q, k, v, lengths, role="select", k=4)[1])
  full, out, sparse, small = jax.jit(run)(q, k, v)
  np.testing.assert_allclose(out, full, atol=1e-6)
  np.testing.assert_allclose(sparse, full, atol=1e-5)  # budget >= cache: identical
  assert same == [True]
  assert int(np.max(small)) < 12 and small.shape == (1, 2, 4)
  with pytest.raises(ValueError, match="indices"):
    D.tidal_decode_step(q, k, v, lengths, role="sparse")


def test_h2o_keeps_recent_and_heavy_hitters_and_full_budget_is_exact():
  acc = np.array([[[5.0, 0.1, 3.0, 0.2, 0.3, 0.0, 0.0, 0.0]]], np.float32)
  B, L, K, H = 1, 10, 1, 4
  k, v = _rand((B, L, K, H), 30), _rand((B, L, K, H), 31)
  q = _rand((B, 1, 2, H), 32)
  lengths = np.array([L], np.int32)

  def run(acc0, q, k, v):
    _, probs = reference_attention(q, k, v, return_probs=True)
    acc = D.h2o_accumulate(jnp.zeros((B, K, L)), probs)
    idx = D.h2o_keep_indices(acc, heavy=6, recent=4)
    return (D.h2o_keep_indices(acc0, heavy=2, recent=3), D.h2o_keep_indices(acc0, heavy=4, recent=4),
            acc, D.sparse_decode_attention(q, k, v, idx, lengths),
            D.decode_attention(q, k, v, lengths))
  keep23, keep44, acc, sparse, dense = jax.jit(run)(acc, q, k, v)
  np.testing.assert_array_equal(keep23, [[[0, 2, 5, 6, 7]]])
  np.testing.assert_array_equal(keep44, [[np.arange(8)]])
  np.testing.assert_allclose(np.sum(acc), 2.0, atol=1e-5)  # two query heads, rows sum to one
  np.testing.assert_allclose(sparse, dense, atol=1e-5)
