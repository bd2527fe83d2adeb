"""One-shot device check of every Pallas engine: compiled correctness, then GPU timings.

    python3 -m experiments.gpu_check [--quick] [--sections=block_sparse,neighborhood,dynamic,linear]
                                     [--skip_bench] [--sweep] [--out=results] [--budget_s=S]
    python3 -m experiments.gpu_check --smoke   # tiny shapes; runs anywhere (interpret on CPU)

It runs every section's ``check`` (modules in ``experiments/gpu_checks``:
compiled kernels vs the dense float32 oracle, forward and gradients, float32
and bfloat16), then every section's ``bench`` (bfloat16 timings against the
XLA paths and cuDNN) while ``--budget_s`` allows. Prints one table, rewrites
``<out>/bench_gpu.{csv,json}`` after every section (a run stopped at a time
limit keeps what it measured), and
exits 0 when every check passed, 1 when one failed, 2 without an NVIDIA GPU
(unless --smoke). A section that raises is reported as ERROR and the others
still run, so one run of a few minutes records everything there is.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from experiments.benchmarks.common import write_results  # noqa: E402

SECTIONS = ("block_sparse", "neighborhood", "dynamic", "linear")


def _section(name):
  import importlib  # pylint: disable=g-import-not-at-top
  return importlib.import_module(f"experiments.gpu_checks.{name}")


def _guarded(rows, label, fn):
  """Runs fn(); an exception becomes an ERROR row. Returns fn's result or None."""
  t0 = time.perf_counter()
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except
    rows.append(dict(case=label, result="ERROR",
                     detail=f"{type(e).__name__}: {str(e)[:300]} "
                            f"[{traceback.format_exc().splitlines()[-3].strip()[:120]}]"))
    return None
  finally:
    print(f"[{label}: {time.perf_counter() - t0:.1f} s]", flush=True)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sections", default=",".join(SECTIONS))
  parser.add_argument("--quick", action="store_true", help="smaller benchmark shapes")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny correctness checks only; allowed without a GPU")
  parser.add_argument("--skip_bench", action="store_true")
  parser.add_argument("--sweep", action="store_true", help="block_sparse: other blocks/tiles")
  parser.add_argument("--out", default="results")
  parser.add_argument("--budget_s", type=float, default=0.0,
                      help="skip the benchmarks still to run once this many seconds have "
                           "passed (0: no limit); results are written after every section")
  args = parser.parse_args(argv)
  names = [s for s in args.sections.split(",") if s]
  unknown = sorted(set(names) - set(SECTIONS))
  if unknown:
    parser.error(f"--sections: unknown {unknown}; expected names from {SECTIONS}.")
  on_gpu = jax.default_backend() in ("gpu", "cuda")
  if not on_gpu and not args.smoke:
    print(f"gpu_check: no NVIDIA GPU (jax backend {jax.default_backend()!r}); run on a CUDA "
          "GPU with jax[cuda], or pass --smoke for the tiny interpret-mode checks.")
    return 2
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  rows, ok, start = [], True, time.perf_counter()
  for name in names:  # every check first: correctness before any timing
    passed = _guarded(rows, f"{name} check", lambda m=_section(name): m.check(rows, args.smoke))
    ok &= bool(passed)
    write_results("gpu", rows, args.out)  # what a killed run leaves behind
  if on_gpu and not (args.skip_bench or args.smoke):
    for name in names:
      if args.budget_s and time.perf_counter() - start > args.budget_s:
        rows.append(dict(case=f"{name} bench", result="SKIPPED",
                         detail=f"--budget_s={args.budget_s:g} s spent"))
        continue
      extra = (args.sweep,) if name == "block_sparse" else ()
      _guarded(rows, f"{name} bench",
               lambda m=_section(name), e=extra: m.bench(rows, args.quick, *e))
      write_results("gpu", rows, args.out)
  width = max(len(r["case"]) for r in rows)
  for r in rows:
    print(f"{r['case']:<{width}}  {r['result']:<40}  {r['detail']}", flush=True)
  for path in write_results("gpu", rows, args.out):
    print("wrote", path)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
