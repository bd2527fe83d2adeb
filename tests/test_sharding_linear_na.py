"""Context parallelism of the linear and neighborhood engines on 8 simulated CPU devices.

In a subprocess (XLA_FLAGS must set the device count before jax is imported,
and a pytest-xdist worker may have imported jax already). Every case compares
the sharded op with the unsharded one, forward and gradients of q, k, v, on
context axes of 2, 4 and 8 (with data and heads axes in some cases): linear
attention with decay (and an initial/final state), plain normalised linear
in bfloat16, BASED (Taylor linear branch + sliding window), non-causal linear, na1d (dilated,
causal, a window as long as the axis), na2d split along either spatial
axis and na3d split along its last axis (dilated). Errors name the field;
the communication formulas are checked here.
"""

import pytest

import multidevice

SCRIPT = r'''
import json
import jax, jax.numpy as jnp, numpy as np
from attnjax.linear import based_attention, linear_attention
from attnjax.neighborhood import neighborhood_attention
from attnjax.sharding import (make_mesh, context_parallel_based_attention,
                              context_parallel_linear_attention,
                              context_parallel_neighborhood_attention)
out = {"devices": jax.device_count()}

def mesh_of(shape):
  return make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])

def compare(name, sharded, unsharded, q, k, v, w):
  # one program for both sides: one compile per case
  ((_, (o1, _)), g1), ((_, (o2, _)), g2) = jax.jit(
      lambda *a: (loss_and_grads(sharded, w)(*a), loss_and_grads(unsharded, w)(*a)))(q, k, v)
  out[name] = {"fwd": rel(o1, o2), "grad": max(rel(a, b) for a, b in zip(g1, g2)),
               "dtype": str(o1.dtype)}

# -- linear ----------------------------------------------------------------------------
B, T, N, K, H = 2, 64, 4, 2, 8
q, k, v, w = inputs((B, T), N, K, H, jnp.float32)
s0 = jnp.asarray(np.random.default_rng(9).standard_normal((B, N, H, H), np.float32))
kw = dict(decay="tnl", chunk_size=8, initial_state=s0, return_state=True)
m = mesh_of((1, 1, 8))
compare("linear_decay_state_c8",
        lambda q, k, v: context_parallel_linear_attention(q, k, v, m, **kw),
        lambda q, k, v: linear_attention(q, k, v, **kw), q, k, v, w)

qb, kb, vb, _ = inputs((B, T), N, K, H, jnp.bfloat16, seed=1)
kw = dict(feature_map="elu+1", normalize=True, chunk_size=8)
m = mesh_of((2, 1, 4))
compare("linear_normalized_bf16_data2_c4",
        lambda q, k, v: context_parallel_linear_attention(q, k, v, m, **kw),
        lambda q, k, v: linear_attention(q, k, v, **kw), qb, kb, vb, w)

qs, ks_, vs, ws = inputs((B, 32), N, K, 4, jnp.float32, seed=2)   # BASED: Taylor, F = 21
kw = dict(window=(6, 0), chunk_size=8)
m = mesh_of((1, 2, 2))
compare("based_heads2_c2",
        lambda q, k, v: context_parallel_based_attention(q, k, v, m, **kw),
        lambda q, k, v: based_attention(q, k, v, **kw), qs, ks_, vs, ws)

kw = dict(feature_map="elu+1", normalize=True, causal=False)
m = mesh_of((1, 1, 8))
compare("linear_noncausal_c8",
        lambda q, k, v: context_parallel_linear_attention(q, k, v, m, **kw),
        lambda q, k, v: linear_attention(q, k, v, **kw), q, k, v, w)

# -- neighborhood ------------------------------------------------------------------------
na_cases = [
    ("na1d_dilated_c8", (1, 1, 8), (64,), dict(kernel_size=5, dilation=2), 0),
    ("na1d_causal_c4", (1, 1, 4), (32,), dict(kernel_size=4, dilation=2, is_causal=True), 0),
    ("na1d_full_window_c2", (1, 1, 2), (16,), dict(kernel_size=16), 0),
    ("na2d_axis0_data2_heads2_c2", (2, 2, 2), (8, 12), dict(kernel_size=(3, 5),
                                                            dilation=(1, 2)), 0),
    ("na2d_axis1_data2_c4", (2, 1, 4), (6, 16), dict(kernel_size=(3, 7)), 1),
    ("na3d_axis2_c4", (1, 1, 4), (3, 4, 16), dict(kernel_size=(3, 3, 3), dilation=(1, 1, 2)), 2),
]
for name, shape, spatial, kw, axis in na_cases:
  q, k, v, w = inputs((2,) + spatial, N, K, H, jnp.float32, seed=3)
  m = mesh_of(shape)
  compare(name,
          lambda q, k, v: context_parallel_neighborhood_attention(
              q, k, v, m, spatial_axis=axis, **kw),
          lambda q, k, v: neighborhood_attention(q, k, v, **kw), q, k, v, w)

# -- errors ------------------------------------------------------------------------------
errs = {}
def err(name, fn):
  try:
    fn()
    errs[name] = "no error"
  except ValueError as e:
    errs[name] = str(e)
q, k, v, _ = inputs((2, 36), 3, 3, 8, jnp.float32)
err("seq", lambda: context_parallel_linear_attention(q, k, v, mesh_of((1, 1, 8))))
err("heads", lambda: context_parallel_linear_attention(q[:, :32], k[:, :32], v[:, :32],
                                                       mesh_of((1, 2, 4))))
q, k, v, _ = inputs((2, 16), 4, 4, 8, jnp.float32)
err("window", lambda: context_parallel_based_attention(q, k, v,
                                                        mesh_of((1, 1, 8)), window=5))
err("halo", lambda: context_parallel_neighborhood_attention(q, k, v, mesh_of((1, 1, 8)),
                                                            kernel_size=7))
err("na_extent", lambda: context_parallel_neighborhood_attention(
    q[:, :12], k[:, :12], v[:, :12], mesh_of((1, 1, 8)), kernel_size=3))
err("na_heads", lambda: context_parallel_neighborhood_attention(
    q[..., :3, :], k[..., :3, :], v[..., :3, :], mesh_of((1, 2, 4)), kernel_size=3))
out["errors"] = errs
print("RESULT" + json.dumps(out))
'''

LINEAR = ["linear_decay_state_c8", "linear_normalized_bf16_data2_c4", "based_heads2_c2",
          "linear_noncausal_c8"]
NEIGHBORHOOD = ["na1d_dilated_c8", "na1d_causal_c4", "na1d_full_window_c2",
                "na2d_axis0_data2_heads2_c2", "na2d_axis1_data2_c4", "na3d_axis2_c4"]


multidevice.register("linear_na", multidevice.HELPERS + SCRIPT)


@pytest.fixture(scope="module")
def result():
  return multidevice.result("linear_na")


def test_eight_devices(result):
  assert result["devices"] == 8


@pytest.mark.parametrize("case", LINEAR + NEIGHBORHOOD)
def test_sharded_equals_unsharded(result, case):
  r = result[case]
  tol = 1e-2 if r["dtype"] == "bfloat16" else 2e-5
  assert r["fwd"] < tol, r
  assert r["grad"] < 2 * tol, r


def test_errors_name_the_field(result):
  e = result["errors"]
  assert "query length T=36 is not divisible by the 'context' axis size 8" in e["seq"]
  assert "num_heads N=3 is not divisible by the 'heads' axis size 2" in e["heads"]
  assert "window: the left side of 5 keys is longer than the local shard of 2 tokens" in (
      e["window"])
  assert "spatial axis 0: the left halo of 5 rows" in e["halo"]
  assert "larger than the local shard of 2 rows" in e["halo"]
  assert "spatial axis 0: spatial extent 12 is not divisible by the context axis size 8" in (
      e["na_extent"])
  assert "num_heads N=3 is not divisible by the 'heads' axis size 2" in e["na_heads"]


def test_linear_state_traffic_does_not_grow_with_length():
  from attnjax.sharding import linear_communication_bytes, scan_steps  # pylint: disable=g-import-not-at-top
  assert [scan_steps(c) for c in (1, 2, 3, 4, 8, 16)] == [0, 1, 2, 3, 4, 5]
  kw = dict(batch=1, num_heads=32, num_kv_heads=8, features=128, value_dim=128, num_chunks=8)
  short = linear_communication_bytes(seq_len=8192, **kw)
  long = linear_communication_bytes(seq_len=65536, **kw)
  assert short["state_bytes"] == long["state_bytes"] == 4 * 32 * 128 * 128 * 4
  assert long["allgather_bytes"] == 8 * short["allgather_bytes"]
  nodecay = linear_communication_bytes(seq_len=8192, decay=False, **kw)
  assert nodecay["state_bytes"] == short["state_bytes"] / 4     # KV heads' states only


def test_halo_plan_rows():
  from attnjax.sharding import halo_plan, neighborhood_communication_bytes  # pylint: disable=g-import-not-at-top
  assert (halo_plan(64, 5, 2, False, 8).left, halo_plan(64, 5, 2, False, 8).right) == (4, 4)
  assert (halo_plan(64, 4, 1, False, 8).left, halo_plan(64, 4, 1, False, 8).right) == (2, 1)
  assert (halo_plan(64, 4, 2, True, 4).left, halo_plan(64, 4, 2, True, 4).right) == (6, 0)
  b = neighborhood_communication_bytes((64, 32), kernel_size=(5, 3), batch=1, num_kv_heads=2,
                                       head_dim=8, num_shards=4)
  assert b["halo_rows"] == 4 and b["ratio"] == 4 / (3 * 16)
