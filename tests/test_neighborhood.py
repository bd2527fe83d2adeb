"""Neighborhood attention (NATTEN semantics, spec P2-23): mask, xla path, API."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from attnjax.core.reference import reference_attention
from attnjax.masks.neighborhood import Neighborhood
from attnjax.neighborhood import na1d, na2d, na3d, neighborhood_attention
from attnjax.neighborhood.api import dense_rpb


def rows(shape, k, d=1, c=False):
  m = Neighborhood(shape, k, d, c).to_dense(int(np.prod(shape)), int(np.prod(shape)))[0]
  return [set(np.nonzero(r)[0].tolist()) for r in m]


def test_spec_tiny_cases_verbatim():
  assert rows((5,), 3) == [{0, 1, 2}, {0, 1, 2}, {1, 2, 3}, {2, 3, 4}, {2, 3, 4}]
  assert rows((5,), 3, c=True) == [{0}, {0, 1}, {0, 1, 2}, {1, 2, 3}, {2, 3, 4}]
  assert rows((7,), 3, 2) == [{0, 2, 4}, {1, 3, 5}, {0, 2, 4}, {1, 3, 5}, {2, 4, 6},
                              {1, 3, 5}, {2, 4, 6}]
  assert rows((7,), 3, 2, True) == [{0}, {1}, {0, 2}, {1, 3}, {0, 2, 4}, {1, 3, 5},
                                    {2, 4, 6}]
  assert rows((6,), 4) == [{0, 1, 2, 3}, {0, 1, 2, 3}, {0, 1, 2, 3}, {1, 2, 3, 4},
                           {2, 3, 4, 5}, {2, 3, 4, 5}]


def test_mask_is_and_over_dimensions_and_block_layout():
  m2 = Neighborhood((5, 6), (3, 4), (1, 1), (False, True)).to_dense(30, 30)[0]
  a = Neighborhood((5,), 3).to_dense(5, 5)[0]
  b = Neighborhood((6,), 4, 1, True).to_dense(6, 6)[0]
  np.testing.assert_array_equal(m2, np.einsum("ik,jl->ijkl", a, b).reshape(30, 30))
  mask = Neighborhood((8, 8), 3)
  lay = mask.block_layout(64, 64, 8, 8)
  dense = mask.to_dense(64, 64)[0].reshape(8, 8, 8, 8).any(axis=(1, 3))
  np.testing.assert_array_equal(lay.block_mask[0] > 0, dense)


def _inputs(shape, N=4, K=2, H=8, Hv=None, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(ks[0], (2,) + shape + (N, H), dtype)
  k = jax.random.normal(ks[1], (2,) + shape + (K, H), dtype)
  v = jax.random.normal(ks[2], (2,) + shape + (K, Hv or H), dtype)
  return q, k, v


CASES = [  # shape, kernel, dilation, causal, rpb: odd/even kernels, dilation, causal per dim
    ((11,), 2, 3, False, True),
    ((10,), 3, 2, True, False),
    ((7, 6), (3, 4), (2, 1), (False, True), True),
    ((6, 5), 5, 1, (True, False), False),
    ((4, 5, 6), (3, 2, 3), (1, 2, 2), (True, False, False), True),
]


@pytest.mark.parametrize("shape,kernel,dilation,causal,use_rpb", CASES)
def test_xla_matches_reference_forward_and_grads(shape, kernel, dilation, causal, use_rpb):
  q, k, v = _inputs(shape)
  ks = kernel if isinstance(kernel, tuple) else (kernel,) * len(shape)
  rpb = (jax.random.normal(jax.random.PRNGKey(5), (4,) + tuple(2 * x - 1 for x in ks))
         if use_rpb else None)

  def run(impl, q, k, v, rpb):
    return neighborhood_attention(q, k, v, kernel_size=kernel, dilation=dilation,
                                  is_causal=causal, rpb=rpb, implementation=impl,
                                  return_lse=True)

  o1, l1 = jax.jit(lambda *a: run("reference", *a))(q, k, v, rpb)
  o2, l2 = jax.jit(lambda *a: run("xla", *a))(q, k, v, rpb)
  np.testing.assert_allclose(o2, o1, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(l2, l1, atol=2e-5, rtol=2e-5)
  def loss(impl):
    def f(*a):
      o, l = run(impl, *a)
      return jnp.sum(o ** 2) + jnp.sum(l)
    return f
  argn = (0, 1, 2, 3) if use_rpb else (0, 1, 2)
  g1 = jax.jit(jax.grad(loss("reference"), argnums=argn))(q, k, v, rpb)
  g2 = jax.jit(jax.grad(loss("xla"), argnums=argn))(q, k, v, rpb)
  for a, b in zip(g2, g1):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("shape,kernel,dilation,causal,tile,steps,rem", [
    ((7, 6), (3, 4), (2, 1), (False, True), (2, 2), 3, 0),  # 12 tiles: 3 steps of 4
    ((7, 6), (3, 2), (1, 2), (False, True), (1, 3), 2, 4),  # 14 tiles: 2 x 5 + 4
])
def test_xla_chunked_loop_matches_reference(monkeypatch, shape, kernel, dilation, causal,
                                            tile, steps, rem):
  # several loop steps (and a ragged last one), padded tiles, GQA, rpb, lse cotangent
  from attnjax.neighborhood import xla
  from attnjax.plan.neighborhood import plans, tile_counts
  G, tq, uk = tile_counts(plans(shape, kernel, dilation, causal, tile))
  monkeypatch.setattr(xla, "CHUNK_ELEMENTS", 5 * 2 * 4 * tq * uk)  # B = 2, N = 4
  assert divmod(G, xla._chunk_size(2, 4, G, tq, uk)) == (steps, rem)
  q, k, v = _inputs(shape, Hv=5)
  rpb = jax.random.normal(jax.random.PRNGKey(5), (4,) + tuple(2 * x - 1 for x in kernel))

  def run(impl, q, k, v, rpb):
    return neighborhood_attention(q, k, v, kernel_size=kernel, dilation=dilation,
                                  is_causal=causal, rpb=rpb, implementation=impl,
                                  tile_shape=tile, return_lse=True)

  def loss(impl):
    def f(*a):
      o, l = run(impl, *a)
      return jnp.sum(o ** 2) + jnp.sum(jnp.sin(l))
    return f
  for impl_out, ref_out in zip(jax.jit(lambda *a: run("xla", *a))(q, k, v, rpb),
                               jax.jit(lambda *a: run("reference", *a))(q, k, v, rpb)):
    np.testing.assert_allclose(impl_out, ref_out, atol=2e-5, rtol=2e-5)
  g1 = jax.jit(jax.grad(loss("reference"), argnums=(0, 1, 2, 3)))(q, k, v, rpb)
  g2 = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2, 3)))(q, k, v, rpb)
  for a, b in zip(g2, g1):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5)


def test_xla_traced_scale_is_folded_into_the_query():
  q, k, v = _inputs((5, 6))
  f = lambda s, impl: na2d(q, k, v, kernel_size=3, scale=s, implementation=impl)
  out = jax.jit(lambda s: f(s, "xla"))(jnp.float32(0.3))
  np.testing.assert_allclose(out, jax.jit(lambda s: f(s, "reference"))(0.3), atol=2e-5)
  g1 = jax.jit(jax.grad(lambda s: jnp.sum(f(s, "xla") ** 2)))(jnp.float32(0.3))
  g2 = jax.jit(jax.grad(lambda s: jnp.sum(f(s, "reference") ** 2)))(jnp.float32(0.3))
  np.testing.assert_allclose(g1, g2, rtol=1e-4)


def test_bfloat16_close_to_float32_oracle():
  q, k, v = _inputs((6, 7), dtype=jnp.bfloat16)
  f = jax.jit(lambda q, k, v, impl: na2d(q, k, v, kernel_size=3, dilation=(2, 1),
                                          implementation=impl), static_argnums=3)
  out = f(q, k, v, "xla")
  assert out.dtype == jnp.bfloat16
  ref = f(*(x.astype(jnp.float32) for x in (q, k, v)), "reference")
  naive = f(q, k, v, "reference")
  err = float(jnp.abs(out.astype(jnp.float32) - ref).max())
  naive_err = float(jnp.abs(naive.astype(jnp.float32) - ref).max())
  assert err <= 2 * naive_err + 1e-2
  g = jax.jit(jax.grad(lambda q: jnp.sum(na2d(q, k, v, kernel_size=3, implementation="xla")
                                         .astype(jnp.float32))))(q)
  assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


@st.composite
def configs(draw):
  rank = draw(st.integers(1, 3))
  shape, ks, ds, cs = [], [], [], []
  for _ in range(rank):
    n = draw(st.integers(1, 7 if rank < 3 else 4))
    d = draw(st.integers(1, n))
    k = draw(st.integers(1, n // d))
    shape.append(n), ks.append(k), ds.append(d), cs.append(draw(st.booleans()))
  tile = tuple(draw(st.integers(1, 4)) for _ in range(rank))
  return tuple(shape), tuple(ks), tuple(ds), tuple(cs), tile, draw(st.sampled_from([1, 2]))


@settings(max_examples=5)
@given(configs())
def test_hypothesis_random_configurations(cfg):
  shape, ks, ds, cs, tile, K = cfg
  q, k, v = _inputs(shape, N=2, K=K, H=4)
  args = dict(kernel_size=ks, dilation=ds, is_causal=cs, return_lse=True)
  o1, l1 = jax.jit(lambda q, k, v: neighborhood_attention(
      q, k, v, implementation="reference", **args))(q, k, v)
  o2, l2 = jax.jit(lambda q, k, v: neighborhood_attention(
      q, k, v, implementation="xla", tile_shape=tile, **args))(q, k, v)
  np.testing.assert_allclose(o2, o1, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(l2, l1, atol=2e-5, rtol=2e-5)
  L = int(np.prod(shape))
  counts = Neighborhood(shape, ks, ds, cs).to_dense(L, L)[0].sum(-1)
  if not any(cs):
    assert np.all(counts == np.prod(ks))  # the window shifts instead of shrinking
  assert np.all(counts >= 1)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_additional_keys_merge_through_lse(impl):
  q, k, v = _inputs((6, 5))
  ks_ = jax.random.split(jax.random.PRNGKey(3), 2)
  ak = jax.random.normal(ks_[0], (2, 3, 2, 8))
  av = jax.random.normal(ks_[1], (2, 3, 2, 8))
  fn = lambda q, k, v, ak, av: neighborhood_attention(
      q, k, v, kernel_size=3, is_causal=(True, False), additional_keys=ak,
      additional_values=av, implementation=impl, return_lse=True)
  flat = lambda x: x.reshape((2, 30) + x.shape[-2:])
  mask = np.concatenate([Neighborhood((6, 5), 3, 1, (True, False)).to_dense(30, 30)[0],
                         np.ones((30, 3), bool)], axis=1)
  ref = lambda q, k, v, ak, av: reference_attention(
      flat(q), jnp.concatenate([flat(k), ak], 1), jnp.concatenate([flat(v), av], 1),
      mask=mask[None, None], return_lse=True)
  o, l = jax.jit(fn)(q, k, v, ak, av)
  ro, rl = jax.jit(ref)(q, k, v, ak, av)
  np.testing.assert_allclose(flat(o), ro, atol=2e-5)
  np.testing.assert_allclose(l.reshape(2, 30, 4), rl, atol=2e-5)
  if impl == "reference":
    return
  g1 = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)[0] ** 2), argnums=(0, 1, 2, 3, 4)))(
      q, k, v, ak, av)
  g2 = jax.jit(jax.grad(lambda *a: jnp.sum(ref(*a)[0] ** 2), argnums=(0, 1, 2, 3, 4)))(
      q, k, v, ak, av)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a.reshape(b.shape), b, atol=5e-5)


def test_mqa_and_value_dim_and_special_cases():
  q, k, v = _inputs((8,), N=4, K=1, H=8, Hv=5)

  @jax.jit
  def both(q, k, v):
    full = na1d(q, k, v, kernel_size=8, implementation="xla")  # k = n: full attention
    causal = na1d(q, k, v, kernel_size=8, is_causal=True, implementation="xla")
    tril = np.tril(np.ones((8, 8), bool))
    return (full, reference_attention(q, k, v), causal,
            reference_attention(q, k, v, mask=tril))
  full, dense, causal, dense_causal = both(q, k, v)
  np.testing.assert_allclose(full, dense, atol=2e-5)
  np.testing.assert_allclose(causal, dense_causal, atol=2e-5)
  q3, k3, v3 = _inputs((3, 4, 5), N=2, K=2)
  o = jax.jit(jax.vmap(lambda a, b, c: na3d(a, b, c, kernel_size=(2, 3, 3))))(
      q3[:, None], k3[:, None], v3[:, None])
  ref = jax.jit(lambda a, b, c: na3d(a, b, c, kernel_size=(2, 3, 3),
                                     implementation="reference"))(q3, k3, v3)
  np.testing.assert_allclose(o[:, 0], ref, atol=2e-5)


def test_dense_rpb_matches_natten_indexing():
  # interior query of a 1D k=3 window: offsets -1, 0, +1 map to entries 1, 2, 3
  rpb = jnp.arange(5.0)[None]
  b = dense_rpb(rpb, (7,), (3,), (1,))[0]
  assert [float(b[3, j]) for j in (2, 3, 4)] == [1.0, 2.0, 3.0]
  assert [float(b[0, j]) for j in (0, 1, 2)] == [2.0, 3.0, 4.0]  # shifted window at border


def test_bad_inputs_raise_value_errors_naming_the_argument():
  q, k, v = _inputs((6, 5))
  with pytest.raises(ValueError, match="kernel_size \\* dilation"):
    na2d(q, k, v, kernel_size=(7, 3))
  with pytest.raises(ValueError, match="kernel_size \\* dilation"):
    na2d(q, k, v, kernel_size=3, dilation=(1, 2))
  with pytest.raises(ValueError, match="dilation"):
    na2d(q, k, v, kernel_size=3, dilation=0)
  with pytest.raises(ValueError, match="rpb"):
    na2d(q, k, v, kernel_size=3, rpb=jnp.zeros((4, 3, 3)))
  with pytest.raises(ValueError, match="spatial dimension"):
    na1d(q, k, v, kernel_size=3)
  with pytest.raises(ValueError, match="spatial shape"):
    na2d(q, k[:, :4], v[:, :4], kernel_size=3)
  with pytest.raises(ValueError, match="kernel_size"):
    na2d(q, k, v, kernel_size=(3, 3, 3))
  with pytest.raises(ValueError, match="additional_values"):
    na2d(q, k, v, kernel_size=3, additional_keys=jnp.zeros((2, 3, 2, 8)))
  with pytest.raises(ValueError, match="implementation"):
    na2d(q, k, v, kernel_size=3, implementation="cuda")


def test_na1d_family_in_multihead_layer():
  from attnjax.layers import MultiHeadAttention
  from attnjax.neighborhood import FAMILIES
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 10, 16))
  layer = MultiHeadAttention(num_heads=4, attention="na1d", causal=True,
                             attention_options={"kernel_size": 3})
  params = layer.init(jax.random.PRNGKey(1), x)
  out = jax.jit(layer.apply)(params, x)
  assert out.shape == x.shape
  q, k, v = _inputs((10,))
  fam = FAMILIES["na1d"](q, k, v, causal=True, kernel_size=3,
                         q_positions=jnp.arange(10), k_positions=jnp.arange(10))
  np.testing.assert_allclose(fam, na1d(q, k, v, kernel_size=3, is_causal=True,
                                       implementation="reference"), atol=2e-5)


def test_na1d_family_positions_and_segments():
  from attnjax.neighborhood import FAMILIES
  q, k, v = _inputs((8,))
  fam = FAMILIES["na1d"]
  ref = lambda pos: reference_attention(q, k, v, mask=Neighborhood((8,), 3, 1, False),
                                        q_positions=pos, k_positions=pos)
  shifted = jnp.array([0, 1, 2, 3, 5, 6, 7, 7])
  for pos in (jnp.arange(8), shifted):
    out = jax.jit(lambda p: fam(q, k, v, causal=False, kernel_size=3, q_positions=p,
                                k_positions=p))(pos)
    np.testing.assert_allclose(out, ref(pos), atol=2e-5)
  seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]] * 2)
  out = fam(q, k, v, causal=True, kernel_size=3, segment_ids=seg)
  mask = Neighborhood((8,), 3, 1, True).to_dense(8, 8)[0] & (seg[0][:, None] == seg[0][None])
  np.testing.assert_allclose(out, reference_attention(q, k, v, mask=mask), atol=2e-5)
