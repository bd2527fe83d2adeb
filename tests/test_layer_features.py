"""MultiHeadAttention features: RoPE scalings and conventions, per-projection biases,
fused qkv, attention dropout. Oracles are NumPy transcriptions or the dense reference."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import masks
from attnjax.layers import MultiHeadAttention
from attnjax.layers.rope import (RopeScaling, apply_rope, rope_attention_factor,
                                 rope_frequencies)

B, T, D = 2, 5, 16
R, BASE = 16, 10000.0


def _np_inv(rot=R, base=BASE):
  return 1.0 / base ** (np.arange(0, rot, 2, dtype=np.float64) / rot)


def _np_yarn(factor, L0, rot=R, base=BASE, beta_fast=32.0, beta_slow=1.0):
  inv = _np_inv(rot, base)
  cd = lambda n: rot * math.log(L0 / (n * 2 * math.pi)) / (2 * math.log(base))
  lo, hi = max(math.floor(cd(beta_fast)), 0), min(math.ceil(cd(beta_slow)), rot - 1)
  hi = hi + 0.001 if lo == hi else hi
  ramp = np.clip((np.arange(rot // 2) - lo) / (hi - lo), 0, 1)
  return inv / factor * ramp + inv * (1 - ramp)


def _np_llama3(factor, L0, lo_f=1.0, hi_f=4.0, rot=R, base=BASE):
  out = []
  for f in _np_inv(rot, base):
    wave = 2 * math.pi / f
    if wave < L0 / hi_f:
      out.append(f)
    elif wave > L0 / lo_f:
      out.append(f / factor)
    else:
      sm = (L0 / wave - lo_f) / (hi_f - lo_f)
      out.append((1 - sm) * f / factor + sm * f)
  return np.array(out)


def _np_rope(x, pos, inv, rot, interleaved, mult=1.0):
  x = np.asarray(x, np.float64).copy()
  ang = pos[:, None] * inv[None]                    # [T, rot/2]
  c, s = np.cos(ang)[None, :, None] * mult, np.sin(ang)[None, :, None] * mult
  if interleaved:
    i1, i2 = np.arange(0, rot, 2), np.arange(1, rot, 2)
  else:
    i1, i2 = np.arange(rot // 2), np.arange(rot // 2, rot)
  a, b = x[..., i1].copy(), x[..., i2].copy()
  x[..., i1], x[..., i2] = a * c - b * s, b * c + a * s
  return x


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3"])
def test_rope_scaling_frequencies_match_numpy(kind):
  L0, f = 16, 4.0
  s = RopeScaling(kind, factor=f, original_max_position_embeddings=L0)
  L = 40
  want = {"linear": _np_inv() / f,
          "dynamic": _np_inv(base=BASE * (f * L / L0 - (f - 1)) ** (R / (R - 2))),
          "yarn": _np_yarn(f, L0), "llama3": _np_llama3(f, L0)}[kind]
  got = rope_frequencies(R, BASE, s, seq_len=L)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5)
  # factor 1 is unscaled (dynamic: up to L0 only, it still stretches longer sequences)
  one = RopeScaling(kind, factor=1.0, original_max_position_embeddings=L0)
  L1 = L0 if kind == "dynamic" else L
  np.testing.assert_allclose(np.asarray(rope_frequencies(R, BASE, one, seq_len=L1)),
                             _np_inv(), rtol=2e-5)
  if kind == "dynamic":
    np.testing.assert_allclose(np.asarray(rope_frequencies(R, BASE, s, seq_len=L0 // 2)),
                               _np_inv(), rtol=2e-5)
  if kind == "yarn":
    assert rope_attention_factor(s) == pytest.approx(0.1 * math.log(f) + 1)
    assert rope_attention_factor(one) == 1.0


def test_llama3_scaling_is_smooth_band_with_hf_defaults():
  s = RopeScaling.from_hf({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
  got = np.asarray(rope_frequencies(64, 500000.0, s))
  np.testing.assert_allclose(got, _np_llama3(8.0, 8192, rot=64, base=500000.0), rtol=2e-5)
  assert RopeScaling.from_hf({"rope_type": "default"}) is None
  with pytest.raises(ValueError, match="not supported"):
    RopeScaling.from_hf({"type": "linear", "factor": 2.0, "bogus": 1})


def test_apply_rope_matches_numpy_and_partial_rotary():
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (B, T, 3, 16)))
  pos = np.arange(T) + 3.0
  cases = [(i, r, k) for i in (False, True) for r, k in ((16, None), (8, "yarn"), (6, "linear"))]
  scaling = lambda k: None if k is None else RopeScaling(k, 4.0,
                                                         original_max_position_embeddings=16)
  got = jax.jit(lambda x: [apply_rope(x, pos, BASE, rotary_dim=r, scaling=scaling(k),
                                      interleaved=i) for i, r, k in cases])(x)
  for (interleaved, rotary_dim, kind), out in zip(cases, got):
    inv = _np_inv(rotary_dim)
    if kind == "yarn":
      inv = _np_yarn(4.0, 16, rot=rotary_dim)
    elif kind == "linear":
      inv = inv / 4.0
    mult = rope_attention_factor(scaling(kind))
    want = _np_rope(x, pos, inv, rotary_dim, interleaved, mult)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out)[..., rotary_dim:], x[..., rotary_dim:])
  with pytest.raises(ValueError, match="rotary_dim"):
    apply_rope(x, pos, rotary_dim=5)


def test_layer_rope_options_match_projections_plus_reference():
  s = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 4}
  m = MultiHeadAttention(num_heads=2, qkv_features=16, use_rope=True, rotary_dim=4,
                         rope_scaling=s, rope_interleaved=True, causal=True,
                         implementation="reference")
  x = jax.random.normal(jax.random.PRNGKey(1), (B, T, D))

  def want(params, x):
    p = params["params"]
    proj = lambda n: jnp.einsum("btd,dnh->btnh", x, p[n]["kernel"]) + p[n]["bias"]
    pos = jnp.arange(T)
    kw = dict(rotary_dim=4, scaling=s, interleaved=True, seq_len=T)
    q, k = apply_rope(proj("query"), pos, **kw), apply_rope(proj("key"), pos, **kw)
    o = attnjax.reference_attention(q, k, proj("value"), mask=masks.Causal())
    return jnp.einsum("btnh,nhd->btd", o, p["out"]["kernel"]) + p["out"]["bias"]

  def run(x):
    params = m.init(jax.random.PRNGKey(2), x)
    return m.apply(params, x), want(params, x)

  got, expected = jax.jit(run)(x)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_llama_config_reads_hf_rope_scaling():
  from attnjax.models.llama import LlamaConfig
  hf = dict(model_type="llama", vocab_size=11, hidden_size=8, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, intermediate_size=16,
            max_position_embeddings=32,
            rope_scaling={"rope_type": "yarn", "factor": 2.0})
  c = LlamaConfig.from_hf(hf)
  assert c.rope_scaling == RopeScaling("yarn", 2.0, original_max_position_embeddings=32)
  hf["rope_scaling"] = {"type": "llama3", "factor": 8.0}
  assert LlamaConfig.from_hf(hf).rope_scaling.original_max_position_embeddings == 8192


def test_per_projection_bias_flags_and_old_flag():
  x = jax.random.normal(jax.random.PRNGKey(1), (B, T, D))
  has = lambda m: {k: "bias" in v for k, v in
                   jax.eval_shape(m.init, jax.random.PRNGKey(0), x)["params"].items()}
  assert has(MultiHeadAttention(2, use_bias=False)) == dict.fromkeys(
      ("query", "key", "value", "out"), False)
  assert has(MultiHeadAttention(2, use_bias=False, use_key_bias=True, use_out_bias=True)) == {
      "query": False, "key": True, "value": False, "out": True}
  assert has(MultiHeadAttention(2, use_value_bias=False)) == {
      "query": True, "key": True, "value": False, "out": True}


def test_fused_qkv_equals_separate_projections_with_copied_weights(bias=True):
  n, kh, h = 4, 2, 4
  x = jax.random.normal(jax.random.PRNGKey(1), (B, T, D))
  kw = dict(num_heads=n, num_kv_heads=kh, qkv_features=n * h, causal=True,
            use_bias=bias, implementation="reference")
  fused = MultiHeadAttention(fused_qkv=True, **kw)
  pf = jax.jit(fused.init)(jax.random.PRNGKey(2), x)["params"]
  assert pf["qkv"]["kernel"].shape == (D, n + 2 * kh, h)
  assert ("bias" in pf["qkv"]) == bias and "query" not in pf
  sl = {"query": slice(0, n), "key": slice(n, n + kh), "value": slice(n + kh, None)}
  ps = {name: {k: a[:, s] if k == "kernel" else a[s] for k, a in pf["qkv"].items()}
        for name, s in sl.items()}
  ps["out"] = pf["out"]
  got, want = jax.jit(lambda x: (fused.apply({"params": pf}, x),
                                 MultiHeadAttention(**kw).apply({"params": ps}, x)))(x)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="self-attention"):
    jax.eval_shape(lambda x: fused.apply({"params": pf}, x, x), x)
  with pytest.raises(ValueError, match="must be equal"):
    jax.eval_shape(MultiHeadAttention(fused_qkv=True, use_key_bias=not bias, **kw).init,
                   jax.random.PRNGKey(0), x)
  nobias = jax.eval_shape(MultiHeadAttention(fused_qkv=True, **dict(kw, use_bias=False)).init,
                          jax.random.PRNGKey(0), x)["params"]
  assert set(nobias["qkv"]) == {"kernel"}


def _dropout_layer(**kw):
  kw.setdefault("implementation", "reference")
  return MultiHeadAttention(num_heads=2, qkv_features=8, causal=True, **kw)


def test_dropout_off_equals_no_dropout_and_fast_families_raise():
  x = jax.random.normal(jax.random.PRNGKey(1), (B, T, D))

  def run(x):
    params = _dropout_layer().init(jax.random.PRNGKey(2), x)
    # rate 0 needs no rng even when not deterministic; deterministic=True turns dropout off
    return (params, _dropout_layer().apply(params, x, deterministic=False),
            _dropout_layer(dropout_rate=0.5).apply(params, x, deterministic=True))

  params, want, got = jax.jit(run)(x)
  np.testing.assert_allclose(got, want)
  rng = {"dropout": jax.random.PRNGKey(3)}
  kw = {"attention": "sliding_window", "attention_options": {"window_size": 2}}
  with pytest.raises(NotImplementedError, match="sliding_window"):   # no dropout there
    jax.eval_shape(lambda x: _dropout_layer(dropout_rate=0.1, **kw).apply(
        params, x, deterministic=False, rngs=rng), x)
  from attnjax.layers.dropout import check_dropout_rate
  with pytest.raises(ValueError, match="dropout_rate"):
    check_dropout_rate(1.0)


def test_per_head_dropout_runs_on_the_xla_path_and_equals_the_reference():
  x = jax.random.normal(jax.random.PRNGKey(1), (B, T, D))
  m = lambda impl: _dropout_layer(dropout_rate=0.3, broadcast_dropout=False, implementation=impl)
  rng = {"dropout": jax.random.PRNGKey(4)}

  def run(x):
    params = m("xla").init(jax.random.PRNGKey(2), x, deterministic=True)
    return ([m(i).apply(params, x, deterministic=False, rngs=rng) for i in ("xla", "reference")]
            + [m("xla").apply(params, x, deterministic=True)])

  fused, reference, off = jax.jit(run)(x)
  np.testing.assert_allclose(fused, reference, atol=2e-5, rtol=2e-5)   # the same mask
  assert np.abs(fused - off).max() > 1e-3
  # Flax's attention_fn: broadcast_dropout=False takes the same per-head dropout
  from attnjax.layers import make_attention_fn
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (B, T, 2, 4)) for i in range(3))
  key = jax.random.PRNGKey(7)
  got, want = jax.jit(lambda q, k, v: (
      make_attention_fn(implementation="xla")(q, k, v, broadcast_dropout=False,
                                              dropout_rate=0.3, dropout_rng=key),
      attnjax.reference_attention(q, k, v, dropout_rate=0.3, dropout_rng=key)))(q, k, v)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_broadcast_dropout_shares_one_mask_on_the_xla_path_and_equals_the_reference():
  """Flax's default broadcast_dropout=True: one [T, S] mask for the batch and heads, on the
  XLA engine (no dense fallback), equal to the reference; the Flax attention_fn too."""
  from attnjax.core.dropout import BroadcastKey, dense_multiplier
  from attnjax.layers import make_attention_fn
  x = jax.random.normal(jax.random.PRNGKey(1), (B, T, D))
  m = lambda impl: _dropout_layer(dropout_rate=0.3, implementation=impl)   # broadcast default
  rng = {"dropout": jax.random.PRNGKey(4)}
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (B, T, 2, 4)) for i in range(3))
  key = jax.random.PRNGKey(7)

  def run(x, q, k, v):
    params = m("xla").init(jax.random.PRNGKey(2), x, deterministic=True)
    layer = [m(i).apply(params, x, deterministic=False, rngs=rng) for i in ("xla", "reference")]
    fn = [make_attention_fn(implementation="xla")(q, k, v, broadcast_dropout=True,
                                                  dropout_rate=0.3, dropout_rng=key),
          attnjax.reference_attention(q, k, v, dropout_rate=0.3, dropout_rng=BroadcastKey(key))]
    return layer, fn, dense_multiplier(BroadcastKey(key), 0.3, B, 2, T, T)

  layer, fn, mult = jax.jit(run)(x, q, k, v)
  np.testing.assert_allclose(layer[0], layer[1], atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(fn[0], fn[1], atol=2e-5, rtol=2e-5)
  mult = np.asarray(mult)
  assert (mult == mult[:1, :1]).all() and 0 < (mult == 0).mean() < 1   # one shared mask


def test_dropout_hook_equals_numpy_with_the_same_mask():
  from attnjax.layers.dropout import dropout_hook
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (B, T, 2, 4)) for i in range(3))
  key, rate = jax.random.PRNGKey(7), 0.3
  shapes = {True: (1, 1, T, T), False: (B, 2, T, T)}

  def run(q, k, v):
    out = {b: attnjax.reference_attention(q, k, v, mask=masks.Causal(),
                                          probs_hook=dropout_hook(key, rate, b)) for b in shapes}
    keep = {b: jax.random.bernoulli(key, 1 - rate, s) for b, s in shapes.items()}
    return out, keep, attnjax.reference_attention(q, k, v, mask=masks.Causal(),
                                                  return_probs=True)[1]

  out, keep, probs = jax.jit(run)(q, k, v)
  for b in shapes:
    want = np.einsum("bnts,bsnh->btnh", np.asarray(probs, np.float64) * np.asarray(keep[b])
                     / (1 - rate), np.asarray(v, np.float64))
    np.testing.assert_allclose(out[b], want, rtol=1e-5, atol=1e-6)


def test_layer_dropout_mean_over_masks_is_no_dropout():
  x = jax.random.normal(jax.random.PRNGKey(1), (1, T, D))
  m = _dropout_layer(dropout_rate=0.5, broadcast_dropout=False)
  params = jax.jit(lambda r, x: m.init(r, x, deterministic=True))(jax.random.PRNGKey(2), x)
  keys = jax.random.split(jax.random.PRNGKey(5), 512)
  want, outs = jax.jit(lambda x: (
      m.apply(params, x, deterministic=True),
      jax.vmap(lambda r: m.apply(params, x, deterministic=False, rngs={"dropout": r}))(keys)))(x)
  want, outs = np.asarray(want), np.asarray(outs)
  assert np.abs(outs[0] - want).max() > 0.05            # a single mask changes the output
  err = np.abs(outs.mean(0) - want).max()
  assert err < 4 * outs.std(0).max() / np.sqrt(len(keys)) + 1e-6, err
