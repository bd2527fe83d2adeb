"""The default main job: a tiny byte-level causal LM on the Python standard library's sources.

``python -m experiments.train`` (no arguments) runs this: 2 layers, d_model
128, 4 heads, 128-byte context, batch 16, 300 steps of AdamW. Pick a family
with ``--config=configs/lm_stdlib.py:<family>`` (e.g. ``s2``, ``s2+dense1``)
or ``--config.model.attention=<family>``.
"""
from configs import common


def get_config(arg: str = ""):
  c = common.base_config("lm_stdlib")
  c.task.update(name="stdlib_lm", seq_len=128, include_tests=False, eval_percent=5,
                max_bytes=0)
  common.size(c, num_layers=2, d_model=128, num_heads=4, steps=300, learning_rate=3e-3,
              warmup=30, log_every=25, eval_every=100, batch_size=16, eval_batches=4)
  return common.apply_family(c, arg)
