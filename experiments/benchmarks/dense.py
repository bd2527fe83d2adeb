"""Dense causal attention on CPU: attnjax's XLA path vs ``jax.nn.dot_product_attention``.

B = 1, N = 8, H = 64, causal, T = 2k, 4k, 8k. Reports the time ratio and the
achieved GFLOP/s counting only the visited (lower) half of the score matrix,
against the GFLOP/s of a plain ``jnp`` 1024^3 matmul measured right before each
timing (the CPU is shared, so the roofline is re-measured next to each number).
Forward and forward+backward (the jax.nn forward+backward is skipped above
4k: it materialises several [N, T, T] float32 arrays).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import flags

import attnjax
from experiments.benchmarks import common

FLAGS = flags.FLAGS
DEFAULT_LENS = (2048, 4096, 8192)
B, N, H = 1, 8, 64
JAX_FWDBWD_MAX_T = 4096


def _flag(name, default):
  try:
    return getattr(FLAGS, name)
  except (AttributeError, flags.UnparsedFlagAccessError):
    return default


def _ours(q, k, v):
  return attnjax.attention(q, k, v, mask=attnjax.masks.Causal(), implementation="xla")


def _theirs(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


def _grad(fn):
  return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)),
                          argnums=(0, 1, 2)))


def run():
  quick = _flag("quick", False)
  repeats = _flag("repeats", 3)
  dtype = jnp.dtype(_flag("dtype", "float32"))
  lens = [int(x) for x in _flag("seq_lens", [])] or ([512, 1024] if quick else DEFAULT_LENS)
  rows = []
  for t in lens:
    q, k, v = common.random_qkv(jax.random.PRNGKey(t), B, t, t, N, N, H, dtype=dtype)
    pairs = t * (t + 1) / 2
    row = {"T": t}
    for mode in ("fwd", "fwdbwd"):
      back = mode == "fwdbwd"
      ours = jax.jit(_ours) if not back else _grad(_ours)
      common.block(ours(q, k, v))
      mm = common.measure_matmul_gflops()
      t_ours = common.time_fn(ours, q, k, v, repeats=repeats)
      row[f"{mode}_matmul_gflops"] = mm
      gf = common.attention_flops(pairs, B, N, H, backward=back) / t_ours / 1e9
      row.update({f"{mode}_attnjax_s": t_ours, f"{mode}_attnjax_gflops": gf,
                  f"{mode}_pct_of_matmul": 100.0 * gf / mm})
      if back and t > JAX_FWDBWD_MAX_T:
        continue
      theirs = jax.jit(_theirs) if not back else _grad(_theirs)
      t_theirs = common.time_fn(theirs, q, k, v, repeats=max(1, repeats - 1))
      row.update({f"{mode}_jaxnn_s": t_theirs, f"{mode}_speedup_vs_jaxnn": t_theirs / t_ours})
    row["fwd_attnjax_peak_bytes"] = common.peak_bytes(_ours, q, k, v)
    rows.append(row)
    print(common.format_table([row]), flush=True)
  return rows
