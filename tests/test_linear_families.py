"""Linear-engine families: Lightning/TNL, BASED, Flowformer, Agent, Titans, DSF, FAMILIES."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax.linear as L
from attnjax.core.reference import reference_attention
from attnjax.linear.flow import flow_attention_quadratic


def _qkv(t, s=None, n=4, kh=2, h=4, seed=0):
  s = t if s is None else s
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(ks[0], (1, t, n, h)), jax.random.normal(ks[1], (1, s, kh, h)),
          jax.random.normal(ks[2], (1, s, kh, h)))


def test_lightning_uses_tnl_slopes():
  q, k, v = _qkv(9)
  o = L.lightning_attention(q, k, v, layer_idx=1, num_layers=3, block_size=4)
  ref = L.linear_attention(q, k, v, decay=L.tnl_decay_slopes(4, 1, 3), implementation="reference")
  np.testing.assert_allclose(o, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t,s,window", [(11, 11, (3, 0)), (6, 11, (4, 0)), (11, 6, (2, 0))])
def test_based_window_branch_matches_dense_band(t, s, window):
  q, k, v = _qkv(t, s)
  rel = jnp.arange(s)[None, :] - (jnp.arange(t) + s - t)[:, None]
  mask = (rel >= -window[0]) & (rel <= window[1])
  ref = reference_attention(q, k, v, mask=mask[None, None])
  out = L.based_attention(q, k, v, window=window, branch="window")
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  wide = L.based_attention(q, k, v, window=(64, 0), branch="window")
  causal = reference_attention(q, k, v, mask=(rel <= 0)[None, None])
  np.testing.assert_allclose(wide, causal, rtol=1e-5, atol=1e-5)


def test_based_is_linear_plus_window_and_causal():
  q, k, v = _qkv(10)
  out = L.based_attention(q, k, v, window=(3, 0), chunk_size=4)
  lin = L.linear_attention(q, k, v, feature_map="taylor", normalize=True, eps=1e-12,
                           implementation="reference")
  win = L.based_attention(q, k, v, window=(3, 0), branch="window")
  np.testing.assert_allclose(out, lin + win, rtol=1e-5, atol=1e-5)
  phi = L.materialize_mixing_matrix(
      lambda q, k, v: L.based_attention(q, k, v, window=(3, 0), chunk_size=4), q, k)
  assert np.allclose(np.triu(np.asarray(phi), 1), 0.0)


@pytest.mark.parametrize("causal,s", [(False, 10), (True, 10), (False, 6)])
def test_flow_linear_equals_quadratic(causal, s):
  q, k, v = _qkv(10, s)
  out = L.flow_attention(q, k, v, causal=causal, chunk_size=4)
  np.testing.assert_allclose(out, flow_attention_quadratic(q, k, v, causal=causal),
                             rtol=1e-5, atol=1e-6)
  if causal:
    g = jax.grad(lambda q: L.flow_attention(q, k, v, causal=True, chunk_size=4).sum())(q)
    g_ref = jax.grad(lambda q: flow_attention_quadratic(q, k, v, causal=True).sum())(q)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


def test_flow_identical_tokens_spec_case():
  q, k, v = _qkv(8)
  q = jnp.broadcast_to(q[:, :1], q.shape)
  k = jnp.broadcast_to(k[:, :1], k.shape)
  y = L.flow_attention(q, k, v)
  # Uniform flows: c_j = 1, Ihat = 1 (up to eps), so y_i = sigmoid(1) * mean(v).
  mean_v = jnp.repeat(v.mean(1, keepdims=True), 2, axis=2)
  np.testing.assert_allclose(y, jnp.broadcast_to(jax.nn.sigmoid(1.0) * mean_v, y.shape),
                             rtol=1e-4, atol=1e-5)


def test_flow_causal_is_causal():
  q, k, v = _qkv(8)
  y = L.flow_attention(q, k, v, causal=True, chunk_size=4)
  y2 = L.flow_attention(q.at[:, 5:].add(1.0), k.at[:, 5:].add(1.0), v.at[:, 5:].add(1.0),
                        causal=True, chunk_size=4)
  np.testing.assert_allclose(y[:, :5], y2[:, :5], rtol=1e-5, atol=1e-6)


def test_agent_attention_oracles():
  q, k, v = _qkv(16, 12)
  a = L.pool_agents(q, 4)
  out = L.agent_attention(q, k, v, agents=a)
  scale = 0.5
  kr, vr = jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2)
  p = jnp.einsum("bntA,bnAs->bnts", jax.nn.softmax(jnp.einsum("btnh,bAnh->bntA", q, a) * scale),
                 jax.nn.softmax(jnp.einsum("bAnh,bsnh->bnAs", a, kr) * scale))
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(out, jnp.einsum("bnts,bsne->btne", p, vr), rtol=1e-4, atol=1e-5)
  one = L.agent_attention(q, k, v, num_agents=1)
  np.testing.assert_allclose(one, jnp.broadcast_to(one[:, :1], one.shape), rtol=1e-6, atol=1e-6)
  grid = L.pool_agents(q, 4, hw=(4, 4))
  np.testing.assert_allclose(grid, q.reshape(1, 2, 2, 2, 2, 4, 4).mean((2, 4)).reshape(1, 4, 4, 4),
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(NotImplementedError):
    L.agent_attention(q, k, v, causal=True)


def _gates(t, n=3, seed=1):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  al = jax.nn.sigmoid(jax.random.normal(ks[0], (2, t, n)) - 2)
  th = 0.2 * jax.nn.sigmoid(jax.random.normal(ks[1], (2, t, n)))
  et = jax.nn.sigmoid(jax.random.normal(ks[2], (2, t, n)))
  return al, th, et


def _minibatch_oracle(q, k, v, al, th, et, chunk):
  """Token loop where every gradient in a chunk is taken at the chunk-start memory."""
  b, t, n, d = q.shape
  m = np.zeros((b, n, d, d)); s = np.zeros((b, n, d, d)); ys = []
  q, k, v, al, th, et = (np.asarray(x, np.float64) for x in (q, k, v, al, th, et))
  for c0 in range(0, t, chunk):
    m0 = m.copy()
    for i in range(c0, min(c0 + chunk, t)):
      u = np.einsum("bnij,bnj->bni", m0, k[:, i]) - v[:, i]
      grad = 2 * u[..., :, None] * k[:, i][..., None, :]
      s = et[:, i][..., None, None] * s - th[:, i][..., None, None] * grad
      m = (1 - al[:, i])[..., None, None] * m + s
      ys.append(np.einsum("bnij,bnj->bni", m, q[:, i]))
  return np.stack(ys, 1)


def test_titans_linear_memory():
  ks = jax.random.split(jax.random.PRNGKey(2), 3)
  q, k, v = (jax.random.normal(kk, (2, 10, 3, 4)) for kk in ks)
  k = k * 0.5
  al, th, et = _gates(10)
  for chunk in (1, 4):
    np.testing.assert_allclose(L.linear_memory(q, k, v, al, th, et, chunk_size=chunk),
                               _minibatch_oracle(q, k, v, al, th, et, chunk), rtol=1e-4, atol=1e-5)
  apply = lambda p, x: p["w"] @ x
  p0 = {"w": jnp.zeros((3, 4, 4))}
  np.testing.assert_allclose(
      L.memory_recurrence(q, k, v, al, th, et, memory_apply=apply, params0=p0),
      L.linear_memory(q, k, v, al, th, et, chunk_size=1), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
      L.neural_memory(p0, q, k, v, al, th, et, memory_apply=apply, chunk_size=4),
      L.linear_memory(q, k, v, al, th, et, chunk_size=4), rtol=1e-4, atol=1e-5)
  # alpha = 1 (forget everything) and eta = 0 (no momentum): log-space weights stay finite.
  ones, zeros = jnp.ones_like(al), jnp.zeros_like(et)
  np.testing.assert_allclose(L.linear_memory(q, k, v, ones, th, zeros, chunk_size=4),
                             _minibatch_oracle(q, k, v, ones, th, zeros, 4), rtol=1e-4, atol=1e-5)


def test_titans_mlp_memory_matches_recurrence_at_chunk_one():
  ks = jax.random.split(jax.random.PRNGKey(4), 5)
  q, k, v = (jax.random.normal(kk, (1, 6, 2, 4)) for kk in ks[:3])
  al, th, et = (x[:1, :, :2] for x in _gates(6))
  params = {"w1": 0.3 * jax.random.normal(ks[3], (2, 8, 4)),
            "w2": 0.3 * jax.random.normal(ks[4], (2, 4, 8))}
  apply = lambda p, x: p["w2"] @ jax.nn.silu(p["w1"] @ x)
  np.testing.assert_allclose(
      L.neural_memory(params, q, k, v, al, th, et, memory_apply=apply, chunk_size=1),
      L.memory_recurrence(q, k, v, al, th, et, memory_apply=apply, params0=params),
      rtol=1e-4, atol=1e-5)


def test_dsf_utilities():
  q, k, v = _qkv(5, n=2, kh=1)
  slopes = jnp.array([0.2, 0.5])
  phi = L.materialize_mixing_matrix(
      lambda q, k, v: L.linear_attention(q, k, v, decay=slopes, chunk_size=4), q, k)
  for h in range(2):
    np.testing.assert_allclose(phi[0, h], L.linear_attention_mixing_matrix(q[0, :, h], k[0, :, 0],
                                                                           slopes[h]),
                               rtol=1e-5, atol=1e-5)
  y = L.linear_attention_dsf(q[0, :, 1], k[0, :, 0], v[0, :, 0], slopes[1])
  np.testing.assert_allclose(y, L.linear_attention(q, k, v, decay=slopes)[0, :, 1], rtol=1e-5,
                             atol=1e-5)
  one = jnp.ones((3, 1))
  y = L.dsf_scan(jnp.ones((3, 1)), one[:, :, None], one[:, None, :], jnp.array([[1.0], [2.0], [3.0]]))
  np.testing.assert_allclose(y.ravel(), [1, 3, 6])
  phi_flow = L.materialize_mixing_matrix(
      lambda q, k, v: L.flow_attention(q, k, v, causal=True, chunk_size=4), q, k)
  assert np.allclose(np.triu(np.asarray(phi_flow), 1), 0.0)


@pytest.mark.parametrize("name", sorted(L.FAMILIES))
def test_families_patterns(name):
  for t, s, causal in ((6, 6, False), (6, 6, True), (4, 6, False), (4, 6, True)):
    q, k, v = _qkv(t, s)
    fn = L.FAMILIES[name]
    opts = {"num_agents": 2} if name == "agent" else {}
    if name in ("based",):
      opts = {"window": (2, 0) if causal else (2, 2), "chunk_size": 4}
    unsupported = (name == "agent" and causal) or (name == "flow" and causal and t != s)
    if unsupported:
      with pytest.raises(NotImplementedError):
        fn(q, k, v, causal=causal, **opts)
      continue
    out = fn(q, k, v, causal=causal, **opts)
    assert out.shape == (1, t, 4, 4) and np.all(np.isfinite(out))
