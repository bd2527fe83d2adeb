"""Linear-engine families: Lightning/TNL, BASED, Flowformer, Agent, Titans, DSF, FAMILIES."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax.linear as L
from attnjax.core.reference import reference_attention
from attnjax.linear.flow import flow_attention_quadratic


def _qkv(t, s=None, n=4, kh=2, h=4, seed=0):
  """NumPy inputs (no device compile to build them)."""
  s = t if s is None else s
  rng = np.random.default_rng(seed)
  f = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  return f(1, t, n, h), f(1, s, kh, h), f(1, s, kh, h)


def _jit(fn, *args):
  """fn(*args) compiled as one program (eager op-by-op dispatch compiles every op)."""
  return jax.jit(fn)(*args)


def test_lightning_uses_tnl_slopes():
  q, k, v = _qkv(9)
  o, ref = _jit(lambda q, k, v: (
      L.lightning_attention(q, k, v, layer_idx=1, num_layers=3, block_size=4),
      L.linear_attention(q, k, v, decay=L.tnl_decay_slopes(4, 1, 3), implementation="reference")),
      q, k, v)
  np.testing.assert_allclose(o, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t,s,window", [(11, 11, (3, 0)), (6, 11, (4, 0)), (11, 6, (2, 0))])
def test_based_window_branch_matches_dense_band(t, s, window):
  q, k, v = _qkv(t, s)
  rel = np.arange(s)[None, :] - (np.arange(t) + s - t)[:, None]
  mask = (rel >= -window[0]) & (rel <= window[1])
  out, ref, wide, causal = _jit(lambda q, k, v: (
      L.based_attention(q, k, v, window=window, branch="window"),
      reference_attention(q, k, v, mask=mask[None, None]),
      L.based_attention(q, k, v, window=(64, 0), branch="window"),
      reference_attention(q, k, v, mask=(rel <= 0)[None, None])), q, k, v)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(wide, causal, rtol=1e-5, atol=1e-5)


def test_based_is_linear_plus_window_and_causal():
  q, k, v = _qkv(10)
  out, lin, win, phi = _jit(lambda q, k, v: (
      L.based_attention(q, k, v, window=(3, 0), chunk_size=4),
      L.linear_attention(q, k, v, feature_map="taylor", normalize=True, eps=1e-12,
                         implementation="reference"),
      L.based_attention(q, k, v, window=(3, 0), branch="window"),
      L.materialize_mixing_matrix(
          lambda q, k, v: L.based_attention(q, k, v, window=(3, 0), chunk_size=4), q, k)),
      q, k, v)
  np.testing.assert_allclose(out, lin + win, rtol=1e-5, atol=1e-5)
  assert np.allclose(np.triu(np.asarray(phi), 1), 0.0)


@pytest.mark.parametrize("causal,s", [(False, 10), (True, 10), (False, 6)])
def test_flow_linear_equals_quadratic(causal, s):
  q, k, v = _qkv(10, s)
  lin = lambda q, k, v: L.flow_attention(q, k, v, causal=causal, chunk_size=4)
  quad = lambda q, k, v: flow_attention_quadratic(q, k, v, causal=causal)
  grads = lambda q, k, v: tuple(jax.grad(lambda x: f(x, k, v).sum())(q) for f in (lin, quad))
  out, want, g = _jit(lambda q, k, v: (lin(q, k, v), quad(q, k, v),
                                       grads(q, k, v) if causal else None), q, k, v)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
  if causal:
    np.testing.assert_allclose(g[0], g[1], rtol=1e-4, atol=1e-5)


def test_flow_identical_tokens_spec_case():
  q, k, v = _qkv(8)
  q = np.broadcast_to(q[:, :1], q.shape)
  k = np.broadcast_to(k[:, :1], k.shape)
  y = _jit(L.flow_attention, q, k, v)
  # Uniform flows: c_j = 1, Ihat = 1 (up to eps), so y_i = sigmoid(1) * mean(v).
  mean_v = np.repeat(v.mean(1, keepdims=True), 2, axis=2)
  np.testing.assert_allclose(y, np.broadcast_to(mean_v / (1 + np.exp(-1.0)), y.shape),
                             rtol=1e-4, atol=1e-5)


def test_flow_causal_is_causal():
  q, k, v = _qkv(8)
  f = lambda q, k, v: L.flow_attention(q, k, v, causal=True, chunk_size=4)
  y, y2 = _jit(lambda q, k, v: (f(q, k, v), f(q.at[:, 5:].add(1.0), k.at[:, 5:].add(1.0),
                                              v.at[:, 5:].add(1.0))), q, k, v)
  np.testing.assert_allclose(y[:, :5], y2[:, :5], rtol=1e-5, atol=1e-6)


def test_agent_attention_oracles():
  q, k, v = _qkv(16, 12)
  scale = 0.5

  def run(q, k, v):
    a = L.pool_agents(q, 4)
    kr, vr = jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2)
    p = jnp.einsum("bntA,bnAs->bnts", jax.nn.softmax(jnp.einsum("btnh,bAnh->bntA", q, a) * scale),
                   jax.nn.softmax(jnp.einsum("bAnh,bsnh->bnAs", a, kr) * scale))
    return (L.agent_attention(q, k, v, agents=a), p, jnp.einsum("bnts,bsne->btne", p, vr),
            L.agent_attention(q, k, v, num_agents=1), L.pool_agents(q, 4, hw=(4, 4)))
  out, p, want, one, grid = map(np.asarray, _jit(run, q, k, v))
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(one, np.broadcast_to(one[:, :1], one.shape), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(grid, q.reshape(1, 2, 2, 2, 2, 4, 4).mean((2, 4)).reshape(1, 4, 4, 4),
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(NotImplementedError):
    L.agent_attention(q, k, v, causal=True)


def _gates(t, n=3, seed=1):
  rng = np.random.default_rng(seed)
  sig = lambda x: (1 / (1 + np.exp(-x))).astype(np.float32)
  al = sig(rng.standard_normal((2, t, n)) - 2)
  th = 0.2 * sig(rng.standard_normal((2, t, n)))
  et = sig(rng.standard_normal((2, t, n)))
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
  rng = np.random.default_rng(2)
  q, k, v = (rng.standard_normal((2, 10, 3, 4)).astype(np.float32) for _ in range(3))
  k = k * 0.5
  al, th, et = _gates(10)
  apply = lambda p, x: p["w"] @ x
  p0 = {"w": np.zeros((3, 4, 4), np.float32)}
  # alpha = 1 (forget everything) and eta = 0 (no momentum): log-space weights stay finite.
  ones, zeros = np.ones_like(al), np.zeros_like(et)

  def run(q, k, v, al, th, et):
    lm = lambda chunk, a=al, e=et: L.linear_memory(q, k, v, a, th, e, chunk_size=chunk)
    return (lm(1), lm(4), L.memory_recurrence(q, k, v, al, th, et, memory_apply=apply, params0=p0),
            L.neural_memory(p0, q, k, v, al, th, et, memory_apply=apply, chunk_size=4),
            lm(4, ones, zeros))
  lm1, lm4, rec, neural, extreme = _jit(run, q, k, v, al, th, et)
  for chunk, got in ((1, lm1), (4, lm4)):
    np.testing.assert_allclose(got, _minibatch_oracle(q, k, v, al, th, et, chunk), rtol=1e-4,
                               atol=1e-5)
  np.testing.assert_allclose(rec, lm1, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(neural, lm4, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(extreme, _minibatch_oracle(q, k, v, ones, th, zeros, 4), rtol=1e-4,
                             atol=1e-5)


def test_titans_mlp_memory_matches_recurrence_at_chunk_one():
  rng = np.random.default_rng(4)
  q, k, v = (rng.standard_normal((1, 6, 2, 4)).astype(np.float32) for _ in range(3))
  al, th, et = (x[:1, :, :2] for x in _gates(6))
  params = {"w1": 0.3 * rng.standard_normal((2, 8, 4)).astype(np.float32),
            "w2": 0.3 * rng.standard_normal((2, 4, 8)).astype(np.float32)}
  apply = lambda p, x: p["w2"] @ jax.nn.silu(p["w1"] @ x)
  got, want = _jit(lambda *a: (
      L.neural_memory(params, *a, memory_apply=apply, chunk_size=1),
      L.memory_recurrence(*a, memory_apply=apply, params0=params)), q, k, v, al, th, et)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_dsf_utilities():
  q, k, v = _qkv(5, n=2, kh=1)
  slopes = np.array([0.2, 0.5], np.float32)

  def run(q, k, v, slopes):
    phi = L.materialize_mixing_matrix(
        lambda q, k, v: L.linear_attention(q, k, v, decay=slopes, chunk_size=4), q, k)
    per_head = [L.linear_attention_mixing_matrix(q[0, :, h], k[0, :, 0], slopes[h])
                for h in range(2)]
    one = jnp.ones((3, 1))
    return (phi, per_head, L.linear_attention_dsf(q[0, :, 1], k[0, :, 0], v[0, :, 0], slopes[1]),
            L.linear_attention(q, k, v, decay=slopes)[0, :, 1],
            L.dsf_scan(jnp.ones((3, 1)), one[:, :, None], one[:, None, :],
                       jnp.array([[1.0], [2.0], [3.0]])),
            L.materialize_mixing_matrix(
                lambda q, k, v: L.flow_attention(q, k, v, causal=True, chunk_size=4), q, k))
  phi, per_head, y, y_ref, scan, phi_flow = _jit(run, q, k, v, slopes)
  for h in range(2):
    np.testing.assert_allclose(phi[0, h], per_head[h], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(scan).ravel(), [1, 3, 6])
  assert np.allclose(np.triu(np.asarray(phi_flow), 1), 0.0)


@pytest.mark.parametrize("name", sorted(L.FAMILIES))
def test_families_patterns(name):
  fn = L.FAMILIES[name]
  cases = []  # (self and cross) x (causal or not), the supported ones in one compiled call
  for t, s, causal in ((6, 6, False), (6, 6, True), (4, 6, False), (4, 6, True)):
    opts = {"num_agents": 2} if name == "agent" else {}
    if name in ("based",):
      opts = {"window": (2, 0) if causal else (2, 2), "chunk_size": 4}
    unsupported = (name == "agent" and causal) or (name == "flow" and causal and t != s)
    if unsupported:
      with pytest.raises(NotImplementedError):
        fn(*_qkv(t, s), causal=causal, **opts)
      continue
    cases.append((t, causal, opts))
  q, k, v = _qkv(6)
  outs = _jit(lambda q, k, v: [fn(q[:, :t], k, v, causal=causal, **opts)
                               for t, causal, opts in cases], q, k, v)
  for (t, _, _), out in zip(cases, outs):
    assert out.shape == (1, t, 4, 4) and np.all(np.isfinite(out))
