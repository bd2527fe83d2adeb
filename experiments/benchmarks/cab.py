"""CAB-style benchmark (Zhang et al., ICML 2023; arXiv:2210.07661): every family x the four patterns.

"CAB: Comprehensive Attention Benchmarking on Long Sequence Modeling".

``python -m experiments.bench --family=cab`` times every registered attention
family (``attnjax.layers.list_families()``) and the peers installed here on
CAB's four attention patterns: non-causal self (NS), causal self (CS),
non-causal cross (NC: queries T/2, keys T) and causal cross (CC, bottom-right
aligned) at each sequence length, with CAB's shapes (batch 1, 4 heads,
head_dim 64). Per row: forward and forward+backward median seconds, peak
memory of the compiled forward+backward (XLA memory analysis), tokens/s.
A family that cannot do a pattern says why (its NotImplementedError). Then
CAB's *efficiency length* per family and pattern: dense attention's time
(and memory) fitted as a quadratic in L, the family's as a linear function;
the length where they cross (``efficiency_length``). Results:
``results/bench_cab.{csv,json}`` (by experiments.bench) and ``results/cab.png``.

Peers, in the same process: ``jax.nn.dot_product_attention`` (XLA; cuDNN on
GPU), splash attention on TPU, tokamax when importable.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import families as fam_lib
from experiments.benchmarks import common

FLAGS = flags.FLAGS
PATTERNS = {"NS": (False, False), "CS": (True, False), "NC": (False, True), "CC": (True, True)}
DEFAULT_LENS = (256, 512, 1024, 2048)
QUICK_LENS = (128, 256)
B, N, H = 1, 4, 64


def efficiency_length(lengths, dense_cost, family_cost) -> Optional[float]:
  """Length where a linear fit of ``family_cost`` crosses a quadratic fit of ``dense_cost``.

  CAB's protocol: vanilla attention ~ a + b L + c L^2, the efficient one
  ~ a' + b' L (least squares). Returns the smallest positive crossing beyond
  which the family is cheaper, 0.0 when it is cheaper at every positive
  length, or None when it never becomes cheaper.
  """
  L = np.asarray(lengths, np.float64)
  if len(L) < 3:
    return None
  c, b, a = np.polyfit(L, np.asarray(dense_cost, np.float64), 2)
  b1, a1 = np.polyfit(L, np.asarray(family_cost, np.float64), 1)
  roots = np.roots([c, b - b1, a - a1])
  real = sorted(r.real for r in roots if abs(r.imag) < 1e-9 and r.real > 0)
  diff = lambda x: (a + b * x + c * x * x) - (a1 + b1 * x)   # > 0: family cheaper
  big = 10 * max(L.max(), real[-1] if real else 0.0)
  if not real:
    return 0.0 if diff(big) > 0 else None
  if diff(big) <= 0:
    return None
  return float(real[-1])


def _peers() -> Dict[str, callable]:
  out = {}

  def jax_xla(q, k, v, *, causal):
    T, S = q.shape[1], k.shape[1]
    if causal and T != S:
      raise NotImplementedError("jax.nn.dot_product_attention's is_causal is top-left aligned; "
                                "causal cross (bottom-right) needs an explicit mask.")
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
  out["peer:jax_xla"] = jax_xla
  if jax.default_backend() == "gpu":
    def jax_cudnn(q, k, v, *, causal):
      if causal and q.shape[1] != k.shape[1]:
        raise NotImplementedError("cuDNN's is_causal is top-left aligned.")
      return jax.nn.dot_product_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                                          v.astype(jnp.bfloat16), is_causal=causal,
                                          implementation="cudnn")
    out["peer:jax_cudnn"] = jax_cudnn
  if jax.default_backend() == "tpu":
    out.update(_splash())
  try:
    import tokamax  # pylint: disable=g-import-not-at-top
    def tok(q, k, v, *, causal):
      return tokamax.dot_product_attention(q, k, v, is_causal=causal)
    out["peer:tokamax"] = tok
  except ImportError:
    pass
  return out


def _splash():
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm  # pylint: disable=g-import-not-at-top

  def splash(q, k, v, *, causal):
    T, S = q.shape[1], k.shape[1]
    base = sm.CausalMask((T, S), offset=S - T) if causal else sm.FullMask((T, S))
    kernel = sk.make_splash_mha(sm.MultiHeadMask([base] * q.shape[2]), head_shards=1,
                                q_seq_shards=1)
    f = jax.vmap(kernel)
    out = f(jnp.swapaxes(q, 1, 2) * q.shape[-1] ** -0.5, jnp.swapaxes(k, 1, 2),
            jnp.swapaxes(v, 1, 2))
    return jnp.swapaxes(out, 1, 2)
  return {"peer:splash": splash}


def _compiled_peak(compiled) -> Optional[int]:
  m = compiled.memory_analysis()
  if m is None:
    return None
  return (int(getattr(m, "temp_size_in_bytes", 0) or 0)
          + int(getattr(m, "argument_size_in_bytes", 0) or 0)
          + int(getattr(m, "output_size_in_bytes", 0) or 0)
          - int(getattr(m, "alias_size_in_bytes", 0) or 0))


#: Options a family needs before it can run at all (it has no default), as
#: functions of (T, S): anchor gets 4 packed documents of S / 4 tokens and
#: composite a quarter of the sequence as its visual prefix.
REQUIRED = {
    "block_local": lambda T, S: {"block_size": 32},
    "combiner": lambda T, S: {"segment_len": 32},
    "hip": lambda T, S: {"top_k": max(16, S // 4)},
    "anchor": lambda T, S: {"doc_ids": np.repeat(np.arange(4), -(-S // 4))[:S]},
    "composite": lambda T, S: {"num_visual": S // 4},
}


def _family_fn(name, fn):
  opts = fam_lib._accepted(fn, fam_lib.PRESETS.get(name, {}))  # pylint: disable=protected-access
  extra = REQUIRED.get(name, lambda T, S: {})
  return lambda q, k, v, *, causal: fn(q, k, v, causal=causal, **opts,
                                       **extra(q.shape[1], k.shape[1]))


def measure(name, fn, T, pattern, dtype, repeats) -> Dict[str, object]:
  causal, cross = PATTERNS[pattern]
  Tq = T // 2 if cross else T
  q, k, v = common.random_qkv(jax.random.PRNGKey(T), B, Tq, T, N, N, H, dtype)
  row = {"family": name, "pattern": pattern, "seq_len": T, "q_len": Tq}
  fwd = lambda q, k, v: fn(q, k, v, causal=causal)
  loss = lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32))
  try:
    f = jax.jit(fwd).lower(q, k, v).compile()
    g = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
  except NotImplementedError as e:
    return dict(row, status="unsupported: " + str(e).splitlines()[0][:160])
  except Exception as e:  # pylint: disable=broad-except
    return dict(row, status=f"error: {type(e).__name__}: " + str(e).splitlines()[0][:160]
                if str(e) else f"error: {type(e).__name__}")
  t_f = common.time_fn(f, q, k, v, repeats=repeats)
  t_b = common.time_fn(g, q, k, v, repeats=repeats)
  return dict(row, status="ok", fwd_s=t_f, fwd_bwd_s=t_b, peak_MB=(_compiled_peak(g) or 0) / 2**20,
              fwd_tokens_per_s=B * Tq / t_f, fwd_bwd_tokens_per_s=B * Tq / t_b)


def add_efficiency_lengths(rows: List[Dict]) -> List[Dict]:
  """One summary row per (family, pattern): CAB's efficiency length vs dense (time, memory)."""
  out = []
  ok = [r for r in rows if r.get("status") == "ok"]
  for pattern in PATTERNS:
    dense = {r["seq_len"]: r for r in ok if r["family"] == "dense" and r["pattern"] == pattern}
    for name in sorted({r["family"] for r in ok if r["pattern"] == pattern} - {"dense"}):
      mine = {r["seq_len"]: r for r in ok if r["family"] == name and r["pattern"] == pattern}
      L = sorted(set(dense) & set(mine))
      if len(L) < 3:
        continue
      el = {}
      for key in ("fwd_s", "fwd_bwd_s", "peak_MB"):
        e = efficiency_length(L, [dense[x][key] for x in L], [mine[x][key] for x in L])
        el[key] = "never" if e is None else round(e)
      out.append({"family": name, "pattern": pattern, "seq_len": "fit",
                  "status": "efficiency_length", "eff_len_fwd": el["fwd_s"],
                  "eff_len_fwd_bwd": el["fwd_bwd_s"], "eff_len_memory": el["peak_MB"]})
  return out


def plot(rows: List[Dict], path: str) -> Optional[str]:
  """results/cab.png: forward+backward time vs length, one panel per pattern."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  ok = [r for r in rows if r.get("status") == "ok"]
  if not ok:
    return None
  names = sorted({r["family"] for r in ok})
  cmap = plt.get_cmap("tab20")
  style = {n: dict(color=cmap(i % 20), ls=("-", "--", ":")[(i // 20) % 3]) for i, n in enumerate(names)}
  fig, axes = plt.subplots(1, 4, figsize=(18, 4.5), sharey=True)
  handles = {}
  for ax, pattern in zip(axes, PATTERNS):
    for name in names:
      pts = sorted((r["seq_len"], r["fwd_bwd_s"]) for r in ok
                   if r["family"] == name and r["pattern"] == pattern)
      if pts:
        (h,) = ax.plot(*zip(*pts), marker="o", ms=3, lw=2.5 if name == "dense" else 1,
                       label=name, **style[name])
        handles[name] = h
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title(pattern)
    ax.set_xlabel("sequence length")
  axes[0].set_ylabel("forward+backward seconds")
  fig.legend([handles[n] for n in names if n in handles], [n for n in names if n in handles],
             fontsize=7, ncol=1, loc="center right")
  fig.subplots_adjust(right=0.86)
  fig.suptitle(f"CAB patterns on {jax.default_backend()} (B={B}, heads={N}, head_dim={H})")
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def run():
  from attnjax.layers import registry  # pylint: disable=g-import-not-at-top
  lens = [int(x) for x in FLAGS.seq_lens] if FLAGS.seq_lens else (
      QUICK_LENS if FLAGS.quick else DEFAULT_LENS)
  dtype = jnp.dtype(FLAGS.dtype)
  candidates = {n: _family_fn(n, f) for n, f in sorted(registry.list_families().items())}
  candidates.update(_peers())
  rows = []
  for name, fn in candidates.items():
    for pattern in PATTERNS:
      for T in lens:
        r = measure(name, fn, T, pattern, dtype, FLAGS.repeats)
        rows.append(r)
        print(f"cab: {name:<18} {pattern} {T:>6}  {r['status'][:70]}", flush=True)
        if r["status"].startswith("unsupported"):
          break   # a pattern the family cannot do: the same at every length
  rows += add_efficiency_lengths(rows)
  p = plot(rows, os.path.join(FLAGS.results_dir, "cab.png"))
  if p:
    print("wrote", p)
  return rows
