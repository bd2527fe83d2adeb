"""LongHeads one token at a time (attnjax.dynamic.longheads_decode_step) equals the per-token
teacher-forcing form (longheads_attention with query_block=1), cache garbage unread."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import dynamic as D


def _rand(shape, seed):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _decode_rows(q, k, v, *, w, attn_len, begin=None):
  """Every row decoded on its own: the cache past the row and the chunk keys of its own,
  previous and later chunks are replaced by garbage."""
  B, T, N, H = q.shape
  reps = D.chunk_representations(k, v, q, chunk_size=w, rope_base=10000.0)
  junk = lambda x, s: x + 50.0 * _rand(x.shape, s)

  def row(p):
    kp = jnp.where((jnp.arange(T) <= p)[None, :, None, None], k, junk(k, 7))
    vp = jnp.where((jnp.arange(T) <= p)[None, :, None, None], v, junk(v, 8))
    rp = jnp.where((jnp.arange(T // w) < p // w - 1)[None, None, :, None], reps, junk(reps, 9))
    qp = jax.lax.dynamic_slice_in_dim(q, p, 1, axis=1)
    return D.longheads_decode_step(qp, kp, vp, rp, jnp.full((B,), p), chunk_size=w,
                                   attn_len=attn_len, begin_selective_length=begin)[:, 0]
  return jnp.swapaxes(jax.jit(lambda: jax.lax.map(row, jnp.arange(T)))(), 0, 1)


@pytest.mark.parametrize("K", [2])
def test_longheads_decode_step_equals_the_per_token_forward(K):
  B, T, N, H, w, attn_len = 2, 48, 4, 8, 4, 16
  q, k, v = _rand((B, T, N, H), 1), _rand((B, T, K, H), 2), _rand((B, T, K, H), 3)
  full = D.longheads_attention(q, k, v, chunk_size=w, attn_len=attn_len, query_block=1)
  got = _decode_rows(q, k, v, w=w, attn_len=attn_len)
  np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=2e-5)
  # the selection matters: plain causal attention differs
  plain = D.longheads_attention(q, k, v, chunk_size=w, attn_len=T)
  assert float(jnp.abs(full - plain).max()) > 1e-2


def test_longheads_decode_step_plain_below_begin_selective_length():
  B, T, N, H, w = 1, 20, 2, 8, 4
  q, k, v = _rand((B, T, N, H), 4), _rand((B, T, N, H), 5), _rand((B, T, N, H), 6)
  full = D.longheads_attention(q, k, v, chunk_size=w, attn_len=12, begin_selective_length=24)
  got = _decode_rows(q, k, v, w=w, attn_len=12, begin=24)
  np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=2e-5)


def test_longheads_decode_step_bad_input_names_the_argument():
  q, kv = jnp.zeros((1, 1, 2, 8)), jnp.zeros((1, 16, 2, 8))
  reps = jnp.zeros((1, 2, 4, 8))
  with pytest.raises(ValueError, match="one token"):
    D.longheads_decode_step(jnp.zeros((1, 2, 2, 8)), kv, kv, reps, 0, chunk_size=4, attn_len=12)
  with pytest.raises(ValueError, match="chunk_reps"):
    D.longheads_decode_step(q, kv, kv, reps[:, :, :3], 0, chunk_size=4, attn_len=12)
  with pytest.raises(ValueError, match="attn_len"):
    D.longheads_decode_step(q, kv, kv, reps, 0, chunk_size=4, attn_len=8)


@pytest.mark.parametrize("query_block", [1, 4])
def test_longheads_length_not_a_chunk_multiple_equals_the_rows_of_a_longer_sequence(query_block):
  """T = 45 with chunks of 4: padded at the end; each row equals that row of any sequence that
  continues it (causality), here the first 45 rows of a 48-token sequence (query_block=1), and
  the selection of a block is that of its real queries."""
  B, T, N, H = 1, 48, 4, 8
  q, k, v = _rand((B, T, N, H), 11), _rand((B, T, 2, H), 12), _rand((B, T, 2, H), 13)
  f = lambda n: D.longheads_attention(q[:, :n], k[:, :n], v[:, :n], chunk_size=4, attn_len=16,
                                      query_block=query_block)
  short, full = f(45), f(48)
  assert short.shape == (B, 45, N, H)
  if query_block == 1:
    np.testing.assert_allclose(np.asarray(short), np.asarray(full[:, :45]), atol=1e-5)
  else:        # blocks share a selection: rows before the last block agree
    np.testing.assert_allclose(np.asarray(short[:, :44]), np.asarray(full[:, :44]), atol=1e-5)
  with pytest.raises(ValueError, match="query_block"):
    D.longheads_attention(q[:, :45], k[:, :45], v[:, :45], chunk_size=4, attn_len=16,
                          query_block=3)
