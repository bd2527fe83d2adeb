"""Metric sinks: stdout lines, a CSV file, a TensorBoard event file, and the final summary table.

The CSV (``<workdir>/metrics.csv``) is in long format ``step,split,metric,value``
so that tasks may add metrics freely. On resume, rows after the restored step
(written by the interrupted run) are dropped first, so the file reads as one
uninterrupted run. That rewrite goes to a temporary file which is synced and
renamed over the CSV, so a process killed at any point leaves either the old
or the new file, never a truncated one. Reading validates every row: a row
torn by a kill (no line end, a value cut short) or otherwise malformed is
dropped with a warning naming the file and line, never crashing a resume.
Event files (``<workdir>/tb``) are written by tensorboardX and open in
TensorBoard.
"""
from __future__ import annotations

import csv
import math
import os
import sys
import warnings
from typing import Callable, Dict, List, Optional

FIELDS = ("step", "split", "metric", "value")
HEADER = ",".join(FIELDS)


class MetricsFileWarning(UserWarning):
  """A metrics file had damaged rows (dropped) or lost its history."""


def _default_warn(message: str) -> None:
  warnings.warn(message, MetricsFileWarning, stacklevel=3)


def _parse_row(line: str) -> Optional[Dict[str, object]]:
  """One CSV line -> row dict; None if the line is not a complete, valid row."""
  if not line.endswith(("\n", "\r")):
    return None   # no line end: the write was cut (possibly mid-value)
  parts = line.rstrip("\r\n").split(",")
  if len(parts) != len(FIELDS) or not parts[1] or not parts[2]:
    return None
  try:
    step, value = int(parts[0]), float(parts[3])
  except ValueError:
    return None
  if step < 0:
    return None
  return {"step": step, "split": parts[1], "metric": parts[2], "value": value}


def read_csv(path: str, warn: Optional[Callable[[str], None]] = None
             ) -> List[Dict[str, object]]:
  """Valid rows of a metrics CSV with ``step`` as int and ``value`` as float.

  Args:
    path: the CSV; a missing file has no rows.
    warn: called with one message per problem (an empty file, a bad header,
      each dropped row, naming ``path:line``); default ``warnings.warn``.
  """
  warn = warn or _default_warn
  if not os.path.exists(path):
    return []
  with open(path, newline="") as f:
    lines = f.read().splitlines(keepends=True)
  if not lines:
    warn(f"{path} is empty (no header, no rows).")
    return []
  first = 0
  if lines[0].rstrip("\r\n") == HEADER:
    first = 1
  else:
    warn(f"{path}:1: expected the header {HEADER!r}, found {lines[0][:80]!r}; reading the "
         "line as a row.")
  rows = []
  for lineno, line in enumerate(lines[first:], start=first + 1):
    row = _parse_row(line)
    if row is None:
      last = lineno == len(lines)
      warn(f"{path}:{lineno}: dropped a {'torn last' if last else 'malformed'} row "
           f"{line[:80]!r}" + (" (cut short by an interrupted write)." if last else "."))
      continue
    rows.append(row)
  return rows


def _fsync_dir(directory: str) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return   # platforms without directory handles
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def atomic_write(path: str, write: Callable) -> None:
  """Replaces ``path`` by what ``write(file)`` writes, atomically and durably.

  The text goes to ``<path>.tmp``, is flushed and fsynced, then renamed over
  ``path`` (``os.replace``); a crash at any point leaves the old or the new
  file, complete.
  """
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _write_rows(rows: List[Dict[str, object]]) -> Callable:
  def write(f):
    w = csv.DictWriter(f, fieldnames=FIELDS)
    w.writeheader()
    w.writerows({**r, "value": repr(float(r["value"]))} for r in rows)
  return write


class MetricWriter:
  """Writes scalars to the CSV, TensorBoard and (for chosen splits) stdout."""

  def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True,
               echo=None, warn: Optional[Callable[[str], None]] = None):
    os.makedirs(workdir, exist_ok=True)
    self.csv_path = os.path.join(workdir, "metrics.csv")
    kept = [r for r in read_csv(self.csv_path, warn) if r["step"] <= resume_step]
    if resume_step > 0 and not kept:
      (warn or _default_warn)(
          f"{self.csv_path} holds no metrics up to the resumed step {resume_step} (missing or "
          "emptied file); they cannot be recovered, the file continues from the resumed run.")
    atomic_write(self.csv_path, _write_rows(kept))
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

  def sync(self):
    """Makes every row written so far durable (before a checkpoint is saved)."""
    self._file.flush()
    os.fsync(self._file.fileno())

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

