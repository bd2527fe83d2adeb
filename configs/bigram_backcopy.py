"""Bigram-Backcopy (Active-Dormant attention heads, spec P2-06) with a 1-layer decoder.

``--config=configs/bigram_backcopy.py:<family>``; vocab 64, 64 tokens,
3 trigger tokens. ``copy_accuracy`` is the accuracy on back-copy positions.
"""
from configs import common


def get_config(arg: str = ""):
  c = common.base_config("bigram_backcopy")
  c.task.name = "bigram_backcopy"
  c.task.seq_len = 64
  c.task.vocab_size = 64
  c.task.num_triggers = 3
  c.task.successors_per_token = 4
  c.task.trigger_prob = 0.15
  c.task.batch_size = 32
  c.task.eval_batches = 4
  c.model.num_layers = 1
  c.model.d_model = 64
  c.model.num_heads = 4
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 20
  c.train.num_steps = 300
  c.train.log_every = 50
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  return common.apply_family(c, arg)
