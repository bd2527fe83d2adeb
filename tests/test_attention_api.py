"""Front door: attention() implementations agree; dot_product_attention == jax.nn's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import api
from attnjax import masks as M


def qkv(B, T, S, N, K, H=8, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(ks[0], (B, T, N, H)), jax.random.normal(ks[1], (B, S, K, H)),
          jax.random.normal(ks[2], (B, S, K, H)))


@pytest.mark.parametrize("mask", [None, M.Causal(), M.SlidingWindow(6, 1) & M.Causal()])
def test_attention_implementations_agree(mask):
  q, k, v = qkv(2, 24, 40, 4, 2)
  ref, ref_lse = api.attention(q, k, v, mask=mask, return_lse=True, implementation="reference")
  for impl in (None, "xla"):
    out, lse = jax.jit(lambda a, b, c, impl=impl: api.attention(
        a, b, c, mask=mask, return_lse=True, implementation=impl))(q, k, v)
    np.testing.assert_allclose(out, ref, atol=2e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=2e-5)


def test_attention_grads_xla_vs_reference_and_merge():
  q, k, v = qkv(1, 16, 32, 2, 1)

  def loss(impl):
    return lambda a, b, c: (api.attention(a, b, c, mask=M.Causal(), implementation=impl)
                            ** 2).sum()
  g1 = jax.jit(jax.grad(loss("xla"), (0, 1, 2)))(q, k, v)
  g2 = jax.grad(loss("reference"), (0, 1, 2))(q, k, v)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, atol=1e-4)
  # two key halves merged through their lse == one call over all keys
  kp = jnp.arange(32, dtype=jnp.int32)
  qp = jnp.arange(16, dtype=jnp.int32) + 16
  o1, l1 = api.attention(q, k[:, :16], v[:, :16], mask=M.Causal(), q_positions=qp,
                         k_positions=kp[:16], return_lse=True, implementation="xla")
  o2, l2 = api.attention(q, k[:, 16:], v[:, 16:], mask=M.Causal(), q_positions=qp,
                         k_positions=kp[16:], return_lse=True, implementation="xla")
  o, _ = api.merge_attention(o1, l1, o2, l2)
  np.testing.assert_allclose(o, api.attention(q, k, v, mask=M.Causal(),
                                              implementation="reference"), atol=2e-5)


def test_attention_falls_back_for_unsupported_scores_with_a_warning():
  from attnjax import scores  # pylint: disable=g-import-not-at-top
  q, k, v = qkv(1, 8, 8, 2, 2)
  s = scores.lssar(2.0)
  with pytest.warns(UserWarning, match="reference runs.*re-weights"):
    out = api.attention(q, k, v, score=s)
  np.testing.assert_allclose(out, api.attention(q, k, v, score=s, implementation="reference"),
                             atol=1e-6)
  with pytest.raises(NotImplementedError):
    api.attention(q, k, v, score=s, implementation="xla")


def _valid_rows(qlen, B, T):
  return (np.arange(T)[None, :] < np.asarray(qlen)[:, None])[:, :, None, None]


@pytest.mark.parametrize("case", ["plain", "causal", "window", "window_pair", "lengths",
                                  "bias_mask", "unbatched", "gqa_causal_cross"])
def test_dot_product_attention_matches_jax(case):
  B, T, S, N, K = 2, 16, 16, 4, 4
  kw, rows = {}, None
  if case == "gqa_causal_cross":
    S, K = 24, 2
    kw = dict(is_causal=True)
  q, k, v = qkv(B, T, S, N, K)
  if case == "causal":
    kw = dict(is_causal=True)
  elif case == "window":
    kw = dict(is_causal=True, local_window_size=3)
  elif case == "window_pair":
    kw = dict(local_window_size=(2, 4))
  elif case == "lengths":
    qlen, klen = jnp.array([16, 9]), jnp.array([12, 16])
    kw = dict(query_seq_lengths=qlen, key_value_seq_lengths=klen, is_causal=True)
    rows = _valid_rows(qlen, B, T)
  elif case == "bias_mask":
    kw = dict(bias=jax.random.normal(jax.random.PRNGKey(2), (1, N, T, S)),
              mask=jax.random.bernoulli(jax.random.PRNGKey(3), 0.8, (B, 1, T, S)))
  elif case == "unbatched":
    q, k, v = q[0], k[0], v[0]
    kw = dict(is_causal=True)
  want = jax.nn.dot_product_attention(q, k, v, implementation="xla", **kw)
  got = jax.jit(lambda a, b, c: api.dot_product_attention(a, b, c, implementation="xla",
                                                          **kw))(q, k, v)
  got_default = api.dot_product_attention(q, k, v, **kw)
  if rows is not None:
    want, got, got_default = (np.where(rows, x, 0) for x in (want, got, got_default))
  np.testing.assert_allclose(got, want, atol=2e-5)
  np.testing.assert_allclose(got_default, want, atol=2e-5)
