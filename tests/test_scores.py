"""Tests for attnjax.scores against the spec oracles and an independent NumPy oracle."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import masks, scores
from attnjax.layers import MultiHeadAttention

B, T, S, N, K, H = 2, 5, 5, 4, 2, 8
ref = attnjax.reference_attention


def _qkv(seed=0, dtype=np.float32, t=T, s=S, scale=1.0):
  """NumPy inputs (no device compile to build them)."""
  rng = np.random.default_rng(seed)
  f = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  q = (scale * f(B, t, N, H)).astype(np.float32)
  k, v = f(B, s, K, H), f(B, s, K, H)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _jit(fn, *args):
  """fn(*args) compiled as one program (eager op-by-op dispatch compiles every op)."""
  return jax.jit(fn)(*args)


def _np_oracle(q, k, v, vis, row_fn):
  """Independent float64 oracle: row_fn(logits_row[visible], i, head) -> weights."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  rep = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  out = np.zeros(q.shape[:3] + (v.shape[-1],))
  for b in range(q.shape[0]):
    for n in range(q.shape[2]):
      for i in range(q.shape[1]):
        sel = vis[n, i]
        if sel.any():
          w = row_fn(logits[b, n, i, sel], i, n)
          out[b, i, n] = w @ v[b, sel, n]
  return out


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


CAUSAL = masks.Causal().to_dense(T, S, N)
WINDOW = (masks.Causal() & masks.SlidingWindow(2)).to_dense(T, S, N)


# -- the spec's tiny cases ---------------------------------------------------------
def test_softplus_two_equal_logits_give_half_half():
  q = np.ones((1, 1, 1, 4), np.float32)
  k = np.ones((1, 2, 1, 4), np.float32)
  v = np.arange(8.0, dtype=np.float32).reshape(1, 2, 1, 4)
  probs = _jit(lambda q, k, v: [
      ref(q, k, v, score=score, scale=scale, return_probs=True)[1]
      for scale in (0.1, 1.0, 7.0)
      for score in (scores.Softplus(), scores.Softplus(length_scale=False), scores.lssar(3.0))],
      q, k, v)
  assert len(probs) == 9
  for p in probs:
    np.testing.assert_allclose(p[0, 0, 0], [0.5, 0.5], rtol=1e-6)


def test_relu_all_negative_logits_give_zeros():
  q = np.ones((1, 3, 1, 4), np.float32)
  k = -np.ones((1, 4, 1, 4), np.float32)
  v = np.random.default_rng(0).standard_normal((1, 4, 1, 4)).astype(np.float32)
  outs = _jit(lambda q, k, v: [ref(q, k, v, score=score, mask=masks.Causal())
                               for score in (scores.ReLU(), scores.ReLU("length"))], q, k, v)
  for out in outs:
    np.testing.assert_array_equal(out, 0.0)


def test_temperatures_one_and_neutral_limits_are_softmax():
  q, k, v = _qkv()

  def run(q, k, v):
    ones_q, ones_v = jnp.ones((B, T, N)), jnp.ones((B, S, K))
    q1, v1 = scores.selective_temperatures(q, v, ones_q, ones_v)
    return ref(q, k, v, mask=masks.Causal()), ref(q1, k, v1, mask=masks.Causal()), [
        ref(q, k, v, mask=masks.Causal(), score=score)
        for score in (scores.Selective(beta=0.0, variant="linear"), scores.Selective(beta=30.0),
                      scores.SoftCap(1e9), scores.Sink(-jnp.inf), scores.DEFAULT_SCORE)]
  want, tempered, outs = _jit(run, q, k, v)
  np.testing.assert_allclose(tempered, want, rtol=1e-6, atol=1e-6)
  for out in outs:
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


# -- each variant against the NumPy oracle, with masks and GQA ---------------------
@pytest.mark.parametrize("vis,mask", [(CAUSAL, masks.Causal()),
                                      (WINDOW, masks.Causal() & masks.SlidingWindow(2))])
def test_variants_match_numpy_oracle(vis, mask):
  q, k, v = _qkv(1, scale=3.0)
  sink = np.array([-1.0, 0.0, 0.5, 2.0])
  c = np.exp(-np.exp(1.5))
  cases = [
      (scores.SoftCap(2.0), lambda x, i, n: _softmax(2.0 * np.tanh(x / 2.0))),
      (scores.Sink(jnp.asarray(sink)), lambda x, i, n: (
          np.exp(x - max(x.max(), sink[n])) /
          (np.exp(x - max(x.max(), sink[n])).sum() + np.exp(sink[n] - max(x.max(), sink[n]))))),
      (scores.Selective(), lambda x, i, n: _softmax(x * (1 + c * np.log(i + 1)))),
      (scores.Selective(beta=0.3, variant="linear"),
       lambda x, i, n: _softmax(x * (1 + 0.3 * np.log(i + 1)))),
      (scores.Softplus(), lambda x, i, n: _l1(np.logaddexp(0, np.log(len(x)) * x))),
      (scores.Softplus(length_base=16.0),
       lambda x, i, n: _l1(np.logaddexp(0, np.log(len(x)) / np.log(16.0) * x))),
      (scores.lssar(2.0, offset=0.5), lambda x, i, n: _lssar(x, 2.0, 0.5)),
      (scores.ReLU(), lambda x, i, n: np.maximum(x, 0)),
      (scores.ReLU("length"), lambda x, i, n: np.maximum(x, 0) / len(x)),
  ]
  outs = _jit(lambda q, k, v: [ref(q, k, v, mask=mask, score=score) for score, _ in cases],
              q, k, v)
  for (score, row_fn), got in zip(cases, outs):
    np.testing.assert_allclose(got, _np_oracle(q, k, v, vis, row_fn), rtol=2e-5, atol=2e-5,
                               err_msg=repr(score))


def _l1(a):
  return a / a.sum()


def _lssar(x, p, o):
  a = _l1(np.logaddexp(0, np.log(len(x)) * x))
  w = np.maximum(len(x) * a - o, 0) ** p
  return w / w.sum() if w.sum() > 0 else w


def test_selective_equals_prescaled_queries():
  q, k, v = _qkv(2)
  pos = np.arange(T) + 3  # explicit positions, e.g. a decoding offset

  def run(q, k, v):
    pairs = []
    for score in (scores.Selective(beta=0.7), scores.Selective(beta=0.2, variant="linear")):
      c = (jnp.exp(-jnp.exp(0.7)) if score.variant == "exp" else 0.2)
      factor = jnp.broadcast_to((1 + c * jnp.log(pos + 1.0))[None, :, None], (B, T, N))
      qs, _ = scores.selective_temperatures(q, v, factor)
      kw = dict(mask=masks.Causal(), q_positions=pos, k_positions=np.arange(S) + 3)
      pairs.append((ref(q, k, v, score=score, **kw), ref(qs, k, v, **kw)))
    return pairs
  for got, want in _jit(run, q, k, v):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_softplus_rows_sum_to_one_and_reweight_identity():
  q, k, v = _qkv(3, scale=4.0)
  c = masks.Causal()

  def run(q, k, v):
    probs = [ref(q, k, v, mask=c, score=score, return_probs=True)[1]
             for score in (scores.Softplus(), scores.lssar(4.0), scores.lssar(2.0, offset=1.0))]
    return (probs, ref(q, k, v, mask=c, score=scores.lssar(1.0)),
            ref(q, k, v, mask=c, score=scores.Softplus()),
            ref(q, k, v, mask=c, score=scores.lssar(3.0)),
            ref(q[:, :3], k[:, :3], v[:, :3], mask=c, score=scores.lssar(3.0)))
  probs, lssar1, softplus, full, part = _jit(run, q, k, v)
  for p in map(np.asarray, probs):
    assert np.all(p >= 0)
    sums = p.sum(-1)
    assert np.all((np.abs(sums - 1) < 1e-5) | (sums == 0))
  np.testing.assert_allclose(lssar1, softplus, rtol=1e-5, atol=1e-6)
  # Causal prefix invariance: the first 3 outputs do not depend on later keys.
  np.testing.assert_allclose(full[:, :3], part, rtol=1e-5, atol=1e-6)


def test_lse_rules_and_fully_masked_rows():
  q, k, v = _qkv(4)
  with pytest.raises(ValueError, match="return_lse"):
    ref(q, k, v, score=scores.ReLU(), return_lse=True)
  empty = np.zeros((1, 1, T, S), bool)
  empty[..., 1:, :] = True  # row 0 sees nothing
  all_scores = (scores.Sink(1.0), scores.Softplus(), scores.lssar(2.0), scores.SoftCap(5.0),
                scores.Selective(), scores.ReLU("length"))
  outs = _jit(lambda q, k, v: [ref(q, k, v, mask=empty, score=score) for score in all_scores],
              q, k, v)
  for score, out in zip(all_scores, map(np.asarray, outs)):
    assert np.all(np.isfinite(out)) and np.all(out[:, 0] == 0), repr(score)


def test_bad_arguments():
  for bad in (lambda: scores.SoftCap(0.0), lambda: scores.Selective(variant="cubic"),
              lambda: scores.lssar(0.5), lambda: scores.Softplus(length_base=1.0),
              lambda: scores.lssar(2.0, offset=-1.0), lambda: scores.ReLU("rows")):
    with pytest.raises(ValueError):
      bad()
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="q_temp"):
    scores.selective_temperatures(q, v, np.ones((B, T), np.float32))


# -- dtypes, transforms, gradients ------------------------------------------------
def test_bfloat16():
  q, k, v = _qkv(5)
  qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
  f32 = lambda x: x.astype(jnp.float32)
  pairs = _jit(lambda qb, kb, vb: [
      (ref(qb, kb, vb, mask=masks.Causal(), score=score),
       ref(f32(qb), f32(kb), f32(vb), mask=masks.Causal(), score=score))
      for score in (scores.SoftCap(), scores.Softplus(), scores.ReLU(), scores.Sink(0.0))],
      qb, kb, vb)
  for out, want in pairs:
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=2e-2, atol=2e-2)


def test_jit_static_pytree_and_vmap():
  q, k, v = _qkv(6)
  f = jax.jit(lambda q, k, v, score: ref(q, k, v, mask=masks.Causal(), score=score),
              static_argnums=3)
  g = jax.jit(lambda q, k, v, score: ref(q, k, v, mask=masks.Causal(), score=score))
  sink = scores.Sink(np.zeros(N, np.float32))
  static = (scores.SoftCap(3.0), scores.lssar(2.0), scores.Selective())
  vm = jax.vmap(lambda q, k, v: ref(q, k, v, mask=masks.Causal(), score=scores.ReLU("length")))
  # The references (and the vmapped call) in one program.
  want, want_sink, got_vm, want_vm = _jit(lambda q, k, v: (
      [ref(q, k, v, mask=masks.Causal(), score=score) for score in static],
      ref(q, k, v, mask=masks.Causal(), score=sink),
      vm(q[:, None], k[:, None], v[:, None])[:, 0],
      ref(q, k, v, mask=masks.Causal(), score=scores.ReLU("length"))), q, k, v)
  for score, w in zip(static, want):
    hash(score)
    np.testing.assert_allclose(f(q, k, v, score), w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g(q, k, v, sink), want_sink, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_vm, want_vm, rtol=1e-5, atol=1e-6)


def test_gradients_finite_including_beta_and_sinks():
  q, k, v = _qkv(7)

  def loss(q, beta, sink):
    a = ref(q, k, v, mask=masks.Causal(), score=scores.Selective(beta=beta))
    b = ref(q, k, v, mask=masks.Causal(), score=scores.Sink(sink))
    c = ref(q, k, v, mask=masks.Causal(), score=scores.lssar(2.0))
    d = ref(q, k, v, mask=masks.Causal(), score=scores.ReLU())
    e = ref(q, k, v, mask=masks.Causal(), score=scores.SoftCap(1.0))
    return sum(jnp.sum(x ** 2) for x in (a, b, c, d, e))

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, np.float32(1.5), np.zeros(N, np.float32))
  grads = [np.asarray(g) for g in grads]
  for g in grads:
    assert np.all(np.isfinite(g))
  assert abs(float(grads[1])) > 0 and np.all(grads[2] != 0)


def test_front_door_attention_with_scores():
  q, k, v = _qkv(8)
  pairs = _jit(lambda q, k, v: [
      (attnjax.attention(q, k, v, mask=masks.Causal(), score=score),
       ref(q, k, v, mask=masks.Causal(), score=score))
      for score in (scores.SoftCap(2.0), scores.Softplus())], q, k, v)
  for got, want in pairs:
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_layer_learns_score_params():
  x = np.random.default_rng(0).standard_normal((B, T, 16)).astype(np.float32)
  for score, name, shape in ((scores.Sink(0.0), "score_sink_logits", (4,)),
                             (scores.Selective(), "score_beta", ())):
    m = MultiHeadAttention(num_heads=4, num_kv_heads=2, causal=True, score=score)

    def run(x):
      params = m.init(jax.random.PRNGKey(1), x)
      return params, jax.grad(lambda p: jnp.sum(m.apply(p, x) ** 2))(params)
    params, g = jax.jit(run)(x)
    assert params["params"][name].shape == shape
    g = np.asarray(g["params"][name])
    assert np.all(np.isfinite(g)) and np.any(g != 0)
