"""Embedded tasks (no network): the registry ``TASKS`` and ``make_task(config)``."""
from __future__ import annotations

from experiments.tasks.base import Task
from experiments.tasks.bigram_backcopy import BigramBackcopy
from experiments.tasks.digits import Digits
from experiments.tasks.listops import ListOps
from experiments.tasks.mqar import MQAR
from experiments.tasks.passkey import Passkey
from experiments.tasks.stdlib_lm import StdlibLM

TASKS = {c.name: c for c in (StdlibLM, MQAR, Passkey, BigramBackcopy, ListOps, Digits)}


def make_task(task_config, seed: int) -> Task:
  """Builds the task named ``task_config.name`` with the other fields as options.

  ``task_config`` is a ConfigDict or dict with ``name``, ``batch_size``,
  ``eval_batches`` and the task's own keyword arguments.
  """
  cfg = dict(task_config.to_dict() if hasattr(task_config, "to_dict") else task_config)
  name = cfg.pop("name", None)
  if name not in TASKS:
    raise ValueError(f"config.task.name must be one of {sorted(TASKS)}, got {name!r}.")
  batch_size = cfg.pop("batch_size", None)
  eval_batches = cfg.pop("eval_batches", 1)
  try:
    return TASKS[name](seed, batch_size, eval_batches, **cfg)
  except TypeError as e:
    raise ValueError(f"config.task: task {name!r} got a field it does not take ({e}).") from e
