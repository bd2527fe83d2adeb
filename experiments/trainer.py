"""The training loop: AdamW with warmup + cosine decay, evaluation, checkpoints, metrics.

``train(config, workdir)`` validates the config, builds the task, the mesh,
the model and the optimizer, resumes from the latest checkpoint of
``workdir`` if there is one, and trains to ``config.train.num_steps``. The
data of step ``s`` is a pure function of (seed, s) and the logging window's
metric sums live in the checkpointed state, so a run that is interrupted and
resumed logs exactly the metrics of an uninterrupted one. A step whose loss or
gradient norm is not finite stops the run (:class:`TrainingDiverged`, naming
the step) before that state is logged or saved; the last good checkpoint is
kept and ``summary.json`` records ``run.status`` "diverged" with the step.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from attnjax import sharding as S
from experiments import checkpoints, config_checks, families, metrics, models, objectives
from experiments.tasks import make_task

# Config fields a checkpoint must agree with to be resumed.
_FINGERPRINT = ("seed", "task", "model", "optim")


def make_optimizer(optim_cfg, num_steps: int) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW with linear warmup and cosine decay."""
  lr = float(optim_cfg.learning_rate)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=int(optim_cfg.warmup_steps),
      decay_steps=int(num_steps), end_value=lr * float(optim_cfg.min_lr_ratio))
  decay_mask = lambda params: jax.tree_util.tree_map(lambda x: x.ndim >= 2, params)
  chain = [optax.adamw(schedule, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2),
                       weight_decay=float(optim_cfg.weight_decay), mask=decay_mask)]
  if float(optim_cfg.clip_norm) > 0:
    chain.insert(0, optax.clip_by_global_norm(float(optim_cfg.clip_norm)))
  return optax.chain(*chain), schedule


def fingerprint(config) -> Dict[str, Any]:
  d = {k: (config[k].to_dict() if hasattr(config[k], "to_dict") else config[k])
       for k in _FINGERPRINT}
  d["num_steps"] = int(config.train.num_steps)
  return json.loads(json.dumps(d, sort_keys=True, default=str))


def _apply(model, task, params, batch):
  if task.kind == "lm":
    return model.apply({"params": params}, batch["inputs"])
  return model.apply({"params": params}, batch["inputs"], batch.get("token_mask"))


def _sums(task, logits, batch):
  if task.kind == "lm":
    return objectives.lm_sums(logits, batch, "seq_accuracy" in task.extra_metrics)
  return objectives.classify_sums(logits, batch)


class TrainingDiverged(RuntimeError):
  """A step's loss or gradient norm was not finite; the diverged state was not saved."""

  def __init__(self, step: int, loss: float, grad_norm: float, detail: str = ""):
    self.step, self.loss, self.grad_norm = step, loss, grad_norm
    super().__init__(f"training diverged at step {step}: loss {loss}, gradient norm "
                     f"{grad_norm}" + (f" ({detail})." if detail else "."))


def _check_finite(step: int, stats) -> None:
  """Raises TrainingDiverged if the loss or gradient norm of ``step`` is not finite."""
  loss, grad_norm = (float(v) for v in jax.device_get((stats["loss"], stats["grad_norm"])))
  if not (math.isfinite(loss) and math.isfinite(grad_norm)):
    raise TrainingDiverged(step, loss, grad_norm)


class Experiment:
  """Everything built from a config; ``run()`` trains."""

  def __init__(self, config, workdir: str, echo=None, warn=None):
    config_checks.check_config(config)
    self.config, self.workdir = config, workdir
    self.echo = echo or (lambda s: tqdm.write(s))
    self.warn = warn or (lambda s: tqdm.write(f"warning: {s}", file=sys.stderr))
    self.task = make_task(config.task, config.seed)
    mc = config.mesh
    self.mesh = S.make_mesh(mc.data, mc.heads, mc.context, field="config.mesh")
    S.check_divisible(self.mesh, batch_size=self.task.batch_size, seq_len=self.task.seq_len,
                      num_heads=int(config.model.num_heads),
                      num_kv_heads=int(config.model.num_kv_heads) or None)
    act = S.activation_sharding(self.mesh) if self.mesh.size > 1 else None
    self.layers = families.resolve(config.model)
    self.model = models.build_model(config, self.task, act, self.mesh)
    self.num_steps = int(config.train.num_steps)
    self.tx, self.schedule = make_optimizer(config.optim, self.num_steps)
    self._jit_step = None   # built at the first step, for the state's shardings
    self._eval_step = jax.jit(self._eval)
    self._init_params = jax.jit(self._init_state)
    self._init_opt = jax.jit(self.tx.init)

  # -- pure functions -----------------------------------------------------------
  def _init_state(self, rng):
    batch = self.task.train_batch(0)
    params = self.model.init(rng, *self._model_args(batch))["params"]
    return params

  def _model_args(self, batch):
    if self.task.kind == "lm":
      return (jnp.asarray(batch["inputs"]),)
    mask = batch.get("token_mask")
    return (jnp.asarray(batch["inputs"]), None if mask is None else jnp.asarray(mask))

  def _step(self, state, batch):
    def loss_fn(params):
      logits = _apply(self.model, self.task, params, batch)
      sums = _sums(self.task, logits, batch)
      return objectives.loss_from_sums(sums), sums
    (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    grad_norm = optax.tree.norm(grads)
    sums = dict(sums, grad_norm_num=grad_norm, grad_norm_den=jnp.float32(1.0),
                learning_rate_num=self.schedule(state["step"]),
                learning_rate_den=jnp.float32(1.0))
    acc = jax.tree_util.tree_map(lambda a, b: a + b, state["acc"], sums)
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                 "acc": acc}
    return new_state, {"loss": loss, "grad_norm": grad_norm}

  def _train_step(self, state, batch):
    """The jitted ``_step``; its new state keeps the input state's shardings, so the
    second step reuses the first step's program (unpinned, XLA may place the outputs
    differently on a mesh, and the next call compiles again)."""
    if self._jit_step is None:
      kwargs = {}
      if self.mesh.size > 1:
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        kwargs["out_shardings"] = (jax.tree_util.tree_map(lambda x: x.sharding, state),
                                   replicated)
      self._jit_step = jax.jit(self._step, **kwargs)
    return self._jit_step(state, batch)

  def _eval(self, params, batch):
    return _sums(self.task, _apply(self.model, self.task, params, batch), batch)

  # -- state --------------------------------------------------------------------
  def _zero_acc(self, params):
    batch = self._device_batch(self.task.train_batch(0))
    shapes = jax.eval_shape(lambda p, b: _sums(self.task, _apply(self.model, self.task, p, b),
                                               b), params, batch)
    acc = {k: jnp.zeros((), jnp.float32) for k in shapes}
    for k in ("grad_norm", "learning_rate"):
      acc[k + "_num"] = acc[k + "_den"] = jnp.zeros((), jnp.float32)
    return acc

  def _device_batch(self, batch):
    if self.mesh.size == 1:
      return {k: jnp.asarray(v) for k, v in batch.items()}
    return {k: jax.device_put(v, S.batch_sharding(self.mesh, np.ndim(v)))
            for k, v in batch.items()}

  def initial_state(self):
    rng = jax.random.PRNGKey(int(self.config.seed))
    params = self._init_params(rng)
    if self.mesh.size > 1:
      params = jax.device_put(params, S.param_shardings(self.mesh, params))
    opt_state = self._init_opt(params)
    return self._committed({"step": jnp.zeros((), jnp.int32), "params": params,
                            "opt_state": opt_state, "acc": self._zero_acc(params)})

  def _committed(self, state):
    """Every leaf placed explicitly (replicated over a mesh), as restored leaves are.

    A restored checkpoint's arrays are committed to their shardings; a fresh
    state placed the same way makes a resumed run reuse the compiled steps
    instead of compiling them again for differently placed inputs.
    """
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    def place(x):
      if x.committed:
        return x
      return jax.device_put(x, replicated if self.mesh.size > 1 else x.sharding)
    return jax.tree_util.tree_map(place, state)

  # -- loop ---------------------------------------------------------------------
  def evaluate(self, params) -> Dict[str, float]:
    total = None
    for b in self.task.eval_batches():
      s = self._eval_step(params, self._device_batch(b))
      total = s if total is None else jax.tree_util.tree_map(jnp.add, total, s)
    return objectives.finalize(jax.device_get(total), self.task.extra_metrics)

  def extra_evaluations(self, params) -> Dict[str, Dict[str, float]]:
    out = {}
    for name, batches in self.task.extra_eval_sets().items():
      total = None
      for b in batches:
        s = self._eval_step(params, self._device_batch(b))
        total = s if total is None else jax.tree_util.tree_map(jnp.add, total, s)
      out[name] = objectives.finalize(jax.device_get(total), self.task.extra_metrics)
    return out

  def _restore_or_init(self, ckpt):
    """(state, step): the latest (or ``restore_step``) checkpoint, else a fresh state at 0."""
    tc = self.config.train
    state = self.initial_state()
    if not ckpt.steps() and tc.restore_step == -1:
      return state, 0
    if not ckpt.steps():
      raise checkpoints.CheckpointError(
          f"config.train.restore_step={tc.restore_step}: there are no checkpoints in "
          f"{ckpt.directory}.")
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    state, start = ckpt.restore(abstract, fingerprint(self.config),
                                None if tc.restore_step == -1 else int(tc.restore_step))
    self.echo(f"resumed from checkpoint step {start} in {ckpt.directory}")
    return state, start

  def _loop(self, state, start: int, stop: int, ckpt, writer, bar):
    """Trains steps ``start + 1 .. stop``, logging, evaluating and checkpointing.

    Each step's loss and gradient norm are checked for a non-finite value one
    step late (the host reads them while the next step runs), and always
    before anything is logged, evaluated or saved, so a diverged state is
    never written. Returns (state, step, last eval metrics); raises
    :class:`TrainingDiverged` at the first non-finite step.
    """
    tc = self.config.train
    meta = {"fingerprint": fingerprint(self.config)}
    tokens = self.task.batch_size * self.task.seq_len
    step, t_win, steps_win, last_eval, pending = start, time.time(), 0, {}, None
    while step < stop:
      batch = self._device_batch(self.task.train_batch(step))
      state, stats = self._train_step(state, batch)
      step += 1
      steps_win += 1
      bar.update(1)
      if pending is not None:
        _check_finite(*pending)
      pending = (step, stats)
      log = step % tc.log_every == 0 or step == self.num_steps
      evaluate = step % tc.eval_every == 0 or step == self.num_steps
      save = step % tc.checkpoint_every == 0 or step == self.num_steps or step == stop
      if not (log or evaluate or save):
        continue
      _check_finite(*pending)
      pending = None
      if log:
        m = objectives.finalize(jax.device_get(state["acc"]), self.task.extra_metrics)
        writer.write(step, "train", m)
        dt = max(time.time() - t_win, 1e-9)
        writer.write(step, "perf", {"steps_per_sec": steps_win / dt,
                                    "tokens_per_sec": steps_win * tokens / dt}, echo=False)
        bar.set_postfix(loss=f"{m['loss']:.4f}")
        state = dict(state, acc=jax.tree_util.tree_map(jnp.zeros_like, state["acc"]))
        t_win, steps_win = time.time(), 0
      if evaluate:
        last_eval = self.evaluate(state["params"])
        writer.write(step, "eval", last_eval)
      if save:
        writer.sync()
        ckpt.save(step, state, meta)
    return state, step, last_eval

  def run(self) -> Dict[str, Any]:
    """Trains (resuming from the workdir's checkpoints) and returns the summary.

    Raises:
      TrainingDiverged: a step's loss or gradient norm was not finite; the
        summary (``run.status`` "diverged") is written first.
    """
    cfg, tc = self.config, self.config.train
    t_start = time.time()
    ckpt = checkpoints.Checkpointer(self.workdir, int(tc.keep_checkpoints))
    state, start = self._restore_or_init(ckpt)
    writer = metrics.MetricWriter(self.workdir, resume_step=start, echo=self.echo,
                                  warn=self.warn)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state["params"]))
    self.echo(f"task {json.dumps(self.task.describe())}")
    self.echo(f"model {cfg.model.kind}: {n_params:,} params, layers "
              f"{[f for f, _ in self.layers]}, mesh {dict(self.mesh.shape)}")
    stop = self.num_steps if tc.stop_after == -1 else min(self.num_steps, start + int(tc.stop_after))
    bar = tqdm(total=self.num_steps, initial=start, disable=not tc.progress_bar,
               dynamic_ncols=True, mininterval=1.0, desc=cfg.name)
    diverged = None
    try:
      state, step, last_eval = self._loop(state, start, stop, ckpt, writer, bar)
    except TrainingDiverged as e:
      diverged, step, last_eval = e, e.step - 1, writer.last.get("eval", {})
    finally:
      bar.close()
    extra = {}
    if diverged is None and step == self.num_steps and step > start:
      extra = self.extra_evaluations(state["params"])
      for name, m in extra.items():
        writer.write(step, name, m)
    elif diverged is None and step == start:   # nothing left to train: report the logged results again
      last_eval = writer.last.get("eval", {})
      extra = {k: v for k, v in writer.last.items() if k not in ("train", "eval", "perf")}
    writer.close()
    run = {"name": cfg.name, "workdir": self.workdir, "steps": step,
           "finished": diverged is None and step == self.num_steps,
           "status": "finished" if step == self.num_steps else "stopped",
           "resumed_from": start, "wall_seconds": time.time() - t_start, "params": n_params}
    if diverged is not None:
      last = max(ckpt.steps(), default=None)
      run.update(status="diverged", diverged_at_step=diverged.step, last_checkpoint=last)
      diverged = TrainingDiverged(
          diverged.step, diverged.loss, diverged.grad_norm,
          f"config.optim.learning_rate={cfg.optim.learning_rate}; the diverged state was not "
          "saved, " + (f"the last good checkpoint is step {last} in {ckpt.directory}"
                       if last is not None else "no checkpoint was written before it"))
    summary = self._write_summary(run, writer, last_eval, extra)
    if diverged is not None:
      raise diverged
    return summary

  def _write_summary(self, run, writer, last_eval, extra) -> Dict[str, Any]:
    """Writes ``summary.json`` (atomically), echoes the summary table, returns the summary."""
    summary = {"run": run,
               "model": {"layers": ",".join(f for f, _ in self.layers),
                         "options": json.dumps([o for _, o in self.layers], default=str)},
               "train": writer.last.get("train", {}), "eval": last_eval}
    if "perf" in writer.last:
      summary["perf"] = writer.last["perf"]
    summary.update(extra)
    metrics.atomic_write(os.path.join(self.workdir, "summary.json"),
                         lambda f: json.dump(summary, f, indent=1, default=str))
    self.echo(metrics.summary_table(
        f"summary of {run['name']} ({run['steps']} steps, {run['wall_seconds']:.1f} s, "
        f"{run['status']})", summary))
    return summary


def train(config, workdir: str, echo=None, warn=None) -> Dict[str, Any]:
  """Validates ``config``, trains (resuming from ``workdir``) and returns the summary."""
  return Experiment(config, workdir, echo, warn).run()
