"""scikit-learn digits (8x8 images, 10 classes) with a small non-causal encoder over 2x2 patches.

``--config=configs/digits.py:<family>``; 16 patch tokens of 4 pixels,
2 layers of width 64, learned position embeddings (no RoPE).
"""
from configs import common


def get_config(arg: str = ""):
  c = common.base_config("digits")
  c.task.update(name="digits", patch_size=2)   # the whole test split is always evaluated
  c.model.update(kind="encoder_classifier", use_rope=False)
  common.size(c, num_layers=2, d_model=64, num_heads=4, steps=300, learning_rate=2e-3,
              warmup=20, log_every=50, eval_every=100, batch_size=64, eval_batches=1)
  c = common.apply_family(c, arg)
  if "kernel_size" in c.model.attention_options:
    # 16 patch tokens: a 7-token neighbourhood (the 1D preset of 33 is longer than the input).
    c.model.attention_options.kernel_size = 7
  return c
