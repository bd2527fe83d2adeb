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


def _qkv(seed=0, dtype=jnp.float32, t=T, s=S, scale=1.0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = scale * jax.random.normal(ks[0], (B, t, N, H), jnp.float32)
  k = jax.random.normal(ks[1], (B, s, K, H), jnp.float32)
  v = jax.random.normal(ks[2], (B, s, K, H), jnp.float32)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


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
  q = jnp.ones((1, 1, 1, 4))
  k = jnp.ones((1, 2, 1, 4))
  v = jnp.arange(8.0).reshape(1, 2, 1, 4)
  for scale in (0.1, 1.0, 7.0):
    for score in (scores.Softplus(), scores.Softplus(length_scale=False), scores.lssar(3.0)):
      _, probs = ref(q, k, v, score=score, scale=scale, return_probs=True)
      np.testing.assert_allclose(probs[0, 0, 0], [0.5, 0.5], rtol=1e-6)


def test_relu_all_negative_logits_give_zeros():
  q = jnp.ones((1, 3, 1, 4))
  k = -jnp.ones((1, 4, 1, 4))
  v = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 1, 4))
  for score in (scores.ReLU(), scores.ReLU("length")):
    out = ref(q, k, v, score=score, mask=masks.Causal())
    np.testing.assert_array_equal(out, 0.0)


def test_temperatures_one_and_neutral_limits_are_softmax():
  q, k, v = _qkv()
  want = ref(q, k, v, mask=masks.Causal())
  ones_q, ones_v = jnp.ones((B, T, N)), jnp.ones((B, S, K))
  q1, v1 = scores.selective_temperatures(q, v, ones_q, ones_v)
  np.testing.assert_allclose(ref(q1, k, v1, mask=masks.Causal()), want, rtol=1e-6, atol=1e-6)
  for score in (scores.Selective(beta=0.0, variant="linear"), scores.Selective(beta=30.0),
                scores.SoftCap(1e9), scores.Sink(-jnp.inf), scores.DEFAULT_SCORE):
    np.testing.assert_allclose(ref(q, k, v, mask=masks.Causal(), score=score), want,
                               rtol=1e-5, atol=1e-5)


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
  for score, row_fn in cases:
    got = ref(q, k, v, mask=mask, score=score)
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
  pos = jnp.arange(T) + 3  # explicit positions, e.g. a decoding offset
  for score in (scores.Selective(beta=0.7), scores.Selective(beta=0.2, variant="linear")):
    c = (jnp.exp(-jnp.exp(0.7)) if score.variant == "exp" else 0.2)
    factor = jnp.broadcast_to((1 + c * jnp.log(pos + 1.0))[None, :, None], (B, T, N))
    qs, _ = scores.selective_temperatures(q, v, factor)
    kw = dict(mask=masks.Causal(), q_positions=pos, k_positions=jnp.arange(S) + 3)
    np.testing.assert_allclose(ref(q, k, v, score=score, **kw), ref(qs, k, v, **kw),
                               rtol=1e-5, atol=1e-5)


def test_softplus_rows_sum_to_one_and_reweight_identity():
  q, k, v = _qkv(3, scale=4.0)
  for score in (scores.Softplus(), scores.lssar(4.0), scores.lssar(2.0, offset=1.0)):
    _, p = ref(q, k, v, mask=masks.Causal(), score=score, return_probs=True)
    assert bool(jnp.all(p >= 0))
    sums = p.sum(-1)
    assert bool(jnp.all((jnp.abs(sums - 1) < 1e-5) | (sums == 0)))
  np.testing.assert_allclose(ref(q, k, v, mask=masks.Causal(), score=scores.lssar(1.0)),
                             ref(q, k, v, mask=masks.Causal(), score=scores.Softplus()),
                             rtol=1e-5, atol=1e-6)
  # Causal prefix invariance: the first 3 outputs do not depend on later keys.
  full = ref(q, k, v, mask=masks.Causal(), score=scores.lssar(3.0))
  part = ref(q[:, :3], k[:, :3], v[:, :3], mask=masks.Causal(), score=scores.lssar(3.0))
  np.testing.assert_allclose(full[:, :3], part, rtol=1e-5, atol=1e-6)


def test_lse_rules_and_fully_masked_rows():
  q, k, v = _qkv(4)
  with pytest.raises(ValueError, match="return_lse"):
    ref(q, k, v, score=scores.ReLU(), return_lse=True)
  empty = jnp.zeros((1, 1, T, S), bool).at[..., 1:, :].set(True)  # row 0 sees nothing
  for score in (scores.Sink(1.0), scores.Softplus(), scores.lssar(2.0), scores.SoftCap(5.0),
                scores.Selective(), scores.ReLU("length")):
    out = ref(q, k, v, mask=empty, score=score)
    assert bool(jnp.all(jnp.isfinite(out))) and bool(jnp.all(out[:, 0] == 0)), repr(score)


def test_bad_arguments():
  for bad in (lambda: scores.SoftCap(0.0), lambda: scores.Selective(variant="cubic"),
              lambda: scores.lssar(0.5), lambda: scores.Softplus(length_base=1.0),
              lambda: scores.lssar(2.0, offset=-1.0), lambda: scores.ReLU("rows")):
    with pytest.raises(ValueError):
      bad()
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="q_temp"):
    scores.selective_temperatures(q, v, jnp.ones((B, T)))


# -- dtypes, transforms, gradients ------------------------------------------------
def test_bfloat16():
  q, k, v = _qkv(5)
  qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
  for score in (scores.SoftCap(), scores.Softplus(), scores.ReLU(), scores.Sink(0.0)):
    out = ref(qb, kb, vb, mask=masks.Causal(), score=score)
    assert out.dtype == jnp.bfloat16
    want = ref(qb.astype(jnp.float32), kb.astype(jnp.float32), vb.astype(jnp.float32),
               mask=masks.Causal(), score=score)
    np.testing.assert_allclose(out.astype(jnp.float32), want, rtol=2e-2, atol=2e-2)


def test_jit_static_pytree_and_vmap():
  q, k, v = _qkv(6)
  f = jax.jit(lambda q, k, v, score: ref(q, k, v, mask=masks.Causal(), score=score),
              static_argnums=3)
  g = jax.jit(lambda q, k, v, score: ref(q, k, v, mask=masks.Causal(), score=score))
  sink = scores.Sink(jnp.zeros(N))
  for score in (scores.SoftCap(3.0), scores.lssar(2.0), scores.Selective()):
    hash(score)
    np.testing.assert_allclose(f(q, k, v, score), ref(q, k, v, mask=masks.Causal(),
                                                      score=score), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g(q, k, v, sink), ref(q, k, v, mask=masks.Causal(), score=sink),
                             rtol=1e-5, atol=1e-6)
  vm = jax.vmap(lambda q, k, v: ref(q, k, v, mask=masks.Causal(), score=scores.ReLU("length")))
  got = vm(q[:, None], k[:, None], v[:, None])[:, 0]
  np.testing.assert_allclose(got, ref(q, k, v, mask=masks.Causal(), score=scores.ReLU("length")),
                             rtol=1e-5, atol=1e-6)


def test_gradients_finite_including_beta_and_sinks():
  q, k, v = _qkv(7)

  def loss(q, beta, sink):
    a = ref(q, k, v, mask=masks.Causal(), score=scores.Selective(beta=beta))
    b = ref(q, k, v, mask=masks.Causal(), score=scores.Sink(sink))
    c = ref(q, k, v, mask=masks.Causal(), score=scores.lssar(2.0))
    d = ref(q, k, v, mask=masks.Causal(), score=scores.ReLU())
    e = ref(q, k, v, mask=masks.Causal(), score=scores.SoftCap(1.0))
    return sum(jnp.sum(x ** 2) for x in (a, b, c, d, e))

  grads = jax.grad(loss, argnums=(0, 1, 2))(q, jnp.float32(1.5), jnp.zeros(N))
  for g in grads:
    assert bool(jnp.all(jnp.isfinite(g)))
  assert float(jnp.abs(grads[1])) > 0 and bool(jnp.all(grads[2] != 0))


def test_front_door_attention_with_scores():
  q, k, v = _qkv(8)
  for score in (scores.SoftCap(2.0), scores.Softplus()):
    got = attnjax.attention(q, k, v, mask=masks.Causal(), score=score)
    np.testing.assert_allclose(got, ref(q, k, v, mask=masks.Causal(), score=score),
                               rtol=2e-5, atol=2e-5)


def test_layer_learns_score_params():
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, 16))
  for score, name, shape in ((scores.Sink(0.0), "score_sink_logits", (4,)),
                             (scores.Selective(), "score_beta", ())):
    m = MultiHeadAttention(num_heads=4, num_kv_heads=2, causal=True, score=score)
    params = m.init(jax.random.PRNGKey(1), x)
    assert params["params"][name].shape == shape
    g = jax.grad(lambda p: jnp.sum(m.apply(p, x) ** 2))(params)
    assert bool(jnp.all(jnp.isfinite(g["params"][name])))
    assert bool(jnp.any(g["params"][name] != 0))
