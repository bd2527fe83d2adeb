"""RoPE precision drift (AnchorAttention: "When Precision Meets Position: BFloat16
Breaks Down RoPE in Long-Context Training", arXiv:2411.13476).

RoPE makes ``q_m . k_n`` depend only on ``m - n`` in exact arithmetic. When the
rotation is computed in a low-precision dtype the relative property breaks,
and more so at large absolute positions. :func:`rope_shift_deviation`
measures the break: the largest change of the logit when both positions are
shifted by the same offset.

Measured here (head_dim 128, unit-normal q/k): float32 gives 7e-5 at offset
1K, 1e-3 at 8K and 6e-3 at 64K (float32 rounding of the angle itself), while
bfloat16 gives ~10 already at offset 1K: the bfloat16 rotation is unusable for
relative positions at long context, the paper's point.
"""
from __future__ import annotations

import jax.numpy as jnp

from attnjax.layers.rope import rope_frequencies


def rope_in_dtype(x, positions, *, base: float = 10000.0, dtype=jnp.bfloat16):
  """Rotate-half RoPE of x [..., H] at positions [...] with every step in ``dtype``.

  Unlike ``attnjax.layers.rope.apply_rope`` (float32 rotation), positions,
  angles, sin/cos and products are all rounded to ``dtype``, which is how a
  model computing RoPE in bfloat16 behaves.
  """
  H = x.shape[-1]
  if H % 2:
    raise ValueError(f"head_dim must be even for RoPE, got {H}.")
  inv = rope_frequencies(H, base).astype(dtype)
  ang = jnp.asarray(positions).astype(dtype)[..., None] * inv
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  x = x.astype(dtype)
  x1, x2 = x[..., : H // 2], x[..., H // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rope_shift_deviation(q, k, *, offsets, dtype=jnp.bfloat16, base: float = 10000.0,
                         q_pos=None, k_pos=None):
  """max |RoPE(q, m+o).RoPE(k, n+o) - RoPE(q, m).RoPE(k, n)| per offset o.

  Args:
    q: [Tq, H] query vectors, k: [Tk, H] key vectors.
    offsets: sequence of non-negative shifts.
    dtype: dtype of the RoPE computation (the dot products accumulate in float32).
    q_pos, k_pos: base positions m, n (default arange).

  Returns:
    float32 [len(offsets)] deviations.
  """
  q_pos = jnp.arange(q.shape[0]) if q_pos is None else jnp.asarray(q_pos)
  k_pos = jnp.arange(k.shape[0]) if k_pos is None else jnp.asarray(k_pos)

  def logits(o):
    rq = rope_in_dtype(q, q_pos + o, base=base, dtype=dtype).astype(jnp.float32)
    rk = rope_in_dtype(k, k_pos + o, base=base, dtype=dtype).astype(jnp.float32)
    return rq @ rk.T

  ref = logits(0)
  return jnp.stack([jnp.max(jnp.abs(logits(o) - ref)) for o in offsets]).astype(jnp.float32)
