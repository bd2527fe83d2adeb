"""Launcher: ``python -m experiments.train --config=configs/<name>.py[:<family>] --workdir=<dir>``.

With no arguments it trains the default main job, a tiny byte-level causal
LM on the Python standard library's sources (``configs/lm_stdlib.py``),
printing the loss as it falls. Any config field can be overridden, e.g.
``--config.model.attention=s2 --config.train.num_steps=1000``. Re-running
with the same ``--workdir`` resumes from its latest checkpoint.
"""
from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "lm_stdlib.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Experiment config file (ml_collections), optionally :<family>.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, metrics.csv, tb/, summary.json); re-use it to "
    "resume. Default: runs/<config name>-<timestamp>.")


def main(argv):
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
  app.run(main)
