"""Multi-query associative recall (Zoology / BASED, arXiv:2402.18668) with a small decoder.

``--config=configs/mqar.py:<family>``; vocab 64, 64 tokens, 8 key-value
pairs, 2 layers of width 64. Reported metrics: ``accuracy`` (recalled values)
and ``seq_accuracy`` (examples with every value recalled).
"""
from configs import common


def get_config(arg: str = ""):
  c = common.base_config("mqar")
  c.task.update(name="mqar", seq_len=64, vocab_size=64, num_kv_pairs=8, alpha=0.01)
  common.size(c, num_layers=2, d_model=64, num_heads=4, steps=400, learning_rate=3e-3,
              warmup=20, log_every=50, eval_every=200, batch_size=32, eval_batches=4)
  return common.apply_family(c, arg)
