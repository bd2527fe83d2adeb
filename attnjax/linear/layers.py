"""Flax Linen layers with parameters for the linear engine: TNL (token mixer, SGLU), Agent Attention, Titans.

TNL (arXiv:2405.17381), Agent Attention (arXiv:2312.08874), Titans (arXiv:2501.00663);
full titles in attnjax.linear.lightning, .agent and .titans.

Parameter-free families (linear, lightning, based, flow, agent without bias)
are reached through FAMILIES and attnjax.layers.MultiHeadAttention.
"""
from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.linear.agent import agent_attention, pool_agents
from attnjax.linear.api import linear_attention_step
from attnjax.linear.decay import tnl_decay_slopes
from attnjax.linear.lightning import lightning_attention, lrpe_rotate, lrpe_thetas, srms_norm
from attnjax.block_sparse.families import sliding_window_attention, streaming_attention
from attnjax.linear.based import window_sides
from attnjax.linear.titans import linear_memory, short_causal_conv


def _heads(x, n):
  return x.reshape(x.shape[:-1] + (n, x.shape[-1] // n))


class AgentAttention(nn.Module):
  """Agent attention block on x [B, T, D] (T = h * w when hw is given).

  Agents pool the queries; with hw and agent_bias, the agent biases are
  per-agent 7 x 7 maps resized to h x w plus row and column terms
  (trunc-normal 0.02 init), and a 3 x 3 depthwise convolution of V (as an
  image) is added to the output; without hw the convolution is 1-D (width 3).
  """
  num_heads: int
  num_agents: int = 49
  hw: Optional[Tuple[int, int]] = None
  agent_bias: bool = True
  use_dwc: bool = True

  @nn.compact
  def __call__(self, x):
    b, t, dim = x.shape
    n = self.num_heads
    q, k, v = (_heads(nn.Dense(dim, name=nm)(x), n) for nm in ("query", "key", "value"))
    bias_ak = bias_qa = None
    if self.agent_bias and self.hw is not None:
      h, w = self.hw
      init = nn.initializers.truncated_normal(0.02)
      shape = (n, self.num_agents)
      maps = []
      for nm in ("ak", "qa"):
        pb = self.param(f"{nm}_pool_bias", init, shape + (7, 7))
        rows = self.param(f"{nm}_row_bias", init, shape + (h, 1))
        cols = self.param(f"{nm}_col_bias", init, shape + (1, w))
        full = jax.image.resize(pb, shape + (h, w), "bilinear") + rows + cols
        maps.append(full.reshape(shape + (t,)))
      bias_ak = maps[0][None]
      bias_qa = jnp.swapaxes(maps[1], -1, -2)[None]
    out = agent_attention(q, k, v, agents=pool_agents(q, self.num_agents, self.hw),
                          bias_ak=bias_ak, bias_qa=bias_qa)
    out = out.reshape(b, t, dim)
    if self.use_dwc:
      vv = v.reshape(b, t, dim)
      if self.hw is not None:
        conv = nn.Conv(dim, (3, 3), padding="SAME", feature_group_count=dim, name="dwc")
        out = out + conv(vv.reshape(b, *self.hw, dim)).reshape(b, t, dim)
      else:
        out = out + nn.Conv(dim, (3,), padding="SAME", feature_group_count=dim, name="dwc")(vv)
    return nn.Dense(dim, name="out")(out)


def conv_kernel_init(key, shape, dtype=jnp.float32):
  """Init of a short causal conv kernel [W, C]: normal with std 1/sqrt(W) (fan-in W)."""
  return jax.random.normal(key, shape, dtype) / jnp.sqrt(shape[0]).astype(dtype)


class TitansMemory(nn.Module):
  """Titans' long-term memory as a layer on x [B, T, D] (matrix memory, chunked).

  q, k, v = SiLU(conv(x W)) with conv the paper's short depthwise causal
  convolution (``conv_size`` taps, 0 for none; parameters "conv_query",
  "conv_key", "conv_value" [W, D]; the order projection -> conv -> SiLU is
  our reading, as in the linear recurrent models the paper follows); q and k
  l2-normalised; alpha, theta, eta = sigmoid of per-head linear maps of x;
  y_t = M_t(q_t) then an output Dense.
  """
  num_heads: int
  chunk_size: int = 64
  conv_size: int = 4

  @nn.compact
  def __call__(self, x):
    b, t, dim = x.shape
    n = self.num_heads

    def proj(nm):
      z = nn.Dense(dim, name=nm)(x)
      if self.conv_size:
        z = short_causal_conv(z, self.param(f"conv_{nm}", conv_kernel_init,
                                            (self.conv_size, dim)))[0]
      return _heads(jax.nn.silu(z), n)

    l2 = lambda z: z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + 1e-6)
    q, k, v = l2(proj("query")), l2(proj("key")), proj("value")
    alpha, theta, eta = (jax.nn.sigmoid(nn.Dense(n, name=nm)(x)) for nm in ("alpha", "theta", "eta"))
    y = linear_memory(q, k, v, alpha, theta, eta, chunk_size=self.chunk_size)
    return nn.Dense(dim, name="out")(y.reshape(b, t, dim))


class SlidingWindowBlock(nn.Module):
  """Causal sliding-window softmax attention on x [B, T, D] (projections + banded op).

  With ``num_sink`` > 0 the first ``num_sink`` positions stay visible to
  every query (Titans' SW-Attn* over persistent tokens + x).
  """
  num_heads: int
  window: Tuple[int, int] = (64, 0)
  num_sink: int = 0

  @nn.compact
  def __call__(self, x):
    b, t, dim = x.shape
    q, k, v = (_heads(nn.Dense(dim, name=nm)(x), self.num_heads) for nm in ("query", "key", "value"))
    left, right = window_sides(self.window, True)
    if self.num_sink:
      out = streaming_attention(q, k, v, num_sink=self.num_sink, window=left + 1)
    else:
      out = sliding_window_attention(q, k, v, left=left, right=right, causal=True)
    return nn.Dense(dim, name="out")(out.reshape(b, t, dim))


class _Persistent(nn.Module):
  """Prepends Titans' learnable persistent tokens: x [B, T, D] -> [B, Np + T, D]."""
  num_tokens: int

  @nn.compact
  def __call__(self, x):
    if not self.num_tokens:
      return x
    p = self.param("persistent", nn.initializers.normal(0.02), (self.num_tokens, x.shape[-1]))
    return jnp.concatenate([jnp.broadcast_to(p.astype(x.dtype), (x.shape[0],) + p.shape), x], 1)


class TitansMAG(nn.Module):
  """Memory as a gate on x [B, T, D] -> [B, T, D] (Titans, arXiv:2501.00663).

  x~ = [persistent || x]; y = SW-Attn*(x~) (sliding window, persistent
  tokens always visible); o = LayerNorm(y) * sigmoid(LayerNorm(M(x~))), the
  rows of x kept. The paper writes o = y (x) M(x~) with a non-linear gating
  that normalises both branches with learnable vector-valued weights
  followed by a non-linearity; we read the non-linearity as a sigmoid on the
  memory branch, so the memory gates the attention branch (gate 1 passes
  it, 0 closes it).
  """
  num_heads: int
  window: Tuple[int, int] = (64, 0)
  chunk_size: int = 64
  conv_size: int = 4
  num_persistent: int = 4

  @nn.compact
  def __call__(self, x):
    npst = self.num_persistent
    xt = _Persistent(npst, name="persistent")(x)
    y = SlidingWindowBlock(self.num_heads, self.window, npst, name="attention")(xt)
    m = TitansMemory(self.num_heads, self.chunk_size, self.conv_size, name="memory")(xt)
    o = nn.LayerNorm(name="norm_attention")(y) * jax.nn.sigmoid(nn.LayerNorm(name="norm_memory")(m))
    return o[:, npst:]


class TitansMAL(nn.Module):
  """Memory as a layer on x [B, T, D] -> [B, T, D] (Titans, arXiv:2501.00663).

  x~ = [persistent || x]; h = x~ + M(x~); o = h + SW-Attn(h), the rows of x
  kept: the paper's y = M(x~), o = SW-Attn(y) with the block's residual
  connections written in (plain sliding window, as the paper writes it).
  """
  num_heads: int
  window: Tuple[int, int] = (64, 0)
  chunk_size: int = 64
  conv_size: int = 4
  num_persistent: int = 4

  @nn.compact
  def __call__(self, x):
    xt = _Persistent(self.num_persistent, name="persistent")(x)
    h = xt + TitansMemory(self.num_heads, self.chunk_size, self.conv_size, name="memory")(xt)
    o = h + SlidingWindowBlock(self.num_heads, self.window, name="attention")(h)
    return o[:, self.num_persistent:]


class TNLTokenMixer(nn.Module):
  """TNL's token mixer on x [B, T, D] (TNL, arXiv:2405.17381).

  q, k, v = SiLU(x W_q), SiLU(x W_k), SiLU(x W_v) split into N heads; with
  ``use_lrpe`` q and k get LRPE's relative rotation (doubled features,
  learnable theta [N, H] "lrpe_theta"; see :mod:`attnjax.linear.lightning`);
  o = lightning attention with the layer's decay slopes; SRMSNorm over D; a
  low-rank sigmoid output gate sigmoid((x W_down) W_up); then W_o.

  Decoding: ``initial_state`` [B, N, H (2H with LRPE), H] is the state after
  ``offset`` tokens and ``return_state`` returns the state after x; with
  T == 1 the step runs the recurrence (``linear_attention_step``), so
  feeding tokens one by one reproduces the prefill.
  """
  num_heads: int
  layer_idx: int = 0
  num_layers: int = 1
  chunk_size: int = 64
  use_lrpe: bool = False

  @nn.compact
  def __call__(self, x, initial_state=None, return_state: bool = False, offset=0):
    b, t, dim = x.shape
    n = self.num_heads
    q, k, v = (_heads(jax.nn.silu(nn.Dense(dim, name=nm)(x)), n) for nm in ("query", "key", "value"))
    if self.use_lrpe:
      theta = self.param("lrpe_theta", lambda _, s: jnp.asarray(lrpe_thetas(*s)), (n, dim // n))
      pos = offset + jnp.arange(t)
      q, k = lrpe_rotate(q, theta, pos), lrpe_rotate(k, theta, pos)
    slopes = jnp.asarray(tnl_decay_slopes(n, self.layer_idx, self.num_layers))
    if t == 1:
      o, state = linear_attention_step(initial_state, q[:, 0], k[:, 0], v[:, 0], decay=slopes)
      o = o[:, None]
    else:
      o, state = lightning_attention(q, k, v, slopes=slopes, block_size=self.chunk_size,
                                     initial_state=initial_state, return_state=True)
    o = srms_norm(o.reshape(b, t, dim))
    gate = nn.Dense(dim, name="gate_up")(nn.Dense(dim // n, use_bias=False, name="gate_down")(x))
    out = nn.Dense(dim, name="out")(o * jax.nn.sigmoid(gate))
    return (out, state) if return_state else out


class SGLU(nn.Module):
  """TNL's SGLU channel mixer on x [..., D]: ((x W_u) * (x W_v)) W_o, no activation.

  ``hidden_dim`` F (D when None); no biases, as TNL's code. Parameters
  "u", "v", "out" map onto :func:`attnjax.linear.sglu`'s w_u, w_v, w_o.
  """
  hidden_dim: Optional[int] = None
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    f = self.hidden_dim or x.shape[-1]
    dense = lambda width, nm: nn.Dense(width, use_bias=self.use_bias, name=nm)
    return dense(x.shape[-1], "out")(dense(f, "u")(x) * dense(f, "v")(x))
