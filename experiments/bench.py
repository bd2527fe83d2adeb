"""Benchmark entry point: ``python -m experiments.bench --family=<name>``.

Each family lives in ``experiments/benchmarks/<name>.py`` and exposes
``run() -> list[dict]``; it may read the flags defined here. Rows are printed
as a table and written to ``results/bench_<family>.csv`` and ``.json``.
"""
from __future__ import annotations

import importlib
import pkgutil

from absl import app
from absl import flags

from experiments import benchmarks
from experiments.benchmarks import common

FLAGS = flags.FLAGS
flags.DEFINE_string("family", None, "Benchmark module in experiments/benchmarks (e.g. dense).")
flags.DEFINE_list("seq_lens", [], "Sequence lengths (default: the family's own list).")
flags.DEFINE_string("dtype", "float32", "float32 | bfloat16 | float16.")
flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (median reported).")
flags.DEFINE_bool("quick", False, "Small shapes only (smoke test of the benchmark).")
flags.DEFINE_string("results_dir", common.RESULTS_DIR, "Where results files go.")


def available_families():
  return sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__)
                if m.name != "common" and not m.name.startswith("_"))


def main(argv):
  del argv
  fams = available_families()
  if FLAGS.family is None or FLAGS.family not in fams:
    raise app.UsageError(f"--family must be one of {fams}, got {FLAGS.family!r}.")
  module = importlib.import_module(f"experiments.benchmarks.{FLAGS.family}")
  rows = module.run()
  print(common.format_table(rows))
  paths = common.write_results(FLAGS.family, rows, FLAGS.results_dir)
  print("wrote", ", ".join(paths))


if __name__ == "__main__":
  app.run(main)
