"""The base experiment config and the per-family presets shared by every config file.

Every field can be overridden from the command line, e.g.
``--config.model.attention=s2 --config.train.num_steps=1000``.
"""
from __future__ import annotations

import ml_collections

def base_config(name: str) -> ml_collections.ConfigDict:
  """Fields every experiment has; the experiment files fill task and sizes."""
  c = ml_collections.ConfigDict()
  c.name = name
  c.seed = 0

  c.task = ml_collections.ConfigDict()
  c.task.name = ""
  c.task.batch_size = 16
  c.task.eval_batches = 4

  m = c.model = ml_collections.ConfigDict()
  m.kind = "decoder_lm"            # decoder_lm | encoder_classifier
  m.num_layers = 2
  m.d_model = 128
  m.num_heads = 4
  m.num_kv_heads = 0               # 0 = num_heads (MHA)
  m.mlp_ratio = 4
  m.use_rope = True
  m.attention = "dense"            # family of every layer not listed below
  # Options of model.attention's family: any key, also from the command line
  # (--config.model.attention_options.window=16); checked against the family at start-up.
  m.attention_options = ml_collections.ConfigDict()
  m.family_options = ml_collections.ConfigDict()   # {family: {option: value}}
  m.dense_layers = ()              # layer indices that use dense_attention (MASFormer)
  m.dense_every = 0                # n > 0: layers with (i + 1) % n == 0 are dense (Phi-3-small)
  m.dense_attention = "dense"
  m.layer_attention = ()           # explicit family per layer; overrides the three above
  m.use_presets = True             # small-model option presets (experiments.families.PRESETS)
  m.implementation = "auto"        # auto | reference | xla | pallas
  m.dtype = "float32"

  o = c.optim = ml_collections.ConfigDict()
  o.learning_rate = 3e-3
  o.warmup_steps = 30
  o.min_lr_ratio = 0.1             # cosine decay to learning_rate * min_lr_ratio
  o.weight_decay = 0.01
  o.b1 = 0.9
  o.b2 = 0.98
  o.clip_norm = 1.0

  t = c.train = ml_collections.ConfigDict()
  t.num_steps = 300
  t.log_every = 25
  t.eval_every = 100
  t.checkpoint_every = 100
  t.keep_checkpoints = 3
  t.restore_step = -1              # -1: the latest checkpoint in the workdir
  t.stop_after = -1                # > 0: stop after this many steps in this process (time slicing)
  t.progress_bar = True

  mesh = c.mesh = ml_collections.ConfigDict()
  mesh.data = 1                    # -1: all devices not used by the other axes
  mesh.heads = 1
  mesh.context = 1
  return c


def size(c: ml_collections.ConfigDict, *, num_layers: int, d_model: int, num_heads: int,
         steps: int, learning_rate: float, warmup: int, log_every: int, eval_every: int,
         batch_size: int, eval_batches: int) -> ml_collections.ConfigDict:
  """Sets the model size, batch and schedule fields of an experiment config."""
  c.model.update(num_layers=num_layers, d_model=d_model, num_heads=num_heads)
  c.task.update(batch_size=batch_size, eval_batches=eval_batches)
  c.optim.update(learning_rate=learning_rate, warmup_steps=warmup)
  c.train.update(num_steps=steps, log_every=log_every, eval_every=eval_every,
                 checkpoint_every=eval_every)
  return c


def apply_family(c: ml_collections.ConfigDict, family: str) -> ml_collections.ConfigDict:
  """Sets the config's attention from a ``get_config`` argument.

  ``family`` is a registered family name or a variant of
  ``experiments.families.VARIANTS`` (e.g. ``s2_homo``), optionally followed
  by ``+dense<k>``: the first k layers dense, a MASFormer-style schedule
  (e.g. ``s2+dense2``).
  """
  family = (family or "").strip()
  if not family:
    return c
  if "+dense" in family:
    family, k = family.split("+dense")
    c.model.dense_layers = tuple(range(int(k or 1)))
  c.model.attention = family
  # The family's small-model presets become explicit fields, so that the
  # command line can override them (--config.model.attention_options.window=16).
  from experiments import families  # pylint: disable=g-import-not-at-top
  c.model.attention_options = ml_collections.ConfigDict(families.preset_options(family))
  return c
