"""Neighborhood attention mask (NATTEN semantics; arXiv:2403.04690) on flattened tokens.

The per-dimension window rule lives here so that the mask (the oracle) and the
fast paths in :mod:`attnjax.neighborhood` share one definition.

For one dimension of length ``n``, kernel size ``k``, dilation ``d`` and causal
flag ``c``, a query at ``x`` and a key at ``y``:

* dilation groups: ``g = x % d``, within-group coordinate ``x' = x // d``,
  group length ``n_g = ceil((n - g) / d)``; keys must share the group;
* non-causal: ``left = k // 2``, ``right = k // 2 + k % 2 - 1``; the window
  centre ``clamp(x', left, n_g - 1 - right)`` shifts inward at borders, so every
  query sees exactly ``k`` keys;
* causal: ``x' - k < y' <= x'`` (no shift: early queries see fewer keys).

The final mask is the AND over dimensions; tokens are flattened row-major.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Tuple

import jax.numpy as jnp
import numpy as np

from attnjax.masks.base import Mask


def _is_int(v) -> bool:
  return not isinstance(v, bool) and isinstance(v, (int, np.integer))


def normalize_per_dim(name: str, value, rank: int, *, boolean: bool = False) -> Tuple:
  """An int/bool or a per-dimension tuple -> a tuple of ``rank`` entries."""
  if isinstance(value, (tuple, list)):
    vals = tuple(value)
    if len(vals) != rank:
      raise ValueError(
          f"{name} must be a single value or a tuple of {rank} values (one per "
          f"spatial dimension), got {value!r} of length {len(vals)}.")
  else:
    vals = (value,) * rank
  for v in vals:
    if boolean:
      if not isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{name} must be bool or a tuple of bools, got {value!r}.")
    elif not _is_int(v):
      raise ValueError(f"{name} must be an int or a tuple of ints, got {value!r}.")
  return tuple(bool(v) for v in vals) if boolean else tuple(int(v) for v in vals)


def check_neighborhood_args(spatial_shape, kernel_size, dilation=1, is_causal=False):
  """Validates and normalises the NA hyper-parameters.

  Returns ``(spatial_shape, kernel_size, dilation, is_causal)`` as tuples of
  equal length; raises ValueError naming the argument otherwise.
  """
  if _is_int(spatial_shape):
    spatial_shape = (spatial_shape,)
  spatial_shape = tuple(spatial_shape)
  if not spatial_shape or not all(_is_int(s) and s >= 1 for s in spatial_shape):
    raise ValueError(
        f"spatial_shape must be a non-empty tuple of positive ints, got {spatial_shape!r}.")
  rank = len(spatial_shape)
  ks = normalize_per_dim("kernel_size", kernel_size, rank)
  ds = normalize_per_dim("dilation", dilation, rank)
  cs = normalize_per_dim("is_causal", is_causal, rank, boolean=True)
  for i, (n, k, d) in enumerate(zip(spatial_shape, ks, ds)):
    if d < 1:
      raise ValueError(f"dilation must be >= 1 in every dimension, got {ds} (dim {i}).")
    if k < 1:
      raise ValueError(f"kernel_size must be >= 1 in every dimension, got {ks} (dim {i}).")
    if k * d > n:
      raise ValueError(
          f"kernel_size * dilation must be <= the spatial extent in every dimension: "
          f"dim {i} has kernel_size {k} * dilation {d} = {k * d} > extent {n} "
          f"(spatial_shape {spatial_shape}).")
  return spatial_shape, ks, ds, cs


def _xp(*arrays):
  """numpy for numpy/python inputs, jax.numpy when any input is a jax array."""
  for a in arrays:
    if not isinstance(a, (np.ndarray, np.generic, int, bool)):
      return jnp
  return np


def group_length(n: int, d: int, g):
  """Number of coordinates in [0, n) congruent to g mod d."""
  return (n - g + d - 1) // d


def window_bounds(x, n: int, k: int, d: int, causal: bool):
  """Window of query coordinate(s) ``x`` in within-group coordinates.

  Returns ``(group, lo, hi)``: the query's dilation group and the half-open
  range ``[lo, hi)`` of within-group key coordinates it attends to. Works on
  NumPy or jax integer arrays.
  """
  xp = _xp(x)
  g = x % d
  xg = x // d
  if causal:
    lo = xp.maximum(xg - k + 1, 0)
    return g, lo, xg + 1
  left = k // 2
  right = k // 2 + k % 2 - 1
  ng = group_length(n, d, g)
  centre = xp.minimum(xp.maximum(xg, left), ng - 1 - right)
  return g, centre - left, centre + right + 1


def dim_predicate(x, y, n: int, k: int, d: int, causal: bool):
  """May query coordinate ``x`` attend to key coordinate ``y`` along one dimension."""
  g, lo, hi = window_bounds(x, n, k, d, causal)
  yg = y // d
  return (y % d == g) & (yg >= lo) & (yg < hi)


def unravel(flat, shape: Sequence[int]):
  """Row-major flat index -> tuple of coordinates (NumPy or jax arrays)."""
  coords = []
  for s in reversed(shape):
    coords.append(flat % s)
    flat = flat // s
  return tuple(reversed(coords))


@dataclasses.dataclass(frozen=True)
class Neighborhood(Mask):
  """NATTEN neighborhood mask over the row-major flattening of ``spatial_shape``.

  Args:
    spatial_shape: token grid, e.g. ``(H, W)``; tokens are flattened row-major.
    kernel_size: int or per-dimension tuple (odd or even).
    dilation: int or per-dimension tuple, >= 1.
    is_causal: bool or per-dimension tuple.

  ``to_dense(L, L)`` with ``L = prod(spatial_shape)`` is the oracle mask of
  :func:`attnjax.neighborhood.neighborhood_attention`. Positions are flat token
  indices (self-attention; the default positions ``arange(L)``).
  """
  spatial_shape: Tuple[int, ...]
  kernel_size: Tuple[int, ...]
  dilation: Tuple[int, ...] = 1
  is_causal: Tuple[bool, ...] = False

  def __post_init__(self):
    shape, ks, ds, cs = check_neighborhood_args(
        self.spatial_shape, self.kernel_size, self.dilation, self.is_causal)
    object.__setattr__(self, "spatial_shape", shape)
    object.__setattr__(self, "kernel_size", ks)
    object.__setattr__(self, "dilation", ds)
    object.__setattr__(self, "is_causal", cs)

  @property
  def num_tokens(self) -> int:
    return int(np.prod(self.spatial_shape))

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    L = self.num_tokens
    qc = unravel(q_pos, self.spatial_shape)
    kc = unravel(k_pos, self.spatial_shape)
    out = (q_pos >= 0) & (q_pos < L) & (k_pos >= 0) & (k_pos < L) & (head == head)
    for x, y, n, k, d, c in zip(qc, kc, self.spatial_shape, self.kernel_size,
                                self.dilation, self.is_causal):
      out = out & dim_predicate(x, y, n, k, d, c)
    return out
