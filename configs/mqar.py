"""Multi-query associative recall (Zoology / BASED, spec P2-09) with a small decoder.

``--config=configs/mqar.py:<family>``; vocab 64, 64 tokens, 8 key-value
pairs, 2 layers of width 64. Reported metrics: ``accuracy`` (recalled values)
and ``seq_accuracy`` (examples with every value recalled).
"""
from configs import common


def get_config(arg: str = ""):
  c = common.base_config("mqar")
  c.task.name = "mqar"
  c.task.seq_len = 64
  c.task.vocab_size = 64
  c.task.num_kv_pairs = 8
  c.task.alpha = 0.01
  c.task.batch_size = 32
  c.task.eval_batches = 4
  c.model.num_layers = 2
  c.model.d_model = 64
  c.model.num_heads = 4
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 20
  c.train.num_steps = 400
  c.train.log_every = 50
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  return common.apply_family(c, arg)
