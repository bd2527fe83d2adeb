"""MoH: Multi-Head Attention as Mixture-of-Head Attention (arXiv:2410.11842).

Multi-head attention written as a sum over heads, ``O = sum_h H_h W_o^h``,
becomes ``O = sum_h g_h(x) H_h W_o^h``: ``shared_heads`` heads are always on,
the remaining heads are routed per token (top-k of a softmax router,
renormalised to sum k), and two balance weights mix the groups. A
load-balance loss keeps routed heads evenly used (coefficient 0.01 in the
paper).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import masks
from attnjax.api import attention


def moh_gates(x, w_shared, w_routed, w_balance, *, shared_heads: int, routed_topk: int):
  """Per-token head gates [B, T, N] and routed probabilities [B, T, E].

  Args:
    x: [B, T, D] token features.
    w_shared: [D, shared_heads]; w_routed: [D, E] (E routed heads); w_balance: [D, 2].
  """
  E = w_routed.shape[-1]
  if not 0 <= routed_topk <= E:
    raise ValueError(f"routed_topk must be in [0, {E}], got {routed_topk}.")
  alpha = 2.0 * jax.nn.softmax(x @ w_balance, axis=-1)
  if shared_heads > 1:
    g_shared = shared_heads * jax.nn.softmax(x @ w_shared, axis=-1)
  else:
    g_shared = jnp.ones(x.shape[:-1] + (shared_heads,), x.dtype)
  probs = jax.nn.softmax(x @ w_routed, axis=-1)
  if routed_topk > 0:
    vals, idx = jax.lax.top_k(probs, routed_topk)
    vals = routed_topk * vals / jnp.sum(vals, axis=-1, keepdims=True)
    g_routed = jnp.zeros_like(probs).at[
        jnp.arange(probs.shape[0])[:, None, None], jnp.arange(probs.shape[1])[None, :, None], idx].set(vals)
  else:
    g_routed = jnp.zeros_like(probs)
  gates = jnp.concatenate([alpha[..., :1] * g_shared, alpha[..., 1:] * g_routed], axis=-1)
  return gates, probs


def moh_balance_loss(routed_probs, gates_routed):
  """L_b = E^2 * mean_i(P_i * f_i): P mean router prob, f fraction of tokens selecting head i."""
  E = routed_probs.shape[-1]
  P = jnp.mean(routed_probs.reshape(-1, E), axis=0)
  f = jnp.mean((gates_routed.reshape(-1, E) > 0).astype(routed_probs.dtype), axis=0)
  return E * E * jnp.mean(P * f)


class MoHAttention(nn.Module):
  """Mixture-of-head self-attention over x [B, T, D] -> (out [B, T, D], balance loss).

  ``shared_heads`` of ``num_heads`` are always active; ``routed_topk`` of the
  rest are chosen per token. With ``shared_heads == num_heads`` and zero
  router weights this is standard multi-head attention.
  """
  num_heads: int
  head_dim: int
  shared_heads: int
  routed_topk: int
  causal: bool = True
  implementation: str | None = None

  @nn.compact
  def __call__(self, x):
    B, T, D = x.shape
    N, H = self.num_heads, self.head_dim
    E = N - self.shared_heads
    if not 0 < self.shared_heads <= N:
      raise ValueError(f"shared_heads must be in [1, num_heads={N}], got {self.shared_heads}.")
    q, k, v = (nn.DenseGeneral((N, H), name=n)(x) for n in ("query", "key", "value"))
    heads = attention(q, k, v, mask=masks.Causal() if self.causal else None,
                      implementation=self.implementation)  # [B, T, N, H]
    zeros = nn.initializers.zeros
    w_s = self.param("router_shared", zeros, (D, self.shared_heads))
    w_r = self.param("router_routed", nn.initializers.lecun_normal(), (D, max(E, 1)))[:, :E]
    w_b = self.param("router_balance", zeros, (D, 2))
    gates, probs = moh_gates(x, w_s, w_r, w_b, shared_heads=self.shared_heads,
                             routed_topk=self.routed_topk if E else 0)
    out = nn.DenseGeneral(D, axis=(-2, -1), name="out")(heads * gates[..., None].astype(heads.dtype))
    loss = moh_balance_loss(probs, gates[..., self.shared_heads:]) if E else jnp.zeros(())
    return out, loss
