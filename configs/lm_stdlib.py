"""The default main job: a tiny byte-level causal LM on the Python standard library's sources.

``python -m experiments.train`` (no arguments) runs this: 2 layers, d_model
128, 4 heads, 128-byte context, batch 16, 300 steps of AdamW. Pick a family
with ``--config=configs/lm_stdlib.py:<family>`` (e.g. ``s2``, ``s2+dense1``)
or ``--config.model.attention=<family>``.
"""
from configs import common


def get_config(arg: str = ""):
  c = common.base_config("lm_stdlib")
  c.task.name = "stdlib_lm"
  c.task.seq_len = 128
  c.task.batch_size = 16
  c.task.eval_batches = 4
  c.task.include_tests = False
  c.task.eval_percent = 5
  c.task.max_bytes = 0
  c.model.kind = "decoder_lm"
  c.model.num_layers = 2
  c.model.d_model = 128
  c.model.num_heads = 4
  c.train.num_steps = 300
  c.train.log_every = 25
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  return common.apply_family(c, arg)
