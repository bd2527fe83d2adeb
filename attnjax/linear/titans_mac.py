"""Titans' memory-as-context layer (MAC; "Titans: Learning to Memorize at Test Time", arXiv:2501.00663).

The sequence is cut into segments of `segment` tokens, processed by a scan
that carries the matrix memory (M, S) [B, N, Dh, Dh] and the tails of the
short causal convolutions. For each segment:
  h = M(q_seg)                                retrieval with the memory at the segment start
  y = attention of the segment over [persistent || h || segment]
      (persistent tokens always visible, h_j and x_j visible iff j <= i)
  (M, S) <- chunked memory update with keys/values from y,   m = M_t(y_t)
  out = (y * sigmoid(m)) W_out.
The memory's q, k, v are SiLU(conv(z W)) with the paper's short depthwise
causal convolution (``conv_size`` taps, 0 for none) running across segment
boundaries (its last inputs are carried), q and k l2-normalised. With a
memory that retrieves nothing (h = 0, M(y) = 0) the output is
(0.5 y) W_out with y the attention over [persistent || zeros || segment].
This is our reading of the paper's Figure/Eq. for MAC; the exact gate and
projection placement could not be confirmed against official code.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from attnjax.core.reference import reference_attention
from attnjax.linear.layers import conv_kernel_init
from attnjax.linear.titans import linear_memory, short_causal_conv


def _l2(x):
  return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)


class TitansMAC(nn.Module):
  """Memory as context on x [B, T, D] -> [B, T, D]; T is padded to a multiple of `segment`."""
  num_heads: int
  segment: int = 64
  num_persistent: int = 4
  conv_size: int = 4

  @nn.compact
  def __call__(self, x):
    b, t, dim = x.shape
    n, c = self.num_heads, self.segment
    dh = dim // n
    init = nn.initializers.lecun_normal()
    w = {nm: self.param(nm, init, (dim, dim)) for nm in
         ("wq", "wk", "wv", "wo", "mem_q", "mem_k", "mem_v", "w_out")}
    w_gates = self.param("w_gates", init, (dim, 3 * n))
    persistent = self.param("persistent", nn.initializers.normal(0.02), (self.num_persistent, dim))
    heads = lambda z: z.reshape(z.shape[:-1] + (n, dh))
    npst = self.num_persistent
    rows = jnp.arange(c)[:, None]
    cols = jnp.arange(npst + 2 * c)[None, :]
    rel = jnp.where(cols < npst, -1, (cols - npst) % c)
    mask = (rel <= rows)[None, None]  # [1, 1, C, Np + 2C]

    wc = max(self.conv_size, 1)
    conv = {nm: (self.param(f"conv_{nm}", conv_kernel_init, (wc, dim)) if self.conv_size
                 else jnp.ones((1, dim))) for nm in ("mem_q", "mem_k", "mem_v")}

    def mem_proj(nm, z, tail):
      """SiLU(conv(z W)) of one segment and the conv's new tail [B, W - 1, D]."""
      out, tail = short_causal_conv(z @ w[nm], conv[nm], tail)
      return heads(jax.nn.silu(out)), tail

    def segment_step(state, xs):
      m_state, s_state, tails = state
      qm, tail_x = mem_proj("mem_q", xs, tails["x"])
      h = jnp.einsum("bcnd,bned->bcne", _l2(qm), m_state).reshape(b, c, dim)
      z = jnp.concatenate([jnp.broadcast_to(persistent, (b, npst, dim)), h, xs], axis=1)
      y = reference_attention(heads(xs @ w["wq"]), heads(z @ w["wk"]), heads(z @ w["wv"]),
                              mask=mask)
      y = y.reshape(b, c, dim) @ w["wo"]
      gates = jax.nn.sigmoid(y @ w_gates).reshape(b, c, 3, n)
      (mq, tq), (mk, tk), (mv, tv) = (mem_proj(nm, y, tails[nm])
                                      for nm in ("mem_q", "mem_k", "mem_v"))
      mem_out, (m_new, s_new) = linear_memory(
          _l2(mq), _l2(mk), mv, gates[:, :, 0], gates[:, :, 1], gates[:, :, 2],
          chunk_size=c, initial_state=(m_state, s_state), return_state=True)
      out = (y * jax.nn.sigmoid(mem_out.reshape(b, c, dim))) @ w["w_out"]
      return (m_new, s_new, {"x": tail_x, "mem_q": tq, "mem_k": tk, "mem_v": tv}), out

    pad = -t % c
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0)))
    segs = jnp.moveaxis(xp.reshape(b, -1, c, dim), 1, 0)
    zeros = jnp.zeros((b, n, dh, dh), jnp.float32)
    tail0 = jnp.zeros((b, wc - 1, dim), jnp.float32)
    tails = {nm: tail0 for nm in ("x", "mem_q", "mem_k", "mem_v")}
    _, out = lax.scan(segment_step, (zeros, zeros, tails), segs)
    return jnp.moveaxis(out, 0, 1).reshape(b, -1, dim)[:, :t].astype(x.dtype)
