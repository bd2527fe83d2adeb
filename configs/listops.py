"""ListOps (LRA-style, generated) with a small non-causal encoder classifier.

``--config=configs/listops.py:<family>``; expressions of depth <= 3 with up
to 4 arguments in 64 tokens; 2 layers of width 64.
"""
from configs import common


def get_config(arg: str = ""):
  c = common.base_config("listops")
  c.task.update(name="listops", seq_len=64, max_depth=3, max_args=4, branch_prob=0.3)
  c.model.update(kind="encoder_classifier", use_rope=False)
  common.size(c, num_layers=2, d_model=64, num_heads=4, steps=400, learning_rate=2e-3,
              warmup=20, log_every=50, eval_every=200, batch_size=32, eval_batches=4)
  return common.apply_family(c, arg)
