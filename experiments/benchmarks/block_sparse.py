"""Block-sparse engine on CPU: causal sliding window and S2-Attention (arXiv:2407.17678).

B = 1, N = 8, H = 64, float32.

* Causal sliding window of 256 keys at T = 8k, 32k: time, GFLOP/s over the
  visited blocks and over the attended pairs vs the matmul GFLOP/s measured
  right before each timing, speed-up over ``jax.nn.dot_product_attention`` given the same dense
  boolean mask (8k only: the dense mask costs O(T^2)), and XLA's peak-memory
  estimate (forward and forward+backward).
* S2 (block 64, 16 local blocks, vert_stride 8): time against
  ``density x`` attnjax's dense causal time at the same T, where density is
  the S2 layout's visited blocks over the causal triangle's (block 64); the
  two are timed alternately (at least 5 rounds up to 8k, 1 at 32k) and the
  medians compared.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import attnjax
from attnjax import masks as M
from attnjax.block_sparse import plan as P
from experiments.benchmarks import common

FLAGS = flags.FLAGS
DEFAULT_LENS = (8192, 32768)
B, N, H = 1, 8, 64
WINDOW = 256
JAX_DENSE_MAX_T = 8192


def _flag(name, default):
  try:
    return getattr(FLAGS, name)
  except (AttributeError, flags.UnparsedFlagAccessError):
    return default


def _fn(mask, backward):
  def f(q, k, v):
    return attnjax.attention(q, k, v, mask=mask, implementation="xla")
  if not backward:
    return jax.jit(f)
  return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)), argnums=(0, 1, 2)))


def _visited(mask, t):
  """(visited elements of the engine's chosen blocks, attended pairs) per head, summed."""
  bq, bk, bm = P.pick_blocks(mask, t, t, N, 0, 0)
  bm = np.broadcast_to(bm, (N,) + bm.shape[1:])
  return float(np.count_nonzero(bm)) * bq * bk / N, (bq, bk)


def _window_rows(t, repeats):
  mask = M.SlidingWindow(WINDOW - 1, 0)
  q, k, v = common.random_qkv(jax.random.PRNGKey(t), B, t, t, N, N, H)
  pairs = float(sum(min(i + 1, WINDOW) for i in range(t)))
  visited, blocks = _visited(mask, t)
  row = {"op": f"causal_window_{WINDOW}", "T": t, "blocks": str(blocks)}
  for mode in ("fwd", "fwdbwd"):
    back = mode == "fwdbwd"
    fn = _fn(mask, back)
    common.block(fn(q, k, v))
    mm = common.measure_matmul_gflops()   # re-measured next to each timing (shared CPU)
    sec = common.time_fn(fn, q, k, v, repeats=repeats)
    row[f"{mode}_matmul_gflops"] = mm
    row[f"{mode}_s"] = sec
    row[f"{mode}_gflops_visited_blocks"] = common.attention_flops(
        visited, B, N, H, backward=back) / sec / 1e9
    row[f"{mode}_pct_matmul_visited"] = 100 * row[f"{mode}_gflops_visited_blocks"] / mm
    row[f"{mode}_gflops_pairs"] = common.attention_flops(pairs, B, N, H, backward=back) / sec / 1e9
    row[f"{mode}_peak_bytes"] = common.peak_bytes(fn, q, k, v)
  if t <= JAX_DENSE_MAX_T:
    dense = jnp.asarray(mask.to_dense(t, t))[None]
    jfn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=dense,
                                                               implementation="xla"))
    t_j = common.time_fn(jfn, q, k, v, repeats=1)
    row["fwd_jaxnn_dense_mask_s"] = t_j
    row["fwd_speedup_vs_jaxnn"] = t_j / row["fwd_s"]
  return row


def _s2_rows(t, repeats):
  s2 = M.S2(N, block_size=64, local_blocks=16, vert_stride=8)
  lay = s2.block_layout(t, t, 64, 64, N)
  causal = M.Causal().block_layout(t, t, 64, 64, 1)
  density = lay.num_visited / N / causal.num_visited
  q, k, v = common.random_qkv(jax.random.PRNGKey(t + 1), B, t, t, N, N, H)
  _, blocks = _visited(s2, t)
  row = {"op": "s2_b64_l16_v8", "T": t, "blocks": str(blocks), "density_vs_causal": density}
  for mode in ("fwd", "fwdbwd"):
    back = mode == "fwdbwd"
    t_s2, t_dense = common.time_pair(_fn(s2, back), _fn(M.Causal(), back), q, k, v,
                                     repeats=repeats)
    row.update({f"{mode}_s2_s": t_s2, f"{mode}_dense_causal_s": t_dense,
                f"{mode}_ratio_to_density_x_dense": t_s2 / (density * t_dense)})
  return row


def run():
  quick = _flag("quick", False)
  repeats = _flag("repeats", 3)
  lens = [int(x) for x in _flag("seq_lens", [])] or ([2048, 4096] if quick else DEFAULT_LENS)
  rows = []
  for t in lens:
    for row in (_window_rows(t, repeats), _s2_rows(t, 1 if t > 8192 else max(repeats, 5))):
      rows.append(row)
      print(common.format_table([row]), flush=True)
  return rows
