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

Also here: CAB's *compositional index* (``compositional_index``,
``cab_compositional_index`` with CAB's fixed normalisers ``CI_METRICS``) and
``pattern_support``, which fills a family's row of CAB's pattern matrix by
running it and CAB's causality checks (``attnjax.analysis.causality``).

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

from attnjax.analysis import causality
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


#: CAB's compositional-index definition: for each pattern, its tasks and their metrics as
#: (task, metric, mu, sigma, sign), sign +1 where higher is better. mu/sigma are CAB's fixed
#: normalisers (Shark-NLP/CAB, scripts/compositional_index); metric order as CAB's score files.
CI_METRICS = {
    "NS": (("TTS", "FastSpeech2 MCD", 3.4245, 0.06832, -1),
           ("TTS", "FastSpeech2 MSD", 1.97429, 0.0361768, -1),
           ("TTS", "Transformer-TTS MCD", 4.06947, 0.09422, -1),
           ("TTS", "Transformer-TTS MSD", 2.19021, 0.03866, -1),
           ("Sum", "R-1", 34.88667, 1.39697, 1), ("Sum", "R-2", 6.79333, 1.41078, 1),
           ("Sum", "R-L", 31.96889, 1.31499, 1), ("SR", "PSNR", 23.208, 0.27499, 1),
           ("SR", "SSIM", 0.6758, 0.01557, 1), ("MLM", "PPL", 36.292, 62.30827, -1)),
    "CS": (("TTS", "Transformer-TTS MCD", 4.08325, 0.04529, -1),
           ("TTS", "Transformer-TTS MSD", 2.20085, 0.01372, -1),
           ("Sum", "R-1", 32.9575, 1.92754, 1), ("Sum", "R-2", 6.0925, 0.41007, 1),
           ("Sum", "R-L", 30.2575, 1.61951, 1), ("LM", "PPL", 22.26, 8.29944, -1)),
    "NC": (("PCC", "CD-l1", 7.7025, 0.64789, -1), ("PCC", "CD-l2", 0.24775, 0.03366, -1),
           ("PCC", "F-Score", 0.7625, 0.03906, 1),
           ("LSTF", "ETT MSE", 1.18933, 0.05615, -1), ("LSTF", "ETT MAE", 0.80625, 0.02193, -1),
           ("LSTF", "ECL MSE", 0.47575, 0.01057, -1), ("LSTF", "ECL MAE", 0.511, 0.00601, -1),
           ("LSTF", "Weather MSE", 0.62025, 0.18948, -1),
           ("LSTF", "Weather MAE", 0.58075, 0.10312, -1)),
    "CC": (("TTS", "Transformer-TTS MCD", 5.5037, 1.29239, -1),
           ("TTS", "Transformer-TTS MSD", 2.6278, 0.42726, -1),
           ("Sum", "R-1", 31.35, 3.77103, 1), ("Sum", "R-2", 5.26, 1.26028, 1),
           ("Sum", "R-L", 28.8, 3.28638, 1)),
}


def compositional_index(scores, mu, sigma, sign, tasks=None):
  """CAB's compositional index: the mean over tasks of the mean over a task's metrics of
  ``sign * (score - mu) / sigma``.

  Args:
    scores, mu, sigma, sign: one value per metric (sign +1 where higher is
      better, -1 where lower is better). A missing score is None or NaN.
    tasks: the task of each metric (default: every metric its own task).

  Returns:
    (ci, per_task): ``per_task`` maps each task (in first-seen order) to its
    normalised mean; a task with a missing metric is NaN, and so is ``ci``
    (CAB's leaderboard prints "-" there).
  """
  x = np.asarray([np.nan if s is None else s for s in scores], np.float64)
  mu, sigma, sign = (np.asarray(a, np.float64) for a in (mu, sigma, sign))
  if not x.shape == mu.shape == sigma.shape == sign.shape or x.ndim != 1:
    raise ValueError(f"scores {x.shape}, mu {mu.shape}, sigma {sigma.shape} and sign "
                     f"{sign.shape} must be 1-D of one length.")
  if np.any(sigma <= 0):
    raise ValueError(f"sigma must be positive, got {sigma.tolist()}.")
  tasks = list(range(len(x))) if tasks is None else list(tasks)
  if len(tasks) != len(x):
    raise ValueError(f"tasks has {len(tasks)} entries for {len(x)} metrics.")
  z = sign * (x - mu) / sigma
  per_task = {}
  for t in dict.fromkeys(tasks):
    per_task[t] = float(np.mean(z[[i for i, u in enumerate(tasks) if u == t]]))
  return float(np.mean(list(per_task.values()))), per_task


def cab_compositional_index(pattern: str, scores):
  """:func:`compositional_index` with CAB's normalisers for ``pattern`` (NS, CS, NC or CC);
  ``scores`` in the metric order of ``CI_METRICS[pattern]``."""
  if pattern not in CI_METRICS:
    raise ValueError(f"pattern must be one of {sorted(CI_METRICS)}, got {pattern!r}.")
  rows = CI_METRICS[pattern]
  if len(scores) != len(rows):
    raise ValueError(f"pattern {pattern} has {len(rows)} metrics "
                     f"({[f'{t} {m}' for t, m, *_ in rows]}); got {len(scores)} scores.")
  tasks, _, mu, sigma, sign = zip(*rows)
  return compositional_index(scores, mu, sigma, sign, tasks)


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


def family_fn(name, fn):
  """Family ``fn`` with its small-model presets and required options bound:
  ``(q, k, v, *, causal) -> out``."""
  opts = fam_lib.accepted_options(fn, fam_lib.PRESETS.get(name, {}))
  extra = REQUIRED.get(name, lambda T, S: {})
  return lambda q, k, v, *, causal: fn(q, k, v, causal=causal, **opts,
                                       **extra(q.shape[1], k.shape[1]))


def pattern_support(fn, *, patterns=tuple(PATTERNS), T: int = 64, heads: int = 2,
                    head_dim: int = 16, tol: float = 1e-5) -> Dict[str, str]:
  """A family's row of CAB's pattern matrix, from running it (tiny shapes, float32).

  ``fn(q, k, v, *, causal)`` as :func:`family_fn` returns. Per pattern:
  "ok"; "leaks: ..." when a causal pattern fails CAB's causality check
  (``check_causal_self`` for CS, T == S; ``check_causal_cross`` for CC, T/2
  queries over T keys); or "unsupported: <its NotImplementedError>".
  """
  q, k, v = common.random_qkv(jax.random.PRNGKey(0), 1, T, T, heads, heads, head_dim,
                              jnp.float32)
  out = {}
  for pattern in patterns:
    causal, cross = PATTERNS[pattern]
    qq = q[:, :T // 2] if cross else q
    bound = lambda q, k, v, c=causal: fn(q, k, v, causal=c)
    try:
      if not causal:
        jax.block_until_ready(jax.jit(bound)(qq, k, v))
        out[pattern] = "ok"
        continue
      check = causality.check_causal_cross if cross else causality.check_causal_self
      r = check(bound, qq, k, v, tol=tol)
    except NotImplementedError as e:
      out[pattern] = "unsupported: " + str(e).splitlines()[0][:160]
      continue
    out[pattern] = "ok" if r.ok else (f"leaks: max |change| {r.max_diff:.3g} at (split, query) "
                                      f"{r.where}")
  return out


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
  candidates = {n: family_fn(n, f) for n, f in sorted(registry.list_families().items())}
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
