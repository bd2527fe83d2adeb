"""HaloNets attention downsampling (spec P2-25): ``halo_attention(..., stride=s)``."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax.neighborhood as NA
from attnjax.core.reference import reference_attention


def _inputs(B, X, Y, b, h, N=4, K=2, H=8, seed=0):
  rng = np.random.default_rng(seed)
  w = b + 2 * h
  nrm = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return (nrm(B, X, Y, N, H), nrm(B, X, Y, K, H), nrm(B, X, Y, K, H),
          (nrm(2 * w - 1, H), nrm(2 * w - 1, H)))


@pytest.mark.parametrize("b,h,s,pad_mode,use_rel", [
    (4, 1, 2, "mask", True), (4, 1, 2, "zero", True), (4, 1, 2, "mask", False),
    (4, 1, 2, "zero", False), (6, 2, 3, "mask", True), (4, 2, 4, "zero", True)])
def test_stride_equals_subsampled_stride_one(b, h, s, pad_mode, use_rel):
  B, X, Y = 2, 2 * b, 3 * b
  q, k, v, rel = _inputs(B, X, Y, b, h)
  rel = rel if use_rel else None

  @jax.jit
  def run(q, k, v, rel):
    kw = dict(block_size=b, halo=h, rel_pos=rel, pad_mode=pad_mode, return_lse=True)
    return (NA.halo_attention(q, k, v, **kw), NA.halo_attention(q, k, v, stride=s, **kw),
            NA.halo_attention(q[:, ::s, ::s], k, v, stride=s, **kw))

  (o1, l1), (o2, l2), (o3, l3) = run(q, k, v, rel)
  assert o2.shape == (B, X // s, Y // s, 4, 8) and l2.shape == (B, X // s, Y // s, 4)
  np.testing.assert_allclose(o2, o1[:, ::s, ::s], atol=2e-5)
  np.testing.assert_allclose(l2, l1[:, ::s, ::s], atol=2e-5)
  # an already strided query is the same thing
  np.testing.assert_allclose(o3, o2, atol=1e-6)
  np.testing.assert_allclose(l3, l2, atol=1e-6)
  # the oracle tells neighbouring pixels apart (a query taken at (s*i + 1, s*j) fails)
  assert np.abs(np.asarray(o1[:, 1::s, ::s] - o2)).max() > 1e-2


def _dense_problem(q, k, v, rel, b, h, s, pad_mode):
  """Flat reference inputs: strided queries, zero-padded keys, explicit window mask, bias."""
  B, X, Y = k.shape[:3]
  w = b + 2 * h
  Xp, Yp = X + 2 * h, Y + 2 * h
  qy, qx = [c.reshape(-1) * s for c in np.meshgrid(np.arange(X // s), np.arange(Y // s),
                                                   indexing="ij")]
  ky, kx = [c.reshape(-1) - h for c in np.meshgrid(np.arange(Xp), np.arange(Yp),
                                                   indexing="ij")]  # image coordinates
  mask = np.zeros((qy.size, ky.size), bool)
  for t in range(qy.size):  # the haloed window of the query's block
    y0, x0 = (qy[t] // b) * b - h, (qx[t] // b) * b - h
    mask[t] = (ky >= y0) & (ky < y0 + w) & (kx >= x0) & (kx < x0 + w)
  inside = (ky >= 0) & (ky < X) & (kx >= 0) & (kx < Y)
  if pad_mode == "mask":
    mask &= inside[None, :]
  dy = np.clip(ky[None, :] - qy[:, None] + w - 1, 0, 2 * w - 2)
  dx = np.clip(kx[None, :] - qx[:, None] + w - 1, 0, 2 * w - 2)
  pad = ((0, 0), (h, h), (h, h), (0, 0), (0, 0))
  flat = lambda x: x.reshape((B, -1) + x.shape[-2:])
  qs = flat(q[:, ::s, ::s])
  bias = (jnp.einsum("btnh,tsh->bnts", qs, rel[0][dy])
          + jnp.einsum("btnh,tsh->bnts", qs, rel[1][dx]))
  return qs, flat(jnp.pad(k, pad)), flat(jnp.pad(v, pad)), mask, bias, inside


@pytest.mark.parametrize("pad_mode", ["mask", "zero"])
def test_stride_matches_dense_reference_and_grads(pad_mode):
  B, X, Y, b, h, s = 1, 8, 4, 4, 1, 2
  q, k, v, rel = _inputs(B, X, Y, b, h)

  def fn(q, k, v, rel):
    o, l = NA.halo_attention(q, k, v, block_size=b, halo=h, rel_pos=rel, pad_mode=pad_mode,
                             stride=s, return_lse=True)
    return o.reshape(B, -1, *o.shape[-2:]), l.reshape(B, -1, l.shape[-1])

  def ref(q, k, v, rel):
    qs, kp, vp, mask, bias, _ = _dense_problem(q, k, v, rel, b, h, s, pad_mode)
    return reference_attention(qs, kp, vp, mask=mask, bias=bias, return_lse=True)

  loss = lambda f: lambda *a: sum(jnp.sum(x * jnp.cos(x)) for x in f(*a))
  (o1, l1), g1 = jax.jit(lambda *a: (fn(*a), jax.grad(loss(fn), argnums=(0, 1, 2, 3))(*a)))(
      q, k, v, rel)
  (o2, l2), g2 = jax.jit(lambda *a: (ref(*a), jax.grad(loss(ref), argnums=(0, 1, 2, 3))(*a)))(
      q, k, v, rel)
  np.testing.assert_allclose(o1, o2, atol=3e-5)
  np.testing.assert_allclose(l1, l2, atol=3e-5)
  for a, c in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(a, c, atol=2e-4)
  # the query gradient lives on the strided pixels only
  gq = np.asarray(g1[0])
  assert np.abs(gq[:, ::s, ::s]).min() > 0 and not gq[:, 1::s].any() and not gq[:, :, 1::s].any()
  if pad_mode == "mask":  # halo_mask(stride) is the same window mask on the map's pixels
    _, _, _, mask, _, inside = _dense_problem(q, k, v, rel, b, h, s, pad_mode)
    np.testing.assert_array_equal(NA.halo_mask(X, Y, b, h, stride=s), mask[:, inside])


def test_stride_bfloat16_and_mqa():
  q, k, v, rel = _inputs(1, 8, 8, 4, 1, N=4, K=1)
  fn = jax.jit(lambda q, k, v, rel: NA.halo_attention(q, k, v, block_size=4, halo=1,
                                                      rel_pos=rel, stride=2, return_lse=True))
  cast = lambda x: x.astype(jnp.bfloat16)
  o, l = fn(cast(q), cast(k), cast(v), rel)
  o32, l32 = fn(*(cast(x).astype(jnp.float32) for x in (q, k, v)), rel)
  assert o.dtype == jnp.bfloat16 and l.dtype == jnp.float32 and o.shape == (1, 4, 4, 4, 8)
  np.testing.assert_allclose(o.astype(jnp.float32), o32, atol=2e-2)
  np.testing.assert_allclose(l, l32, atol=2e-3)


def test_avg_down_is_pooled_stride_one():
  q, k, v, rel = _inputs(1, 6, 6, 3, 1)  # block 3 is not divisible by stride 2
  run = jax.jit(lambda q, k, v, rel: (
      NA.halo_attention(q, k, v, block_size=3, halo=1, rel_pos=rel),
      NA.halo_attention(q, k, v, block_size=3, halo=1, rel_pos=rel, stride=2, avg_down=True)))
  o1, o2 = run(q, k, v, rel)
  assert o2.shape == (1, 3, 3, 4, 8)
  pooled = o1.reshape(1, 3, 2, 3, 2, 4, 8).mean(axis=(2, 4))
  np.testing.assert_allclose(o2, pooled, atol=2e-6)
  with pytest.raises(ValueError, match="return_lse"):
    NA.halo_attention(q, k, v, block_size=3, halo=1, stride=2, avg_down=True, return_lse=True)
  with pytest.raises(ValueError, match="query spatial shape"):
    NA.halo_attention(q[:, ::2, ::2], k, v, block_size=3, halo=1, stride=2, avg_down=True)


def test_stride_errors():
  q, k, v, _ = _inputs(1, 12, 12, 6, 1)
  for bad in (0, -2, 2.0, True):
    with pytest.raises(ValueError, match="stride"):
      NA.halo_attention(q, k, v, block_size=6, halo=1, stride=bad)
  with pytest.raises(ValueError, match="stride=4 must divide block_size=6"):
    NA.halo_attention(q, k, v, block_size=6, halo=1, stride=4)
  with pytest.raises(ValueError, match="query spatial shape"):
    NA.halo_attention(q[:, ::3, ::3], k, v, block_size=6, halo=1, stride=2)
  with pytest.raises(ValueError, match="query spatial shape"):
    NA.halo_attention(q[:, ::2, ::2], k, v, block_size=6, halo=1)
  with pytest.raises(ValueError, match="avg_down"):
    NA.halo_attention(q, k, v, block_size=6, halo=1, stride=2, avg_down=1)
  with pytest.raises(ValueError, match="stride"):
    NA.halo_mask(12, 12, 6, 1, stride=5)


def test_halo_layer_stride():
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 8, 8, 16)), jnp.float32)
  mk = lambda **kw: NA.HaloAttention(4, block_size=4, halo=1, **kw)
  params = jax.jit(mk().init)(jax.random.PRNGKey(0), x)
  run = jax.jit(lambda p, x: (mk().apply(p, x), mk(stride=2).apply(p, x),
                              mk(stride=2, avg_down=True).apply(p, x)))
  y1, y2, y3 = run(params, x)
  assert y2.shape == (2, 4, 4, 16) and y3.shape == (2, 4, 4, 16)
  # same parameters at every stride; the output projection acts per pixel
  np.testing.assert_allclose(y2, y1[:, ::2, ::2], atol=2e-5)
  np.testing.assert_allclose(y3, y1.reshape(2, 4, 2, 4, 2, 16).mean(axis=(2, 4)), atol=2e-5)
