"""HiP and LongHeads share one key selection per block of queries: with blocks the selection of a
query sees later queries (documented), with one query per block they are strictly causal."""
import jax
import pytest

from attnjax import dynamic as D
from attnjax.analysis.causality import check_causal_cross

T = 64
CASES = {
    "hip": (lambda q, k, v, b: D.hip_attention(q, k, v, top_k=16, block_size_q=b,
                                               block_stride_q=min(b, 2), causal=True), 8),
    "longheads": (lambda q, k, v, b: D.longheads_attention(q, k, v, chunk_size=4, attn_len=16,
                                                           query_block=b), 4),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_selection_per_query_is_causal_and_per_block_is_not(name):
  fn, block = CASES[name]
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  q, k, v = (jax.random.normal(s, (1, T, 2, 8)) for s in ks)
  splits = [21, 38, 51]                                   # inside blocks
  per_token = check_causal_cross(jax.jit(lambda q, k, v: fn(q, k, v, 1)), q, k, v, splits=splits)
  blocked = check_causal_cross(jax.jit(lambda q, k, v: fn(q, k, v, block)), q, k, v,
                               splits=splits)
  assert per_token.ok, per_token
  assert not blocked.ok and blocked.max_diff > 1e-3, blocked
