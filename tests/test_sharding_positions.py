"""Context parallelism at custom concrete positions, on 8 simulated CPU devices.

The block-sparse route reads its exchange plan off the mask at the given
positions: a continuation chunk (``arange(T) + offset``) and a permuted order
equal the unsharded call with the same positions, forward and gradients, on
context axes of 2 and 4 (zig-zag once), directly and through
``context_parallel`` (S2 with a head axis, and sliding window). In this process
(NumPy only): the plan at shifted positions differs from the default one
where the mask depends on absolute positions, and bad positions raise.
"""
import numpy as np
import pytest

import multidevice

from attnjax import masks as M
from attnjax.sharding import block_sparse_context_plan

SCRIPT = r'''
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh
import attnjax
from attnjax import masks as M
from attnjax.layers import registry
from attnjax.sharding import context_parallel, context_parallel_block_sparse, make_mesh
out = {"devices": jax.device_count()}
B, T, N, K, H = 2, 32, 4, 2, 8
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, H), np.float32)) for n in (N, K, K))
cont = np.arange(T) + 40                                   # a continuation chunk
shuffled = rng.permutation(T)                              # a permuted order
s2 = M.S2(N, block_size=4, local_blocks=1, vert_stride=3, num_kv_heads=K)
sink = M.Causal() & (M.SlidingWindow(5, 0) | M.GlobalTokens((0, 1)))


def mesh(**axes):
  n = int(np.prod(list(axes.values())))
  return Mesh(np.asarray(jax.devices()[:n]).reshape(tuple(axes.values())), tuple(axes))


loss = lambda f: lambda q, k, v: (lambda o: (o * jnp.cos(o)).sum())(f(q, k, v))
both = lambda f, r: jax.jit(lambda *a: [(g(*a), jax.grad(loss(g), (0, 1, 2))(*a)) for g in (f, r)])
cases = {  # name: (mask, mesh, positions, options)
    "sink_continuation_c2": (sink, mesh(context=2), cont, {}),
    "s2_permuted_c4_zigzag": (s2, mesh(context=4), shuffled, dict(assignment="zigzag")),
}
for name, (mask, m, pos, opts) in cases.items():
  f = lambda q, k, v: context_parallel_block_sparse(q, k, v, mask=mask, mesh=m, block_size=4,
                                                    q_positions=pos, k_positions=pos, **opts)
  r = lambda q, k, v: attnjax.attention(q, k, v, mask=mask, q_positions=pos, k_positions=pos,
                                        implementation="reference")
  (o1, g1), (o2, g2) = both(f, r)(q, k, v)
  out[name] = {"fwd": float(jnp.abs(o1 - o2).max()),
               "grad": max(float(jnp.abs(a - b).max()) for a, b in zip(g1, g2))}

# through the one entry, as a layer passes positions ([B, T] rows, concrete); S2 with a head axis
fam_cases = {
    "s2": (make_mesh(1, 2, 4), dict(block_size=4, local_blocks=1, vert_stride=3), cont),
    "sliding_window": (make_mesh(1, 1, 2, devices=jax.devices()[:2]), dict(window=5), shuffled),
}
for fam, (m, opts, pos) in fam_cases.items():
  p = np.broadcast_to(pos, (B, T))
  f = lambda q, k, v: context_parallel(fam, m, head_axis="heads", causal=True, q_positions=p,
                                       k_positions=p, **opts)(q, k, v)
  r = lambda q, k, v: registry.get_family(fam)(q, k, v, causal=True, q_positions=p,
                                               k_positions=p, **opts)
  (o1, g1), (o2, g2) = both(f, r)(q, k, v)
  out["family_" + fam] = {"fwd": float(jnp.abs(o1 - o2).max()),
                          "grad": max(float(jnp.abs(a - b).max()) for a, b in zip(g1, g2))}
print("RESULT" + json.dumps(out))
'''

multidevice.register("positions", SCRIPT)


@pytest.fixture(scope="module")
def result():
  return multidevice.result("positions")


@pytest.mark.parametrize("case", ["sink_continuation_c2", "s2_permuted_c4_zigzag", "family_s2",
                                  "family_sliding_window"])
def test_custom_positions_equal_unsharded(result, case):
  assert result["devices"] == 8
  assert result[case]["fwd"] < 1e-5, result[case]
  assert result[case]["grad"] < 1e-4, result[case]


def test_plan_is_read_off_the_mask_at_the_positions():
  # global tokens 0 and 1: at positions arange(T) + 8 no key is a global token, so the
  # last device needs only its window's neighbour block
  mask = M.Causal() & (M.SlidingWindow(3, 0) | M.GlobalTokens((0, 1)))
  default = block_sparse_context_plan(mask, 32, 2, 2, 4, 1, 4)
  shifted = block_sparse_context_plan(mask, 32, 2, 2, 4, 1, 4,
                                      q_positions=tuple(range(8, 40)),
                                      k_positions=tuple(range(8, 40)))
  assert default.needed_blocks[3, 0] == 2 * 2          # global block 0 and the neighbour
  assert shifted.needed_blocks[3, 0] == 1 * 2          # the neighbour only
  # reversed positions: causality points the other way, device 0 needs device 1's keys
  rev = block_sparse_context_plan(mask, 32, 2, 2, 4, 1, 4, q_positions=tuple(range(31, -1, -1)),
                                  k_positions=tuple(range(31, -1, -1)))
  assert rev.needed_blocks[3, 0] == 0 and rev.needed_blocks[0, 0] > 0
  np.testing.assert_array_equal(rev.q_positions.reshape(-1), np.arange(31, -1, -1))


def test_bad_positions_raise_naming_the_argument():
  import jax
  import jax.numpy as jnp
  from attnjax.sharding import context_parallel_block_sparse, make_mesh
  x = jnp.zeros((2, 8, 2, 4))
  f = lambda **p: context_parallel_block_sparse(x, x, x, mask=M.Causal(), mesh=make_mesh(), **p)
  with pytest.raises(NotImplementedError, match="q_positions differ between batch rows"):
    f(q_positions=np.stack([np.arange(8), np.arange(8) + 1]))
  with pytest.raises(ValueError, match="k_positions must be int positions"):
    f(k_positions=np.arange(7))
  with pytest.raises(TypeError, match="q_positions must be concrete"):
    jax.jit(lambda p: f(q_positions=p))(jnp.arange(8))
