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
