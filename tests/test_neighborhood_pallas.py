"""Fused Pallas neighborhood kernels (spec P2-23) in interpret mode vs the dense oracle."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.masks.neighborhood import check_neighborhood_args
from attnjax.neighborhood import neighborhood_attention
from pallas_kernels.neighborhood.ops import na_pallas
from pallas_kernels.neighborhood.plan import block_plan


def _inputs(shape, N, K, H, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(ks[0], (1,) + shape + (N, H)),
          jax.random.normal(ks[1], (1,) + shape + (K, H)),
          jax.random.normal(ks[2], (1,) + shape + (K, H)))


def _check(backend, shape, kernel, dilation, causal, tile, N=2, K=1, H=8):
  q, k, v = _inputs(shape, N, K, H)
  spatial, ks, ds, cs = check_neighborhood_args(shape, kernel, dilation, causal)
  ref = lambda q, k, v: neighborhood_attention(
      q, k, v, kernel_size=ks, dilation=ds, is_causal=cs, implementation="reference",
      return_lse=True)
  pal = lambda q, k, v: na_pallas(q, k, v, kernel_size=ks, dilation=ds, is_causal=cs,
                                  scale=H ** -0.5, tile_shape=tile, backend=backend)
  o1, l1 = jax.jit(ref)(q, k, v)
  o2, l2 = jax.jit(pal)(q, k, v)
  np.testing.assert_allclose(o2, o1, atol=2e-5)
  np.testing.assert_allclose(l2, l1, atol=2e-5)
  # the lse cotangent matters when the result is merged with additional keys
  loss = lambda f: lambda *a: jnp.sum(f(*a)[0] ** 2) + jnp.sum(jnp.sin(f(*a)[1]))
  g1 = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
  g2 = jax.jit(jax.grad(loss(pal), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g2, g1):
    np.testing.assert_allclose(a, b, atol=5e-5)


def test_block_plan_visits_only_the_union_of_windows():
  bp = block_plan((16, 16), (3, 3), (1, 1), (False, False), (4, 4))
  assert bp.num_blocks == 16 and bp.block == 16
  assert bp.kv_count.max() == 9 and bp.kv_count.min() == 4  # interior 3x3, corner 2x2
  assert bp.visited_blocks < bp.num_blocks ** 2 // 2
  # CSC lists are the transpose of the CSR lists
  pairs = {(i, int(j)) for i in range(16) for j in bp.kv_list[i, :bp.kv_count[i]]}
  back = {(int(i), j) for j in range(16) for i in bp.q_list[j, :bp.q_count[j]]}
  assert pairs == back


def test_gpu_kernel_2d_dilation_causal_gqa():
  _check("gpu", (7, 6), (3, 4), (2, 1), (False, True), (2, 2), N=4, K=2)


def test_gpu_kernel_3d_even_kernel():
  _check("gpu", (4, 5, 4), (2, 3, 2), (1, 1, 2), (True, False, False), (2, 2, 2))


def test_tpu_kernel_1d_dilation_causal():
  _check("tpu", (10,), 3, 2, True, (4,), N=1, K=1)


def test_pallas_through_the_api_with_additional_keys_and_rpb_refusal():
  q, k, v = _inputs((8,), 2, 1, 8)
  ak, av = k[:, :3], v[:, :3]
  args = dict(kernel_size=3, additional_keys=ak, additional_values=av)
  o1 = neighborhood_attention(q, k, v, implementation="reference", **args)
  o2 = neighborhood_attention(q, k, v, implementation="pallas", **args)
  np.testing.assert_allclose(o2, o1, atol=2e-5)
  with pytest.raises(NotImplementedError, match="rpb"):
    neighborhood_attention(q, k, v, kernel_size=3, rpb=jnp.zeros((2, 5)),
                           implementation="pallas")
