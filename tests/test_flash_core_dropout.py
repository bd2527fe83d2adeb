"""The shared flash core (attnjax.core.flash) and attention dropout on the block-sparse XLA engine.

Dropout: the engine regenerates the mask per tile from the key; the dense
reference draws it over [B, N, T, S] with the same function, so the two
agree to rounding, forward and gradients.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry2x32_p

import attnjax
from attnjax import masks as M
from attnjax import scores as SC
from attnjax.block_sparse import api as BA
from attnjax.core import dropout as DR
from attnjax.core import flash as F
from attnjax.core.reference import reference_attention


def _qkv(B, T, S, N, K, H=8, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(ks[0], (B, T, N, H)), jax.random.normal(ks[1], (B, S, K, H)),
          jax.random.normal(ks[2], (B, S, K, H)))


# ---------------------------------------------------------------------------
# the core's pure functions
# ---------------------------------------------------------------------------
def _dense_softmax(s, v):
  p = jax.nn.softmax(s, axis=-1)
  return p @ v, jax.nn.logsumexp(s, axis=-1, keepdims=True)


@jax.jit
def _tiled_and_merged(s, v):
  state = F.init_state(s.shape[:-1], v.shape[-1])
  for c in range(0, s.shape[-1], 8):
    state = F.online_update(*state, s[..., c:c + 8], v[..., c:c + 8, :])
  # two uneven halves each from tile_state, then merged
  merged = F.merge([F.tile_state(s[..., :10], v[..., :10, :]),
                    F.tile_state(s[..., 10:], v[..., 10:, :])])
  return F.finalize(*state), F.finalize(*merged)[0], _dense_softmax(s, v)


def test_online_update_over_tiles_equals_one_softmax():
  ks = jax.random.split(jax.random.PRNGKey(1), 2)
  s = jax.random.normal(ks[0], (3, 5, 24)) * 3
  v = jax.random.normal(ks[1], (3, 24, 4))
  (out, lse), merged, (want_out, want_lse) = _tiled_and_merged(s, v)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(merged, want_out, rtol=1e-5, atol=1e-6)


def test_empty_rows_finalise_to_zeros_and_nan_propagates():
  s = jnp.array([[-jnp.inf, -jnp.inf], [0.0, 1.0], [jnp.nan, 1.0]])
  v = jnp.ones((2, 3))
  out, lse = jax.jit(lambda s_, v_: F.finalize(*F.online_update(*F.init_state((3,), 3), s_,
                                                                 v_)))(s, v)
  assert np.all(np.asarray(out[0]) == 0) and lse[0, 0] == -np.inf
  np.testing.assert_allclose(out[1], 1.0, rtol=1e-6)
  assert np.isnan(np.asarray(out[2])).all() and np.isnan(lse[2, 0])
  # backward: masked pairs and empty rows give exactly zero probability
  p = F.probs_from_lse(s[:2], lse[:2])
  assert np.all(np.asarray(p[0]) == 0)
  np.testing.assert_allclose(p[1], jax.nn.softmax(s[1]), rtol=1e-6)


def test_finalize_with_a_sink_matches_an_extra_valueless_key():
  ks = jax.random.split(jax.random.PRNGKey(2), 2)
  s = jax.random.normal(ks[0], (4, 6))
  v = jax.random.normal(ks[1], (6, 2))
  sink = jnp.float32(0.7)
  out, lse = jax.jit(lambda s_, v_: F.finalize(*F.tile_state(s_, v_), sink=sink))(s, v)
  full = jnp.concatenate([s, jnp.full((4, 1), sink)], -1)
  want = jax.nn.softmax(full, -1)[:, :6] @ v
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(lse[:, 0], jax.nn.logsumexp(full, -1), rtol=1e-6)


def test_logits_grad_and_delta_match_autodiff_with_dropout():
  ks = jax.random.split(jax.random.PRNGKey(3), 4)
  s = jax.random.normal(ks[0], (5, 7))
  v = jax.random.normal(ks[1], (7, 3))
  do = jax.random.normal(ks[2], (5, 3))
  keep = jnp.where(jax.random.uniform(ks[3], (5, 7)) < 0.6, 1 / 0.6, 0.0)
  f = lambda s_: (jax.nn.softmax(s_, -1) * keep) @ v

  @jax.jit
  def both(s_):
    out, lse = F.finalize(*F.tile_state(s_, v, keep))
    p = F.probs_from_lse(s_, lse)
    ds = F.logits_grad(p, F.dot_nt(do, v), F.delta(out, do)[:, None], keep)
    return out, ds, f(s_), jax.vjp(f, s_)[1](do)[0]

  out, ds, want_out, want = both(s)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ds, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# dropout: the engine against the reference with the same key
# ---------------------------------------------------------------------------
RATE = 0.3

CASES = {
    # name: (B, T, S, N, K, attention kwargs)
    "self_dense_gqa": (2, 64, 64, 4, 2, {}),
    "self_causal_mqa": (1, 80, 80, 4, 1, {"mask": M.Causal()}),
    "cross_causal_window": (1, 40, 96, 4, 2, {"mask": M.Causal() & M.SlidingWindow(24)}),
    "mask_array_and_lengths": (2, 64, 64, 2, 1, {"query_seq_lengths": [64, 37],
                                                 "key_value_seq_lengths": [50, 64]}),
    "cross_softcap_bias": (1, 48, 72, 2, 2, {"score": SC.SoftCap(5.0)}),
    # scores normalised by their sum, or not at all
    "softplus_sum": (1, 32, 32, 2, 2, {"score": SC.Softplus(length_scale=False)}),
    "relu_none_causal": (1, 32, 32, 2, 1, {"score": SC.ReLU(), "mask": M.Causal()}),
}


def _array_mask(T, S):
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.random((1, 1, T, S)) < 0.7)


def _kwargs(name, T, S):
  kw = dict(CASES[name][-1])
  for lens in ("query_seq_lengths", "key_value_seq_lengths"):
    if lens in kw:
      kw[lens] = jnp.asarray(kw[lens], jnp.int32)
  if name == "mask_array_and_lengths":
    kw["mask"] = _array_mask(T, S)
  if name == "cross_softcap_bias":
    kw["bias"] = jax.random.normal(jax.random.PRNGKey(9), (1, 2, T, S))
  return kw


def _run(impl, q, k, v, kw, rate=RATE, rng=jax.random.key(7)):
  def loss(q_, k_, v_):
    if isinstance(kw.get("score"), SC.ReLU):   # unnormalised: no lse
      o = attnjax.attention(q_, k_, v_, implementation=impl, dropout_rate=rate,
                            dropout_rng=rng, **kw)
      lse = jnp.zeros(o.shape[:-1])
    else:
      o, lse = attnjax.attention(q_, k_, v_, implementation=impl, return_lse=True,
                                 dropout_rate=rate, dropout_rng=rng, **kw)
    w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
    # the lse enters the loss too (where finite): its cotangent must be right
    return (o * w).sum() + jnp.where(jnp.isfinite(lse), lse, 0.0).sum() * 0.1, (o, lse)
  (_, (o, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2),
                                                   has_aux=True))(q, k, v)
  return o, lse, grads


@pytest.mark.parametrize("name", sorted(CASES))
def test_engine_dropout_equals_the_reference(name):
  B, T, S, N, K, _ = CASES[name]
  q, k, v = _qkv(B, T, S, N, K)
  kw = _kwargs(name, T, S)
  o, lse, grads = _run("xla", q, k, v, kw)
  o_r, lse_r, grads_r = _run("reference", q, k, v, kw)
  np.testing.assert_allclose(o, o_r, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(lse, lse_r, rtol=2e-5, atol=2e-5)
  for g, g_r in zip(grads, grads_r):
    np.testing.assert_allclose(g, g_r, rtol=1e-4, atol=1e-4)


def test_rate_zero_is_no_dropout():
  q, k, v = _qkv(1, 32, 32, 2, 1)

  @jax.jit
  def outs(q_, k_, v_):
    want = attnjax.attention(q_, k_, v_, mask=M.Causal(), implementation="xla")
    return want, [attnjax.attention(q_, k_, v_, mask=M.Causal(), implementation=impl,
                                    dropout_rate=0.0, dropout_rng=jax.random.key(0))
                  for impl in ("xla", "reference")]

  want, got = outs(q, k, v)
  for g in got:
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)


def test_keep_fraction_and_scale():
  rate = 0.25
  mult = np.asarray(DR.dense_multiplier(jax.random.key(4), rate, 2, 3, 128, 160))
  kept = mult > 0
  assert set(np.unique(mult)) == {0.0, np.float32(1 / (1 - rate))}
  n = kept.size   # binomial: 5 standard deviations
  assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)
  # rows, columns, heads and batches are not copies of each other
  assert not np.array_equal(kept[0, 0], kept[0, 1]) and not np.array_equal(kept[0], kept[1])
  assert not np.array_equal(kept[0, 0, 0], kept[0, 0, 1])
  assert not np.array_equal(kept[0, 0, :, 0], kept[0, 0, :, 1])


def test_deterministic_given_the_key_and_different_across_keys():
  q, k, v = _qkv(1, 64, 64, 2, 2)
  f = jax.jit(lambda key: attnjax.attention(q, k, v, implementation="xla", dropout_rate=0.5,
                                            dropout_rng=key))
  a, b, c = f(jax.random.key(1)), f(jax.random.key(1)), f(jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(a - c).max()) > 1e-2
  # and dropout changes the result (the engine tests compare with the reference)
  plain = attnjax.attention(q, k, v, implementation="xla")
  assert float(jnp.abs(a - plain).max()) > 1e-2
  # legacy uint32 keys work too, and give the same mask as the typed key of the seed
  np.testing.assert_array_equal(f(jax.random.PRNGKey(1)), a)


def test_rows_without_keys_stay_zero_under_dropout():
  q, k, v = _qkv(1, 16, 16, 1, 1)
  vis = jnp.ones((16, 16), bool).at[3].set(False)[None, None]
  out = attnjax.attention(q, k, v, mask=vis, implementation="xla", dropout_rate=0.5,
                          dropout_rng=jax.random.key(0))
  assert np.all(np.asarray(out[0, 3]) == 0) and np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("rate, rng, err, word", [
    (1.0, jax.random.key(0), ValueError, "dropout_rate"),
    (-0.1, jax.random.key(0), ValueError, "dropout_rate"),
    (0.1, None, ValueError, "dropout_rng"),
])
def test_dropout_arguments_are_validated(rate, rng, err, word):
  q, k, v = _qkv(1, 8, 8, 1, 1)
  for fn in (lambda: attnjax.attention(q, k, v, implementation="xla", dropout_rate=rate,
                                       dropout_rng=rng),
             lambda: reference_attention(q, k, v, dropout_rate=rate, dropout_rng=rng)):
    with pytest.raises(err, match=word):
      fn()
  # a NumPy / JAX scalar rate is a number too
  assert DR.check_dropout(np.float32(0.25), jax.random.key(0)) == 0.25


def test_traced_rate_is_refused_naming_the_argument():
  q, k, v = _qkv(1, 8, 8, 1, 1)
  with pytest.raises(TypeError, match="dropout_rate"):
    jax.jit(lambda r: attnjax.attention(q, k, v, implementation="xla", dropout_rate=r,
                                        dropout_rng=jax.random.key(0)))(0.1)


def test_both_fast_backends_take_dropout():
  """The Pallas kernels run dropout too (``tests/test_pallas_dropout.py``), on CPU
  (interpreted) and as the default on a GPU target."""
  q, k, v = _qkv(1, 128, 128, 1, 1, H=128)
  call = BA.attention_call(q, k, v, dropout=True)
  assert call["dropout"] and not BA.attention_call(q, k, v)["dropout"]
  assert BA.check_impl("pallas", call) == "pallas"
  assert BA.check_impl("xla", call) == "xla"
  on_gpu = dataclasses.replace(call, platform="gpu", target="sm90",
                               facts=dict(call.facts, kernel_default=True))
  assert BA.check_impl(None, on_gpu) == "pallas"


def test_threefry_rounds_equal_the_primitive_bit_for_bit():
  """``dropout.threefry2x32`` (plain uint32 ops, lowerable in kernels) == threefry2x32_p."""
  words = np.random.default_rng(0).integers(0, 2 ** 32, (4, 4096), dtype=np.uint64)
  words = [jnp.asarray(w.astype(np.uint32)) for w in words]
  want = threefry2x32_p.bind(*words)
  got = jax.jit(DR.threefry2x32)(*words)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)
