"""ListOps (LRA-style, generated) with a small non-causal encoder classifier.

``--config=configs/listops.py:<family>``; expressions of depth <= 3 with up
to 4 arguments in 64 tokens; 2 layers of width 64.
"""
from configs import common


def get_config(arg: str = ""):
  c = common.base_config("listops")
  c.task.name = "listops"
  c.task.seq_len = 64
  c.task.max_depth = 3
  c.task.max_args = 4
  c.task.branch_prob = 0.3
  c.task.batch_size = 32
  c.task.eval_batches = 4
  c.model.kind = "encoder_classifier"
  c.model.num_layers = 2
  c.model.d_model = 64
  c.model.num_heads = 4
  c.model.use_rope = False
  c.optim.learning_rate = 2e-3
  c.optim.warmup_steps = 20
  c.train.num_steps = 400
  c.train.log_every = 50
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  return common.apply_family(c, arg)
