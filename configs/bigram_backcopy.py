"""Bigram-Backcopy (Active-Dormant attention heads, arXiv:2410.13835) with a 1-layer decoder.

``--config=configs/bigram_backcopy.py:<family>``; vocab 64, 64 tokens,
3 trigger tokens. ``copy_accuracy`` is the accuracy on back-copy positions.
"""
from configs import common


def get_config(arg: str = ""):
  c = common.base_config("bigram_backcopy")
  c.task.update(name="bigram_backcopy", seq_len=64, vocab_size=64, num_triggers=3,
                successors_per_token=4, trigger_prob=0.15)
  common.size(c, num_layers=1, d_model=64, num_heads=4, steps=300, learning_rate=3e-3,
              warmup=20, log_every=50, eval_every=100, batch_size=32, eval_batches=4)
  return common.apply_family(c, arg)
