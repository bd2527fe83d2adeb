"""OAT box encoding, NiNformer, HyperZ.Z.W, visual search maps, MEDUSA gates, ICL harness."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision import (HyperZZW, MultiScaleAttentionGates, NiNformerBlock, box_positional_encoding,
                            coordinate_grid, eccentricity_pool, equivalent_data_shift, fft_long_conv, gd_step,
                            hyper_zzw, icl_gd_closeness, softmax_regression_grad,
                            softmax_regression_loss, target_correlation_map)

from test_vision_lib import KEY, rnd as _rnd  # noqa: E402

# NumPy arrays: slicing and indexing test data compiles nothing.
rnd = lambda *a, **kw: np.asarray(_rnd(*a, **kw))


def test_box_encoding_dot_products_depend_only_on_displacement():
  a = np.array([0.1, 0.2, 0.3, 0.5], np.float32)
  d = np.array([0.15, -0.05, 0.15, -0.05], np.float32)
  shift = np.array([0.4, 0.3, 0.4, 0.3], np.float32)
  e = np.asarray(jax.jit(box_positional_encoding, static_argnums=1)(
      np.stack([a, a + d, a + shift, a + shift + d]), 32))
  np.testing.assert_allclose(e[0] @ e[1], e[2] @ e[3], rtol=1e-5)
  assert e.shape == (4, 32)
  with pytest.raises(ValueError, match="dim"):
    box_positional_encoding(a, 12)


def test_ninformer_block_shapes_determinism_and_gradients():
  x = rnd((2, 5, 8), 101)
  layer = NiNformerBlock(ffn_dim=6)

  def run(x):
    v = layer.init(KEY, x)
    return v, layer.apply(v, x), jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2))(v)
  run = jax.jit(run)
  v, y, g = run(x)
  assert y.shape == x.shape
  np.testing.assert_array_equal(y, run(x)[1])  # deterministic
  assert all(np.abs(np.asarray(t)).max() > 0 for t in jax.tree_util.tree_leaves(g))
  with pytest.raises(ValueError, match="tokens"):
    layer.apply(v, np.ones((2, 4, 8), np.float32))


def _circular_numpy(z, k):
  B, L1, L2, C = z.shape
  k = k if k.ndim == 4 else k[None]
  out = np.zeros_like(z)
  for n1 in range(L1):
    for n2 in range(L2):
      for m1 in range(L1):
        for m2 in range(L2):
          out[:, n1, n2] += z[:, m1, m2] * k[:, (n1 - m1) % L1, (n2 - m2) % L2]
  return out


def test_fft_long_conv_equals_direct_circular_convolution():
  z = np.asarray(rnd((2, 4, 5, 3), 102))
  k = np.asarray(rnd((4, 5, 3), 103))
  small = np.zeros((4, 5, 3), np.float32)
  small[:2, :3] = k[:2, :3]
  z1, k1 = z[:, :, 0], k[:, 0]
  want1 = np.stack([sum(z1[:, m] * k1[(n - m) % 4] for m in range(4)) for n in range(4)], 1)
  layer = HyperZZW(hidden=8)
  full, part, one, elem, circ, g, y = jax.jit(lambda z, k: (
      fft_long_conv(z, k), fft_long_conv(z, k[:2, :3]), fft_long_conv(z[:, :, 0], k[:, 0]),
      hyper_zzw(z, k, form="elementwise"), hyper_zzw(z, k), coordinate_grid((3, 2)),
      layer.apply(layer.init(KEY, z), z)))(z, k)
  np.testing.assert_allclose(full, _circular_numpy(z, k), atol=1e-4)
  np.testing.assert_allclose(part, _circular_numpy(z, small), atol=1e-4)
  np.testing.assert_allclose(one, want1, atol=1e-4)
  np.testing.assert_allclose(elem, z * k * z, rtol=1e-5)
  np.testing.assert_allclose(circ, _circular_numpy(z, k * z), atol=1e-3)
  with pytest.raises(ValueError, match="exceeds"):
    fft_long_conv(z, np.ones((5, 5, 3), np.float32))
  g = np.asarray(g)
  assert g.shape == (3, 2, 2) and g.min() == -1.0 and g.max() == 1.0
  assert y.shape == z.shape


def test_target_correlation_peaks_at_pasted_target_and_eccentricity_pool():
  search = 0.1 * rnd((1, 9, 10, 4), 104)
  target = rnd((1, 3, 3, 4), 105)
  search[0, 5:8, 1:4] = target[0]
  f = rnd((1, 5, 6, 2), 106)
  fix = np.array([[2.0, 3.0]], np.float32)
  m, flat, pooled = jax.jit(lambda search, target, f, fix: (
      target_correlation_map(search, target), eccentricity_pool(f, fix, slope=0.0),
      {mode: eccentricity_pool(f, fix, slope=0.7, mode=mode) for mode in ("max", "avg")}))(
          search, target, f, fix)
  assert np.unravel_index(int(np.argmax(m[0])), (9, 10)) == (6, 2)
  np.testing.assert_allclose(flat, f)
  for mode in ("max", "avg"):
    out = np.asarray(pooled[mode])
    fn = np.asarray(f)
    for y in range(5):
      for x in range(6):
        r = int(np.floor(0.7 * np.hypot(y - 2, x - 3)))
        win = fn[0, max(0, y - r):y + r + 1, max(0, x - r):x + r + 1].reshape(-1, 2)
        np.testing.assert_allclose(out[0, y, x], win.max(0) if mode == "max" else win.mean(0), rtol=1e-5)
  np.testing.assert_allclose(out[0, 2, 3], f[0, 2, 3], rtol=1e-6)


def test_multiscale_attention_gates_zero_projection_halves_maps():
  x = rnd((1, 2, 2, 8), 107)
  fmaps = [np.ones((1, 4, 4, 3), np.float32), np.ones((1, 2, 2, 5), np.float32)]
  layer = MultiScaleAttentionGates(num_heads=2, head_dim=4, channels=(3, 5))

  def run(x, fmaps):
    v = layer.init(KEY, x, fmaps)
    v0 = jax.tree_util.tree_map_with_path(
        lambda p, t: jnp.zeros_like(t) if "gate" in jax.tree_util.keystr(p) else t, v)
    return layer.apply(v, x, fmaps), layer.apply(v0, x, fmaps)
  outs, outs0 = jax.jit(run)(x, fmaps)
  assert [o.shape for o in outs] == [f.shape for f in fmaps]
  for o in outs0:
    np.testing.assert_allclose(o, 0.5, rtol=1e-6)


def test_softmax_regression_grad_and_icl_closeness_harness():
  A, x = rnd((6, 3), 108), rnd((3,), 109)
  e = np.exp(np.asarray(rnd((6,), 110)))
  b = (e / e.sum()).astype(np.float32)
  @jax.jit
  def step(A, x, b):
    x1 = gd_step(A, x, b, 0.5)
    return (softmax_regression_grad(A, x, b), jax.grad(softmax_regression_loss, 1)(A, x, b), x1,
            softmax_regression_loss(A, x1, b), softmax_regression_loss(A, x, b),
            (A + equivalent_data_shift(A, x, x1)) @ x)
  g, g_auto, x1, l1, l0, shifted = step(A, x, b)
  np.testing.assert_allclose(g, g_auto, rtol=1e-5, atol=1e-7)
  assert float(l1) < float(l0)
  np.testing.assert_allclose(shifted, np.asarray(A) @ np.asarray(x1), rtol=1e-5, atol=1e-6)
  r = icl_gd_closeness(KEY, n=6, d=3, lrs=(1e-3, 1e-2), num_instances=8)
  assert (np.asarray(r["gap"]) <= np.asarray(r["bound"]) + 1e-7).all()
  ratio = float(r["gap"][1] / r["gap"][0])
  assert 5.0 < ratio < 20.0, ratio  # linear in the learning rate
  with pytest.raises(ValueError, match="A"):
    softmax_regression_loss(A, x[:2], b)
