"""HaloNets (P2-25), HiLo (P2-14), PredFormer (papers_1 #3), MagicInfinite windows (papers_1 #1)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax.neighborhood as NA
from attnjax.core.reference import reference_attention
from attnjax.masks.neighborhood import Neighborhood


def _normal(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _qkv(shape, N=4, K=2, H=8, seed=0):
  """NumPy inputs (no device compile to build them)."""
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(shape + s).astype(np.float32)
  return f(N, H), f(K, H), f(K, H)


flat = lambda x: x.reshape((x.shape[0], -1) + x.shape[-2:])


@pytest.mark.parametrize("b,h", [(4, 1), (2, 3)])
def test_halo_matches_dense_oracle_with_rel_pos(b, h):
  B, X, Y, H = 2, 8, 4, 8
  q, k, v = _qkv((B, X, Y))
  w = b + 2 * h
  rh, rw = (_normal(i, (2 * w - 1, H)) for i in (7, 8))
  mask = NA.halo_mask(X, Y, b, h)[None, None]
  yy, xx = np.divmod(np.arange(X * Y), Y)
  iy = np.clip(yy[None, :] - yy[:, None] + w - 1, 0, 2 * w - 2)
  ix = np.clip(xx[None, :] - xx[:, None] + w - 1, 0, 2 * w - 2)

  def ref(q, k, v, rh, rw):
    bias = (jnp.einsum("btnh,tsh->bnts", flat(q), rh[iy])
            + jnp.einsum("btnh,tsh->bnts", flat(q), rw[ix]))
    return reference_attention(flat(q), flat(k), flat(v), mask=mask, bias=bias)

  fn = lambda q, k, v, rh, rw: flat(NA.halo_attention(q, k, v, block_size=b, halo=h,
                                                      rel_pos=(rh, rw)))
  vg = lambda f: jax.value_and_grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 3))
  out, want, (_, g1), (_, g2) = jax.jit(lambda *a: (fn(*a), ref(*a), vg(fn)(*a), vg(ref)(*a)))(
      q, k, v, rh, rw)
  np.testing.assert_allclose(out, want, atol=3e-5)
  for a, c in zip(g1, g2):
    np.testing.assert_allclose(a, c, atol=1e-4)


def test_halo_special_cases_and_errors():
  q, k, v = _qkv((1, 4, 4))
  glob, dense, zero = jax.jit(lambda q, k, v: (
      NA.halo_attention(q, k, v, block_size=4, halo=0),
      reference_attention(flat(q), flat(k), flat(v)),
      NA.halo_attention(q, k, v, block_size=2, halo=1, pad_mode="zero")))(q, k, v)
  np.testing.assert_allclose(flat(np.asarray(glob)), dense, atol=2e-5)
  # every query of a block has the same key set (block-shared invariant)
  m = np.asarray(NA.halo_mask(8, 8, 4, 2))
  assert (m[0] == m[9]).all() and (m[0] != m[4]).any()
  assert zero.shape == q.shape[:-1] + (8,)
  with pytest.raises(ValueError, match="block_size"):
    NA.halo_attention(q, k, v, block_size=3, halo=1)
  with pytest.raises(ValueError, match="rel_pos"):
    NA.halo_attention(q, k, v, block_size=2, halo=1, rel_pos=(jnp.zeros((3, 8)),) * 2)


def _hilo_params(C, n_lo, n_hi, d, seed=0):
  rng = np.random.default_rng(seed)
  p = lambda i, o: {"kernel": rng.standard_normal((i, o)).astype(np.float32) * 0.3,
                    "bias": rng.standard_normal((o,)).astype(np.float32) * 0.1}
  out = {}
  if n_hi:
    out.update(hifi_qkv=p(C, 3 * n_hi * d), hifi_proj=p(n_hi * d, n_hi * d))
  if n_lo:
    out.update(lofi_q=p(C, n_lo * d), lofi_kv=p(C, 2 * n_lo * d), lofi_proj=p(n_lo * d, n_lo * d))
  return out


def _hilo_oracle(x, prm, N, n_lo, n_hi, d, window):
  B, X, Y, C = x.shape
  dn = lambda t, p: t @ p["kernel"] + p["bias"]
  outs = []
  if n_hi:
    qkv = dn(x, prm["hifi_qkv"]).reshape(B, X * Y, 3, n_hi, d)
    yy, xx = np.divmod(np.arange(X * Y), Y)
    blockdiag = ((yy[:, None] // window == yy[None] // window)
                 & (xx[:, None] // window == xx[None] // window))
    hi = reference_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask=blockdiag)
    outs.append(dn(hi.reshape(B, X, Y, -1), prm["hifi_proj"]))
  pooled = x.reshape(B, X // window, window, Y // window, window, C).mean((2, 4))
  kv = dn(pooled.reshape(B, -1, C), prm["lofi_kv"]).reshape(B, -1, 2, n_lo, d)
  lo = reference_attention(dn(x, prm["lofi_q"]).reshape(B, X * Y, n_lo, d),
                           kv[:, :, 0], kv[:, :, 1])
  outs.append(dn(lo.reshape(B, X, Y, -1), prm["lofi_proj"]))
  return jnp.concatenate(outs, -1)


def test_hilo_branches_match_their_oracles():
  B, X, Y, C, N = 2, 4, 6, 16, 4
  x = _normal(1, (B, X, Y, C))
  n_lo, n_hi = NA.hilo.hilo_heads(N, 0.5, 2)
  assert (n_lo, n_hi) == (2, 2) and NA.hilo.hilo_heads(12, 0.9, 2) == (10, 2)
  d = C // N
  prm = _hilo_params(C, n_lo, n_hi, d)
  prm1 = _hilo_params(C, N, 0, d)  # window = 1: all heads Lo-Fi, unpooled = plain MHSA

  @jax.jit
  def run(x, prm, prm1):
    return (NA.hilo_attention(x, prm, num_heads=N, alpha=0.5, window=2),
            _hilo_oracle(x, prm, N, n_lo, n_hi, d, 2),
            NA.hilo_attention(x, prm1, num_heads=N, alpha=0.5, window=1),
            _hilo_oracle(x, prm1, N, N, 0, d, 1))
  out, ref, out1, ref1 = run(x, prm, prm1)
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(out1, ref1, atol=1e-4, rtol=1e-4)


def test_spatiotemporal_modes_equal_block_diagonal_masks():
  B, T, S = 2, 2, 3
  q, k, v = _qkv((B, T, S))
  t, n = np.divmod(np.arange(T * S), S)
  spatial_mask = t[:, None] == t[None]
  assert spatial_mask[:3, :3].all() and spatial_mask[3:, 3:].all() and not spatial_mask[:3, 3:].any()
  modes = (("full", None), ("spatial", spatial_mask), ("temporal", n[:, None] == n[None]))
  results = jax.jit(lambda q, k, v: [
      (NA.spatiotemporal_attention(q, k, v, mode=mode, return_lse=True),
       reference_attention(flat(q), flat(k), flat(v), mask=mask, return_lse=True))
      for mode, mask in modes])(q, k, v)
  for (out, lse), (ro, rl) in results:
    np.testing.assert_allclose(flat(out), ro, atol=2e-5)
    np.testing.assert_allclose(lse.reshape(rl.shape), rl, atol=2e-5)
  with pytest.raises(ValueError, match="mode"):
    NA.spatiotemporal_attention(q, k, v, mode="diagonal")


def test_sliding_window_plan_and_blending():
  assert NA.sliding_window_denoise_plan(8, 8, 0) == [(0, 8)]
  plan = NA.sliding_window_denoise_plan(10, 4, 2)
  assert plan == [(0, 4), (2, 6), (4, 8), (6, 10)]
  w = NA.blend_weights(plan, 10)
  assert np.all((w >= 0) & (w <= 1)) and np.allclose(w.sum(0), 1)
  x = _normal(0, (2, 10, 3))
  one = NA.sliding_window_denoise_plan(10, 10, 0)
  blended, single = jax.jit(lambda x: (NA.blend_overlaps([x[:, s:e] for s, e in plan], plan, 10),
                                       NA.blend_overlaps([x], one, 10)))(x)
  np.testing.assert_allclose(blended, x, atol=1e-6)
  np.testing.assert_allclose(single, x)
  with pytest.raises(ValueError, match="overlap"):
    NA.sliding_window_denoise_plan(10, 4, 4)


def test_temporal_window_attention_is_a_3d_neighborhood():
  q, k, v = _qkv((1, 5, 2, 3), N=2, K=2)
  mask = np.asarray(Neighborhood((5, 2, 3), (2, 2, 3), 1, (True, False, False)).to_dense(30, 30))
  t = np.arange(30) // 6
  np.testing.assert_array_equal(mask[0], (t[None] <= t[:, None]) & (t[None] >= t[:, None] - 1))
  out, ref = jax.jit(lambda q, k, v: (
      flat(NA.temporal_window_attention(q, k, v, window=2, is_causal=True)),
      reference_attention(flat(q), flat(k), flat(v), mask=mask[None])))(q, k, v)
  np.testing.assert_allclose(out, ref, atol=2e-5)


@pytest.mark.parametrize("layer,shape", [
    (NA.NeighborhoodAttention(4, (3, None), is_causal=(True, False), use_rpb=True), (2, 5, 4, 16)),
    (NA.HaloAttention(4, block_size=2, halo=1), (2, 4, 4, 16)),
    (NA.HiLoAttention(4, alpha=0.5, window=2), (2, 4, 4, 16)),
    (NA.PredFormerLayer(2, "TS"), (1, 3, 4, 8)),
])
def test_layers_init_apply_and_grad(layer, shape):
  x = _normal(0, shape)

  def run(x):
    params = layer.init(jax.random.PRNGKey(1), x)
    return layer.apply(params, x), jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2))(params)
  out, g = jax.jit(run)(x)
  assert out.shape == x.shape
  assert all(np.isfinite(a).all() for a in jax.tree_util.tree_leaves(g))
