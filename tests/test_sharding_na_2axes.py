"""Neighborhood attention with two (or three) spatial axes split over a grid of devices.

On 8 simulated CPU devices in a subprocess (``multidevice``: XLA_FLAGS must set
the device count before jax is imported). Each case compares
``context_parallel_neighborhood_attention`` with ``spatial_axis`` a tuple
against the unsharded neighborhood engine, forward and gradients of q, k, v:
na2d on 2 x 2 and 2 x 4 grids (kernel 3 and 5, dilation 1 and 2, causal along
one axis, GQA, relative position bias and lse with a heads axis, the axes
mapped in reverse order), bfloat16 with a data axis, na3d with two of its
axes split and with all three. The halo bytes are checked against a hand
count and against the collective-permutes of the compiled program; errors
name the axis.
"""

import pytest

import multidevice

SCRIPT = r'''
import json, re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh
from attnjax.neighborhood import neighborhood_attention
from attnjax.sharding import context_parallel_neighborhood_attention, neighborhood_communication_bytes
out = {"devices": jax.device_count()}

def mesh_of(**axes):
  n = int(np.prod(list(axes.values())))
  return Mesh(np.asarray(jax.devices()[:n], dtype=object).reshape(tuple(axes.values())),
              tuple(axes))

def compare(name, sharded, unsharded, q, k, v, w):
  # one program for both sides: one compile per case
  ((_, (o1, l1)), g1), ((_, (o2, l2)), g2) = jax.jit(
      lambda *a: (loss_and_grads(sharded, w)(*a), loss_and_grads(unsharded, w)(*a)))(q, k, v)
  out[name] = {"fwd": rel(o1, o2), "grad": max(rel(a, b) for a, b in zip(g1, g2)),
               "lse": None if l1 is None else rel(l1, l2), "dtype": str(o1.dtype),
               "scale": float(np.abs(np.asarray(o2, np.float32)).max())}

N, K, H = 4, 2, 8
rpb = jnp.asarray(np.random.default_rng(7).standard_normal((N, 5, 5), np.float32))
# name, mesh axes, spatial, options, spatial_axis, context_axis, dtype
cases = [
    ("na2d_k3_rpb_lse_heads2_2x2", dict(heads=2, cx=2, cy=2), (8, 8),
     dict(kernel_size=3, rpb=rpb, return_lse=True), (0, 1), ("cx", "cy"), jnp.float32),
    ("na2d_k5_d2_reversed_2x4", dict(cx=2, cy=4), (24, 12),
     dict(kernel_size=5, dilation=2), (1, 0), ("cx", "cy"), jnp.float32),
    ("na2d_k3_d2_causal_x_2x4", dict(cx=2, cy=4), (8, 16),
     dict(kernel_size=(3, 5), dilation=(2, 1), is_causal=(True, False)), (0, 1),
     ("cx", "cy"), jnp.float32),
    ("na2d_bf16_data2_2x2", dict(data=2, cx=2, cy=2), (8, 8),
     dict(kernel_size=3), (0, 1), ("cx", "cy"), jnp.bfloat16),
    ("na3d_axes02_2x4", dict(cx=2, cy=4), (4, 3, 16),
     dict(kernel_size=3, dilation=(1, 1, 2)), (0, 2), ("cx", "cy"), jnp.float32),
    ("na3d_three_axes_2x2x2", dict(cx=2, cy=2, cz=2), (4, 4, 6),
     dict(kernel_size=(3, 3, 5), is_causal=(False, False, True)), (0, 1, 2),
     ("cx", "cy", "cz"), jnp.float32),
]
for name, axes, spatial, kw, sa, ca, dtype in cases:
  q, k, v, w = inputs((2,) + spatial, N, K, H, dtype, seed=3)
  m = mesh_of(**axes)
  compare(name,
          lambda q, k, v: context_parallel_neighborhood_attention(
              q, k, v, m, spatial_axis=sa, context_axis=ca, **kw),
          lambda q, k, v: neighborhood_attention(q, k, v, **kw), q, k, v, w)

# -- bytes: the collective-permutes of the compiled forward vs the formula ------------------
def permuted_bytes(hlo):
  sizes = {"f32": 4, "bf16": 2}
  total = 0
  for m in re.finditer(r"= (\(?[^=]*?\)?) collective-permute(?:-start)?\(", hlo):
    for dt, dims in re.findall(r"(f32|bf16)\[([0-9,]*)\]", m.group(1)):
      total += sizes[dt] * int(np.prod([int(x) for x in dims.split(",") if x] or [1]))
  return total
spatial, kw = (8, 12), dict(kernel_size=(3, 5))
q, k, v, _ = inputs((2,) + spatial, N, K, H, jnp.float32)
m = mesh_of(cx=2, cy=2)
f = lambda q, k, v: context_parallel_neighborhood_attention(
    q, k, v, m, spatial_axis=(0, 1), context_axis=("cx", "cy"), **kw)
plan = neighborhood_communication_bytes(spatial, spatial_axis=(0, 1), num_shards=(2, 2),
                                        batch=2, num_kv_heads=K, head_dim=H, itemsize=4, **kw)
out["bytes"] = {"hlo": permuted_bytes(jax.jit(f).lower(q, k, v).compile().as_text()),
                "plan": plan["halo_bytes"]}

# -- errors ------------------------------------------------------------------------------
errs = {}
def err(name, fn):
  try:
    fn()
    errs[name] = "no error"
  except ValueError as e:
    errs[name] = str(e)
q, k, v, _ = inputs((1, 8, 8), N, K, H, jnp.float32)
m24 = mesh_of(cx=2, cy=4)
def call(q, k, v, mesh, sa=(0, 1), ca=("cx", "cy"), **kw):
  return lambda: context_parallel_neighborhood_attention(q, k, v, mesh, spatial_axis=sa,
                                                         context_axis=ca, **kw)
err("extent", call(q[:, :, :6], k[:, :, :6], v[:, :, :6], m24, kernel_size=3))
err("halo", call(q, k, v, m24, kernel_size=(3, 5)))
err("halo_dilated", call(q, k, v, mesh_of(cx=4, cy=2), kernel_size=3, dilation=(2, 1)))
err("same_axis", call(q, k, v, m24, ca=("cy", "cy"), kernel_size=3))
err("unknown", call(q, k, v, m24, ca=("cx", "cz"), kernel_size=3))
err("one_name", call(q, k, v, m24, ca="cx", kernel_size=3))
err("same_spatial", call(q, k, v, m24, sa=(1, 1), kernel_size=3))
out["errors"] = errs
print("RESULT" + json.dumps(out))
'''

CASES = ["na2d_k3_rpb_lse_heads2_2x2", "na2d_k5_d2_reversed_2x4", "na2d_k3_d2_causal_x_2x4",
         "na2d_bf16_data2_2x2", "na3d_axes02_2x4", "na3d_three_axes_2x2x2"]

multidevice.register("na_2axes", multidevice.HELPERS + SCRIPT)


@pytest.fixture(scope="module")
def result():
  return multidevice.result("na_2axes")


def test_eight_devices(result):
  assert result["devices"] == 8


@pytest.mark.parametrize("case", CASES)
def test_sharded_equals_unsharded(result, case):
  r = result[case]
  tol = 1e-2 if r["dtype"] == "bfloat16" else 2e-5
  assert r["scale"] > 0.1, r       # not a vacuous comparison of zeros
  assert r["fwd"] < tol, r
  assert r["grad"] < 2 * tol, r
  if r["lse"] is not None:
    assert r["lse"] < tol, r


def test_halo_bytes_match_the_compiled_program(result):
  # (8, 12) on 2 x 2, kernel (3, 5), B=2, K=2, H=Hv=8, float32: X halo 1 + 1 rows of the
  # 4 x 6 tile, then Y halo 2 + 2 columns of the 6 x 6 extended tile: 12 + 24 tokens.
  assert result["bytes"]["plan"] == 36 * 2 * 2 * (8 + 8) * 4
  assert result["bytes"]["hlo"] == result["bytes"]["plan"]


def test_two_axis_bytes_by_hand():
  from attnjax.sharding import neighborhood_communication_bytes  # pylint: disable=g-import-not-at-top
  kw = dict(batch=1, num_kv_heads=2, head_dim=4, itemsize=4)
  b = neighborhood_communication_bytes((8, 12), kernel_size=(3, 5), spatial_axis=(0, 1),
                                       num_shards=(2, 2), **kw)
  token = 2 * (4 + 4) * 4
  assert b["halo_rows"] == (2, 4)
  assert b["halo_tokens"] == 2 * 6 + 4 * 6          # X rows of the tile, Y of the extended tile
  assert b["halo_bytes"] == 36 * token
  assert b["allgather_bytes"] == 3 * 4 * 6 * token
  # 256 x 256, kernel 7 on 2 x 4 devices: 6 rows of the 128 x 64 tile, 6 columns of 134 x 64
  b = neighborhood_communication_bytes((256, 256), kernel_size=7, spatial_axis=(0, 1),
                                       num_shards=(2, 4), **kw)
  assert b["halo_tokens"] == 6 * 64 + 6 * 134
  assert b["ratio"] == (6 * 64 + 6 * 134) / (7 * 128 * 64)
  one = neighborhood_communication_bytes((256, 256), kernel_size=7, spatial_axis=0,
                                         num_shards=8, **kw)
  assert one["halo_tokens"] == 6 * 256 and b["halo_bytes"] < one["halo_bytes"]


def test_errors_name_the_axis(result):
  e = result["errors"]
  assert ("spatial axis 1 (mesh axis 'cy'): spatial extent 6 is not divisible by the context "
          "axis size 4") in e["extent"]
  assert "spatial axis 1 (mesh axis 'cy'): the left halo of" in e["halo"]
  assert "larger than the local shard of 2 rows" in e["halo"]
  assert "the largest kernel_size is 4 (kernel_size * dilation = 4)" in e["halo"]
  assert "spatial axis 0 (mesh axis 'cx')" in e["halo_dilated"]
  assert "kernel_size * dilation = " in e["halo_dilated"]
  assert "spatial axes 0 and 1 are both mapped to the mesh axis 'cy'" in e["same_axis"]
  assert "context_axis[1]='cz' (for spatial axis 1) is not an axis of the mesh" in e["unknown"]
  assert "context_axis must name one mesh axis per split spatial axis" in e["one_name"]
  assert "spatial_axis=(1, 1) names a spatial axis twice" in e["same_spatial"]


def test_busiest_device_bytes_of_a_two_shard_axis():
  from attnjax.sharding import neighborhood_communication_bytes  # pylint: disable=g-import-not-at-top
  kw = dict(batch=1, num_kv_heads=2, head_dim=4, itemsize=4)
  token = 2 * (4 + 4) * 4
  # 256 x 256, kernel 7 on 2 x 4: along X (2 shards) each device has one neighbour and gets
  # 3 rows of its 128 x 64 tile; along Y an interior device gets 3 + 3 columns of 134 x 64.
  b = neighborhood_communication_bytes((256, 256), kernel_size=7, spatial_axis=(0, 1),
                                       num_shards=(2, 4), **kw)
  assert b["max_received_bytes"] == (3 * 64 + 6 * 134) * token
  # 8 shards on one axis: interior devices get both sides, as halo_bytes says.
  one = neighborhood_communication_bytes((256, 256), kernel_size=7, spatial_axis=0,
                                         num_shards=8, **kw)
  assert one["max_received_bytes"] == one["halo_bytes"] == 6 * 256 * token
  # Causal along X on 2 shards: only the later shard receives (3 rows... of kernel 7: 6).
  c = neighborhood_communication_bytes((16, 8), kernel_size=7, is_causal=(True, False),
                                       spatial_axis=0, num_shards=2, **kw)
  assert c["max_received_bytes"] == c["halo_bytes"] == 6 * 8 * token
