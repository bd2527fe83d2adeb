"""Start-up validation of an experiment config: every error names the config field.

``check_config`` checks the fields themselves; ``check_attention`` runs each
layer's attention family once on abstract inputs of the model's shapes
(``jax.eval_shape``, nothing is computed), so that an option the family
rejects (an unknown name, a bad value, a missing required one) is reported
under the config field the user set (e.g.
``config.model.attention_options.window=0``), not as an error from deep inside
the library at the first training step.
"""
from __future__ import annotations

import difflib
import re
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from experiments import families

#: What a family raises for options it cannot use (while tracing, before any compute).
_OPTION_ERRORS = (TypeError, ValueError, NotImplementedError, ArithmeticError, AssertionError,
                  IndexError, KeyError)


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


def _probe(fn, q, k, causal: bool, options: Dict[str, object]) -> Optional[Exception]:
  """The error ``fn`` raises when traced on ``q`` and ``k`` (also the values) with ``options``."""
  try:
    jax.eval_shape(lambda q, k, v: fn(q, k, v, causal=causal, **options), q, k, k)
  except _OPTION_ERRORS as e:
    return e
  return None


def _first_line(e: Exception) -> str:
  """The first line of an error message, without its final full stop."""
  lines = str(e).strip().splitlines()
  return lines[0].rstrip(".") if lines else type(e).__name__


def _unknown_option(name: str, layer, source: str, fn) -> str:
  valid, complete = families.option_names(fn)
  close = difflib.get_close_matches(name, valid, n=1)
  return (f"{source}: attention family {layer.family!r} has no option {name!r}"
          + (f" (did you mean {close[0]!r}?)" if close else "")
          + f"; valid options: {', '.join(valid) or 'none'}"
          + ("" if complete else " (and options of functions it forwards to that could not be "
             "listed)") + ".")


def _explain(i: int, layer, fn, probe, options, sources, option_field: str,
             err: Exception) -> str:
  """The error message for ``err``, naming the field of the option that caused it.

  ``probe(options)`` traces ``fn`` again (to find the one option whose removal
  clears the error); ``option_field`` is where this layer's options are set.
  """
  where = f"attention family {layer.name!r}, layer {i}"
  text = str(err)
  unknown = re.search(r"(?:unexpected keyword argument|has no option) '(\w+)'", text)
  if isinstance(err, (TypeError, ValueError)) and unknown and unknown.group(1) in options:
    return _unknown_option(unknown.group(1), layer, sources[unknown.group(1)], fn)
  missing = re.search(r"missing \d+ required keyword-only arguments?: '(\w+)'", text)
  if isinstance(err, TypeError) and missing:
    return f"{option_field}.{missing.group(1)}: {where} needs this option; set it."
  user_first = sorted(options, key=lambda o: not sources[o].startswith("config."))
  for name in user_first:
    rest = {o: v for o, v in options.items() if o != name}
    if probe(rest) is None:
      setting = (f"{sources[name]}={options[name]!r}" if sources[name].startswith("config.")
                 else f"{sources[name]}, {name}={options[name]!r}")
      return f"{setting}: {_first_line(err)} ({where})."
  return (f"{layer.field}={layer.name!r} (layer {i}, options {options}) cannot run this model: "
          f"{_first_line(err)}.")


def check_attention(config, seq_len: int) -> None:
  """Traces every layer's attention family with its options; ValueError naming the field.

  Args:
    config: the experiment config (``model`` fields: heads, width, dtype,
      kind, implementation and the attention schedule and options).
    seq_len: the tokens per example the model sees.
  """
  from attnjax.layers import registry  # pylint: disable=g-import-not-at-top
  m = config.model
  n = int(m.num_heads)
  kv, h = int(m.num_kv_heads) or n, int(m.d_model) // n
  dtype = jnp.dtype(m.dtype)
  q = jax.ShapeDtypeStruct((1, int(seq_len), n, h), dtype)
  k = jax.ShapeDtypeStruct((1, int(seq_len), kv, h), dtype)
  causal = str(m.kind) == "decoder_lm"
  impl = None if m.implementation in ("auto", "", None) else str(m.implementation)
  seen = set()
  for i, layer in enumerate(families.resolve_layers(m)):
    options, sources = dict(layer.options), dict(layer.sources)
    if impl is not None:
      options["implementation"] = impl
      sources["implementation"] = "config.model.implementation"
    key = (layer.name, repr(sorted(options.items())))
    if key in seen:
      continue
    seen.add(key)
    fn = registry.get_family(layer.family)
    probe = lambda opts, fn=fn: _probe(fn, q, k, causal, opts)
    err = probe(options)
    if err is not None:
      option_field = ("config.model.attention_options" if layer.name == str(m.attention)
                      else f"config.model.family_options.{layer.name}")
      raise ValueError(_explain(i, layer, fn, probe, options, sources, option_field, err))
