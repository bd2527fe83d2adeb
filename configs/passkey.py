"""Passkey / needle retrieval: one model trained on contexts of 16-124 tokens,
evaluated at each length of ``task.eval_contexts``.

``--config=configs/passkey.py:<family>`` (e.g. ``dense``, ``s2``,
``s2+dense1``); 3-digit passkeys, 2 layers of width 64.
"""
from configs import common


def get_config(arg: str = ""):
  c = common.base_config("passkey")
  c.task.name = "passkey"
  c.task.seq_len = 128
  c.task.vocab_size = 32
  c.task.num_digits = 3
  c.task.min_context = 16
  c.task.eval_contexts = (32, 64, 96, 124)
  c.task.batch_size = 32
  c.task.eval_batches = 2
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
