"""Combiner-Axial and Combiner-Mixture (Ren et al., NeurIPS 2021; arXiv:2107.05768): causal, O(L sqrt L).

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

Combiner-Mixture (the released code's causal ``axial_mixture_unidir``) adds,
for every earlier row a' < a, two more regions in the same softmax: that
row's part left of column c {(a', c') : c' < c} and its part right of it
{(a', c') : c' > c}, pooled and summarised the same way along the row
(cumulative from the left, and from the right). Earlier positions are then
reached along two paths each, a mixture of the two factorizations.

Shapes inside: rows R = T / s, queries and keys as [B, R, s, N, H] (KV heads
repeated to the N query heads).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -jnp.inf
_HI = jax.lax.Precision.HIGHEST


def _exclusive_prefix_pool(x, pool, axis=1, reverse=False):
  """x [B, R, s, N, H] -> at index i, the pool of x over indices < i along ``axis``
  (> i with ``reverse``); the first index gets zeros (an empty region, never used)."""
  if reverse:
    return jnp.flip(_exclusive_prefix_pool(jnp.flip(x, axis), pool, axis), axis)
  if pool == "max":
    acc = jax.lax.cummax(x, axis=axis)
  else:
    count = jnp.arange(1, x.shape[axis] + 1, dtype=x.dtype)
    acc = jnp.cumsum(x, axis=axis) / count.reshape((-1,) + (1,) * (x.ndim - 1 - axis))
  first = jnp.zeros_like(jax.lax.slice_in_dim(acc, 0, 1, axis=axis))
  return jnp.concatenate([first, jax.lax.slice_in_dim(acc, 0, x.shape[axis] - 1, axis=axis)],
                         axis=axis)


def _region_summary(q_reg, k, v, member, spec):
  """Softmax of pooled region queries over region members, and the summaries.

  ``spec`` = (logits einsum, summary einsum); member: bool broadcastable to
  the logits. Empty regions get zero weights and zero summaries (never used).
  """
  lg = jnp.einsum(spec[0], q_reg, k, precision=_HI)
  lg = jnp.where(member, lg, _NEG_INF)
  m = jnp.max(lg, axis=-1, keepdims=True)
  w = jnp.exp(lg - jnp.where(jnp.isfinite(m), m, 0.0))
  w = w / jnp.maximum(w.sum(-1, keepdims=True), 1e-30)
  return w, jnp.einsum(spec[1], w, v, precision=_HI)


_COLUMN = ("bacnh,bdcnh->bacnd", "bacnd,bdcnh->bacnh")  # along a column: key rows d
_ROW = ("bacnh,baenh->bacne", "bacne,baenh->bacnh")  # along a row: key columns e


def axial_parts(q, k, v, s: int, pool: str, scale: float, mixture: bool = False):
  """Joint-softmax weights of Combiner-Axial (or -Mixture) and the region summaries.

  Args:
    q, k: float32 [B, T, N, H]; v: float32 [B, T, N, Hv] (heads already matched).

  Returns:
    dict with p_row [B, R, s, N, s] (row prefix, key column c'), p_col
    [B, R, s, N, R] (column above, key row a'), p_reg [B, R, s, N, s] (region
    of column c' above the row), w_reg [B, R, s, N, R] (within-region weight
    of key row a' in the region of column c' above row a, indexed
    [b, a, c', n, a']), summary [B, R, s, N, Hv], lse [B, R, s, N]; with
    ``mixture`` also p_left / p_right [B, R, s, N, R] (the part of row a'
    left / right of the query's column) with their within-region weights
    w_left / w_right [B, R, s, N, s] (indexed [b, a', c, n, c']).
  """
  B, T, N, H = q.shape
  R = T // s
  qr, kr, vr = (x.reshape(B, R, s, N, x.shape[-1]) for x in (q, k, v))
  a, c = jnp.arange(R), jnp.arange(s)
  above = (a[None, :] < a[:, None])[None, :, None, None, :]  # [a, a'] as [1, a, 1, 1, a']
  # Regions "column c' above row a": pooled down the column.
  w, summary = _region_summary(_exclusive_prefix_pool(qr, pool) * scale, kr, vr, above, _COLUMN)
  # Joint softmax of query (a, c): row prefix, column above, other columns' regions.
  l_row = jnp.einsum(_ROW[0], qr, kr, precision=_HI) * scale
  l_row = jnp.where((c[None, :] <= c[:, None])[None, None, :, None, :], l_row, _NEG_INF)
  l_col = jnp.einsum(_COLUMN[0], qr, kr, precision=_HI) * scale
  l_col = jnp.where(above, l_col, _NEG_INF)
  l_reg = jnp.einsum(_ROW[0], qr, _exclusive_prefix_pool(kr, pool), precision=_HI) * scale
  reg_ok = (c[None, :] != c[:, None])[None, :, :] & (a > 0)[:, None, None]  # [a, c, c']
  l_reg = jnp.where(reg_ok[None, :, :, None, :], l_reg, _NEG_INF)
  logits = [l_row, l_col, l_reg]
  out = dict(w_reg=w, summary=summary)
  if mixture:
    # Regions "row a' left (right) of column c": pooled along the row.
    for name, rev in (("left", False), ("right", True)):
      side = (c[None, :] > c[:, None]) if rev else (c[None, :] < c[:, None])  # [c, c']
      w_s, summ_s = _region_summary(_exclusive_prefix_pool(qr, pool, 2, rev) * scale, kr, vr,
                                    side[None, None, :, None, :], _ROW)
      k_s = _exclusive_prefix_pool(kr, pool, 2, rev)
      l_s = jnp.einsum(_COLUMN[0], qr, k_s, precision=_HI) * scale
      empty = (c == (s - 1)) if rev else (c == 0)  # no key on that side of the column
      l_s = jnp.where(above & ~empty[None, None, :, None, None], l_s, _NEG_INF)
      logits.append(l_s)
      out.update({f"w_{name}": w_s, f"summary_{name}": summ_s})
  joint = jnp.concatenate(logits, axis=-1)
  p = jax.nn.softmax(joint, axis=-1)  # the row prefix always holds the query itself
  out.update(p_row=p[..., :s], p_col=p[..., s:s + R], p_reg=p[..., s + R:2 * s + R],
             lse=jax.nn.logsumexp(joint, axis=-1))
  if mixture:
    out.update(p_left=p[..., 2 * s + R:2 * s + 2 * R], p_right=p[..., 2 * s + 2 * R:])
  return out


def axial_output(parts, v):
  """out [B, T, N, Hv] float32 from :func:`axial_parts` and v [B, T, N, Hv]."""
  B, R, s, N, _ = parts["p_row"].shape
  vr = v.reshape(B, R, s, N, v.shape[-1])
  out = (jnp.einsum(_ROW[1], parts["p_row"], vr, precision=_HI)
         + jnp.einsum(_COLUMN[1], parts["p_col"], vr, precision=_HI)
         + jnp.einsum(_ROW[1], parts["p_reg"], parts["summary"], precision=_HI))
  for side in ("left", "right"):
    if f"p_{side}" in parts:  # region (a', side of c): summary stored at [b, a', c]
      out = out + jnp.einsum(_COLUMN[1], parts[f"p_{side}"], parts[f"summary_{side}"],
                             precision=_HI)
  return out.reshape(B, R * s, N, v.shape[-1])


def axial_effective_matrix(parts):
  """P_eff [B, N, T, T]: the weight of key j = (a', c') for query i = (a, c)."""
  p_row, p_col, p_reg, w = parts["p_row"], parts["p_col"], parts["p_reg"], parts["w_reg"]
  B, R, s, N, _ = p_row.shape
  eye_r, eye_s = jnp.eye(R), jnp.eye(s)
  # [b, a, c, n, a', c']
  direct_row = jnp.einsum("bacne,ad->bacnde", p_row, eye_r)
  direct_col = jnp.einsum("bacnd,ce->bacnde", p_col, eye_s)
  peff = direct_row + direct_col + jnp.einsum("bacne,baend->bacnde", p_reg, w)
  for side in ("left", "right"):
    if f"p_{side}" in parts:  # weight p[a, c, a'] x w[a', c, c'] on key (a', c')
      peff = peff + jnp.einsum("bacnd,bdcne->bacnde", parts[f"p_{side}"], parts[f"w_{side}"])
  peff = peff.reshape(B, R * s, N, R * s)
  return jnp.transpose(peff, (0, 2, 1, 3))
