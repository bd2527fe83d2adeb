"""scikit-learn digits (8x8 images, 10 classes) with a small non-causal encoder over 2x2 patches.

``--config=configs/digits.py:<family>``; 16 patch tokens of 4 pixels,
2 layers of width 64, learned position embeddings (no RoPE).
"""
from configs import common


def get_config(arg: str = ""):
  c = common.base_config("digits")
  c.task.name = "digits"
  c.task.patch_size = 2
  c.task.batch_size = 64
  c.task.eval_batches = 1           # the whole test split is always evaluated
  c.model.kind = "encoder_classifier"
  c.model.num_layers = 2
  c.model.d_model = 64
  c.model.num_heads = 4
  c.model.use_rope = False
  c.optim.learning_rate = 2e-3
  c.optim.warmup_steps = 20
  c.train.num_steps = 300
  c.train.log_every = 50
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  return common.apply_family(c, arg)
