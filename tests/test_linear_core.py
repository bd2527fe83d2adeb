"""Linear attention core: chunked == recurrent == quadratic, patterns, states, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import attnjax.linear as L
from attnjax.linear import reference, xla_chunked

B, N, K, H = 1, 4, 2, 4
SLOPES = jnp.array([0.5, 0.25, 0.1, 0.0])


def _qkv(t, s=None, dtype=jnp.float32, seed=0, hv=H):
  s = t if s is None else s
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(ks[0], (B, t, N, H), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (B, s, K, H), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (B, s, K, hv), jnp.float32).astype(dtype)
  return q, k, v


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def _value_and_grads(impl, q, k, v, **kw):
  def loss(q, k, v):
    o = L.linear_attention(q, k, v, implementation=impl, **kw)
    return jnp.sum(jnp.sin(o.astype(jnp.float32))), o
  (_, o), g = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
  return o, g


@pytest.mark.parametrize("feature_map,decay", [
    ("identity", None), ("elu+1", "tnl"), ("relu", "tnl"), ("taylor", None), ("taylor", "tnl")])
def test_chunked_matches_quadratic_and_recurrent(feature_map, decay):
  q, k, v = _qkv(10)
  kw = dict(feature_map=feature_map, decay=decay, chunk_size=4)  # 4 does not divide 10
  o, g = _value_and_grads("xla", q, k, v, **kw)
  o_ref, g_ref = _value_and_grads("reference", q, k, v, **kw)
  assert _rel(o, o_ref) < 1e-5
  for a, b in zip(g, g_ref):
    assert _rel(a, b) < 1e-5
  phi = L.resolve_feature_map(feature_map)
  slopes = None if decay is None else L.tnl_decay_slopes(N)
  o_rec, _ = reference.recurrent_linear_attention(phi(q), phi(k), v, slopes=slopes)
  assert _rel(o, o_rec) < 1e-5


@pytest.mark.parametrize("decay", [SLOPES])
def test_normalized_and_callable_feature_map(decay):
  q, k, v = _qkv(9)
  fm = lambda x: jax.nn.softplus(x) + 0.1
  kw = dict(feature_map=fm, decay=decay, normalize=True, chunk_size=4)
  o, g = _value_and_grads("xla", q, k, v, **kw)
  o_ref, g_ref = _value_and_grads("reference", q, k, v, **kw)
  assert _rel(o, o_ref) < 1e-5
  for a, b in zip(g, g_ref):
    assert _rel(a, b) < 1e-4


@pytest.mark.parametrize("decay", ["tnl"])
def test_bfloat16(decay):
  q, k, v = _qkv(12, dtype=jnp.bfloat16)
  kw = dict(feature_map="elu+1", decay=decay, normalize=True, chunk_size=4)
  o, g = _value_and_grads("xla", q, k, v, **kw)
  assert o.dtype == jnp.bfloat16 and all(x.dtype == jnp.bfloat16 for x in g)
  o_ref, g_ref = _value_and_grads("reference", *(x.astype(jnp.float32) for x in (q, k, v)), **kw)
  # The error is that of rounding the bf16 output: a few bf16 ulps.
  assert _rel(o, o_ref) < 2e-2
  for a, b in zip(g, g_ref):
    assert _rel(a, b) < 3e-2


def test_decay_slope_gradient():
  q, k, v = _qkv(11)
  s0 = 0.1 * jnp.ones((B, N, H, H))

  def loss(impl):
    def fn(slopes):
      o, s = L.linear_attention(q, k, v, decay=slopes, chunk_size=4, initial_state=s0,
                                return_state=True, implementation=impl)
      return jnp.sum(jnp.sin(o)) + jnp.sum(s ** 2)
    return fn
  slopes = jnp.array([0.3, 0.2, 0.1, 0.05])
  assert _rel(jax.grad(loss("xla"))(slopes), jax.grad(loss("reference"))(slopes)) < 1e-4


@pytest.mark.parametrize("fast,exact", [(9.0, False), (12.0, True)])
def test_fast_decays_factorised_and_exact(fast, exact):
  # With chunk 8, a slope of 9 gives a chunk log-decay of 72: still factorised
  # (factors up to exp(36)); 12 gives 96 > FACTOR_LIMIT, so the XLA path uses
  # the exact exp(b_r - b_c) form. Outputs and all gradients must match.
  q, k, v = _qkv(19)
  slopes = jnp.array([fast, 0.3, 0.0, 2.0])
  assert (8 * fast > xla_chunked.FACTOR_LIMIT) == exact
  s0 = 0.1 * jnp.ones((B, N, H, H))

  def loss(impl):
    def fn(q, k, v, slopes):
      o, s = L.linear_attention(q, k, v, decay=slopes, chunk_size=8, initial_state=s0,
                                return_state=True, implementation=impl)
      return jnp.sum(jnp.sin(o)) + jnp.sum(s ** 2), o
    return fn
  (_, o), g = jax.value_and_grad(loss("xla"), (0, 1, 2, 3), has_aux=True)(q, k, v, slopes)
  (_, o_ref), g_ref = jax.value_and_grad(loss("reference"), (0, 1, 2, 3), has_aux=True)(
      q, k, v, slopes)
  assert np.all(np.isfinite(o)) and _rel(o, o_ref) < 1e-5
  for a, b in zip(g, g_ref):
    assert np.all(np.isfinite(a)) and _rel(a, b) < 1e-4


@pytest.mark.parametrize("t,s,causal", [(8, 8, False), (8, 8, True), (5, 11, False),
                                        (5, 11, True), (11, 5, True)])
def test_cab_patterns(t, s, causal):
  q, k, v = _qkv(t, s)
  kw = dict(feature_map="elu+1", causal=causal, normalize=True, chunk_size=4)
  if causal and t != s:  # gradients where the padding of the cross alignment matters
    o, g = _value_and_grads("xla", q, k, v, **kw)
    o_ref, g_ref = _value_and_grads("reference", q, k, v, **kw)
    for a, b in zip(g, g_ref):
      assert _rel(a, b) < 1e-4
  else:
    o = L.linear_attention(q, k, v, implementation="xla", **kw)
    o_ref = L.linear_attention(q, k, v, implementation="reference", **kw)
  assert _rel(o, o_ref) < 1e-5
  if causal and t <= s:  # query i only sees keys up to i + s - t
    i = t // 2
    k2 = k.at[:, i + s - t + 1:].add(1.0)
    v2 = v.at[:, i + s - t + 1:].add(1.0)
    o2 = L.linear_attention(q, k2, v2, implementation="xla", **kw)
    np.testing.assert_allclose(o2[:, :i + 1], o[:, :i + 1], rtol=1e-5, atol=1e-6)


def test_causal_cross_longer_queries_see_nothing_first():
  q, k, v = _qkv(7, 3)
  o = L.linear_attention(q, k, v, feature_map="elu+1", normalize=True, chunk_size=2)
  np.testing.assert_array_equal(np.asarray(o[:, :4]), 0.0)  # positions < 0: no key, zeros
  assert np.all(np.isfinite(o))


def test_state_in_pieces_and_decode_step():
  q, k, v = _qkv(13)
  kw = dict(feature_map="taylor", decay=SLOPES, normalize=True, chunk_size=4)
  full, s_full = L.linear_attention(q, k, v, return_state=True, **kw)
  a, s_a = L.linear_attention(q[:, :6], k[:, :6], v[:, :6], return_state=True, **kw)
  b, s_b = L.linear_attention(q[:, 6:], k[:, 6:], v[:, 6:], initial_state=s_a,
                              return_state=True, **kw)
  np.testing.assert_allclose(jnp.concatenate([a, b], 1), full, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s_b, s_full, rtol=1e-5, atol=1e-4)
  state = L.init_state(B, N, 1 + H + H * H, H, normalize=True)
  step = jax.jit(lambda s, q, k, v: L.linear_attention_step(
      s, q, k, v, feature_map="taylor", decay=SLOPES, normalize=True))
  outs = []
  for t in range(13):
    o_t, state = step(state, q[:, t], k[:, t], v[:, t])
    outs.append(o_t)
  np.testing.assert_allclose(jnp.stack(outs, 1), full, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state, s_full, rtol=1e-5, atol=1e-4)


def test_jit_vmap_grad():
  q, k, v = _qkv(6)
  f = jax.jit(lambda q, k, v: L.linear_attention(q, k, v, decay="tnl", chunk_size=4))
  stacked = [jnp.stack([x, 2 * x]) for x in (q, k, v)]
  out = jax.vmap(f)(*stacked)
  np.testing.assert_allclose(out[1], f(2 * q, 2 * k, 2 * v), rtol=1e-5, atol=1e-5)
  g = jax.jit(jax.grad(lambda q: f(q, k, v).sum()))(q)
  assert g.shape == q.shape and np.all(np.isfinite(g))


def test_spec_tiny_cases():
  # Taylor map (P2-09): 273 features at d' = 16 and phi(q).phi(k) = 1 + s + s^2 / 2.
  x, y = jax.random.normal(jax.random.PRNGKey(3), (2, 16))
  fx, fy = L.taylor(x), L.taylor(y)
  s = x @ y / 4.0
  assert fx.shape == (273,)
  np.testing.assert_allclose(fx @ fy, 1 + s + s * s / 2, rtol=1e-5)
  # DSF (P2-05): phi = id, q = k = [1], v = [1, 2, 3] -> y = [1, 3, 6].
  one = jnp.ones((1, 3, 1, 1))
  vv = jnp.array([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1)
  np.testing.assert_allclose(L.linear_attention(one, one, vv).ravel(), [1, 3, 6])
  # Lightning (#25): L = 2, q = k = v = 1, lambda = 0.5 -> [1, 1.5].
  two = jnp.ones((1, 2, 1, 1))
  o = L.linear_attention(two, two, two, decay=jnp.log(2.0))
  np.testing.assert_allclose(o.ravel(), [1.0, 1.5], rtol=1e-6)


def test_tnl_slopes():
  np.testing.assert_allclose(L.alibi_slopes(8), 2.0 ** -np.arange(1, 9))
  np.testing.assert_allclose(L.tnl_decay_slopes(8, 0, 4), 0.5 ** np.arange(1, 9) * (1 + 1e-5),
                             rtol=1e-6)
  np.testing.assert_allclose(L.tnl_decay_slopes(8, 3, 4), 0.5 ** np.arange(1, 9) * 1e-5,
                             rtol=1e-5)


def test_bad_inputs():
  q, k, v = _qkv(6)
  with pytest.raises(ValueError, match="decay"):
    L.linear_attention(q, k, v, decay=jnp.array([0.1, -0.2, 0.1, 0.1]))
  with pytest.raises(ValueError, match="decay"):
    L.linear_attention(q, k, v, decay=jnp.ones(3))
  with pytest.raises(ValueError, match="chunk_size"):
    L.linear_attention(q, k, v, chunk_size=0)
  with pytest.raises(ValueError, match="initial_state"):
    L.linear_attention(q, k, v, initial_state=jnp.zeros((B, N, H, H + 1)))
  with pytest.raises(ValueError, match="query"):
    L.linear_attention(q[0], k, v)
  with pytest.raises(ValueError, match="feature_map"):
    L.linear_attention(q, k, v, feature_map="cosine")
  with pytest.raises(ValueError, match="implementation"):
    L.linear_attention(q, k, v, implementation="cuda")
  with pytest.raises(ValueError, match="state"):
    L.linear_attention_step(jnp.zeros((B, N, H, 2)), q[:, 0], k[:, 0], v[:, 0])
  with pytest.raises(ValueError, match="q_t"):
    L.linear_attention_step(jnp.zeros((B, N, H, H)), q, k[:, 0], v[:, 0])
  with pytest.raises(NotImplementedError, match="causal"):
    L.linear_attention(q, k, v, causal=False, decay="tnl")


@settings(max_examples=4, deadline=None)
@given(t=st.integers(1, 9), s=st.integers(1, 9), chunk=st.integers(1, 5), causal=st.booleans(),
       decay=st.booleans())
def test_property_sweep(t, s, chunk, causal, decay):
  q, k, v = _qkv(t, s, seed=t * 10 + s)
  kw = dict(feature_map="elu+1", causal=causal, chunk_size=chunk,
            decay=SLOPES if (decay and causal) else None)
  o = L.linear_attention(q, k, v, implementation="xla", **kw)
  o_ref = L.linear_attention(q, k, v, implementation="reference", **kw)
  np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)
