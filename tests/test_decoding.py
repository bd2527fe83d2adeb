"""Decode paths (contiguous, paged), RazorAttention compression, allocator simulation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import decoding as D
from attnjax.core.reference import reference_attention
from attnjax.masks import Causal


def _rand(shape, seed):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def test_decode_ignores_garbage_beyond_lengths_and_matches_prefix_attention():
  B, L, K, H = 2, 12, 2, 8
  k, v = _rand((B, L, K, H), 0), _rand((B, L, K, H), 1)
  q = _rand((B, 2, 4, H), 2)
  lengths = jnp.array([7, 12])
  out = D.decode_attention(q, k, v, lengths)
  garbage = k.at[0, 7:].set(1e4), v.at[0, 7:].set(-1e4)
  np.testing.assert_allclose(D.decode_attention(q, *garbage, lengths), out, atol=1e-5)
  for b, n in enumerate([7, 12]):
    ref = reference_attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], mask=Causal())
    np.testing.assert_allclose(out[b:b + 1], ref, atol=1e-5)
  with pytest.raises(ValueError, match="lengths"):
    D.decode_attention(q, k, v, jnp.array([3]))


def test_paged_equals_contiguous_for_random_block_tables():
  B, page, pages_per_seq, K, H = 2, 4, 3, 1, 8
  k, v = _rand((B, page * pages_per_seq, K, H), 3), _rand((B, page * pages_per_seq, K, H), 4)
  q = _rand((B, 1, 2, H), 5)
  perm = np.random.default_rng(0).permutation(B * pages_per_seq + 2)[:B * pages_per_seq]
  table = perm.reshape(B, pages_per_seq)
  k_pages = jnp.zeros((B * pages_per_seq + 2, page, K, H)).at[table.reshape(-1)].set(k.reshape(-1, page, K, H))
  v_pages = jnp.zeros((B * pages_per_seq + 2, page, K, H)).at[table.reshape(-1)].set(v.reshape(-1, page, K, H))
  lengths = jnp.array([9, 12])
  np.testing.assert_allclose(D.paged_decode_attention(q, k_pages, v_pages, table, lengths),
                             D.decode_attention(q, k, v, lengths), atol=1e-6)


def test_razor_exact_when_nothing_dropped_and_when_dropped_keys_are_identical():
  B, S, K, H = 1, 16, 2, 8
  k, v = _rand((B, S, K, H), 6), _rand((B, S, K, H), 7)
  q = _rand((B, 1, 4, H), 8)
  full = reference_attention(q, k, v)
  none_dropped = D.razor_compress(k, v, jnp.array([True, True]))
  np.testing.assert_allclose(D.razor_decode_attention(q, none_dropped), full, atol=1e-5)
  keep = D.razor_keep_mask(S, jnp.array([True, False]), num_sink=2, ratio=4.0)
  same = jnp.where((~keep).T[None, :, :, None], k[:, :1], k)  # dropped keys identical, values arbitrary
  comp = D.razor_compress(same, v, jnp.array([True, False]), num_sink=2, ratio=4.0)
  np.testing.assert_allclose(D.razor_decode_attention(q, comp), reference_attention(q, same, v), atol=1e-5)
  frac = np.asarray(comp.kept_fraction)
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
  out = D.duo_attention(q, k, v, retrieval_heads=(True, False), sink=2, recent=3)
  full = reference_attention(q, k, v, mask=Causal())
  from attnjax.masks import SinkWindow
  stream = reference_attention(q, k, v, mask=SinkWindow(2, 3))
  np.testing.assert_allclose(out[:, :, :2], full[:, :, :2], atol=1e-5)
  np.testing.assert_allclose(out[:, :, 2:], stream[:, :, 2:], atol=1e-5)
  np.testing.assert_allclose(D.duo_attention(q, k, v, retrieval_heads=(False, False), sink=4, recent=8),
                             full, atol=1e-5)  # sink + recent >= L -> full attention
  np.testing.assert_allclose(D.mix_heads(full, stream, jnp.ones(2)), full)
  mid = D.mix_heads(full, stream, jnp.array([0.5, 0.25]))
  np.testing.assert_allclose(mid[:, :, 2:], 0.25 * full[:, :, 2:] + 0.75 * stream[:, :, 2:], atol=1e-6)
  np.testing.assert_array_equal(D.select_retrieval_heads(jnp.array([0.9, 0.2, 0.6, 0.1]), streaming_fraction=0.5),
                                [True, False, True, False])
  with pytest.raises(ValueError, match="retrieval_heads"):
    D.duo_attention(q, k, v, retrieval_heads=(True,))


def test_sink_recent_cache_matches_streaming_mask_with_constant_bytes():
  B, T, K, H = 1, 11, 1, 4
  q = _rand((B, T, 2, H), 13)
  k, v = _rand((B, T, K, H), 14), _rand((B, T, K, H), 15)
  from attnjax.masks import SinkWindow
  ref = reference_attention(q, k, v, mask=SinkWindow(2, 3))
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
  lengths = jnp.array([L])
  idx = D.tokenselect_indices(q, k, n_init=4, n_local=8, top_k=28)
  np.testing.assert_array_equal(idx[0], np.arange(L))
  np.testing.assert_allclose(D.sparse_decode_attention(q, k, v, idx, lengths),
                             D.decode_attention(q, k, v, lengths), atol=1e-5)
  small = D.tokenselect_indices(q, k, n_init=2, n_local=4, top_k=6)
  assert small.shape == (1, 12) and set(range(2)) <= set(np.asarray(small[0])) and 39 in np.asarray(small[0])
  perm = jnp.array([1, 0, 3, 2])  # swap heads within each KV group
  np.testing.assert_array_equal(D.tokenselect_indices(q[:, :, perm], k, n_init=2, n_local=4, top_k=6), small)


def test_tokenselect_single_head_picks_its_own_top_logits_and_cache_reuse():
  B, L, H = 1, 30, 4
  k = _rand((B, L, 1, H), 23)
  q = _rand((B, 1, 1, H), 24)
  idx = D.tokenselect_indices(q, k, n_init=0, n_local=0, top_k=5)
  logits = np.asarray(jnp.einsum("bh,blh->bl", q[:, 0, 0], k[:, :, 0]))
  np.testing.assert_array_equal(np.sort(np.argsort(-logits[0])[:5]), idx[0])
  cache = D.SelectionCache(jnp.mean(q, 1), idx)
  _, _, hit = cache.select(q, k, n_init=0, n_local=0, top_k=5)
  assert bool(hit[0])
  _, _, miss = cache.select(q, k, threshold=1.5, n_init=0, n_local=0, top_k=5)
  assert not bool(miss[0])  # threshold above 1: never reuses


def test_tidal_decode_budget_full_equals_full_attention_and_indices_persist():
  B, L, K, H = 1, 16, 2, 8
  k, v = _rand((B, L, K, H), 25), _rand((B, L, K, H), 26)
  q = _rand((B, 1, 4, H), 27)
  lengths = jnp.array([12])
  sched = D.TidalSchedule(full_layers=(0,), select_layers=(1, 3))
  assert [sched.role(i) for i in range(5)] == ["full", "select", "sparse", "select", "sparse"]
  full = D.decode_attention(q, k, v, lengths)
  out, idx = D.tidal_decode_step(q, k, v, lengths, role="select", k=L)
  np.testing.assert_allclose(out, full, atol=1e-6)
  sparse, idx2 = D.tidal_decode_step(q, k, v, lengths, role="sparse", indices=idx)
  np.testing.assert_allclose(sparse, full, atol=1e-5)  # budget >= cache: identical
  assert idx2 is idx
  _, small = D.tidal_decode_step(q, k, v, lengths, role="select", k=4)
  assert int(small.max()) < 12 and small.shape == (1, 2, 4)
  with pytest.raises(ValueError, match="indices"):
    D.tidal_decode_step(q, k, v, lengths, role="sparse")


def test_h2o_keeps_recent_and_heavy_hitters_and_full_budget_is_exact():
  acc = jnp.array([[[5.0, 0.1, 3.0, 0.2, 0.3, 0.0, 0.0, 0.0]]])
  np.testing.assert_array_equal(D.h2o_keep_indices(acc, heavy=2, recent=3), [[[0, 2, 5, 6, 7]]])
  np.testing.assert_array_equal(D.h2o_keep_indices(acc, heavy=4, recent=4), [[np.arange(8)]])
  B, L, K, H = 1, 10, 1, 4
  k, v = _rand((B, L, K, H), 30), _rand((B, L, K, H), 31)
  q = _rand((B, 1, 2, H), 32)
  _, probs = reference_attention(q, k, v, return_probs=True)
  acc = D.h2o_accumulate(jnp.zeros((B, K, L)), probs)
  np.testing.assert_allclose(acc.sum(), 2.0, atol=1e-5)  # two query heads, rows sum to one
  idx = D.h2o_keep_indices(acc, heavy=6, recent=4)
  np.testing.assert_allclose(D.sparse_decode_attention(q, k, v, idx, jnp.array([L])),
                             D.decode_attention(q, k, v, jnp.array([L])), atol=1e-5)
