"""Combiner: direct local attention plus attention to region abstractions (Ren et al., NeurIPS 2021; arXiv:2107.05768).

"Combiner: Full Attention Transformer with Sparse Computation Cost".

The paper's four patterns: "fixed" (below), "axial" and "mixture"
(:mod:`attnjax.dynamic.combiner_axial`), "logsparse"
(:mod:`attnjax.dynamic.combiner_logsparse`, which states the span rule the
project chose).

Combiner-Fixed:

The sequence is cut into segments of ``segment_len`` tokens. Query i in
segment g attends directly to its own segment (its causal prefix when
causal) and to one abstraction per other (causal: strictly earlier) segment
r, all in one joint softmax. Region r's key is ``k_r = pool(k_j, j in r)``
and its value the local summary ``s_r = sum_j softmax_j(q_r . k_j) v_j`` with
``q_r = pool(q_j, j in r)``. Every visible position j then gets the weight
``P(region of j | i) * softmax_j(q_r . k_j) > 0``: full support at
O(L (s + L / s)) cost. The two parts are exact softmaxes over disjoint
logit sets, merged through their log-sum-exps.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.core import validation as V
from attnjax.core.merge import merge_attention
from attnjax.dynamic import combiner_axial as AX
from attnjax.dynamic import combiner_logsparse as LS
from attnjax.dynamic.gather import layout_attention, masked_softmax_attend
from attnjax.dynamic.select import pool_blocks

__all__ = ["combiner_attention", "combiner_effective_matrix"]


PATTERNS = ("fixed", "axial", "mixture", "logsparse")


def _check(query, key, value, segment_len, pool, causal, scale, pattern):
  """Validated (dims, scale) of a Combiner call."""
  d = V.check_qkv(query, key, value)
  if pattern not in PATTERNS:
    raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}.")
  if d.T != d.S:
    raise NotImplementedError(f"combiner_attention is defined for self-attention only "
                              f"(its pattern has no cross-attention form): T={d.T} must equal S={d.S}.")
  if pattern != "fixed" and not causal:
    raise NotImplementedError(f"pattern={pattern!r} is implemented for causal=True only "
                              "(its regions are parts of the causal past).")
  V.check_positive_int("segment_len", segment_len)
  if d.T % segment_len:
    raise ValueError(f"segment_len={segment_len} must divide the length T={d.T}.")
  if pool not in ("max", "mean"):
    raise ValueError(f"pool must be 'max' or 'mean', got {pool!r}.")
  return d, V.check_scale(scale, d.H)


def _axial(query, key, value, segment_len, pool, scale, d, pattern):
  hi = jnp.arange(d.N) // (d.N // d.K)
  f32 = lambda x: x.astype(jnp.float32)
  v = f32(value)[:, :, hi]
  parts = AX.axial_parts(f32(query), f32(key)[:, :, hi], v, segment_len, pool, scale,
                         mixture=pattern == "mixture")
  return parts, v


def _parts(query, key, value, segment_len, pool, causal, scale):
  d, scale = _check(query, key, value, segment_len, pool, causal, scale, "fixed")
  n = d.T // segment_len
  g = d.N // d.K
  q_r = pool_blocks(query.astype(jnp.float32), segment_len, method=pool)  # [B, n, N, H]
  k_r = pool_blocks(key.astype(jnp.float32), segment_len, method=pool)  # [B, n, K, H]
  # Local summaries: region query q_r over the region's own keys (non-causal).
  ks = jnp.transpose(key.reshape(d.B, n, segment_len, d.K, d.H), (0, 3, 1, 2, 4))
  vs = jnp.transpose(value.reshape(d.B, n, segment_len, d.K, d.Hv), (0, 3, 1, 2, 4))
  hi = jnp.arange(d.N) // g
  qr = jnp.transpose(q_r, (0, 2, 1, 3))[:, :, :, None, :]  # [B, N, n, 1, H]
  summ, _ = masked_softmax_attend(qr, ks[:, hi], vs[:, hi], jnp.ones((1, 1, 1, 1, 1), bool),
                                  scale)
  summ = summ[:, :, :, 0]  # [B, N, n, Hv]
  # Region attention: q_i . k_r over other (earlier) regions, values s_r.
  seg = jnp.arange(d.T) // segment_len
  r = jnp.arange(n)
  vis = (r[None, :] < seg[:, None]) if causal else (r[None, :] != seg[:, None])
  qt = jnp.transpose(query, (0, 2, 1, 3))  # [B, N, T, H]
  kr = jnp.transpose(k_r, (0, 2, 1, 3))[:, hi]  # [B, N, n, H]
  o_reg, lse_reg = masked_softmax_attend(qt, kr, summ, vis[None, None], scale)
  return d, scale, summ, o_reg, lse_reg, vis


def _local(query, key, value, segment_len, causal, scale, implementation, d):
  """Direct part of "fixed" and "logsparse": each segment's (causal) self-attention."""
  n = d.T // segment_len
  diag = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None, None, :, None], (d.B, d.K, n, 1))
  ones = jnp.ones((d.B, d.K, n), jnp.int32)
  return layout_attention(query, key, value, diag, ones, block_q=segment_len,
                          block_kv=segment_len, causal=causal, scale=scale,
                          return_lse=True, implementation=implementation)


def _heads_first(query, key, value, d):
  """float32 q [B, N, T, H], k [B, N, T, H], v [B, N, T, Hv] (KV heads repeated)."""
  hi = jnp.arange(d.N) // (d.N // d.K)
  tr = lambda x: jnp.transpose(x.astype(jnp.float32), (0, 2, 1, 3))
  return tr(query), tr(key)[:, hi], tr(value)[:, hi]


def _logsparse(query, key, value, segment_len, pool, scale, implementation, d):
  o_loc, lse_loc = _local(query, key, value, segment_len, True, scale, implementation, d)
  if LS.num_levels(d.T // segment_len) == 0:  # one segment: dense causal attention
    return o_loc, lse_loc
  q, k, v = _heads_first(query, key, value, d)
  o_reg, lse_reg = LS.region_attention(q, LS.logsparse_regions(q, k, v, segment_len, pool, scale),
                                       scale)
  return merge_attention(o_loc, lse_loc, jnp.transpose(o_reg, (0, 2, 1, 3)).astype(query.dtype),
                         jnp.transpose(lse_reg, (0, 2, 1)))


def combiner_attention(query, key, value, *, segment_len: int, pool: str = "max",
                       causal: bool = True, scale=None, return_lse: bool = False,
                       implementation=None, pattern: str = "fixed"):
  """Combiner attention (patterns "fixed", "axial", "mixture" and "logsparse").

  Args:
    query: [B, T, N, H]; key: [B, T, K, H]; value: [B, T, K, Hv] (self-attention).
    segment_len: s, dividing T (about sqrt(T) in the paper): the segment
      length ("fixed", "logsparse") or the row length ("axial", "mixture");
      "logsparse" with s = 1 is the paper's O(L log L) form.
    pool: region pooling of q and k, "max" (default) or "mean".
    causal: "fixed": direct part = own segment's causal prefix, regions =
      strictly earlier segments; otherwise own segment and every other
      segment. "axial", "mixture" and "logsparse" are causal only.
    implementation: the local part's path ("fixed"; see ``layout_attention``).
    pattern: "fixed" (Combiner-Fixed), "axial" (Combiner-Axial: row prefix
      and column above directly, other columns' parts above as regions) or
      "mixture" (Combiner-Mixture: Axial plus, per earlier row, its parts
      left and right of the query's column as regions) or "logsparse"
      (Combiner-Logsparse: own segment's causal prefix directly, the earlier
      segments in dyadic spans by the binary expansion of the segment index,
      one region each; see :mod:`attnjax.dynamic.combiner_logsparse`).

  Returns:
    out [B, T, N, Hv] (and lse [B, T, N] of the joint softmax).
  """
  if pattern == "logsparse":
    d, scale = _check(query, key, value, segment_len, pool, causal, scale, pattern)
    out, lse = _logsparse(query, key, value, segment_len, pool, scale, implementation, d)
    return (out, lse) if return_lse else out
  if pattern != "fixed":
    d, scale = _check(query, key, value, segment_len, pool, causal, scale, pattern)
    parts, v = _axial(query, key, value, segment_len, pool, scale, d, pattern)
    out = AX.axial_output(parts, v).astype(query.dtype)
    lse = parts["lse"].reshape(d.B, d.T, d.N)
    return (out, lse) if return_lse else out
  _check(query, key, value, segment_len, pool, causal, scale, pattern)
  d, scale, _, o_reg, lse_reg, _ = _parts(query, key, value, segment_len, pool, causal, scale)
  o_loc, lse_loc = _local(query, key, value, segment_len, causal, scale, implementation, d)
  o_reg = jnp.transpose(o_reg, (0, 2, 1, 3)).astype(query.dtype)
  lse_reg = jnp.transpose(lse_reg, (0, 2, 1))
  out, lse = merge_attention(o_loc, lse_loc, o_reg, lse_reg)
  return (out, lse) if return_lse else out


def combiner_effective_matrix(query, key, value, *, segment_len: int, pool: str = "max",
                              causal: bool = True, scale=None, pattern: str = "fixed"):
  """The dense weights P_eff [B, N, T, T] that Combiner applies to V (test oracle).

  ``out == einsum(P_eff, V)``; rows sum to 1; with causal, P_eff[i, j] > 0
  exactly for j <= i.
  """
  if pattern == "logsparse":
    d, scale = _check(query, key, value, segment_len, pool, causal, scale, pattern)
    q, k, v = _heads_first(query, key, value, d)
    return LS.logsparse_effective_matrix(
        q, k, LS.logsparse_regions(q, k, v, segment_len, pool, scale), segment_len, scale)
  if pattern != "fixed":
    d, scale = _check(query, key, value, segment_len, pool, causal, scale, pattern)
    return AX.axial_effective_matrix(
        _axial(query, key, value, segment_len, pool, scale, d, pattern)[0])
  _check(query, key, value, segment_len, pool, causal, scale, pattern)
  d, scale, _, _, lse_reg, vis = _parts(query, key, value, segment_len, pool, causal, scale)
  n = d.T // segment_len
  g = d.N // d.K
  hi = jnp.arange(d.N) // g
  qf = jnp.transpose(query.astype(jnp.float32), (0, 2, 1, 3))
  kf = jnp.transpose(key.astype(jnp.float32), (0, 2, 1, 3))[:, hi]
  logits = jnp.einsum("bnth,bnsh->bnts", qf, kf) * scale
  seg = jnp.arange(d.T) // segment_len
  same = seg[:, None] == seg[None, :]
  direct = same & (jnp.arange(d.T)[None, :] <= jnp.arange(d.T)[:, None]) if causal else same
  q_r = jnp.transpose(pool_blocks(query.astype(jnp.float32), segment_len, method=pool), (0, 2, 1, 3))
  k_r = jnp.transpose(pool_blocks(key.astype(jnp.float32), segment_len, method=pool), (0, 2, 1, 3))[:, hi]
  reg_logits = jnp.einsum("bnth,bnrh->bntr", qf, k_r) * scale
  # Joint normaliser over direct logits and region logits.
  all_logits = jnp.concatenate([jnp.where(direct, logits, -jnp.inf),
                                jnp.where(vis, reg_logits, -jnp.inf)], -1)
  lse = jax.nn.logsumexp(all_logits, -1, keepdims=True)
  p_dir = jnp.where(direct, jnp.exp(logits - lse), 0.0)
  p_reg = jnp.where(vis, jnp.exp(reg_logits - lse), 0.0)  # [B, N, T, n]
  # Within-region weights softmax_j(q_r . k_j) for each key j of region r.
  inner = jnp.einsum("bnrh,bnsh->bnrs", q_r, kf) * scale
  inner = jnp.where(seg[None, None, None, :] == jnp.arange(n)[None, None, :, None], inner, -jnp.inf)
  inner = jax.nn.softmax(inner, -1)  # [B, N, n, T]
  return p_dir + jnp.einsum("bntr,bnrs->bnts", p_reg, inner)
