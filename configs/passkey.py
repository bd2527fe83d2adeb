"""Passkey / needle retrieval: one model trained on contexts of 16-124 tokens,
evaluated at each length of ``task.eval_contexts``.

``--config=configs/passkey.py:<family>`` (e.g. ``dense``, ``s2``,
``s2+dense1``); 3-digit passkeys, 2 layers of width 64.
"""
from configs import common


def get_config(arg: str = ""):
  c = common.base_config("passkey")
  c.task.update(name="passkey", seq_len=128, vocab_size=32, num_digits=3, min_context=16,
                eval_contexts=(32, 64, 96, 124))
  common.size(c, num_layers=2, d_model=64, num_heads=4, steps=400, learning_rate=3e-3,
              warmup=20, log_every=50, eval_every=200, batch_size=32, eval_batches=2)
  return common.apply_family(c, arg)
