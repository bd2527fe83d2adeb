"""Tiled pure-JAX neighborhood attention (NATTEN FNA, arXiv:2403.04690): cost O(n * prod(t + k - 1)).

Queries are grouped into multi-dimensional tiles of dilation-group members
(:mod:`attnjax.plan.neighborhood`). Tiles are processed in chunks: a loop
step gathers its tiles' queries and the union of their key windows straight
from the token arrays (static index tables, :mod:`attnjax.neighborhood.tables`),
runs one batched matmul per kv head (the Gq query heads sharing it stacked
along the rows), adds the static fine mask as a 0/-inf bias looked up per tile
in a small table of the distinct tile masks, and scatters its outputs back to
the tokens. The backward is a custom VJP that recomputes the probabilities per
chunk from the saved log-sum-exp (FlashAttention style) and scatter-adds the
key/value gradients; the softmax, lse and gradient math is
:mod:`attnjax.core.flash`'s. Logits never exceed one chunk; memory and time grow
linearly with the number of tokens.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from attnjax.core import flash as F
from attnjax.neighborhood.tables import (mask_bias_table, query_index, tile_rpb,
                                         union_index)
from attnjax.plan.neighborhood import from_tiles, plans, tile_counts, to_tiles

__all__ = ["na_xla", "visited_pairs", "step_shape", "to_tiles", "from_tiles", "tile_rpb"]

#: logits elements (float32) per loop step: large enough for efficient batched
#: matmuls, small enough that a step's probabilities stay in cache
CHUNK_ELEMENTS = 1 << 20


class _Cfg(NamedTuple):
  plan_key: tuple  # (spatial, kernel, dilation, causal, tile)
  scale: float
  K: int  # kv heads


class _Tables(NamedTuple):
  """Per-call constants: token indices of tile queries/unions, mask biases."""
  q_get: jax.Array  # int32 [G, tq] (padding -> token 0)
  q_put: jax.Array  # int32 [G, tq] (padding -> L: dropped by scatters)
  k_get: jax.Array  # int32 [G, uk]
  table: jax.Array  # f32 [C, tq, uk]
  combo: jax.Array  # int32 [G]

  @classmethod
  def build(cls, plan_key):
    qi = query_index(plan_key)
    L = 1
    for n in plan_key[0]:
      L *= n
    table, combo = mask_bias_table(plan_key)
    return cls(jnp.asarray(qi.clip(0)), jnp.asarray(qi.clip(-1) % (L + 1)),
               jnp.asarray(union_index(plan_key)), table, combo)


def _ds(x, start, size, axis=0):
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _chunked(step, G, chunk, carry):
  """Runs ``carry = step(start, size, carry)`` over tiles [0, G), static sizes."""
  n, rem = divmod(G, chunk)
  if n == 1:
    carry = step(0, chunk, carry)
  elif n > 1:
    carry = jax.lax.fori_loop(0, n, lambda i, c: step(i * chunk, chunk, c), carry)
  if rem:
    carry = step(n * chunk, rem, carry)
  return carry


def _rows(x, idx, K):
  """x [B, L, h, ...] at token rows idx [c, r] -> [B, K, c, (h // K) * r, ...]."""
  B, h = x.shape[0], x.shape[2]
  c, r = idx.shape
  y = x.at[:, idx.reshape(-1)].get(mode="promise_in_bounds")  # [B, c * r, h, ...]
  y = y.reshape((B, c, r, K, h // K) + x.shape[3:])
  y = jnp.moveaxis(jnp.moveaxis(y, 3, 1), 4, 3)  # [B, K, c, h // K, r, ...]
  return y.reshape((B, K, c, (h // K) * r) + x.shape[3:])


def _put(acc, upd, idx, K, add):
  """Inverse of :func:`_rows`: writes (or adds) upd [B, K, c, (h // K) * r, ...]
  into acc [B, L, h, ...] at token rows idx [c, r]; rows >= L are dropped."""
  B, h = acc.shape[0], acc.shape[2]
  c, r = idx.shape
  u = upd.reshape((B, K, c, h // K, r) + acc.shape[3:])
  u = jnp.moveaxis(jnp.moveaxis(u, 3, 4), 1, 3).reshape((B, c * r, h) + acc.shape[3:])
  at = acc.at[:, idx.reshape(-1)]
  return at.add(u, mode="drop") if add else at.set(u.astype(acc.dtype), mode="drop")


def _chunk_size(B, N, G, tq, uk):
  """Tiles per loop step: at most CHUNK_ELEMENTS logits, preferably a divisor of
  G (a ragged last step compiles to a separate, less efficient program)."""
  cap = int(max(1, min(G, CHUNK_ELEMENTS // (B * N * tq * uk))))
  for c in range(cap, (cap - 1) // 2, -1):
    if G % c == 0:
      return c
  return cap


def _logits(q, k, tabs, bias, start, size, cfg):
  """Tiles [start, start + size): q [B, K, c, M, H], k [B, K, c, uk, H] and the
  masked scaled logits [B, K, c, Gq, tq, uk]."""
  qi = _ds(tabs.q_get, start, size)
  q_ = _rows(q, qi, cfg.K)
  k_ = _rows(k, _ds(tabs.k_get, start, size), cfg.K)
  s = F.dot_nt(q_, k_)
  B, K, c, M, uk = s.shape
  tq = qi.shape[1]
  s = s.reshape(B, K, c, M // tq, tq, uk) * cfg.scale
  # The fine mask is a 0/-inf table; select rather than add, so that a NaN
  # logit of a key outside a query's window does not leak into that query.
  fine = jnp.take(tabs.table, _ds(tabs.combo, start, size), axis=0)[:, None]
  s = jnp.where(fine == F.NEG_INF, F.NEG_INF, s)
  if bias is not None:  # [K, G, Gq, tq, uk]
    s = s + _ds(bias, start, size, 1)[None]
  return q_, k_, s


def _forward(q, k, v, bias, cfg):
  tabs = _Tables.build(cfg.plan_key)
  B, L, N, _ = q.shape
  Hv = v.shape[-1]
  G, tq = tabs.q_get.shape
  uk = tabs.k_get.shape[1]

  def step(start, size, carry):
    o, lse = carry
    _, _, s = _logits(q, k, tabs, bias, start, size, cfg)
    v_ = _rows(v, _ds(tabs.k_get, start, size), cfg.K)
    # the Gq query heads of a kv head stacked along the rows: [B, K, c, Gq * tq, uk]
    o_, lse_ = F.finalize(*F.tile_state(s.reshape(v_.shape[:3] + (-1, uk)), v_))
    qi = _ds(tabs.q_put, start, size)
    return (_put(o, o_, qi, cfg.K, False), _put(lse, lse_[..., 0], qi, cfg.K, False))

  init = (jnp.zeros((B, L, N, Hv), jnp.float32), jnp.zeros((B, L, N), jnp.float32))
  return _chunked(step, G, _chunk_size(B, N, G, tq, uk), init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, bias, cfg):
  """Tiled attention on flat tokens: q [B, L, N, H], k [B, L, K, H], v [B, L, K, Hv],
  bias None or [K, G, Gq, tq, uk] -> (o [B, L, N, Hv] f32, lse [B, L, N] f32)."""
  return _forward(q, k, v, bias, cfg)


def _attend_fwd(q, k, v, bias, cfg):
  o, lse = _forward(q, k, v, bias, cfg)
  return (o, lse), (q, k, v, bias, o, lse)


def _keys_grad(x, w):
  """x [..., M, h], w [..., M, u] -> w^T x [..., u, h] (float32), computed as
  (x^T w)^T: the transposes land on the small x and on the result, and the
  product keeps its lhs contracted on the last axis, which XLA:CPU's fast
  matmul path needs (a transposed-lhs product falls back to a slower dot)."""
  xt = jnp.swapaxes(x, -1, -2)
  return jnp.swapaxes(jnp.einsum("...hm,...mu->...hu", xt, w,
                                 preferred_element_type=jnp.float32), -1, -2)


def _attend_bwd(cfg, res, cts):
  q, k, v, bias, o, lse = res
  do, dlse = cts
  tabs = _Tables.build(cfg.plan_key)
  B, L, N, _ = q.shape
  G, tq = tabs.q_get.shape
  uk = tabs.k_get.shape[1]
  K = cfg.K
  delta = F.delta(o, do, dlse)  # [B, L, N]
  # shifted once here: per step, exp(s - lse) is F.probs_from_lse without its select
  lse = F.safe_shift(lse)
  do = do.astype(jnp.float32)

  def step(start, size, carry):
    dq, dk, dv, db = carry
    q_, k_, s = _logits(q, k, tabs, bias, start, size, cfg)
    qi = _ds(tabs.q_get, start, size)
    ki = _ds(tabs.k_get, start, size)
    rows = lambda x: _rows(x, qi, K).reshape(s.shape[:-1] + (1,))
    p = jnp.exp(s - rows(lse))
    do_ = _rows(do, qi, K)  # [B, K, c, M, Hv]
    v_ = _rows(v, ki, K)
    dp = F.dot_nt(do_, v_)
    ds = F.logits_grad(p, dp.reshape(p.shape), rows(delta))
    if db is not None:
      db = jax.lax.dynamic_update_slice_in_dim(db, jnp.sum(ds, axis=0), start, 1)
    p = p.reshape(dp.shape)
    ds = ds.reshape(dp.shape)
    dv_ = _keys_grad(do_, p)
    dq_ = F.dot_nn(ds.astype(k_.dtype), k_) * cfg.scale
    dk_ = _keys_grad(q_, ds.astype(q_.dtype)) * cfg.scale
    return (_put(dq, dq_, _ds(tabs.q_put, start, size), K, False),
            _put(dk, dk_, ki, K, True), _put(dv, dv_, ki, K, True), db)

  init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32),
          jnp.zeros(v.shape, jnp.float32),
          None if bias is None else jnp.zeros(bias.shape, jnp.float32))
  dq, dk, dv, db = _chunked(step, G, _chunk_size(B, N, G, tq, uk), init)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
          None if bias is None else db.astype(bias.dtype))


_attend.defvjp(_attend_fwd, _attend_bwd)


def na_xla(query, key, value, *, kernel_size, dilation, is_causal, scale,
           rpb=None, tile_shape):
  """Tiled neighborhood attention.

  Args:
    query: [B, *spatial, N, H]; key: [B, *spatial, K, H]; value: [B, *spatial, K, Hv].
    kernel_size, dilation, is_causal, tile_shape: normalised per-dim tuples.
    scale: logit scale (a python number, or an array: then folded into the query).
    rpb: optional [N, 2k1-1, ..., 2kD-1] relative position bias.

  Returns:
    (out [B, *spatial, N, Hv] in the query dtype, lse [B, *spatial, N] float32).
  """
  D = query.ndim - 3
  spatial = tuple(query.shape[1:1 + D])
  plan_key = (spatial, tuple(kernel_size), tuple(dilation), tuple(is_causal),
              tuple(tile_shape))
  ps = plans(*plan_key)
  if not isinstance(scale, (int, float)):
    query = (query * scale).astype(query.dtype)
    scale = 1.0
  B = query.shape[0]
  N = query.shape[-2]
  K = value.shape[-2]
  G, tq, uk = tile_counts(ps)
  flat = lambda x: x.reshape((B, -1) + x.shape[-2:])
  bias = None
  if rpb is not None:
    bias = tile_rpb(rpb, ps).reshape(G, K, N // K, tq, uk).transpose(1, 0, 2, 3, 4)
  o, lse = _attend(flat(query), flat(key), flat(value), bias,
                   _Cfg(plan_key, float(scale), K))
  return (o.reshape(query.shape[:-1] + o.shape[-1:]).astype(query.dtype),
          lse.reshape(query.shape[:-1]))


def visited_pairs(spatial_shape, kernel_size, dilation, is_causal, tile_shape) -> int:
  """Number of (query, key) pairs the tiled path computes (padding included)."""
  ps = plans(tuple(spatial_shape), kernel_size, dilation, is_causal, tile_shape)
  G, tq, uk = tile_counts(ps)
  return G * tq * uk


def step_shape(spatial_shape, kernel_size, dilation, is_causal, tile_shape, batch: int,
               heads: int):
  """(matmuls per loop step, rows, union keys) of the tiled path's batched tile
  matmuls for ``heads`` query heads without grouping (one kv head per head)."""
  ps = plans(tuple(spatial_shape), kernel_size, dilation, is_causal, tile_shape)
  G, tq, uk = tile_counts(ps)
  return batch * heads * _chunk_size(batch, heads, G, tq, uk), tq, uk
