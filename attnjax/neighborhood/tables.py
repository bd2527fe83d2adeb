"""Static per-shape tables of the tiled neighborhood path (NATTEN FNA, arXiv:2403.04690).

Tiles are ordered ``(d_1, nt_1, ..., d_D, nt_D)`` and the queries of a tile
``(t_1, ..., t_D)``, as in :func:`attnjax.plan.neighborhood.to_tiles`; union
slots ``(u_1, ..., u_D)``. Index tables are flat row-major token indices,
computed once per static shape with NumPy (cached).
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from attnjax.plan.neighborhood import plans, spread, tile_counts


def _strides(spatial):
  return np.cumprod((1,) + tuple(spatial[::-1]))[:len(spatial)][::-1]


@functools.lru_cache(maxsize=64)
def union_index(plan_key):
  """int32 [G, uk]: token index of every tile's union slots (slots past a
  group's end point at a valid token; the fine mask hides them)."""
  ps = plans(*plan_key)
  D = len(ps)
  out = np.zeros([1] * (2 * D), np.int64)
  for i, (p, stride) in enumerate(zip(ps, _strides(plan_key[0]))):
    shape = [1] * (2 * D)
    shape[i], shape[D + i] = p.d * p.nt, p.u
    out = out + p.key_index.reshape(shape) * int(stride)
  G, _, uk = tile_counts(ps)
  return out.reshape(G, uk).astype(np.int32)


@functools.lru_cache(maxsize=64)
def query_index(plan_key):
  """int32 [G, tq]: token index of every tile query, -1 for padding."""
  ps = plans(*plan_key)
  D = len(ps)
  out = np.zeros([1] * (2 * D), np.int64)
  valid = np.ones([1] * (2 * D), bool)
  for i, (p, stride) in enumerate(zip(ps, _strides(plan_key[0]))):
    g = np.arange(p.d)[:, None, None]
    x = (np.arange(p.nt)[None, :, None] * p.t + np.arange(p.t)) * p.d + g  # [d, nt, t]
    shape = [1] * (2 * D)
    shape[i], shape[D + i] = p.d * p.nt, p.t
    out = out + x.reshape(shape) * int(stride)
    valid = valid & (x < p.n).reshape(shape)
  G, tq, _ = tile_counts(ps)
  return np.where(valid, out, -1).reshape(G, tq).astype(np.int32)


@functools.lru_cache(maxsize=64)
def _mask_classes(plan_key):
  """Tiles share few distinct fine masks (interior tiles all have the same one).

  Returns ``(per_dim, combos, tile_combo)``: per dimension the distinct masks
  bool [n_i, t_i, u_i]; the distinct per-dim combinations int [C, D]; the
  combination of every tile int32 [G].
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
  tile ``g`` uses ``table[tile_combo[g]]``. Built in the traced program from
  the small per-dimension masks (``C`` is 9 for a 2D grid without dilation)."""
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
  out = jnp.broadcast_to(out, (C,) + out.shape[1:]).reshape(C, tq, uk)
  return jnp.where(out, 0.0, -jnp.inf).astype(jnp.float32), jnp.asarray(tile_combo)


def tile_rpb(rpb, ps):
  """rpb [N, 2k1-1, ...] -> bias [G, N, tq, uk] of every tile (float32)."""
  D = len(ps)
  full = []
  for p in ps:
    full += [p.d, p.nt]
  full = tuple(full + [p.t for p in ps] + [p.u for p in ps])
  idx = tuple(jnp.broadcast_to(jnp.asarray(spread(p.rpb_index, i, D)), full)
              for i, p in enumerate(ps))
  G, tq, uk = tile_counts(ps)
  b = rpb.astype(jnp.float32)[(slice(None),) + idx]  # [N, *full]
  return b.reshape(rpb.shape[0], G, tq, uk).transpose(1, 0, 2, 3)
