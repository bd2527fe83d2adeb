"""Tiled pure-JAX neighborhood attention (spec P2-23): cost O(n * prod(t + k - 1)).

Queries are regrouped (pad + reshape, no gather) into multi-dimensional tiles
of dilation-group members; each tile attends to the gathered union of its
members' windows with a static fine mask. Logits never exceed
``[B, N, n, prod(t + k - 1)]``: memory and time grow linearly with the number
of tokens.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from attnjax.neighborhood.tiling import plans, spread, tile_counts

#: logits elements per chunk of tiles (about 1 MiB of float32: stays in cache)
CHUNK_ELEMENTS = 1 << 18


def to_tiles(x, ps):
  """[B, *spatial, *rest] -> [B, G, tq, *rest] in tiled order (zero padding)."""
  D = len(ps)
  B, rest = x.shape[0], x.shape[1 + D:]
  pad = [(0, 0)] + [(0, p.padded - p.n) for p in ps] + [(0, 0)] * len(rest)
  if any(hi for _, hi in pad):
    x = jnp.pad(x, pad)
  shape = [B]
  for p in ps:
    shape += [p.nt, p.t, p.d]
  x = x.reshape(shape + list(rest))
  # axes: 1 + 3i -> nt_i, 2 + 3i -> t_i, 3 + 3i -> d_i
  perm = [0]
  for i in range(D):
    perm += [3 + 3 * i, 1 + 3 * i]
  perm += [2 + 3 * i for i in range(D)]
  perm += list(range(1 + 3 * D, 1 + 3 * D + len(rest)))
  G, tq, _ = tile_counts(ps)
  return x.transpose(perm).reshape([B, G, tq] + list(rest))


def from_tiles(y, ps):
  """Inverse of :func:`to_tiles`: [B, G, tq, *rest] -> [B, *spatial, *rest]."""
  D = len(ps)
  B, rest = y.shape[0], y.shape[3:]
  shape = [B]
  for p in ps:
    shape += [p.d, p.nt]
  shape += [p.t for p in ps]
  y = y.reshape(shape + list(rest))
  # axes: 1 + 2i -> d_i, 2 + 2i -> nt_i, 1 + 2D + i -> t_i
  perm = [0]
  for i in range(D):
    perm += [2 + 2 * i, 1 + 2 * D + i, 1 + 2 * i]
  perm += list(range(1 + 3 * D, 1 + 3 * D + len(rest)))
  y = y.transpose(perm).reshape([B] + [p.padded for p in ps] + list(rest))
  return y[(slice(None),) + tuple(slice(0, p.n) for p in ps)]


def gather_union(x, ps):
  """[B, *spatial, *rest] -> [B, G, uk, *rest]: each tile's union of key windows."""
  D = len(ps)
  B, rest = x.shape[0], x.shape[1 + D:]
  for i, p in enumerate(ps):
    ax = 1 + 3 * i
    x = jnp.take(x, jnp.asarray(p.key_index.reshape(-1)), axis=ax)
    x = x.reshape(x.shape[:ax] + (p.d, p.nt, p.u) + x.shape[ax + 1:])
  perm = [0]
  for i in range(D):
    perm += [1 + 3 * i, 2 + 3 * i]
  perm += [3 + 3 * i for i in range(D)]
  perm += list(range(1 + 3 * D, 1 + 3 * D + len(rest)))
  G, _, uk = tile_counts(ps)
  return x.transpose(perm).reshape([B, G, uk] + list(rest))


def tile_mask(ps):
  """bool [G, tq, uk] fine mask of every tile, built from small per-dim constants."""
  D = len(ps)
  out = None
  for i, p in enumerate(ps):
    m = jnp.asarray(spread(p.mask, i, D))
    out = m if out is None else out & m
  G, tq, uk = tile_counts(ps)
  return jnp.broadcast_to(out, _full_shape(ps)).reshape(G, tq, uk)


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
  D = len(ps)
  shape = []
  for p in ps:
    shape += [p.d, p.nt]
  return tuple(shape + [p.t for p in ps] + [p.u for p in ps])


def na_xla(query, key, value, *, kernel_size, dilation, is_causal, scale,
           rpb=None, tile_shape):
  """Tiled neighborhood attention.

  Args:
    query: [B, *spatial, N, H]; key: [B, *spatial, K, H]; value: [B, *spatial, K, Hv].
    kernel_size, dilation, is_causal, tile_shape: normalised per-dim tuples.
    scale: logit scale.
    rpb: optional [N, 2k1-1, ..., 2kD-1] relative position bias.

  Returns:
    (out [B, *spatial, N, Hv] in the query dtype, lse [B, *spatial, N] float32).
  """
  D = query.ndim - 3
  spatial = query.shape[1:1 + D]
  ps = plans(spatial, kernel_size, dilation, is_causal, tile_shape)
  N, H = query.shape[-2:]
  K, Hv = value.shape[-2:]
  Gq = N // K
  # Tiles lead (G first) and are processed in cache-sized chunks (lax.map):
  # the [.., tq, uk] logits of a chunk never leave the cache. Heads come
  # before tokens so that every (tile, kv head) is one contiguous matmul, the
  # Gq query heads sharing a kv head stacked along M.
  qt = to_tiles(query, ps)  # [B, G, tq, N, H]
  B, G, tq = qt.shape[:3]
  qt = qt.reshape(B, G, tq, K, Gq, H).transpose(1, 0, 3, 4, 2, 5).reshape(G, B, K, Gq * tq, H)
  kt = gather_union(key, ps).transpose(1, 0, 3, 2, 4)  # [G, B, K, uk, H]
  vt = gather_union(value, ps).transpose(1, 0, 3, 2, 4)
  uk = kt.shape[3]
  mask = tile_mask(ps)  # [G, tq, uk]
  bias = None if rpb is None else tile_rpb(rpb, ps).reshape(G, K, Gq, tq, uk)

  def attend(args):
    q_, k_, v_, m_, b_ = args
    s = jnp.einsum("bkmh,bkuh->bkmu", q_, k_, preferred_element_type=jnp.float32)
    s = s.reshape(B, K, Gq, tq, uk) * scale
    if b_ is not None:
      s = s + b_
    s = jnp.where(m_[None, None, None], s, -jnp.inf)
    mx = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    p = jnp.exp(s - mx)
    l = jnp.sum(p, axis=-1, keepdims=True)
    lse_ = jnp.where(l > 0, mx + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)[..., 0]
    # normalise after the PV matmul: one pass less over the [.., tq, uk] tensor
    o_ = jnp.einsum("bkmu,bkuh->bkmh", p.reshape(B, K, Gq * tq, uk).astype(v_.dtype), v_,
                    preferred_element_type=jnp.float32)
    return o_.reshape(B, K, Gq, tq, Hv) / jnp.where(l > 0, l, 1.0), lse_

  per_tile = B * N * tq * uk
  chunk = int(max(1, min(G, CHUNK_ELEMENTS // per_tile)))
  o, lse = jax.lax.map(attend, (qt, kt, vt, mask, bias), batch_size=chunk)
  o = o.transpose(1, 0, 2, 3, 4, 5)  # [B, G, K, Gq, tq, Hv]
  lse = lse.transpose(1, 0, 2, 3, 4)  # [B, G, K, Gq, tq]
  o = from_tiles(o.transpose(0, 1, 4, 2, 3, 5).reshape(B, G, tq, N, Hv), ps)
  o = o.astype(query.dtype)
  lse = from_tiles(lse.transpose(0, 1, 4, 2, 3).reshape(B, G, tq, N), ps)
  return o, lse


def visited_pairs(spatial_shape, kernel_size, dilation, is_causal, tile_shape) -> int:
  """Number of (query, key) pairs the tiled path computes (padding included)."""
  ps = plans(tuple(spatial_shape), kernel_size, dilation, is_causal, tile_shape)
  G, tq, uk = tile_counts(ps)
  return G * tq * uk
