"""Metric sinks: stdout lines, a CSV file, a TensorBoard event file, and the final summary table.

The CSV (``<workdir>/metrics.csv``) is in long format ``step,split,metric,value``
so that tasks may add metrics freely. On resume, rows after the restored step
(written by the interrupted run) are dropped first, so the file reads as one
uninterrupted run. Event files (``<workdir>/tb``) are written by tensorboardX
and open in TensorBoard.
"""
from __future__ import annotations

import csv
import math
import os
import sys
from typing import Dict, List

FIELDS = ("step", "split", "metric", "value")


def read_csv(path: str) -> List[Dict[str, object]]:
  """Rows of a metrics CSV with ``step`` as int and ``value`` as float."""
  if not os.path.exists(path):
    return []
  with open(path, newline="") as f:
    return [{"step": int(r["step"]), "split": r["split"], "metric": r["metric"],
             "value": float(r["value"])} for r in csv.DictReader(f)]


class MetricWriter:
  """Writes scalars to the CSV, TensorBoard and (for chosen splits) stdout."""

  def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True,
               echo=None):
    os.makedirs(workdir, exist_ok=True)
    self.csv_path = os.path.join(workdir, "metrics.csv")
    kept = [r for r in read_csv(self.csv_path) if r["step"] <= resume_step]
    with open(self.csv_path, "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=FIELDS)
      w.writeheader()
      w.writerows(kept)
    self._file = open(self.csv_path, "a", newline="")  # pylint: disable=consider-using-with
    self._csv = csv.DictWriter(self._file, fieldnames=FIELDS)
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step + 1)
    self._echo = echo or (lambda s: print(s, file=sys.stdout, flush=True))
    self.last: Dict[str, Dict[str, float]] = {}
    for r in kept:   # the latest value of every metric so far (a resumed run's summary)
      self.last.setdefault(r["split"], {})[r["metric"]] = r["value"]

  def write(self, step: int, split: str, scalars: Dict[str, float], echo: bool = True):
    for k, v in scalars.items():
      v = float(v)
      self._csv.writerow({"step": step, "split": split, "metric": k, "value": repr(v)})
      if self._tb is not None:
        self._tb.add_scalar(f"{split}/{k}", v, step)
    self._file.flush()
    self.last.setdefault(split, {}).update({k: float(v) for k, v in scalars.items()})
    if echo:
      self._echo(f"step {step:>6} | {split:<5} | " + "  ".join(
          f"{k} {_fmt(v)}" for k, v in scalars.items()))

  def close(self):
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def _fmt(v: float) -> str:
  if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
    return str(v)
  if abs(v) >= 1000 or (v != 0 and abs(v) < 1e-3):
    return f"{v:.3e}"
  return f"{v:.4f}"


def summary_table(title: str, sections: Dict[str, Dict[str, object]]) -> str:
  """A plain-text table: one row per (section, key)."""
  rows = [(s, k, _fmt(v) if isinstance(v, float) else str(v))
          for s, d in sections.items() for k, v in d.items()]
  if not rows:
    return title
  w0 = max(len(r[0]) for r in rows)
  w1 = max(len(r[1]) for r in rows)
  w2 = max(len(r[2]) for r in rows)
  line = "+" + "-" * (w0 + 2) + "+" + "-" * (w1 + 2) + "+" + "-" * (w2 + 2) + "+"
  out = [title, line]
  prev = None
  for s, k, v in rows:
    if prev is not None and s != prev:
      out.append(line)
    out.append(f"| {(s if s != prev else ''):<{w0}} | {k:<{w1}} | {v:>{w2}} |")
    prev = s
  out.append(line)
  return "\n".join(out)

