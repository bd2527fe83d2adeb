"""Agent Attention: softmax attention through n agent tokens (Han et al., ECCV 2024; arXiv:2312.08874).

"Agent Attention: On the Integration of Softmax and Linear Attention".

Agents A [B, n, N, H] (by default adaptive average pooling of the queries)
first aggregate the keys, V_A = softmax(A K^T * scale + B1) V, then broadcast
back, O = softmax(Q A^T * scale + B2) V_A. This is linear attention with
phi_q(Q) = softmax(Q A^T) and phi_k(K) = softmax(A K^T); cost O(T n + S n).
The depthwise convolution on V of the paper is a parametric part and lives in
attnjax.linear.layers.AgentAttention.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from attnjax.core.validation import check_qkv, check_scale


def _pool_axis(x, n, axis):
  """Adaptive average pooling of axis `axis` of x to length n (PyTorch's bin edges)."""
  x = jnp.moveaxis(x, axis, 0)
  length = x.shape[0]
  s = jnp.asarray([(i * length) // n for i in range(n)])
  e = jnp.asarray([-(-((i + 1) * length) // n) for i in range(n)])
  cs = jnp.concatenate([jnp.zeros_like(x[:1]), jnp.cumsum(x, axis=0)], axis=0)
  width = (e - s).astype(x.dtype).reshape((n,) + (1,) * (x.ndim - 1))
  return jnp.moveaxis((cs[e] - cs[s]) / width, 0, axis)


def pool_agents(query, num_agents: int, hw: Optional[Tuple[int, int]] = None):
  """Agent tokens by adaptive average pooling of the queries.

  Args:
    query: [B, T, N, H]; with hw = (h, w), T == h * w is a row-major grid and
      the pooling is 2-D to a sqrt(n) x sqrt(n) grid (n must be a square).
  Returns:
    [B, n, N, H].
  """
  if num_agents < 1:
    raise ValueError(f"num_agents must be >= 1, got {num_agents}.")
  if hw is None:
    if num_agents > query.shape[1]:
      raise ValueError(f"num_agents={num_agents} exceeds the query length T={query.shape[1]}.")
    return _pool_axis(query, num_agents, 1)
  h, w = hw
  side = math.isqrt(num_agents)
  if side * side != num_agents:
    raise ValueError(f"with hw, num_agents must be a square number, got {num_agents}.")
  if h * w != query.shape[1] or side > min(h, w):
    raise ValueError(f"hw={hw} must satisfy h*w == T={query.shape[1]} and min(h, w) >= "
                     f"sqrt(num_agents)={side}.")
  b, _, n, d = query.shape
  grid = _pool_axis(_pool_axis(query.reshape(b, h, w, n, d), side, 1), side, 2)
  return grid.reshape(b, side * side, n, d)


def agent_attention(query, key, value, *, agents=None, num_agents: int = 49,
                    hw: Optional[Tuple[int, int]] = None, bias_ak=None, bias_qa=None,
                    scale: Optional[float] = None, causal: bool = False):
  """Agent attention (non-causal self or cross).

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv].
    agents: [B, n, N, H]; None pools the queries (see pool_agents).
    bias_ak: agent bias B1 broadcastable to [B, N, n, S] (agent -> key logits).
    bias_qa: agent bias B2 broadcastable to [B, N, T, n] (query -> agent logits).
  Returns:
    [B, T, N, Hv] in query.dtype.
  """
  d = check_qkv(query, key, value)
  if causal:
    raise NotImplementedError(
        "agent attention is not causal: pooled agents mix every query position "
        "(CAB's causal patterns are out of its reach).")
  scale = check_scale(scale, d.H)
  q = query.astype(jnp.float32)
  a = pool_agents(q, num_agents, hw) if agents is None else jnp.asarray(agents, jnp.float32)
  if a.ndim != 4 or a.shape[0] != d.B or a.shape[2] != d.N or a.shape[3] != d.H:
    raise ValueError(f"agents must have shape [B, n, N, H]=({d.B}, n, {d.N}, {d.H}), got {a.shape}.")
  g = d.N // d.K
  n_agents = a.shape[1]
  ag = a.reshape(d.B, n_agents, d.K, g, d.H)
  k = key.astype(jnp.float32)
  v = value.astype(jnp.float32)
  logits_ak = jnp.einsum("bakgh,bskh->bkgas", ag, k) * scale
  if bias_ak is not None:
    logits_ak = logits_ak + jnp.broadcast_to(bias_ak, (d.B, d.N, n_agents, d.S)).reshape(
        d.B, d.K, g, n_agents, d.S)
  v_agents = jnp.einsum("bkgas,bske->bkgae", jax.nn.softmax(logits_ak, axis=-1), v)
  qg = q.reshape(d.B, d.T, d.K, g, d.H)
  logits_qa = jnp.einsum("btkgh,bakgh->bkgta", qg, ag) * scale
  if bias_qa is not None:
    logits_qa = logits_qa + jnp.broadcast_to(bias_qa, (d.B, d.N, d.T, n_agents)).reshape(
        d.B, d.K, g, d.T, n_agents)
  out = jnp.einsum("bkgta,bkgae->btkge", jax.nn.softmax(logits_qa, axis=-1), v_agents)
  return out.reshape(d.B, d.T, d.N, d.Hv).astype(query.dtype)
