"""Launcher end to end: loss falls, checkpoints, identical metrics after resume, clear errors."""
import multiprocessing
import os
import runpy
import sys

import pytest

from attnjax.layers import registry
from configs import common
from experiments import checkpoints, metrics, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_main(argv, out, err):
  """Child process: ``python -m experiments.train *argv`` with stdout and stderr to files."""
  for fd, path in ((1, out), (2, err)):
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
  os.chdir(ROOT)
  sys.argv = ["experiments.train", *argv]
  runpy.run_module("experiments.train", run_name="__main__", alter_sys=True)


def run_train_cli(tmp_path, *args, timeout=300):
  """(exit status, stdout, stderr) of ``python -m experiments.train --workdir=<tmp>/run *args``.

  Each run is a process forked from one server that has imported JAX, the
  trainer and the attention engines once (nothing initialised), so a config
  error costs a fraction of a second instead of a fresh interpreter's imports.
  """
  ctx = multiprocessing.get_context("forkserver")
  ctx.set_forkserver_preload(["experiments.trainer", *registry.ENGINE_PACKAGES])
  out, err = str(tmp_path / "stdout.txt"), str(tmp_path / "stderr.txt")
  proc = ctx.Process(target=_train_main,
                     args=([f"--workdir={tmp_path / 'run'}", *args], out, err))
  proc.start()
  proc.join(timeout)
  if proc.exitcode is None:
    proc.kill()
    proc.join()
  with open(out) as f_out, open(err) as f_err:
    return proc.exitcode, f_out.read(), f_err.read()


def tiny_config(**train):
  c = common.base_config("tiny")
  c.task.name = "stdlib_lm"
  c.task.seq_len = 16
  c.task.batch_size = 4
  c.task.eval_batches = 1
  c.model.num_layers = 1
  c.model.d_model = 16
  c.model.num_heads = 2
  c.model.mlp_ratio = 2
  c.optim.learning_rate = 1e-2
  c.optim.warmup_steps = 2
  c.train.num_steps = 12
  c.train.log_every = 2
  c.train.eval_every = 6
  c.train.checkpoint_every = 4
  c.train.progress_bar = False
  c.train.update(train)
  return c


def _rows(workdir):
  return [(r["step"], r["split"], r["metric"], r["value"])
          for r in metrics.read_csv(os.path.join(workdir, "metrics.csv")) if r["split"] != "perf"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
  """One Experiment (compiled once) reused across runs in different workdirs."""
  exp = trainer.Experiment(tiny_config(), str(tmp_path_factory.mktemp("a")), echo=lambda s: None)
  summary = exp.run()
  return exp, summary


def test_loss_falls_and_checkpoints_written(experiment):
  exp, summary = experiment
  losses = [v for s, sp, m, v in _rows(exp.workdir) if sp == "train" and m == "loss"]
  assert len(losses) == 6
  assert losses[-1] < losses[0] - 0.5
  assert summary["run"]["finished"] and summary["run"]["steps"] == 12
  assert checkpoints.Checkpointer(exp.workdir).steps() == [4, 8, 12]
  assert os.listdir(os.path.join(exp.workdir, "tb"))
  assert "bits_per_byte" in summary["eval"]


def test_resume_after_interruption_gives_identical_metrics(experiment, tmp_path):
  exp, _ = experiment
  exp.workdir = str(tmp_path)
  exp.config.train.stop_after = 7          # preempted after step 7 (checkpoints 4 and 7)
  first = exp.run()
  assert not first["run"]["finished"] and first["run"]["steps"] == 7
  # A kill before the step-7 checkpoint was written: only step 4 survives, while
  # metrics.csv already holds rows up to step 7 from the interrupted process.
  ckpt_dir = os.path.join(str(tmp_path), "checkpoints")
  os.rename(os.path.join(ckpt_dir, "7"), os.path.join(str(tmp_path), "moved_7"))
  exp.config.train.stop_after = -1
  second = exp.run()
  assert second["run"]["resumed_from"] == 4 and second["run"]["finished"]
  ref = _rows(experiment[1]["run"]["workdir"])
  assert _rows(str(tmp_path)) == ref


def _digest(path):
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, path)] = fh.read()
  return out


def test_corrupted_checkpoint_is_reported_and_kept(experiment, tmp_path):
  exp, _ = experiment
  exp.workdir = str(tmp_path)
  exp.config.train.stop_after = 8
  exp.run()
  ckpt_dir = os.path.join(str(tmp_path), "checkpoints")
  good = _digest(os.path.join(ckpt_dir, "4"))
  for root, _, files in os.walk(os.path.join(ckpt_dir, "8", "state")):
    for f in files:
      p = os.path.join(root, f)
      size = os.path.getsize(p)
      with open(p, "r+b") as fh:   # overwrite the array data (and metadata) with garbage
        fh.write(b"\xff" * max(size, 1))
  bad = _digest(os.path.join(ckpt_dir, "8"))
  exp.config.train.stop_after = -1
  with pytest.raises(checkpoints.CheckpointError, match=r"checkpoint step 8 .*(could not be read|damaged)"):
    exp.run()
  assert _digest(os.path.join(ckpt_dir, "4")) == good
  assert _digest(os.path.join(ckpt_dir, "8")) == bad
  assert checkpoints.Checkpointer(str(tmp_path)).steps() == [4, 8]
  exp.config.train.restore_step = 99
  with pytest.raises(checkpoints.CheckpointError, match="restore_step=99: no such checkpoint"):
    exp.run()
  exp.config.train.restore_step = -1


def test_changed_config_does_not_resume(experiment, tmp_path):
  exp, _ = experiment
  c = tiny_config(num_steps=20)
  exp2 = trainer.Experiment(c, experiment[1]["run"]["workdir"], echo=lambda s: None)
  with pytest.raises(checkpoints.CheckpointError, match="different config"):
    exp2.run()


@pytest.mark.parametrize("field,value,match", [
    ("model.attention", "no_such_family", "config.model.attention: unknown attention family"),
    ("model.layer_attention", ("dense", "dense"), "config.model.layer_attention has 2 entries"),
    ("model.num_heads", 3, "config.model.d_model=16 must be divisible by config.model.num_heads"),
    ("model.num_kv_heads", 3, "config.model.num_kv_heads=3 must divide"),
    ("model.dense_layers", (5,), "config.model.dense_layers entry 5"),
    ("mesh.heads", 2, "config.mesh: data \\* heads \\* context"),
    ("optim.warmup_steps", 50, "config.optim.warmup_steps=50"),
    ("task.name", "nope", "config.task.name must be one of"),
    ("task.seq_len", 0, "task.seq_len must be an integer >= 2"),
])
def test_bad_config_names_the_field(field, value, match, tmp_path):
  c = tiny_config()
  group, key = field.split(".")
  c[group][key] = value
  with pytest.raises(ValueError, match=match):
    trainer.Experiment(c, str(tmp_path))


@pytest.mark.parametrize("args,message", [
    (["--config.model.attention=no_such_family"],
     "config.model.attention: unknown attention family 'no_such_family'"),
    # the overrides parse (family argument, its options, a tuple); then num_steps is refused.
    (["--config=configs/mqar.py:sliding_window", "--config.model.attention_options.window=16",
      "--config.model.layer_attention=('dense', 'sliding_window')", "--config.train.num_steps=0"],
     "config.train.num_steps must be an integer >= 1, got 0"),
])
def test_cli_reports_bad_field_and_exits_nonzero(tmp_path, args, message):
  code, _, stderr = run_train_cli(tmp_path, *args)
  assert code == 1
  assert message in stderr
  assert "Traceback" not in stderr


def test_encoder_classifier_trains_on_digits(tmp_path):
  c = tiny_config(num_steps=16, log_every=4, eval_every=16, checkpoint_every=16)
  c.task = common.base_config("x").task
  c.task.update(name="digits", patch_size=2, batch_size=32, eval_batches=1)
  c.model.update(kind="encoder_classifier", use_rope=False)
  summary = trainer.train(c, str(tmp_path), echo=lambda s: None)
  losses = [v for s, sp, m, v in _rows(str(tmp_path)) if sp == "train" and m == "loss"]
  assert losses[-1] < losses[0]
  assert summary["eval"]["accuracy"] > 0.2        # chance is 0.1


def test_rerunning_a_finished_run_reports_its_results(experiment):
  exp, summary = experiment
  exp.workdir = summary["run"]["workdir"]
  exp.config.train.stop_after = -1
  before = _rows(exp.workdir)
  again = exp.run()
  assert again["run"]["resumed_from"] == 12 and again["run"]["steps"] == 12
  assert again["eval"] == summary["eval"]
  assert _rows(exp.workdir) == before          # no duplicated rows
