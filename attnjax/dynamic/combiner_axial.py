"""Combiner-Axial (Ren et al., NeurIPS 2021; spec papers_1.md #4): causal, full support at O(L sqrt L).

The sequence is read as rows of ``s = segment_len`` tokens: position i is
(row a, column c) with i = a * s + c. Query (a, c) attends directly to its
row's causal prefix {(a, c') : c' <= c} and to its column above
{(a', c) : a' < a}. Every other column c' != c contributes one region, the
part of that column above the current row {(a', c') : a' < a}, as a single
abstraction: key ``k_r = pool(k over the region)`` and value the region
summary ``s_r = sum_j softmax_j(q_r . k_j) v_j`` with ``q_r = pool(q over the
region)``. Pooling over a column prefix is a cumulative max (or mean) down
the column, computed once for every row. Direct logits and region logits
share one softmax, so every earlier position gets a positive weight.

Shapes inside: rows R = T / s, queries and keys as [B, R, s, N, H] (KV heads
repeated to the N query heads).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -jnp.inf
_HI = jax.lax.Precision.HIGHEST


def _exclusive_prefix_pool(x, pool):
  """x [B, R, s, N, H] -> pool over rows a' < a at row a (row 0: zeros, never used)."""
  if pool == "max":
    acc = jax.lax.cummax(x, axis=1)
  else:
    acc = jnp.cumsum(x, axis=1) / jnp.arange(1, x.shape[1] + 1, dtype=x.dtype)[:, None, None, None]
  return jnp.concatenate([jnp.zeros_like(acc[:, :1]), acc[:, :-1]], axis=1)


def axial_parts(q, k, v, s: int, pool: str, scale: float):
  """Joint-softmax weights of Combiner-Axial and the region summaries.

  Args:
    q, k: float32 [B, T, N, H]; v: float32 [B, T, N, Hv] (heads already matched).

  Returns:
    dict with p_row [B, R, s, N, s] (row prefix, key column c'), p_col
    [B, R, s, N, R] (column above, key row a'), p_reg [B, R, s, N, s] (region
    of column c'), w_reg [B, R, s, N, R] (within-region weight of key row a'
    in the region of column c' above row a, indexed [b, a, c', n, a']) and
    summary [B, R, s, N, Hv].
  """
  B, T, N, H = q.shape
  R = T // s
  qr, kr, vr = (x.reshape(B, R, s, N, x.shape[-1]) for x in (q, k, v))
  a = jnp.arange(R)
  c = jnp.arange(s)
  # Region summaries: column c' above row a, query/key pooled over the region.
  q_reg = _exclusive_prefix_pool(qr, pool)
  k_reg = _exclusive_prefix_pool(kr, pool)
  above = a[None, :] < a[:, None]  # [a, a'] strictly earlier rows
  lg = jnp.einsum("bacnh,bdcnh->bacnd", q_reg, kr, precision=_HI) * scale
  lg = jnp.where(above[None, :, None, None, :], lg, _NEG_INF)
  m = jnp.max(lg, axis=-1, keepdims=True)
  w = jnp.exp(lg - jnp.where(jnp.isfinite(m), m, 0.0))
  w = w / jnp.maximum(w.sum(-1, keepdims=True), 1e-30)  # row 0: all zero
  summary = jnp.einsum("bacnd,bdcnh->bacnh", w, vr, precision=_HI)
  # Joint softmax of query (a, c): row prefix, column above, other columns' regions.
  l_row = jnp.einsum("bacnh,baenh->bacne", qr, kr, precision=_HI) * scale
  l_row = jnp.where((c[None, :] <= c[:, None])[None, None, :, None, :], l_row, _NEG_INF)
  l_col = jnp.einsum("bacnh,bdcnh->bacnd", qr, kr, precision=_HI) * scale
  l_col = jnp.where(above[None, :, None, None, :], l_col, _NEG_INF)
  l_reg = jnp.einsum("bacnh,baenh->bacne", qr, k_reg, precision=_HI) * scale
  reg_ok = (c[None, :] != c[:, None])[None, :, :] & (a > 0)[:, None, None]  # [a, c, c']
  l_reg = jnp.where(reg_ok[None, :, :, None, :], l_reg, _NEG_INF)
  joint = jnp.concatenate([l_row, l_col, l_reg], axis=-1)
  p = jax.nn.softmax(joint, axis=-1)  # the row prefix always holds the query itself
  return dict(p_row=p[..., :s], p_col=p[..., s:s + R], p_reg=p[..., s + R:], w_reg=w,
              summary=summary, lse=jax.nn.logsumexp(joint, axis=-1))


def axial_output(parts, v):
  """out [B, T, N, Hv] float32 from :func:`axial_parts` and v [B, T, N, Hv]."""
  B, R, s, N, _ = parts["p_row"].shape
  vr = v.reshape(B, R, s, N, v.shape[-1])
  out = (jnp.einsum("bacne,baenh->bacnh", parts["p_row"], vr, precision=_HI)
         + jnp.einsum("bacnd,bdcnh->bacnh", parts["p_col"], vr, precision=_HI)
         + jnp.einsum("bacne,baenh->bacnh", parts["p_reg"], parts["summary"], precision=_HI))
  return out.reshape(B, R * s, N, v.shape[-1])


def axial_effective_matrix(parts):
  """P_eff [B, N, T, T]: the weight of key j = (a', c') for query i = (a, c)."""
  p_row, p_col, p_reg, w = parts["p_row"], parts["p_col"], parts["p_reg"], parts["w_reg"]
  B, R, s, N, _ = p_row.shape
  eye_r, eye_s = jnp.eye(R), jnp.eye(s)
  # [b, a, c, n, a', c']
  direct_row = jnp.einsum("bacne,ad->bacnde", p_row, eye_r)
  direct_col = jnp.einsum("bacnd,ce->bacnde", p_col, eye_s)
  regions = jnp.einsum("bacne,baend->bacnde", p_reg, w)
  peff = (direct_row + direct_col + regions).reshape(B, R * s, N, R * s)
  return jnp.transpose(peff, (0, 2, 1, 3))
