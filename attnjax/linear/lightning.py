"""Lightning Attention-2 and TNL's decayed linear attention (arXiv:2401.04658, arXiv:2405.17381).

"Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in
LLMs" and TNL, "Various Lengths, Constant Speed: Efficient Language Modeling with
Lightning Attention".

o_t = sum_{j<=t} lambda_h^(t-j) (q_t . k_j) v_j with lambda_h = exp(-s_h); no
feature map and no denominator (TNL applies SiLU in its projections).

Also TNL's other pure pieces: ``srms_norm``, the SGLU channel mixer ``sglu``
and LRPE's relative rotation (``lrpe_thetas``, ``lrpe_rotate``). LRPE-d
(from TransNormerLLM, used by TNL) scores a pair as
q_s . k_t lambda^(s-t) exp(i theta (s-t)). For real q and k the project reads
the rotation as the real part, per channel c:
sum_c q_{s,c} k_{t,c} cos(theta_c (s - t)), obtained, as in the
TransNormerLLM code, by doubling the features,
x_t -> [x_t cos(theta t), x_t sin(theta t)] for q and k alike, so the decayed
linear attention above runs unchanged on 2H features. theta_c =
10000^(-2 c / d) over the flattened (head, channel) index c, d = N * H (the
code's initialisation; the code learns theta, which the layer does too).
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from attnjax.linear.api import linear_attention
from attnjax.linear.decay import tnl_decay_slopes


def lightning_attention(query, key, value, *, slopes=None, layer_idx: int = 0,
                        num_layers: int = 1, causal: bool = True, block_size: int = 64,
                        initial_state=None, return_state: bool = False,
                        implementation: Optional[str] = None, **kwargs):
  """Decayed causal linear attention, chunked as in Lightning Attention-2.

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv].
    slopes: per-head slopes [N] (>= 0); None uses TNL's
      tnl_decay_slopes(N, layer_idx, num_layers).
    block_size: the chunk length (64 as the Triton kernel of the paper).
    Other arguments as linear_attention (identity feature map, no normalisation).
  Returns:
    out [B, T, N, Hv] (and the final state [B, N, H, Hv] if return_state).
  """
  if slopes is None:
    slopes = jnp.asarray(tnl_decay_slopes(query.shape[2], layer_idx, num_layers))
  return linear_attention(query, key, value, feature_map="identity", causal=causal,
                          decay=slopes if causal else None, chunk_size=block_size,
                          initial_state=initial_state, return_state=return_state,
                          implementation=implementation, **kwargs)


def srms_norm(x, eps: float = 1e-6):
  """TNL's simple RMS norm x / (||x||_2 / sqrt(d)) over the last axis."""
  x32 = x.astype(jnp.float32)
  rms = jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 / rms).astype(x.dtype)


def sglu(x, params):
  """TNL's SGLU channel mixer ((x W_u) * (x W_v)) W_o, no activation.

  Args:
    x: [..., D].
    params: dict with "w_u", "w_v" [D, F] and "w_o" [F, D_out]; optional
      biases "b_u", "b_v" [F] and "b_o" [D_out] (TNL's code has none).
  Returns:
    [..., D_out] in x.dtype (float32 accumulation).
  """
  for name in ("w_u", "w_v", "w_o"):
    if name not in params:
      raise ValueError(f"sglu params need 'w_u', 'w_v' and 'w_o'; missing {name!r} "
                       f"(got {sorted(params)}).")
  x32 = x.astype(jnp.float32)
  lin = lambda z, w, b: z @ params[w].astype(jnp.float32) + (
      params[b].astype(jnp.float32) if b in params else 0.0)
  return lin(lin(x32, "w_u", "b_u") * lin(x32, "w_v", "b_v"), "w_o", "b_o").astype(x.dtype)


def lrpe_thetas(num_heads: int, head_dim: int, base: float = 10000.0) -> np.ndarray:
  """LRPE's rotation frequencies [N, H] float32: base^(-2 c / (N H)), c = n H + h."""
  if num_heads < 1 or head_dim < 1:
    raise ValueError(f"num_heads and head_dim must be >= 1, got {num_heads}, {head_dim}.")
  d = num_heads * head_dim
  return (base ** (-2.0 * np.arange(d) / d)).reshape(num_heads, head_dim).astype(np.float32)


def lrpe_rotate(x, theta, positions):
  """LRPE's relative rotation as doubled features (see the module docstring).

  Args:
    x: queries or keys [B, T, N, H].
    theta: [N, H] frequencies (e.g. ``lrpe_thetas``).
    positions: [T] token positions (an offset + arange(T) when decoding).
  Returns:
    [B, T, N, 2H]: [x cos(theta p), x sin(theta p)], in x.dtype. For rotated
    q at s and k at t, q' . k' = sum_c q_c k_c cos(theta_c (s - t)).
  """
  theta = jnp.asarray(theta, jnp.float32)
  if x.ndim != 4 or theta.shape != x.shape[2:]:
    raise ValueError(f"lrpe_rotate takes x [B, T, N, H] and theta [N, H]; got x {x.shape}, "
                     f"theta {theta.shape}.")
  ang = jnp.asarray(positions, jnp.float32)[:, None, None] * theta  # [T, N, H]
  if ang.shape[0] != x.shape[1]:
    raise ValueError(f"positions must have shape [T]=({x.shape[1]},), got {jnp.shape(positions)}.")
  x32 = x.astype(jnp.float32)
  return jnp.concatenate([x32 * jnp.cos(ang), x32 * jnp.sin(ang)], -1).astype(x.dtype)
