"""Linear attention core: chunked == recurrent == quadratic, patterns, states, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import attnjax.linear as L
from attnjax.linear import reference, xla_chunked

B, N, K, H = 1, 4, 2, 4
SLOPES = np.array([0.5, 0.25, 0.1, 0.0], np.float32)


def _qkv(t, s=None, dtype=np.float32, seed=0, hv=H):
  """NumPy inputs (no device compile to build them)."""
  s = t if s is None else s
  rng = np.random.default_rng(seed)
  f = lambda *shape: rng.standard_normal(shape).astype(np.float32).astype(dtype)
  return f(B, t, N, H), f(B, s, K, H), f(B, s, K, hv)


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def _vg(impl, q, k, v, **kw):
  def loss(q, k, v):
    o = L.linear_attention(q, k, v, implementation=impl, **kw)
    return jnp.sum(jnp.sin(o.astype(jnp.float32))), o
  (_, o), g = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
  return o, g


def _xla_and_reference(q, k, v, ref_inputs=None, **kw):
  """(o, grads) of the XLA path and of the reference (on ref_inputs) in one compiled call."""
  ref_inputs = (q, k, v) if ref_inputs is None else ref_inputs
  return jax.jit(lambda a, b: (_vg("xla", *a, **kw), _vg("reference", *b, **kw)))(
      (q, k, v), ref_inputs)


@pytest.mark.parametrize("feature_map,decay", [
    ("identity", None), ("elu+1", "tnl"), ("relu", "tnl"), ("taylor", None), ("taylor", "tnl")])
def test_chunked_matches_quadratic_and_recurrent(feature_map, decay):
  q, k, v = _qkv(10)
  kw = dict(feature_map=feature_map, decay=decay, chunk_size=4)  # 4 does not divide 10
  phi = L.resolve_feature_map(feature_map)
  slopes = None if decay is None else L.tnl_decay_slopes(N)
  (o, g), (o_ref, g_ref), o_rec = jax.jit(lambda a, b, c: (
      _vg("xla", a, b, c, **kw), _vg("reference", a, b, c, **kw),
      reference.recurrent_linear_attention(phi(a), phi(b), c, slopes=slopes)[0]))(q, k, v)
  assert _rel(o, o_ref) < 1e-5
  for a, b in zip(g, g_ref):
    assert _rel(a, b) < 1e-5
  assert _rel(o, o_rec) < 1e-5


@pytest.mark.parametrize("decay", [SLOPES])
def test_normalized_and_callable_feature_map(decay):
  q, k, v = _qkv(9)
  fm = lambda x: jax.nn.softplus(x) + 0.1
  kw = dict(feature_map=fm, decay=decay, normalize=True, chunk_size=4)
  (o, g), (o_ref, g_ref) = _xla_and_reference(q, k, v, **kw)
  assert _rel(o, o_ref) < 1e-5
  for a, b in zip(g, g_ref):
    assert _rel(a, b) < 1e-4


@pytest.mark.parametrize("decay", ["tnl"])
def test_bfloat16(decay):
  q, k, v = _qkv(12, dtype=jnp.bfloat16)
  kw = dict(feature_map="elu+1", decay=decay, normalize=True, chunk_size=4)
  (o, g), (o_ref, g_ref) = _xla_and_reference(
      q, k, v, ref_inputs=tuple(x.astype(np.float32) for x in (q, k, v)), **kw)
  assert o.dtype == jnp.bfloat16 and all(x.dtype == jnp.bfloat16 for x in g)
  # The error is that of rounding the bf16 output: a few bf16 ulps.
  assert _rel(o, o_ref) < 2e-2
  for a, b in zip(g, g_ref):
    assert _rel(a, b) < 3e-2


def test_decay_slope_gradient():
  q, k, v = _qkv(11)
  s0 = np.full((B, N, H, H), 0.1, np.float32)

  def loss(impl):
    def fn(slopes):
      o, s = L.linear_attention(q, k, v, decay=slopes, chunk_size=4, initial_state=s0,
                                return_state=True, implementation=impl)
      return jnp.sum(jnp.sin(o)) + jnp.sum(s ** 2)
    return fn
  slopes = np.array([0.3, 0.2, 0.1, 0.05], np.float32)
  g, g_ref = jax.jit(lambda x: (jax.grad(loss("xla"))(x), jax.grad(loss("reference"))(x)))(slopes)
  assert _rel(g, g_ref) < 1e-4


@pytest.mark.parametrize("fast,exact", [(9.0, False), (12.0, True)])
def test_fast_decays_factorised_and_exact(fast, exact):
  # With chunk 8, a slope of 9 gives a chunk log-decay of 72: still factorised
  # (factors up to exp(36)); 12 gives 96 > FACTOR_LIMIT, so the XLA path uses
  # the exact exp(b_r - b_c) form. Outputs and all gradients must match.
  q, k, v = _qkv(19)
  slopes = np.array([fast, 0.3, 0.0, 2.0], np.float32)
  assert (8 * fast > xla_chunked.FACTOR_LIMIT) == exact
  s0 = np.full((B, N, H, H), 0.1, np.float32)

  def loss(impl):
    def fn(q, k, v, slopes):
      o, s = L.linear_attention(q, k, v, decay=slopes, chunk_size=8, initial_state=s0,
                                return_state=True, implementation=impl)
      return jnp.sum(jnp.sin(o)) + jnp.sum(s ** 2), o
    return fn
  ((_, o), g), ((_, o_ref), g_ref) = jax.jit(lambda *a: tuple(
      jax.value_and_grad(loss(impl), (0, 1, 2, 3), has_aux=True)(*a)
      for impl in ("xla", "reference")))(q, k, v, slopes)
  assert np.all(np.isfinite(o)) and _rel(o, o_ref) < 1e-5
  for a, b in zip(g, g_ref):
    assert np.all(np.isfinite(a)) and _rel(a, b) < 1e-4


@pytest.mark.parametrize("t,s,causal", [(8, 8, False), (8, 8, True), (5, 11, False),
                                        (5, 11, True), (11, 5, True)])
def test_cab_patterns(t, s, causal):
  q, k, v = _qkv(t, s)
  kw = dict(feature_map="elu+1", causal=causal, normalize=True, chunk_size=4)
  i = t // 2
  k2, v2 = k.copy(), v.copy()  # query i only sees keys up to i + s - t
  k2[:, i + s - t + 1:] += 1.0
  v2[:, i + s - t + 1:] += 1.0
  fwd = lambda impl, a, b, c: L.linear_attention(a, b, c, implementation=impl, **kw)

  @jax.jit
  def run(a, b, c, b2, c2):
    if causal and t != s:  # gradients where the padding of the cross alignment matters
      (o, g), (o_ref, g_ref) = _vg("xla", a, b, c, **kw), _vg("reference", a, b, c, **kw)
    else:
      o, o_ref, g, g_ref = fwd("xla", a, b, c), fwd("reference", a, b, c), (), ()
    return o, o_ref, g, g_ref, fwd("xla", a, b2, c2)
  o, o_ref, g, g_ref, o2 = run(q, k, v, k2, v2)
  for a, b in zip(g, g_ref):
    assert _rel(a, b) < 1e-4
  assert _rel(o, o_ref) < 1e-5
  if causal and t <= s:
    np.testing.assert_allclose(o2[:, :i + 1], o[:, :i + 1], rtol=1e-5, atol=1e-6)


def test_causal_cross_longer_queries_see_nothing_first():
  q, k, v = _qkv(7, 3)
  o = jax.jit(lambda a, b, c: L.linear_attention(a, b, c, feature_map="elu+1", normalize=True,
                                                 chunk_size=2))(q, k, v)
  np.testing.assert_array_equal(np.asarray(o[:, :4]), 0.0)  # positions < 0: no key, zeros
  assert np.all(np.isfinite(o))


def test_state_in_pieces_and_decode_step():
  q, k, v = _qkv(13)
  kw = dict(feature_map="taylor", decay=SLOPES, normalize=True, chunk_size=4)
  def pieces(q, k, v):
    full, s_full = L.linear_attention(q, k, v, return_state=True, **kw)
    a, s_a = L.linear_attention(q[:, :6], k[:, :6], v[:, :6], return_state=True, **kw)
    b, s_b = L.linear_attention(q[:, 6:], k[:, 6:], v[:, 6:], initial_state=s_a,
                                return_state=True, **kw)
    return full, s_full, jnp.concatenate([a, b], 1), s_b
  full, s_full, ab, s_b = jax.jit(pieces)(q, k, v)
  np.testing.assert_allclose(ab, full, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s_b, s_full, rtol=1e-5, atol=1e-4)
  state = L.init_state(B, N, 1 + H + H * H, H, normalize=True)
  step = jax.jit(lambda s, q, k, v: L.linear_attention_step(
      s, q, k, v, feature_map="taylor", decay=SLOPES, normalize=True))
  outs = []
  for t in range(13):
    o_t, state = step(state, q[:, t], k[:, t], v[:, t])
    outs.append(o_t)
  np.testing.assert_allclose(np.stack(outs, 1), full, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state, s_full, rtol=1e-5, atol=1e-4)


def test_jit_vmap_grad():
  q, k, v = _qkv(6)
  f = jax.jit(lambda q, k, v: L.linear_attention(q, k, v, decay="tnl", chunk_size=4))
  stacked = [np.stack([x, 2 * x]) for x in (q, k, v)]
  out = jax.vmap(f)(*stacked)
  np.testing.assert_allclose(out[1], f(2 * q, 2 * k, 2 * v), rtol=1e-5, atol=1e-5)
  g = jax.jit(jax.grad(lambda q: f(q, k, v).sum()))(q)
  assert g.shape == q.shape and np.all(np.isfinite(g))


def test_spec_tiny_cases():
  # Taylor map (P2-09): 273 features at d' = 16 and phi(q).phi(k) = 1 + s + s^2 / 2.
  x, y = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
  one = np.ones((1, 3, 1, 1), np.float32)
  vv = np.array([1.0, 2.0, 3.0], np.float32).reshape(1, 3, 1, 1)
  two = np.ones((1, 2, 1, 1), np.float32)
  fx, fy, dsf, o = jax.jit(lambda x, y, one, vv, two: (
      L.taylor(x), L.taylor(y), L.linear_attention(one, one, vv),
      L.linear_attention(two, two, two, decay=jnp.log(2.0))))(x, y, one, vv, two)
  s = x @ y / 4.0
  assert fx.shape == (273,)
  np.testing.assert_allclose(fx @ fy, 1 + s + s * s / 2, rtol=1e-5)
  # DSF (P2-05): phi = id, q = k = [1], v = [1, 2, 3] -> y = [1, 3, 6].
  np.testing.assert_allclose(np.asarray(dsf).ravel(), [1, 3, 6])
  # Lightning (#25): L = 2, q = k = v = 1, lambda = 0.5 -> [1, 1.5].
  np.testing.assert_allclose(np.asarray(o).ravel(), [1.0, 1.5], rtol=1e-6)


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
  o, o_ref = jax.jit(lambda a, b, c: tuple(L.linear_attention(a, b, c, implementation=impl, **kw)
                                            for impl in ("xla", "reference")))(q, k, v)
  np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)
