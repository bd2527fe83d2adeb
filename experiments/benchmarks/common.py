"""Shared benchmark helpers: timing, matmul roofline, peak memory, results files.

Timings are medians after a warm-up call that compiles; every ratio that a
benchmark reports is measured side by side in the same process, because the
machines it runs on are shared and noisy.
"""
from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp

RESULTS_DIR = "results"


def block(x):
  """Blocks until every array in the pytree ``x`` is computed."""
  return jax.block_until_ready(x)


def time_fn(fn: Callable, *args, repeats: int = 3, min_time: float = 0.0) -> float:
  """Median wall seconds of ``fn(*args)`` after one warm-up (compiling) call.

  ``fn`` should already be jitted. With ``min_time``, repeats continue until
  that many seconds were spent (at least ``repeats`` calls).
  """
  block(fn(*args))
  times = []
  start = time.perf_counter()
  while len(times) < repeats or (time.perf_counter() - start) < min_time:
    t0 = time.perf_counter()
    block(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def time_pair(fn_a: Callable, fn_b: Callable, *args, repeats: int = 3):
  """Median wall seconds of ``fn_a(*args)`` and ``fn_b(*args)``, timed alternately.

  One warm-up call each, then ``repeats`` rounds of (a, b): a burst of load on a
  shared machine hits both sides of a ratio instead of one.
  """
  block(fn_a(*args))
  block(fn_b(*args))
  ta, tb = [], []
  for _ in range(repeats):
    for fn, out in ((fn_a, ta), (fn_b, tb)):
      t0 = time.perf_counter()
      block(fn(*args))
      out.append(time.perf_counter() - t0)
  return statistics.median(ta), statistics.median(tb)


def measure_matmul_gflops(n: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
  """GFLOP/s of a plain ``jnp`` [n, n] x [n, n] matmul on the default device."""
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  f = jax.jit(jnp.matmul)
  t = time_fn(f, a, b, repeats=repeats)
  return 2.0 * n ** 3 / t / 1e9


def tile_matmul_gflops(batch: int, rows: int, keys: int, head_dim: int,
                       dtype=jnp.float32, repeats: int = 10) -> float:
  """GFLOP/s of an attention tile's two matmuls alone, batched as a kernel step runs them.

  Times ``S = Q K^T`` ([batch, rows, head_dim] x [batch, keys, head_dim]) and
  ``O = P V`` ([batch, rows, keys] x [batch, keys, head_dim]) in one jitted call,
  with nothing else: the ceiling a tiled attention path with these tiles can
  reach on this device, to set next to :func:`measure_matmul_gflops`.
  """
  ks = jax.random.split(jax.random.PRNGKey(1), 4)
  q = jax.random.normal(ks[0], (batch, rows, head_dim), dtype)
  k = jax.random.normal(ks[1], (batch, keys, head_dim), dtype)
  p = jax.random.normal(ks[2], (batch, rows, keys), dtype)
  v = jax.random.normal(ks[3], (batch, keys, head_dim), dtype)
  f = jax.jit(lambda q, k, p, v: (jnp.einsum("bmh,bkh->bmk", q, k),
                                  jnp.einsum("bmk,bkh->bmh", p, v)))
  t = time_fn(f, q, k, p, v, repeats=repeats)
  return 4.0 * batch * rows * keys * head_dim / t / 1e9


def attention_flops(num_pairs: float, batch: int, heads: int, head_dim: int,
                    value_dim: Optional[int] = None, backward: bool = False) -> float:
  """FLOPs of softmax attention over ``num_pairs`` visited (query, key) pairs per head.

  Forward: 2*H (QK^T) + 2*Hv (PV) per pair; the backward adds 2.5x the forward
  (as FlashAttention counts it), so forward+backward is 3.5x.
  """
  value_dim = head_dim if value_dim is None else value_dim
  fwd = 2.0 * num_pairs * batch * heads * (head_dim + value_dim)
  return fwd * (3.5 if backward else 1.0)


def peak_bytes(fn: Callable, *args) -> Optional[int]:
  """Peak temporary + argument + output bytes of ``jit(fn)(*args)`` per XLA's analysis."""
  try:
    compiled = jax.jit(fn).lower(*args).compile()
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  total = 0
  for attr in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"):
    total += int(getattr(m, attr, 0) or 0)
  return total - int(getattr(m, "alias_size_in_bytes", 0) or 0)


def write_results(family: str, rows: List[Dict], directory: str = RESULTS_DIR) -> List[str]:
  """Writes rows to ``<directory>/bench_<family>.csv`` and ``.json``; returns the paths."""
  os.makedirs(directory, exist_ok=True)
  meta = {"family": family, "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
          "time": time.strftime("%Y-%m-%d %H:%M:%S")}
  jpath = os.path.join(directory, f"bench_{family}.json")
  with open(jpath, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
  cpath = os.path.join(directory, f"bench_{family}.csv")
  keys: List[str] = []
  for r in rows:
    keys.extend(k for k in r if k not in keys)
  with open(cpath, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
  return [cpath, jpath]


def format_table(rows: List[Dict]) -> str:
  """Plain-text table of result rows (floats with 4 significant digits)."""
  if not rows:
    return "(no rows)"
  keys: List[str] = []
  for r in rows:
    keys.extend(k for k in r if k not in keys)
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    return "" if v is None else str(v)
  cells = [[fmt(r.get(k)) for k in keys] for r in rows]
  widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
  lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
  lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
  return "\n".join(lines)


def random_qkv(key, B, T, S, N, K, H, dtype=jnp.float32, Hv=None):
  """Random normal q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv]."""
  kq, kk, kv = jax.random.split(key, 3)
  Hv = H if Hv is None else Hv
  return (jax.random.normal(kq, (B, T, N, H), dtype),
          jax.random.normal(kk, (B, S, K, H), dtype),
          jax.random.normal(kv, (B, S, K, Hv), dtype))


def run_on_simulated_devices(module: str, function: str, args: Sequence = (),
                             num_devices: int = 8, timeout: float = 1800) -> Any:
  """``experiments.benchmarks.<module>.<function>(*args)`` in a child process with
  ``num_devices`` simulated CPU devices (XLA_FLAGS must be set before jax is imported).

  The result must be JSON-serialisable (rows); RuntimeError with the child's stderr
  when it fails.
  """
  flags = os.environ.get("XLA_FLAGS", "") + \
      f" --xla_force_host_platform_device_count={int(num_devices)}"
  env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  code = (f"import json; from experiments.benchmarks import {module} as m; "
          f"print('RESULT' + json.dumps(m.{function}(*{tuple(args)!r})))")
  p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                     timeout=timeout, check=False)
  out = [json.loads(l[6:]) for l in p.stdout.splitlines() if l.startswith("RESULT")]
  if p.returncode or not out:
    raise RuntimeError(f"measuring on {num_devices} simulated devices failed:\n"
                       f"{p.stderr[-2000:]}")
  return out[-1]
