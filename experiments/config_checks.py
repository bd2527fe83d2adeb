"""Start-up validation of an experiment config: every error names the config field."""
from __future__ import annotations

import numpy as np

from experiments import families


def _int(field, v, minimum=1):
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
    raise ValueError(f"{field} must be an integer >= {minimum}, got {v!r}.")
  return int(v)


def _pos_float(field, v, allow_zero=False):
  try:
    f = float(v)
  except (TypeError, ValueError):
    raise ValueError(f"{field} must be a number, got {v!r}.") from None
  if not (f >= 0 if allow_zero else f > 0):
    raise ValueError(f"{field} must be {'>= 0' if allow_zero else '> 0'}, got {v!r}.")
  return f


def check_config(config) -> None:
  """Raises ValueError naming the first bad field of ``config``."""
  m, o, t = config.model, config.optim, config.train
  _int("config.seed", config.seed, 0)
  layers = _int("config.model.num_layers", m.num_layers)
  d = _int("config.model.d_model", m.d_model)
  n = _int("config.model.num_heads", m.num_heads)
  kv = _int("config.model.num_kv_heads", m.num_kv_heads, 0) or n
  _int("config.model.mlp_ratio", m.mlp_ratio)
  if d % n:
    raise ValueError(f"config.model.d_model={d} must be divisible by config.model.num_heads={n}.")
  if n % kv:
    raise ValueError(
        f"config.model.num_kv_heads={kv} must divide config.model.num_heads={n} (GQA/MQA).")
  if m.implementation not in ("auto", "", None, "reference", "xla", "pallas"):
    raise ValueError(f"config.model.implementation must be auto | reference | xla | pallas, got "
                     f"{m.implementation!r}.")
  try:
    np.dtype(m.dtype) if m.dtype != "bfloat16" else None
  except TypeError:
    raise ValueError(f"config.model.dtype {m.dtype!r} is not a dtype name.") from None
  del layers
  families.resolve(m)
  steps = _int("config.train.num_steps", t.num_steps)
  for f in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    _int(f"config.train.{f}", t[f])
  if t.restore_step != -1:
    _int("config.train.restore_step", t.restore_step, 0)
  if t.stop_after != -1:
    _int("config.train.stop_after", t.stop_after)
  _pos_float("config.optim.learning_rate", o.learning_rate)
  _pos_float("config.optim.weight_decay", o.weight_decay, allow_zero=True)
  _pos_float("config.optim.clip_norm", o.clip_norm, allow_zero=True)
  _pos_float("config.optim.min_lr_ratio", o.min_lr_ratio, allow_zero=True)
  w = _int("config.optim.warmup_steps", o.warmup_steps, 0)
  if w >= steps:
    raise ValueError(f"config.optim.warmup_steps={w} must be < config.train.num_steps={steps}.")
  for f in ("b1", "b2"):
    if not 0.0 <= float(o[f]) < 1.0:
      raise ValueError(f"config.optim.{f} must be in [0, 1), got {o[f]!r}.")
