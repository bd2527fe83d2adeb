"""Tiled token order of the neighborhood paths (NATTEN FNA, arXiv:2403.04690): pad + reshape + transpose.

A spatial dimension of length ``n`` is padded to ``nt * t * d`` and split into
``(nt, t, d)`` (see :mod:`attnjax.neighborhood.tiling`); tiles are ordered
``(d_1, nt_1, ..., d_D, nt_D)`` and the queries of a tile ``(t_1, ..., t_D)``.
"""
from __future__ import annotations

import jax.numpy as jnp

from attnjax.neighborhood.tiling import tile_counts


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
