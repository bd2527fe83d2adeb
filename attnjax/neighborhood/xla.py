"""Tiled pure-JAX neighborhood attention (spec P2-23): cost O(n * prod(t + k - 1)).

Queries are regrouped (heads first, then pad + reshape + transpose) into
multi-dimensional tiles of dilation-group members. Tiles are processed in
chunks: a loop step gathers the union of its tiles' key windows straight from
the flat key/value tokens (static indices), runs one batched matmul per kv
head (the Gq query heads sharing it stacked along the rows), and adds the
static fine mask as a 0/-inf bias looked up per tile from a small table of
the distinct tile masks. The backward is a custom VJP that recomputes the
probabilities per chunk from the saved log-sum-exp (FlashAttention style) and
scatter-adds key/value gradients back to the tokens. Logits never exceed one
chunk; memory and time grow linearly with the number of tokens.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.neighborhood.layout import from_tiles, to_tiles
from attnjax.neighborhood.tiling import plans, spread, tile_counts

__all__ = ["na_xla", "visited_pairs", "to_tiles", "from_tiles", "tile_rpb"]

#: logits elements (float32) per loop step: large enough for efficient batched
#: matmuls, small enough that a step's probabilities stay in cache
CHUNK_ELEMENTS = 1 << 20

_NEG_INF = -jnp.inf


@functools.lru_cache(maxsize=64)
def _mask_classes(plan_key):
  """Tiles share few distinct fine masks (interior tiles all have the same one).

  Returns ``(per_dim, combos, tile_combo)``: per dimension the distinct masks
  bool [n_i, t_i, u_i]; the distinct per-dim combinations int [C, D]; the
  combination of every tile int32 [G] (tiles in the order of ``to_tiles``).
  """
  ps = plans(*plan_key)
  per_dim, ids = [], []
  for p in ps:
    m = p.mask.reshape(p.d * p.nt, p.t * p.u)
    distinct, inv = np.unique(m, axis=0, return_inverse=True)
    per_dim.append(distinct.reshape(-1, p.t, p.u))
    ids.append(inv.reshape(-1))
  grid = np.stack(np.meshgrid(*ids, indexing="ij"), -1).reshape(-1, len(ps))
  combos, tile_combo = np.unique(grid, axis=0, return_inverse=True)
  return tuple(per_dim), combos, tile_combo.reshape(-1).astype(np.int32)


def mask_bias_table(plan_key):
  """(table f32 [C, tq, uk] of 0/-inf fine-mask biases, tile_combo int32 [G]):
  tile ``g`` uses ``table[tile_combo[g]]``."""
  per_dim, combos, tile_combo = _mask_classes(plan_key)
  D = len(per_dim)
  C = combos.shape[0]
  out = None
  for i, m in enumerate(per_dim):
    shape = [C] + [1] * (2 * D)
    shape[1 + i], shape[1 + D + i] = m.shape[1], m.shape[2]
    mi = jnp.asarray(m[combos[:, i]].reshape(shape))
    out = mi if out is None else out & mi
  tq = int(np.prod([m.shape[1] for m in per_dim]))
  uk = int(np.prod([m.shape[2] for m in per_dim]))
  table = jnp.where(jnp.broadcast_to(out, (C,) + out.shape[1:]).reshape(C, tq, uk),
                    0.0, _NEG_INF).astype(jnp.float32)
  return table, jnp.asarray(tile_combo)


def tile_rpb(rpb, ps):
  """rpb [N, 2k1-1, ...] -> bias [G, N, tq, uk] of every tile (float32)."""
  D = len(ps)
  full = _full_shape(ps)
  idx = tuple(jnp.broadcast_to(jnp.asarray(spread(p.rpb_index, i, D)), full)
              for i, p in enumerate(ps))
  G, tq, uk = tile_counts(ps)
  b = rpb.astype(jnp.float32)[(slice(None),) + idx]  # [N, *full]
  return b.reshape(rpb.shape[0], G, tq, uk).transpose(1, 0, 2, 3)


def _full_shape(ps):
  shape = []
  for p in ps:
    shape += [p.d, p.nt]
  return tuple(shape + [p.t for p in ps] + [p.u for p in ps])


def _ds(x, start, size, axis):
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _dus(x, update, start, axis):
  return jax.lax.dynamic_update_slice_in_dim(x, update.astype(x.dtype), start, axis)


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


@functools.lru_cache(maxsize=64)
def _union_index(plan_key):
  """int32 [G, uk]: flat (row-major) token index of every tile's union slots
  (slots past a group's end point at a valid token; the fine mask hides them)."""
  ps = plans(*plan_key)
  spatial = plan_key[0]
  D = len(ps)
  strides = np.cumprod((1,) + tuple(spatial[::-1]))[:D][::-1]
  out = np.zeros([1] * (2 * D), np.int64)
  for i, p in enumerate(ps):
    shape = [1] * (2 * D)
    shape[i], shape[D + i] = p.d * p.nt, p.u
    out = out + (p.key_index.reshape(shape) * int(strides[i]))
  G, _, uk = tile_counts(ps)
  return out.reshape(G, uk).astype(np.int32)


class _Cfg(NamedTuple):
  plan_key: tuple  # (spatial, kernel, dilation, causal, tile)
  scale: float


class _Tiles(NamedTuple):
  """Static per-call tile tables: union token indices and fine-mask biases."""
  index: jax.Array  # int32 [G, uk]
  table: jax.Array  # f32 [C, tq, uk]
  combo: jax.Array  # int32 [G]

  @classmethod
  def build(cls, plan_key):
    table, combo = mask_bias_table(plan_key)
    return cls(jnp.asarray(_union_index(plan_key)), table, combo)


def _chunk_size(qt, uk):
  B, K, G, Gq, tq, _ = qt.shape
  return int(max(1, min(G, CHUNK_ELEMENTS // (B * K * Gq * tq * uk))))


def _gather(x, tiles, start, size):
  """x [B, K, L, c] -> the unions of tiles [start, start + size): [B, K, size, uk, c]."""
  idx = _ds(tiles.index, start, size, 0)
  y = x.at[:, :, idx.reshape(-1)].get(mode="promise_in_bounds")
  return y.reshape(x.shape[:2] + idx.shape + x.shape[3:])


def _step_inputs(qt, kf, tiles, bias, start, size, scale):
  """Tiles [start, start + size): q [B, K, c, M, H], k [B, K, c, uk, H] and the
  masked scaled logits [B, K, c, Gq, tq, uk]."""
  B, K, _, Gq, tq, H = qt.shape
  q = _ds(qt, start, size, 2).reshape(B, K, size, Gq * tq, H)
  k = _gather(kf, tiles, start, size)
  s = jnp.einsum("bkcmh,bkcuh->bkcmu", q, k, preferred_element_type=jnp.float32)
  s = s.reshape(B, K, size, Gq, tq, -1) * scale
  s = s + jnp.take(tiles.table, _ds(tiles.combo, start, size, 0), axis=0)[:, None]
  if bias is not None:  # [K, G, Gq, tq, uk]
    s = s + _ds(bias, start, size, 1)[None]
  return q, k, s


def _forward(qt, kf, vf, bias, cfg):
  tiles = _Tiles.build(cfg.plan_key)
  B, K, G, Gq, tq, _ = qt.shape
  uk = tiles.index.shape[1]
  Hv = vf.shape[-1]

  def step(start, size, carry):
    o, lse = carry
    _, _, s = _step_inputs(qt, kf, tiles, bias, start, size, cfg.scale)
    mx = jnp.max(s, axis=-1, keepdims=True)
    mx = jnp.where(mx > _NEG_INF, mx, 0.0)
    p = jnp.exp(s - mx)
    l = jnp.sum(p, axis=-1, keepdims=True)
    ok = l > 0
    lse_ = jnp.where(ok, mx + jnp.log(jnp.where(ok, l, 1.0)), _NEG_INF)[..., 0]
    v = _gather(vf, tiles, start, size)
    # normalise after the PV matmul: one pass less over the logits
    o_ = jnp.einsum("bkcmu,bkcuh->bkcmh", p.reshape(B, K, size, Gq * tq, uk).astype(v.dtype),
                    v, preferred_element_type=jnp.float32)
    o_ = o_.reshape(B, K, size, Gq, tq, Hv) / jnp.where(ok, l, 1.0)
    return _dus(o, o_, start, 2), _dus(lse, lse_, start, 2)

  init = (jnp.zeros((B, K, G, Gq, tq, Hv), jnp.float32),
          jnp.zeros((B, K, G, Gq, tq), jnp.float32))
  return _chunked(step, G, _chunk_size(qt, uk), init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(qt, kf, vf, bias, cfg):
  """Tiled attention core.

  qt [B, K, G, Gq, tq, H] (query tiles), kf [B, K, L, H], vf [B, K, L, Hv]
  (flat tokens), bias None or [K, G, Gq, tq, uk]
  -> (o [B, K, G, Gq, tq, Hv] f32, lse [B, K, G, Gq, tq] f32).
  """
  return _forward(qt, kf, vf, bias, cfg)


def _attend_fwd(qt, kf, vf, bias, cfg):
  o, lse = _forward(qt, kf, vf, bias, cfg)
  return (o, lse), (qt, kf, vf, bias, o, lse)


def _attend_bwd(cfg, res, cts):
  qt, kf, vf, bias, o, lse = res
  do, dlse = cts
  tiles = _Tiles.build(cfg.plan_key)
  B, K, G, Gq, tq, H = qt.shape
  uk = tiles.index.shape[1]
  Hv = vf.shape[-1]
  M = Gq * tq
  # d lse / d s = p: an lse cotangent shifts delta, ds = p * (dp - delta + dlse)
  delta = jnp.sum(o * do, axis=-1) - dlse  # [B, K, G, Gq, tq]
  lse = jnp.where(lse > _NEG_INF, lse, 0.0)
  do = do.astype(jnp.float32)

  def scatter(acc, upd, start, size):  # [B, K, c, uk, h] added into [B, K, L, h]
    idx = _ds(tiles.index, start, size, 0).reshape(-1)
    return acc.at[:, :, idx].add(upd.reshape(B, K, size * uk, -1),
                                 mode="promise_in_bounds")

  def step(start, size, carry):
    dq, dk, dv, db = carry
    q, k, s = _step_inputs(qt, kf, tiles, bias, start, size, cfg.scale)
    p = jnp.exp(s - _ds(lse, start, size, 2)[..., None])  # [B, K, c, Gq, tq, uk]
    do_ = _ds(do, start, size, 2).reshape(B, K, size, M, Hv)
    v = _gather(vf, tiles, start, size)
    dp = jnp.einsum("bkcmh,bkcuh->bkcmu", do_, v, preferred_element_type=jnp.float32)
    ds = p * (dp.reshape(p.shape) - _ds(delta, start, size, 2)[..., None])
    p = p.reshape(B, K, size, M, uk)
    dv_ = jnp.einsum("bkcmu,bkcmh->bkcuh", p, do_, preferred_element_type=jnp.float32)
    if db is not None:
      db = _dus(db, jnp.sum(ds, axis=0), start, 1)
    ds = ds.reshape(B, K, size, M, uk)
    dq_ = jnp.einsum("bkcmu,bkcuh->bkcmh", ds.astype(k.dtype), k,
                     preferred_element_type=jnp.float32) * cfg.scale
    dk_ = jnp.einsum("bkcmu,bkcmh->bkcuh", ds.astype(q.dtype), q,
                     preferred_element_type=jnp.float32) * cfg.scale
    return (_dus(dq, dq_.reshape(B, K, size, Gq, tq, H), start, 2),
            scatter(dk, dk_, start, size), scatter(dv, dv_, start, size), db)

  init = (jnp.zeros(qt.shape, jnp.float32), jnp.zeros(kf.shape, jnp.float32),
          jnp.zeros(vf.shape, jnp.float32),
          None if bias is None else jnp.zeros(bias.shape, jnp.float32))
  dq, dk, dv, db = _chunked(step, G, _chunk_size(qt, uk), init)
  return (dq.astype(qt.dtype), dk.astype(kf.dtype), dv.astype(vf.dtype),
          None if bias is None else db.astype(bias.dtype))


_attend.defvjp(_attend_fwd, _attend_bwd)


def _heads_first(x):
  """[B, *spatial, h, c] -> [B, h, *spatial, c]."""
  return jnp.moveaxis(x, x.ndim - 2, 1)


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
  N, H = query.shape[-2:]
  K, Hv = value.shape[-2:]
  Gq = N // K
  G, tq, uk = tile_counts(ps)
  # heads lead, tiles next: a chunk of tiles is one batched matmul per kv
  # head, the Gq query heads sharing a kv head stacked along its rows
  qt = to_tiles(_heads_first(query).reshape((B * N,) + spatial + (H,)), ps)
  qt = qt.reshape(B, K, Gq, G, tq, H).transpose(0, 1, 3, 2, 4, 5)
  kf = _heads_first(key).reshape(B, K, -1, H)
  vf = _heads_first(value).reshape(B, K, -1, Hv)
  bias = None
  if rpb is not None:
    bias = tile_rpb(rpb, ps).reshape(G, K, Gq, tq, uk).transpose(1, 0, 2, 3, 4)
  o, lse = _attend(qt, kf, vf, bias, _Cfg(plan_key, float(scale)))
  o = o.transpose(0, 1, 3, 2, 4, 5).reshape(B * N, G, tq, Hv)
  o = from_tiles(o, ps).reshape((B, N) + spatial + (Hv,))
  lse = from_tiles(lse.transpose(0, 1, 3, 2, 4).reshape(B * N, G, tq), ps)
  lse = lse.reshape((B, N) + spatial)
  return jnp.moveaxis(o, 1, D + 1).astype(query.dtype), jnp.moveaxis(lse, 1, D + 1)


def visited_pairs(spatial_shape, kernel_size, dilation, is_causal, tile_shape) -> int:
  """Number of (query, key) pairs the tiled path computes (padding included)."""
  ps = plans(tuple(spatial_shape), kernel_size, dilation, is_causal, tile_shape)
  G, tq, uk = tile_counts(ps)
  return G * tq * uk
