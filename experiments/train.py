"""Launcher: ``python -m experiments.train --config=configs/<name>.py[:<family>] --workdir=<dir>``.

With no arguments it trains the default main job, a tiny byte-level causal
LM on the Python standard library's sources (``configs/lm_stdlib.py``),
printing the loss as it falls. Any config field can be overridden, e.g.
``--config.model.attention=s2 --config.train.num_steps=1000``, and any option
of the chosen family set (``--config.model.attention_options.window=16``).
Re-running with the same ``--workdir`` resumes from its latest checkpoint. A
bad flag or config field (unknown, mistyped, a value the family rejects), a
damaged checkpoint or a diverged run ends with one ``error:`` line naming
the field or step, and exit status 1.
"""
from __future__ import annotations

import difflib
import os
import re
import sys
import time
from typing import List, Optional

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "lm_stdlib.py")

# The config is not locked and new keys are accepted so that any family's options can be
# set (--config.model.attention_options.window=16, whatever the family); every other
# overridden field must exist in the config file (checked by _unknown_field). The default
# file is put on the command line by parse_flags, so that it is loaded (and its overrides
# applied) inside the parser, where an error becomes one line, not at import.
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (ml_collections), optionally :<family>; default "
    "configs/lm_stdlib.py.", lock_config=False, accept_new_attributes=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, metrics.csv, tb/, summary.json); re-use it to "
    "resume. Default: runs/<config name>-<timestamp>.")

#: Config dicts whose keys are free (options of attention families), checked at start-up.
_OPEN_DICTS = ("model.attention_options",)
_OPEN_PREFIXES = ("model.family_options.",)


def _override_paths(argv: List[str]) -> List[str]:
  """The config fields overridden on the command line (``--config.a.b=v`` -> ``a.b``)."""
  paths = []
  for arg in flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False):
    m = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
    if m:
      paths.append(m.group(1))
  return paths


def _config_spec(argv: List[str]) -> str:
  """The ``--config`` value of ``argv`` (``file[:family]``), or the default file."""
  spec = _DEFAULT_CONFIG
  for i, arg in enumerate(argv[1:], 1):
    m = re.match(r"^--?config(?:=(.*))?$", arg)
    if m:
      spec = m.group(1) if m.group(1) is not None else (argv[i + 1] if i + 1 < len(argv) else "")
  return spec


def _may_add(parent: str) -> bool:
  """Whether a new key may be added under the config path ``parent``."""
  return parent in _OPEN_DICTS or (parent.startswith(_OPEN_PREFIXES) and parent.count(".") == 2)


def _unknown_field(argv: List[str]) -> Optional[str]:
  """An error naming the first overridden field the config file does not define, if any."""
  paths = _override_paths(argv)
  if not paths:
    return None
  base = config_flags.config_flags.ConfigFileFlagParser("config", lock_config=False).parse(
      _config_spec(argv))
  if not isinstance(base, ml_collections.ConfigDict):
    return None   # the file did not load: reported from the flag's own error
  for path in paths:
    node, parts = base, path.split(".")
    for depth, key in enumerate(parts):
      parent = ".".join(parts[:depth])
      if isinstance(node, ml_collections.ConfigDict) and key in node:
        node = node[key]
        continue
      if depth == len(parts) - 1 and _may_add(parent):
        break
      return _no_such_field(path, parent, key, node)
  return None


def _no_such_field(path: str, parent: str, key: str, node) -> str:
  """The error for ``--config.<path>`` whose ``key`` is missing under ``parent``."""
  where = "config" + (f".{parent}" if parent else "")
  if not isinstance(node, ml_collections.ConfigDict):
    return f"--config.{path}: {where} is {node!r}, not a config dict."
  fields = sorted(node.keys())
  close = difflib.get_close_matches(key, fields, n=1)
  text = (f"--config.{path}: {where} has no field {key!r}"
          + (f" (did you mean {close[0]!r}?)" if close else "")
          + (f"; its fields: {', '.join(fields)}" if fields else " (it is empty)"))
  if parent == "model.family_options":
    text += (f"; set a family's options as one dict, e.g. --config.model.family_options="
             f"\"{{'{key}': {{'block_size': 16}}}}\"")
  return text + "."


def _one_line(e: BaseException) -> str:
  """The first line of an error (and the last, for a config file's traceback)."""
  lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
  if not lines:
    return type(e).__name__
  if "Traceback" in str(e) and len(lines) > 1:
    return f"{lines[0]} {lines[-1]}"
  line = lines[0]
  return line[1:-1] if len(line) > 1 and line[0] == line[-1] and line[0] in "'\"" else line


def _flag_error(argv: List[str], e: Exception) -> str:
  """The one-line message for an error raised while parsing the flags."""
  try:
    unknown = _unknown_field(argv)
  except Exception:  # pylint: disable=broad-except
    unknown = None   # the config file itself does not load: ``e`` says why
  if unknown:
    return unknown
  spec = _config_spec(argv)
  if not os.path.isfile(spec.split(":", 1)[0]):
    return f"--config={spec}: no such config file."
  return _one_line(e)


def parse_flags(argv: List[str]) -> List[str]:
  """absl flags parser: any bad flag or config field is one ``error:`` line and exit status 1."""
  if not any(re.match(r"^--?config(=|$)", arg) for arg in argv[1:]):
    argv = [argv[0], f"--config={_DEFAULT_CONFIG}", *argv[1:]]
  try:
    rest = flags.FLAGS(argv)
    _CONFIG.value.get("name")   # a config file that failed to load raises here
    problem = _unknown_field(argv)
  except Exception as e:  # pylint: disable=broad-except
    # ml_collections raises AttributeError/KeyError for bad paths, IOError for a missing file.
    problem = _flag_error(argv, e)
  if problem:
    print(f"error: {problem}", file=sys.stderr, flush=True)
    sys.exit(1)
  return rest


def main(argv):
  """Trains the parsed config; a bad config, checkpoint or diverged run is one ``error:`` line."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from experiments import checkpoints, trainer  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join(
      "runs", f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}")
  print(f"workdir: {workdir}", flush=True)
  try:
    trainer.train(config, workdir)
  except (ValueError, checkpoints.CheckpointError, trainer.TrainingDiverged) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
