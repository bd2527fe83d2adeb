"""ULSAM, ELA, CSA and GAAM: spec oracles and tiny cases."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision import (ULSAM, ClassSemanticsAttention, EfficientLocalAttention, GaussianAdaptiveAttention,
                            class_semantics_attention, efficient_local_attention, gaussian_adaptive_gate, ulsam)

from test_vision_lib import KEY  # noqa: E402


def rnd(shape, seed, scale=1.0):
  """test_vision_lib.rnd's values as a NumPy array: slicing and indexing it compiles nothing."""
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _ulsam_params(C, g, zero_pw=False):
  p = {"dw_kernel": rnd((C,), 101), "dw_bias": rnd((C,), 102),
       "pw_kernel": rnd((g, C // g), 103), "pw_bias": rnd((g,), 104)}
  if zero_pw:
    p["pw_kernel"], p["pw_bias"] = np.zeros_like(p["pw_kernel"]), np.zeros_like(p["pw_bias"])
  return p


def test_ulsam_tiny_constant_input_gives_quarter_map():
  x = np.full((1, 2, 2, 3), 1.7, np.float32)
  out, maps = jax.jit(lambda x, p: ulsam(x, p, num_splits=1, return_maps=True))(x, _ulsam_params(3, 1))
  np.testing.assert_allclose(maps, 0.25, atol=1e-6)
  np.testing.assert_allclose(out, 1.7 * 1.25, rtol=1e-6)


def test_ulsam_maps_sum_to_one_zero_pointwise_is_uniform_and_groups_independent():
  x = rnd((2, 3, 4, 8), 105)
  p = _ulsam_params(8, 4)
  f = jax.jit(lambda x, p: ulsam(x, p, num_splits=4, return_maps=True))
  out, maps = f(x, p)
  np.testing.assert_allclose(maps.sum((1, 2)), 1.0, atol=1e-5)
  out0, _ = f(x, _ulsam_params(8, 4, zero_pw=True))
  np.testing.assert_allclose(out0, x * (1 + 1 / 12), rtol=1e-5)
  # permuting the groups (with their parameters) permutes the output groups.
  perm = np.array([2, 0, 3, 1])
  ch = (perm[:, None] * 2 + np.arange(2)).reshape(-1)
  pp = {"dw_kernel": p["dw_kernel"][ch], "dw_bias": p["dw_bias"][ch],
        "pw_kernel": p["pw_kernel"][perm], "pw_bias": p["pw_bias"][perm]}
  np.testing.assert_allclose(f(x[..., ch], pp)[0], out[..., ch], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="num_splits"):
    ulsam(x, p, num_splits=3)


def test_ulsam_layer_trains_batch_stats():
  x = rnd((2, 4, 4, 8), 106)
  layer = ULSAM(num_splits=2)
  y, upd = jax.jit(lambda x: layer.apply(layer.init(KEY, x), x, train=True,
                                         mutable=["batch_stats"]))(x)
  assert y.shape == x.shape and "batch_stats" in upd
  assert np.isfinite(np.asarray(y)).all()


def _ela_numpy(x, kern, gn, scale, bias, eps=1e-5):
  B, H, W, C = x.shape
  k = kern.shape[0]

  def gate(z):  # z [B, L, C]
    L = z.shape[1]
    zp = np.pad(z, ((0, 0), (k // 2, k // 2), (0, 0)))
    y = np.stack([(zp[:, i:i + k] * kern[:, 0][None]).sum(1) for i in range(L)], 1)
    yg = y.reshape(B, L, gn, C // gn)
    m = yg.mean((1, 3), keepdims=True)
    v = yg.var((1, 3), keepdims=True)
    return 1 / (1 + np.exp(-(((yg - m) / np.sqrt(v + eps)).reshape(B, L, C) * scale + bias)))
  return x * gate(x.mean(2))[:, :, None] * gate(x.mean(1))[:, None]


def test_ela_matches_numpy_zero_conv_gives_quarter_and_transpose_equivariance():
  x = rnd((2, 5, 6, 4), 107)
  kern = rnd((3, 1, 4), 108)
  p = {"conv_kernel": kern, "gn_scale": np.linspace(0.5, 1.5, 4, dtype=np.float32),
       "gn_bias": np.linspace(-0.2, 0.2, 4, dtype=np.float32)}
  f = jax.jit(lambda x, p: efficient_local_attention(x, p, gn_groups=2, return_gates=True))
  out, (yh, yw) = f(x, p)
  np.testing.assert_allclose(out, _ela_numpy(np.asarray(x), np.asarray(kern), 2, np.asarray(p["gn_scale"]),
                                             np.asarray(p["gn_bias"])), rtol=1e-4, atol=1e-5)
  assert float(yh.min()) > 0 and float(yw.max()) < 1
  p0 = dict(p, conv_kernel=np.zeros_like(kern), gn_bias=np.zeros(4, np.float32))
  np.testing.assert_allclose(f(x, p0)[0], x / 4, rtol=1e-6)
  xt = np.swapaxes(x, 1, 2)
  np.testing.assert_allclose(f(xt, p)[0], np.swapaxes(out, 1, 2), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="groups"):
    efficient_local_attention(x, p, gn_groups=3)


def test_ela_layer_variants():
  x = rnd((1, 4, 4, 32), 109)
  layer = EfficientLocalAttention(variant="S")
  v, y = jax.jit(lambda x: (lambda v: (v, layer.apply(v, x)))(layer.init(KEY, x)))(x)
  assert v["params"]["conv_kernel"].shape == (5, 8, 32)
  assert y.shape == x.shape
  with pytest.raises(ValueError, match="variant"):
    EfficientLocalAttention(variant="X").init(KEY, x)


def test_csa_zero_weights_identity_and_gates_depend_on_r_only():
  r = rnd((2, 6, 5), 110)
  f = rnd((2, 6, 3), 111)
  z = {"w1": np.zeros((5, 2), np.float32), "b1": np.zeros(2, np.float32),
       "w2": np.zeros((2, 3), np.float32), "b2": np.zeros(3, np.float32),
       "conv_kernel": np.zeros((3, 5, 1), np.float32), "conv_bias": np.zeros(1, np.float32)}
  csa = jax.jit(lambda r, f, p: class_semantics_attention(r, f, p, return_gates=True))
  np.testing.assert_allclose(csa(r, f, z)[0], f, rtol=1e-6)
  layer = ClassSemanticsAttention(temporal_kernel=3, reduction=2)
  v = jax.jit(layer.init)(KEY, r, f)
  p = dict(v["params"])
  out, (wc, wt) = csa(r, f, p)
  np.testing.assert_allclose(jax.jit(layer.apply)(v, r, f), out, rtol=1e-6)
  assert 0 < float(wc.min()) and float(wt.max()) < 1 and wc.shape == (2, 1, 3) and wt.shape == (2, 6, 1)
  _, (wc2, wt2) = csa(r, 3 * f, p)
  np.testing.assert_array_equal(wc, wc2)
  np.testing.assert_array_equal(wt, wt2)
  # numpy oracle for the temporal gate at an interior step
  rr, kk = np.asarray(r), np.asarray(p["conv_kernel"])[:, :, 0]
  t = 2
  want = 1 / (1 + np.exp(-((rr[:, t - 1:t + 2] * kk[None]).sum((1, 2)) + float(p["conv_bias"][0]))))
  np.testing.assert_allclose(wt[:, t, 0], want, rtol=1e-5)


def test_gaam_tiny_case_and_properties():
  y, w = jax.jit(lambda x: gaussian_adaptive_gate(x, jnp.zeros((1, 1)), jnp.ones((1, 1)),
                                                  return_weights=True))(
      np.array([0.0, 1.0, 2.0], np.float32))
  np.testing.assert_allclose(w, [0.274, 0.452, 0.274], atol=1e-3)
  np.testing.assert_allclose(y, [0.0, 0.452, 0.548], atol=1e-3)
  x = rnd((3, 8), 112)
  d = np.array([[0.3, -0.2]], np.float32)
  c = np.array([[1.2, 0.8]], np.float32)
  g = jax.jit(lambda x, d, c: gaussian_adaptive_gate(x, d, c, return_weights=True)[1])
  w = g(x, d, c)
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(g(x + 5.0, d, c), w, atol=1e-4)
  np.testing.assert_allclose(g(x, 0 * d, c), g(3.0 * x, 0 * d, c), atol=1e-5)
  np.testing.assert_allclose(g(x, 0 * d, np.full((1, 2), 1e4, np.float32)), 1 / 8, atol=1e-6)


def test_gaam_heads_axis_padding_and_layer():
  x = rnd((2, 6, 3), 113)
  d = np.array([[0.1], [-0.4]], np.float32)
  c = np.array([[0.9], [1.5]], np.float32)
  y = jax.jit(lambda x: gaussian_adaptive_gate(x, d, c, axis=1, num_heads=2))(x)
  y01 = jax.jit(jax.vmap(lambda x, d, c: gaussian_adaptive_gate(x, d, c, axis=1), (1, 0, 0), 1))(
      x.reshape(2, 2, 3, 3), d[:, None], c[:, None])
  np.testing.assert_allclose(y, y01.reshape(2, 6, 3), rtol=1e-6)
  xp = np.array([[1.0, 2.0, 0.0, 3.0]], np.float32)
  yp = np.asarray(jax.jit(lambda xp: gaussian_adaptive_gate(
      xp, jnp.zeros((1, 1)), jnp.ones((1, 1)), padding_value=0.0))(xp))
  assert float(yp[0, 2]) == 0.0
  with pytest.raises(ValueError, match="num_heads"):
    gaussian_adaptive_gate(x, d, c, axis=1, num_heads=4)
  layer = GaussianAdaptiveAttention(num_gaussians=2, num_heads=2)
  v, out = jax.jit(lambda x: (lambda v: (v, layer.apply(v, x)))(
      layer.init(KEY, jnp.ones((2, 4)))))(x[:, :4, 0])
  assert v["params"]["scales"].shape == (2, 2)
  assert out.shape == (2, 4)


def test_bfloat16_inputs_keep_their_dtype():
  x = rnd((1, 4, 4, 4), 401).astype(jnp.bfloat16)
  p = {"conv_kernel": rnd((3, 1, 4), 402), "gn_scale": np.ones(4, np.float32),
       "gn_bias": np.zeros(4, np.float32)}
  y1, y2, want = jax.jit(lambda x: (efficient_local_attention(x, p, gn_groups=2),
                                    ulsam(x, _ulsam_params(4, 2), num_splits=2),
                                    efficient_local_attention(x.astype(jnp.float32), p,
                                                              gn_groups=2)))(x)
  assert y1.dtype == jnp.bfloat16 and y2.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y1, np.float32), want, rtol=2e-2, atol=2e-2)
