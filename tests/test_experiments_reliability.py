"""Reliability of the experiments launcher: metrics files, checkpoints, divergence, config errors.

One tiny run (compiled once, module fixture) is reused by the tests that need
training; the metrics tests need no model at all.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import checkpoints, metrics, trainer
from test_experiments_train import ROOT, run_train_cli, tiny_config


def _write_csv(path, rows):
  with open(path, "w", newline="") as f:
    f.write("step,split,metric,value\r\n" + "".join(
        f"{r['step']},{r['split']},{r['metric']},{r['value']!r}\r\n" for r in rows))


def _logged_rows(last_step):
  return [{"step": s, "split": "train", "metric": m, "value": v}
          for s in range(2, last_step + 1, 2)
          for m, v in (("loss", 4.0 - s / 1000 + 1e-9 * s), ("accuracy", s / 7.0))]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A finished 12-step run (checkpoints 4, 8, 12) and its Experiment."""
  exp = trainer.Experiment(tiny_config(), str(tmp_path_factory.mktemp("ref")),
                           echo=lambda s: None)
  summary = exp.run()
  return exp, summary


# -- metrics.csv ---------------------------------------------------------------------------

_KILLER = r"""
import os, signal, sys
from experiments import metrics
point, workdir = sys.argv[1], sys.argv[2]

def kill(*args, **kwargs):
  os.kill(os.getpid(), signal.SIGKILL)

class KilledAtFirstWrite:
  def __init__(self, f):
    self.f = f
  def write(self, text):
    kill()
  def __getattr__(self, name):
    return getattr(self.f, name)
  def __enter__(self):
    return self
  def __exit__(self, *exc):
    self.f.close()

def opener(path, mode="r", *args, **kwargs):
  f = open(path, mode, *args, **kwargs)
  return KilledAtFirstWrite(f) if "w" in mode else f

if point == "first_write":
  metrics.open = opener
elif point == "before_rename":
  metrics.os.replace = kill
else:
  metrics._fsync_dir = kill
metrics.MetricWriter(workdir, resume_step=100, tensorboard=False)
"""


@pytest.mark.parametrize("point", ["first_write", "before_rename", "after_rename"])
def test_resume_rewrite_killed_at_any_point_keeps_history(tmp_path, point):
  path = str(tmp_path / "metrics.csv")
  logged = _logged_rows(292)
  _write_csv(path, logged)
  proc = subprocess.run([sys.executable, "-c", _KILLER, point, str(tmp_path)], cwd=ROOT,
                        capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr
  warned = []
  on_disk = metrics.read_csv(path, warned.append)
  assert not warned
  assert on_disk in (logged, [r for r in logged if r["step"] <= 100])
  writer = metrics.MetricWriter(str(tmp_path), resume_step=100, tensorboard=False,
                                warn=warned.append)
  for s in range(102, 293, 2):
    writer.write(s, "train", {r["metric"]: r["value"] for r in logged if r["step"] == s},
                 echo=False)
  writer.close()
  assert not warned
  assert metrics.read_csv(path) == logged


_ROWS = "step,split,metric,value\r\n2,train,loss,4.25\r\n2,train,accuracy,0.125\r\n"


@pytest.mark.parametrize("text,kept,line", [
    ("", 0, None),                                        # killed right after creating it
    (_ROWS + "4,train,lo", 2, 4),                         # torn: fields missing
    (_ROWS + "4,train,loss,4.1", 2, 4),                   # cut mid-number (was 4.125)
    (_ROWS + "4,train,loss,", 2, 4),                      # cut before the value
    (_ROWS + "4,tr\r\n4,train,loss,4.125\r\n", 3, 4),     # a malformed row inside the file
    (_ROWS.replace("0.125", "nope"), 1, 3),
])
def test_damaged_csv_rows_are_dropped_with_a_warning(tmp_path, text, kept, line):
  path = tmp_path / "metrics.csv"
  path.write_bytes(text.encode())
  warned = []
  rows = metrics.read_csv(str(path), warned.append)
  assert len(rows) == kept and len(warned) == 1
  assert str(path) + (f":{line}:" if line else " is empty") in warned[0]
  expected = [(2, "loss", 4.25), (2, "accuracy", 0.125), (4, "loss", 4.125)]
  assert [(r["step"], r["metric"], r["value"]) for r in rows] == expected[:kept]
  writer = metrics.MetricWriter(str(tmp_path), resume_step=4, tensorboard=False,
                                warn=warned.append)   # resuming never crashes
  writer.close()
  assert metrics.read_csv(str(path), warned.append) == rows
  assert len(warned) == 2 + (kept == 0)               # an empty file: history lost, said so


def test_resume_after_a_torn_csv_row_reproduces_the_uninterrupted_run(run, tmp_path):
  exp, summary = run
  exp.workdir = str(tmp_path)
  exp.config.train.stop_after = 7
  exp.run()
  # Killed while writing the step-6 eval rows, so before the step-7 checkpoint.
  ckpt_dir = os.path.join(str(tmp_path), "checkpoints")
  os.rename(os.path.join(ckpt_dir, "7"), os.path.join(str(tmp_path), "moved_7"))
  path = os.path.join(str(tmp_path), "metrics.csv")
  with open(path, "rb") as f:
    data = f.read()
  last = data.rstrip(b"\r\n").rfind(b"\n") + 1
  assert data[last:].startswith(b"6,eval,")
  with open(path, "wb") as f:
    f.write(data[:last + len(b"6,eval,") + 2])
  warned = []
  exp.warn = warned.append
  exp.config.train.stop_after = -1
  try:
    exp.run()
  finally:
    exp.warn = lambda s: None
  assert len(warned) == 1 and "metrics.csv:" in warned[0] and "torn last row" in warned[0]
  ref = metrics.read_csv(os.path.join(summary["run"]["workdir"], "metrics.csv"))
  got = metrics.read_csv(path)
  strip = lambda rows: [r for r in rows if r["split"] != "perf"]
  assert strip(got) == strip(ref)


# -- checkpoints ---------------------------------------------------------------------------

def _files(path):
  out = {}
  for root, _, names in os.walk(path):
    for name in names:
      p = os.path.join(root, name)
      with open(p, "rb") as f:
        out[os.path.relpath(p, path)] = f.read()
  return out


def _flip(path, offset, bit):
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([byte ^ (1 << bit)]))


# A read that orbax abandons after a damaged shard leaves its pending reads unraisable.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_single_bit_flips_in_checkpoint_data_stop_the_restore(run, tmp_path):
  exp, summary = run
  workdir = str(tmp_path / "copy")
  shutil.copytree(summary["run"]["workdir"], workdir)
  state = exp.initial_state()
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  fingerprint = trainer.fingerprint(exp.config)
  ckpt = checkpoints.Checkpointer(workdir)
  good = [np.asarray(x) for x in jax.tree_util.tree_leaves(ckpt.restore(abstract, fingerprint)[0])]
  step_dir = os.path.join(ckpt.directory, "12")
  data = max((p for p in _files(os.path.join(step_dir, "state"))),
             key=lambda p: os.path.getsize(os.path.join(step_dir, "state", p)))
  data = os.path.join(step_dir, "state", data)
  size = os.path.getsize(data)
  stopped = 0
  for i in range(16):
    offset, bit = (size * i) // 16 + 7 * i, i % 8
    _flip(data, offset, bit)
    before = _files(ckpt.directory)
    try:
      restored, _ = checkpoints.Checkpointer(workdir).restore(abstract, fingerprint)
    except checkpoints.CheckpointError as e:
      assert "checkpoint step 12 " in str(e) and "nothing was overwritten" in str(e)
      stopped += 1
    else:   # restored: only acceptable when the flip changed no value at all
      assert all(np.array_equal(np.asarray(a), b)
                 for a, b in zip(jax.tree_util.tree_leaves(restored), good)), (offset, bit)
    assert _files(ckpt.directory) == before
    if i == 0:   # the trainer refuses too, before writing anything
      exp.workdir = workdir
      with pytest.raises(checkpoints.CheckpointError, match="checkpoint step 12 "):
        exp.run()
      assert _files(ckpt.directory) == before and ckpt.steps() == [4, 8, 12]
    _flip(data, offset, bit)
  assert stopped >= 8


# -- the command line: divergence and config errors ----------------------------------------

_TINY = ["--config.task.seq_len=16", "--config.task.batch_size=4", "--config.task.eval_batches=1",
         "--config.model.num_layers=1", "--config.model.d_model=16", "--config.model.num_heads=2",
         "--config.model.mlp_ratio=2", "--config.optim.warmup_steps=2",
         "--config.train.num_steps=12", "--config.train.log_every=2",
         "--config.train.eval_every=6", "--config.train.checkpoint_every=2",
         "--config.train.progress_bar=false"]


def _error_line(stderr):
  lines = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "Traceback" not in stderr, stderr
  return lines[0]


def test_divergence_stops_at_the_first_nonfinite_step_and_keeps_the_last_good_checkpoint(
    tmp_path):
  code, _, stderr = run_train_cli(tmp_path, *_TINY, "--config.optim.learning_rate=1e6")
  assert code == 1
  line = _error_line(stderr)
  workdir = str(tmp_path / "run")
  with open(os.path.join(workdir, "summary.json")) as f:
    run = json.load(f)["run"]
  step, last = run["diverged_at_step"], run["last_checkpoint"]
  assert run["status"] == "diverged" and not run["finished"] and run["steps"] == step - 1
  assert line.startswith(f"error: training diverged at step {step}: loss ")
  assert f"the last good checkpoint is step {last} " in line
  assert last is not None and last < step
  assert checkpoints.Checkpointer(workdir).steps()[-1] == last   # the diverged state: not saved
  logged = metrics.read_csv(os.path.join(workdir, "metrics.csv"))
  assert logged and all(np.isfinite(r["value"]) and r["step"] < step for r in logged)


@pytest.mark.parametrize("args,message", [
    (["--config.model.nope=3"], "error: --config.model.nope: config.model has no field 'nope'"),
    (["--config.trian.num_steps=3"],
     "error: --config.trian.num_steps: config has no field 'trian' (did you mean 'train'?)"),
    (["--config.model.attention=sliding_window", "--config.model.attention_options.window=0"],
     "error: config.model.attention_options.window=0: SlidingWindow left must be"),
    # an option set for a family given by --config.model.attention is taken; the next one
    # the family rejects is named
    (["--config.model.attention=sliding_window", "--config.model.attention_options.window=8",
      "--config.model.attention_options.left=-3"],
     "error: config.model.attention_options.left=-3: "),
    (["--config=configs/mqar.py:s2", "--config.model.attention_options.blok_size=8"],
     "error: config.model.attention_options.blok_size: attention family 's2' has no option "
     "'blok_size' (did you mean 'block_size'?); valid options: block_size, local_blocks, "),
    (["--config.optim.learning_rate=abc"], "error: flag --config.optim.learning_rate=abc: "),
    (["--config=configs/no_such_config.py"],
     "error: --config=configs/no_such_config.py: no such config file."),
    (["--config.model.family_options.s2.block_size=8"],
     "error: --config.model.family_options.s2.block_size: config.model.family_options has no "
     "field 's2'"),
])
def test_bad_config_on_the_command_line_is_one_error_line(tmp_path, args, message):
  code, _, stderr = run_train_cli(tmp_path, *args)
  assert code == 1
  assert _error_line(stderr).startswith(message)


def test_attention_option_typo_in_python_names_the_option_and_the_valid_ones(tmp_path):
  c = tiny_config()
  c.model.attention = "sliding_window"
  c.model.attention_options.windw = 16
  with pytest.raises(ValueError, match=r"^config.model.attention_options.windw: attention "
                     r"family 'sliding_window' has no option 'windw' \(did you mean 'window'\?\); "
                     r"valid options: window, left, right"):
    trainer.Experiment(c, str(tmp_path))
  c.model.attention_options = {}
  c.model.family_options = {"sliding_windw": {"window": 8}}
  with pytest.raises(ValueError, match=r"^config.model.family_options.sliding_windw: unknown "
                     "attention family"):
    trainer.Experiment(c, str(tmp_path))
