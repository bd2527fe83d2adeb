"""GridFormer point-to-grid attention with a per-cell segment softmax (arXiv:2401.02292).

Li et al., "GridFormer: Point-Grid Transformer for Surface Reconstruction" (arXiv:2401.02292).
A plane grid [B, R, R, C] is indexed ``grid[b, y, x]``; point coordinates
``coords2d[..., 0] = x``, ``[..., 1] = y`` are normalised to [0, 1), so point p
falls in cell ``(floor(y R), floor(x R))`` (flat id ``x_cell + R * y_cell``,
as in ConvONet/GridFormer).
"""
from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attnjax.vision._common import check_rank, is_concrete


def segment_softmax(logits, segment_ids, num_segments: int):
  """Softmax over the entries that share a segment id, along axis 0.

  Args:
    logits: [P, ...] float; entries equal to -inf take no weight.
    segment_ids: int [P] in [0, num_segments), or -1 for an entry that takes
      no part (padding; weight 0). Checked when concrete; under jit any id
      outside [0, num_segments) is treated as -1.
    num_segments: static number of segments.

  Returns:
    weights [P, ...] float32; each non-empty segment's weights sum to 1 per
    trailing index; a segment whose logits are all -inf gets zeros (no NaN).
  """
  if segment_ids.ndim != 1 or segment_ids.shape[0] != logits.shape[0]:
    raise ValueError(f"segment_ids must have shape [P]=({logits.shape[0]},), got {segment_ids.shape}.")
  if is_concrete(segment_ids):
    ids = np.asarray(segment_ids)
    if ids.size and (ids.min() < -1 or ids.max() >= num_segments):
      raise ValueError(f"segment_ids must lie in [0, num_segments={num_segments}) or be -1 (excluded), "
                       f"got range [{ids.min()}, {ids.max()}].")
  x = logits.astype(jnp.float32)
  mx = jax.ops.segment_max(x, segment_ids, num_segments)
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
  valid = (segment_ids >= 0) & (segment_ids < num_segments)
  valid = valid.reshape((-1,) + (1,) * (x.ndim - 1))
  safe = jnp.clip(segment_ids, 0, num_segments - 1)
  e = jnp.where(valid, jnp.exp(x - mx[safe]), 0.0)
  denom = jax.ops.segment_sum(e, segment_ids, num_segments)[safe]
  return jnp.where(denom > 0, e / jnp.where(denom > 0, denom, 1.0), 0.0)


def point_cells(coords2d, resolution: int):
  """Cell of each point: coords2d [B, P, 2] in [0, 1) -> (flat id [B, P], offset in the cell [B, P, 2]).

  Checked when concrete; under jit a point outside [0, 1) gets id -1 (it takes
  no part in the attention).
  """
  check_rank("coords2d", coords2d, 3, "[B, P, 2]")
  if coords2d.shape[-1] != 2:
    raise ValueError(f"coords2d must have shape [B, P, 2], got {coords2d.shape}.")
  if is_concrete(coords2d):
    c = np.asarray(coords2d)
    if c.size and (c.min() < 0 or c.max() >= 1):
      raise ValueError(f"coords2d must lie in [0, 1), got range [{c.min()}, {c.max()}]; "
                       "normalise (and pad) the coordinates before calling.")
  scaled = coords2d.astype(jnp.float32) * resolution
  cell = jnp.floor(scaled)
  ij = cell.astype(jnp.int32)
  inside = jnp.all((ij >= 0) & (ij < resolution), axis=-1)
  flat = jnp.where(inside, ij[..., 0] + resolution * ij[..., 1], -1)
  return flat, scaled - cell


def point_to_grid_attention(coords2d, keys, values, grid_q, *, resolution: int,
                            share_channels: int = 8, weight_fn: Optional[Callable] = None,
                            pos_fn: Optional[Callable] = None, point_mask=None):
  """Grouped vector attention of every grid cell over the points inside it.

  ``w_p = weight_fn(k_p - q_cell(p) + pos_p)`` gives C/s weights per point
  (s = share_channels); ``a = softmax`` over the points of the same cell, per
  group; ``F_g = sum_{p in g} a_p * (v_p + pos_p)`` (each group weight covers s
  channels). Empty cells are 0.

  Args:
    coords2d: [B, P, 2] in [0, 1) (x, y).
    keys, values: [B, P, C]; grid_q: [B, R, R, C] with R = resolution.
    share_channels: s, must divide C (8 in GridFormer).
    weight_fn: [..., C] -> [..., C/s] (an MLP in the layer); default: the mean
      of each group of s channels (parameter free).
    pos_fn: [..., 2] (offset inside the cell) -> [..., C]; default: no positional term.
    point_mask: optional bool [B, P]; False points take no part.

  Returns:
    grid [B, R, R, C] float32.
  """
  check_rank("keys", keys, 3, "[B, P, C]")
  check_rank("grid_q", grid_q, 4, "[B, R, R, C]")
  B, P, C = keys.shape
  R = resolution
  if values.shape != keys.shape:
    raise ValueError(f"values must have the keys' shape {keys.shape}, got {values.shape}.")
  if grid_q.shape != (B, R, R, C):
    raise ValueError(f"grid_q must have shape [B, R, R, C]=({B}, {R}, {R}, {C}), got {grid_q.shape}.")
  s = share_channels
  if s < 1 or C % s:
    raise ValueError(f"share_channels must divide C={C}, got {s}.")
  flat, offset = point_cells(coords2d, R)
  if point_mask is not None:
    if point_mask.shape != (B, P):
      raise ValueError(f"point_mask must have shape [B, P]=({B}, {P}), got {point_mask.shape}.")
    flat = jnp.where(point_mask, flat, -1)
  pos = pos_fn(offset) if pos_fn is not None else jnp.zeros((B, P, C), jnp.float32)
  q_flat = grid_q.reshape(B, R * R, C).astype(jnp.float32)
  q_p = jnp.take_along_axis(q_flat, jnp.clip(flat, 0)[..., None], axis=1)
  rel = keys.astype(jnp.float32) - q_p + pos
  if weight_fn is None:
    w = jnp.mean(rel.reshape(B, P, C // s, s), axis=-1)
  else:
    w = weight_fn(rel)
  if w.shape != (B, P, C // s):
    raise ValueError(f"weight_fn must return [B, P, C/s]=({B}, {P}, {C // s}), got {w.shape}.")
  # one softmax over all batches: segment id = b * R^2 + cell, -1 stays excluded.
  ids = jnp.where(flat >= 0, flat + (R * R) * jnp.arange(B)[:, None], -1).reshape(-1)
  a = segment_softmax(w.reshape(B * P, C // s), ids, B * R * R)
  a = jnp.repeat(a, s, axis=-1)
  msg = a * (values.astype(jnp.float32) + pos).reshape(B * P, C)
  out = jax.ops.segment_sum(msg, ids, B * R * R)
  return out.reshape(B, R, R, C)


def sample_grid_bilinear(grid, coords2d):
  """Grid -> point features by bilinear interpolation: grid [B, R, R, C], coords2d [B, P, 2] -> [B, P, C].

  Same convention as ConvONet's ``grid_sample(2 * xy - 1, align_corners=True,
  padding_mode='border')``: coordinate 0 is the centre of the first cell and 1
  the centre of the last one.
  """
  B, R, R2, C = grid.shape
  u = coords2d.astype(jnp.float32) * (jnp.array([R2, R], jnp.float32) - 1.0)
  lo = jnp.clip(jnp.floor(u), 0, jnp.array([R2 - 1, R - 1], jnp.float32))
  frac = jnp.clip(u - lo, 0.0, 1.0)
  x0, y0 = lo[..., 0].astype(jnp.int32), lo[..., 1].astype(jnp.int32)
  x1, y1 = jnp.minimum(x0 + 1, R2 - 1), jnp.minimum(y0 + 1, R - 1)
  flat = grid.reshape(B, R * R2, C).astype(jnp.float32)

  def at(yy, xx):
    return jnp.take_along_axis(flat, (xx + R2 * yy)[..., None], axis=1)
  fx, fy = frac[..., 0:1], frac[..., 1:2]
  return ((1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x1))
          + fy * ((1 - fx) * at(y1, x0) + fx * at(y1, x1)))


class _MLP(nn.Module):
  hidden: int
  out: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.out)(nn.relu(nn.Dense(self.hidden)(x)))


class PointGridAttention(nn.Module):
  """GridFormer point->grid attention on one plane.

  ``__call__(coords2d [B, P, 2], point_feats [B, P, Cp], grid [B, R, R, C],
  point_mask=None) -> grid [B, R, R, C]``: q = conv_q(grid) (1x1), k = W_k c,
  v = MLP_v(c), pos = MLP_pos(offset), w = MLP_w(k - q + pos) with C/s
  outputs, then ``relu(conv3x3(F)) + conv1x1(grid)``. The 1x1 query conv and
  the MLP widths are our choices (not confirmed against the released code).
  """
  share_channels: int = 8

  @nn.compact
  def __call__(self, coords2d, point_feats, grid, point_mask=None):
    C = grid.shape[-1]
    R = grid.shape[1]
    q = nn.Conv(C, (1, 1), name="conv_q")(grid)
    k = nn.Dense(C, name="w_k")(point_feats)
    v = _MLP(C, C, name="mlp_v")(point_feats)
    out = point_to_grid_attention(
        coords2d, k, v, q, resolution=R, share_channels=self.share_channels,
        weight_fn=_MLP(C // self.share_channels, C // self.share_channels, name="mlp_w"),
        pos_fn=_MLP(C, C, name="mlp_pos"), point_mask=point_mask)
    return nn.relu(nn.Conv(C, (3, 3), name="conv_out")(out)) + nn.Conv(C, (1, 1), name="residual")(grid)
