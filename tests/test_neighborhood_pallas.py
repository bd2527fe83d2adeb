"""Fused Pallas neighborhood kernels (spec P2-23) in interpret mode vs the dense oracle."""
import jax
import jax.numpy as jnp
import numpy as np

from attnjax.masks.neighborhood import check_neighborhood_args
from attnjax.neighborhood import neighborhood_attention
from pallas_kernels.neighborhood.bias import bias_plan
from pallas_kernels.neighborhood.ops import na_pallas
from pallas_kernels.neighborhood.plan import block_plan
from pallas_kernels.neighborhood.resources import GpuBlocks


def _normal(shape, seed, dtype=jnp.float32):
  # NumPy draws: jax.random would compile one program per shape
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _inputs(shape, N, K, H, seed=0, dtype=jnp.float32):
  return tuple(_normal((1,) + shape + (h, H), seed + i, dtype)
               for i, h in enumerate((N, K, K)))


def _value_and_grads(f, args):
  """(out, lse) and the gradients wrt every argument of one jitted loss."""
  def loss(*a):
    o, l = f(*a)
    # the lse cotangent matters when the result is merged with additional keys
    return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(jnp.sin(l)), (o, l)
  (_, (o, l)), g = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))),
                                              has_aux=True))(*args)
  return o, l, g


def _check(backend, shape, kernel, dilation, causal, tile, N=2, K=1, H=8, rpb=False,
           dtype=jnp.float32, tol=5e-5, gpu_blocks=None):
  q, k, v = _inputs(shape, N, K, H, dtype=dtype)
  spatial, ks, ds, cs = check_neighborhood_args(shape, kernel, dilation, causal)
  args = (q, k, v)
  if rpb:
    args += (_normal((N,) + tuple(2 * a - 1 for a in ks), 7, dtype),)
  ref = lambda q, k, v, *r: neighborhood_attention(
      q, k, v, kernel_size=ks, dilation=ds, is_causal=cs, rpb=r[0] if r else None,
      implementation="reference", return_lse=True)
  pal = lambda q, k, v, *r: na_pallas(
      q, k, v, kernel_size=ks, dilation=ds, is_causal=cs, scale=H ** -0.5, tile_shape=tile,
      rpb=r[0] if r else None, backend=backend, gpu_blocks=gpu_blocks)
  f32 = lambda x: np.asarray(x, np.float32)
  o1, l1, g1 = _value_and_grads(ref, args)
  o2, l2, g2 = _value_and_grads(pal, args)
  assert o2.dtype == q.dtype and l2.dtype == jnp.float32
  np.testing.assert_allclose(f32(o2), f32(o1), atol=tol)
  np.testing.assert_allclose(l2, l1, atol=tol)
  for a, b in zip(g2, g1):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(f32(a), f32(b), atol=tol * 2, rtol=tol)
  if rpb:  # the test sees a wrong bias: offsets x' - y' (a flipped table) differ
    flipped = jnp.flip(args[3], axis=tuple(range(1, args[3].ndim)))
    o3 = jax.jit(ref)(q, k, v, flipped)[0]
    assert np.abs(f32(o3) - f32(o2)).max() > 20 * tol


def test_block_plan_visits_only_the_union_of_windows():
  bp = block_plan((16, 16), (3, 3), (1, 1), (False, False), (4, 4))
  assert bp.num_blocks == 16 and bp.block == 16
  assert bp.kv_count.max() == 9 and bp.kv_count.min() == 4  # interior 3x3, corner 2x2
  assert bp.visited_blocks < bp.num_blocks ** 2 // 2
  # CSC lists are the transpose of the CSR lists
  pairs = {(i, int(j)) for i in range(16) for j in bp.kv_list[i, :bp.kv_count[i]]}
  back = {(int(i), j) for j in range(16) for i in bp.q_list[j, :bp.q_count[j]]}
  assert pairs == back


def test_bias_plan_classes_are_tile_distances():
  bp = block_plan((16, 16), (3, 3), (1, 1), (False, False), (4, 4))
  pb = bias_plan((16, 16), (3, 3), (1, 1), (False, False), (4, 4))
  assert pb.num_classes == 9 and pb.num_pairs == bp.visited_blocks
  tile = lambda b: np.array(divmod(int(b), 4))
  for i in range(16):
    for s in range(bp.kv_count[i]):
      j = bp.kv_list[i, s]
      c = pb.kv_class[i, s]
      assert np.array_equal(pb.deltas[c], tile(j) - tile(i))
      assert pb.pair_class[pb.pair_slot[i, s]] == c
    for s in range(bp.q_count[i]):  # CSC: key block i, query block q_list[i, s]
      assert np.array_equal(pb.deltas[pb.q_class[i, s]], tile(i) - tile(bp.q_list[i, s]))
  np.testing.assert_array_equal(pb.pair_slot[:, 0],
                                np.cumsum(bp.kv_count) - bp.kv_count)


def test_gpu_kernel_2d_dilation_causal_gqa_rpb():
  _check("gpu", (7, 6), (3, 4), (2, 1), (False, True), (2, 2), N=4, K=2, rpb=True)


def test_gpu_kernel_1d_causal_rpb():
  _check("gpu", (10,), 3, 1, True, (4,), N=2, K=2, rpb=True)


def test_gpu_kernel_bfloat16_rpb_empty_tile():
  # group 1 of the dilation has 4 tokens: its second tile is all padding (no key blocks)
  assert 0 in block_plan((9,), (3,), (2,), (False,), (4,)).kv_count
  _check("gpu", (9,), 3, 2, False, (4,), N=2, K=1, rpb=True, dtype=jnp.bfloat16, tol=5e-2)


def test_gpu_kernel_3d_even_kernel():
  _check("gpu", (4, 5, 4), (2, 3, 2), (1, 1, 2), (True, False, False), (2, 2, 2))


def test_gpu_kernel_sub_blocks_2d_rpb_gqa():
  # 16-query tiles cut into programs of 8 (fwd, dq) or 4 (dk/dv) rows that step
  # through each key tile in chunks: the bias and dS blocks are read and written
  # at sub-block offsets of the class table and of the pair slots
  blocks = (GpuBlocks(8, 4), GpuBlocks(4, 8), GpuBlocks(2, 4))
  _check("gpu", (9, 8), (3, 5), (1, 1), (False, True), (4, 4), N=4, K=2, rpb=True,
         gpu_blocks=blocks)


def test_gpu_kernel_sub_blocks_3d_dilation():
  _check("gpu", (4, 6, 5), (3, 3, 2), (1, 2, 1), (True, False, False), (2, 2, 4),
         gpu_blocks=GpuBlocks(4, 8))


def test_tpu_kernel_1d_dilation_causal():
  _check("tpu", (10,), 3, 2, True, (4,), N=1, K=1)


def test_tpu_kernel_2d_rpb_gqa_empty_tiles():
  assert 0 in block_plan((5, 4), (2, 3), (2, 1), (False, False), (2, 2)).kv_count
  _check("tpu", (5, 4), (2, 3), (2, 1), False, (2, 2), N=2, K=1, rpb=True)


def test_pallas_through_the_api_with_additional_keys_and_rpb():
  q, k, v = _inputs((8,), 2, 1, 8)
  ak, av = k[:, :3], v[:, :3]
  rpb = _normal((2, 5), 3)
  args = dict(kernel_size=3, additional_keys=ak, additional_values=av, rpb=rpb)
  run = lambda impl: jax.jit(lambda *a: neighborhood_attention(
      *a, implementation=impl, **args))(q, k, v)
  o1, o2 = run("reference"), run("pallas")
  np.testing.assert_allclose(o2, o1, atol=2e-5)


def _lower_compiled(backend, rpb, platform):
  """Lowers the compiled (not interpreted) forward + backward for another platform."""
  q = jnp.zeros((1, 16, 16, 4, 64), jnp.bfloat16)
  k = jnp.zeros((1, 16, 16, 2, 64), jnp.bfloat16)
  bias = jnp.zeros((4, 5, 5), jnp.float32) if rpb else None

  def f(q, k, v, bias):
    attend = lambda q, k, v, b: na_pallas(
        q, k, v, kernel_size=(3, 3), dilation=(1, 1), is_causal=(False, False),
        scale=0.125, tile_shape=(8, 16), rpb=b, backend=backend, interpret=False)[0]
    out, pull = jax.vjp(attend, q, k, v, bias)
    return pull(out)
  return jax.jit(f).trace(q, k, k, bias).lower(lowering_platforms=(platform,)).as_text()


def test_compiled_gpu_kernels_lower_to_triton():
  for rpb in (False, True):  # forward, dq, dk/dv
    assert _lower_compiled("gpu", rpb, "cuda").count("custom_call @__gpu$xla.gpu.triton") == 3


def test_compiled_tpu_kernels_lower_to_mosaic():
  from jax._src.mesh import AbstractDevice, AbstractMesh  # pylint: disable=g-import-not-at-top
  mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice("TPU v5 lite", 1, "tpu"))
  with jax.sharding.use_abstract_mesh(mesh):
    for rpb in (False, True):
      assert _lower_compiled("tpu", rpb, "tpu").count("custom_call @tpu_custom_call") == 3
