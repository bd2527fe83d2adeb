"""Neighborhood attention benchmark (NATTEN FNA, arXiv:2403.04690): tiled XLA path vs dense.

float32, B = 1, N = 4, H = 32: na2d on 64x64 and 128x128 tokens with kernel 7
and 13, na3d on 16x32x32 with kernel 7. For each: forward and forward+backward
time of the tiled XLA path, achieved GFLOP/s counting the visited (query, key)
pairs of its tiles (and the share of a plain matmul's GFLOP/s), the GFLOP/s
of the path's two batched tile matmuls run alone at its step shape
(``tile_matmul_gflops``: the ceiling for these tiles on this device, and
``fwd_tile_matmul_share``, the forward's share of it), peak memory
from XLA's analysis, and the dense masked baselines
(``jax.nn.dot_product_attention`` with the dense neighborhood mask, and
attnjax's reference) where they fit. Each tiled-path time is the faster
median of two separately compiled copies of the program (``COMPILES``).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from absl import flags

from attnjax.core.reference import reference_attention
from attnjax.masks.neighborhood import Neighborhood
from attnjax.neighborhood import neighborhood_attention
from attnjax.plan.neighborhood import default_tile_shape
from attnjax.neighborhood.xla import step_shape, visited_pairs
from experiments.benchmarks import common

FLAGS = flags.FLAGS
B, N, H = 1, 4, 32
CONFIGS = (((64, 64), 7), ((64, 64), 13), ((128, 128), 7), ((128, 128), 13),
           ((16, 32, 32), 7))
QUICK_CONFIGS = (((16, 16), 3), ((32, 32), 7), ((8, 8, 8), 3))
#: dense baselines above this many tokens are skipped (O(L^2) memory)
DENSE_MAX_TOKENS = 16384
#: larger 2D tile measured next to the default one (efficiency vs visited keys)
ALT_TILE = (16, 16)
#: separately compiled copies of each tiled-path program; the faster one counts
COMPILES = 2


def _flag(name, default):
  try:
    return getattr(FLAGS, name)
  except (AttributeError, flags.UnparsedFlagAccessError):
    return default


def _inputs(spatial, dtype):
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  shape = (B,) + tuple(spatial) + (N, H)
  return tuple(jax.random.normal(k, shape, dtype) for k in ks)


def _na(spatial, kernel, tile=None):
  fwd = lambda q, k, v: neighborhood_attention(q, k, v, kernel_size=kernel,
                                               implementation="xla", tile_shape=tile)
  loss = lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32))
  return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2))), fwd


def _dense_fns(spatial, kernel):
  L = math.prod(spatial)
  mask = jnp.asarray(Neighborhood(tuple(spatial), kernel).to_dense(L, L)[0])[None, None]
  flat = lambda x: x.reshape(B, L, N, H)
  jnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      flat(q), flat(k), flat(v), mask=mask, implementation="xla"))
  ref = jax.jit(lambda q, k, v: reference_attention(flat(q), flat(k), flat(v),
                                                    mask=Neighborhood(tuple(spatial), kernel)))
  loss = lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(
      flat(q), flat(k), flat(v), mask=mask, implementation="xla"))
  return jnn, ref, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _xla_row(spatial, kernel, tile, repeats, dtype, matmul):
  D = len(spatial)
  L = math.prod(spatial)
  q, k, v = _inputs(spatial, dtype)
  pairs = visited_pairs(spatial, (kernel,) * D, (1,) * D, (False,) * D, tile)
  # The faster of two separate compiles: on the shared 2-core CPU, one compile of
  # an unchanged program was seen to run ~2x slow on every call (not reproducible).
  t_f, t_fb = float("inf"), float("inf")
  for _ in range(COMPILES):
    fwd, fwdbwd, raw = _na(spatial, kernel, tile)
    t_f = min(t_f, common.time_fn(fwd, q, k, v, repeats=repeats))
    t_fb = min(t_fb, common.time_fn(fwdbwd, q, k, v, repeats=repeats))
  gf = common.attention_flops(pairs, B, N, H) / t_f / 1e9
  gfb = common.attention_flops(pairs, B, N, H, backward=True) / t_fb / 1e9
  tile_mm = common.tile_matmul_gflops(
      *step_shape(spatial, (kernel,) * D, (1,) * D, (False,) * D, tile, B, N), H)
  return {"op": f"na{D}d_xla", "spatial": "x".join(map(str, spatial)), "tokens": L,
          "kernel": kernel, "tile": "x".join(map(str, tile)),
          "visited_keys_per_query": pairs / L, "window_keys": kernel ** D,
          "fwd_s": t_f, "fwdbwd_s": t_fb, "fwd_gflops": gf, "fwdbwd_gflops": gfb,
          "matmul_gflops": matmul, "fwd_matmul_share": gf / matmul,
          "fwdbwd_matmul_share": gfb / matmul,
          "tile_matmul_gflops": tile_mm, "fwd_tile_matmul_share": gf / tile_mm,
          "peak_mb": (common.peak_bytes(raw, q, k, v) or 0) / 2 ** 20}


def _dense_columns(spatial, kernel, row, repeats, dtype):
  """Dense masked baselines of one configuration and the speedups over ``row``."""
  L = math.prod(spatial)
  if L > DENSE_MAX_TOKENS:
    return {}
  q, k, v = _inputs(spatial, dtype)
  jnn, ref, jnn_bwd = _dense_fns(spatial, kernel)
  rep = 1 if L >= 8192 else repeats
  t_d = common.time_fn(jnn, q, k, v, repeats=rep)
  t_r = common.time_fn(ref, q, k, v, repeats=rep)
  out = dict(dense_jax_fwd_s=t_d, dense_reference_fwd_s=t_r,
             speedup_vs_dense_jax=t_d / row["fwd_s"], speedup_vs_reference=t_r / row["fwd_s"])
  if L <= 4096:
    t_db = common.time_fn(jnn_bwd, q, k, v, repeats=rep)
    out.update(dense_jax_fwdbwd_s=t_db, fwdbwd_speedup_vs_dense_jax=t_db / row["fwdbwd_s"])
  return out


def run():
  quick = _flag("quick", False)
  repeats = _flag("repeats", 3)
  dtype = jnp.dtype(_flag("dtype", "float32"))
  rows, defaults = [], []
  # Every tiled-path row first, the dense baselines after: a timing taken right
  # after a multi-GB dense run was measured up to 2.5x slow on this machine.
  for spatial, kernel in (QUICK_CONFIGS if quick else CONFIGS):
    D = len(spatial)
    tile = default_tile_shape(spatial, (kernel,) * D, (1,) * D)
    # the matmul roofline is re-measured next to every configuration (shared CPUs)
    matmul = common.measure_matmul_gflops()
    row = _xla_row(spatial, kernel, tile, repeats, dtype, matmul)
    row["default_tile"] = True
    rows.append(row)
    defaults.append((spatial, kernel, row))
    if D == 2 and not quick and tuple(tile) != ALT_TILE:
      alt = _xla_row(spatial, kernel, ALT_TILE, repeats, dtype, matmul)
      alt["default_tile"] = False
      alt["fwd_s_vs_default_tile"] = alt["fwd_s"] / row["fwd_s"]
      alt["fwdbwd_s_vs_default_tile"] = alt["fwdbwd_s"] / row["fwdbwd_s"]
      rows.append(alt)
  for spatial, kernel, row in defaults:
    row.update(_dense_columns(spatial, kernel, row, repeats, dtype))
  return rows
