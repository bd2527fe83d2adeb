"""Relative position bias (rpb) of the fused neighborhood kernels (NATTEN; arXiv:2403.04690).

The rpb entry of a (query, key) pair is ``rpb[n, y' - x' + k - 1]`` per
dimension, in within-group coordinates (``attnjax.neighborhood.api.dense_rpb``).
A query block is tile ``j`` and a key block tile ``j'`` of the same dilation
group, so the query at position ``p`` and the key at position ``i`` of their
tiles have the offset ``(j' - j) * t + i - p``: the [tq, tq] bias block of a
visited pair depends only on the per-dimension tile distance ``j' - j``. The
pairs therefore share a few distinct blocks ("classes"; 9 for a 2D grid whose
tiles are at least as wide as the kernel) and the kernels read
``table[n, class(pair)]`` from a small [N, C, tq, tq] table (no in-kernel gather
from the rpb table, memory independent of the number of tokens).

Gradient: the dq kernels write ``dS = p * (dp - delta)`` (the gradient of the
bias-carrying logits) of every visited pair; :func:`table_grad` sums them per
class, and autodiff of the gather in :func:`class_table` scatters the class
gradients into the rpb table.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.plan.neighborhood import plans
from pallas_kernels.neighborhood.plan import block_plan


@dataclasses.dataclass(frozen=True, eq=False)
class BiasPlan:
  """Static bias schedule of a :class:`~pallas_kernels.neighborhood.plan.BlockPlan`.

  Attributes:
    deltas: int [C, D] per-dimension tile distance ``j' - j`` of every class.
    kv_class: int32 [G, max_kv] class of each CSR entry (0 for empty rows).
    q_class: int32 [G, max_q] class of each CSC entry (0 for empty columns).
    pair_slot: int32 [G, max_kv] slot of each CSR entry in the per-pair dS
      output [..., num_slots, tq, tq]: ``row_start + min(s, count - 1)``; each
      row without key blocks gets a spare slot of its own past ``num_pairs``
      (its program writes nothing there; an output block is never revisited).
    pair_class: int32 [num_pairs] class of every visited pair (CSR order).
    num_slots: num_pairs + the number of rows without key blocks.
  """
  deltas: np.ndarray
  kv_class: np.ndarray
  q_class: np.ndarray
  pair_slot: np.ndarray
  pair_class: np.ndarray
  num_slots: int

  @property
  def num_classes(self) -> int:
    return self.deltas.shape[0]

  @property
  def num_pairs(self) -> int:
    return self.pair_class.shape[0]


@functools.lru_cache(maxsize=64)
def bias_plan(spatial_shape, kernel_size, dilation, is_causal, tile_shape) -> BiasPlan:
  """Builds the :class:`BiasPlan` for a static problem (cached)."""
  ps = plans(spatial_shape, kernel_size, dilation, is_causal, tile_shape)
  bp = block_plan(spatial_shape, kernel_size, dilation, is_causal, tile_shape)
  dims = []
  for p in ps:
    dims += [p.d, p.nt]
  # tile coordinate j of every block, per dimension: [G, D]
  tile = np.stack(np.unravel_index(np.arange(bp.num_blocks), dims)[1::2], axis=-1)
  rows = np.arange(bp.num_blocks)
  csr = tile[bp.kv_list] - tile[rows][:, None, :]  # [G, max_kv, D]
  csc = tile[rows][:, None, :] - tile[bp.q_list]  # [G, max_q, D]
  valid = np.arange(bp.kv_list.shape[1])[None, :] < bp.kv_count[:, None]
  pairs = csr[valid]  # CSR order: row-major over (row, s)
  deltas, pair_class = np.unique(pairs.reshape(-1, len(ps)), axis=0, return_inverse=True)
  lookup = {tuple(d): c for c, d in enumerate(deltas.tolist())}
  classify = lambda a, count: np.array(
      [[lookup[tuple(x)] if n else 0 for x in row] for row, n in zip(a.tolist(), count)],
      np.int32).reshape(a.shape[:2])
  starts = np.concatenate([[0], np.cumsum(bp.kv_count)[:-1]])
  s = np.arange(bp.kv_list.shape[1])[None, :]
  last = np.maximum(bp.kv_count[:, None] - 1, 0)
  num_pairs = int(bp.kv_count.sum())
  spare = num_pairs + np.cumsum(bp.kv_count == 0) - 1
  pair_slot = np.where(bp.kv_count[:, None] > 0, starts[:, None] + np.minimum(s, last),
                       spare[:, None])
  return BiasPlan(deltas.astype(np.int64), classify(csr, bp.kv_count),
                  classify(csc, bp.q_count), pair_slot.astype(np.int32),
                  pair_class.reshape(-1).astype(np.int32),
                  num_pairs + int(np.sum(bp.kv_count == 0)))


def class_table(rpb, plan_key, bplan: BiasPlan):
  """rpb [N, 2k1-1, ..., 2kD-1] -> table float32 [N, C, tq, tq] (differentiable).

  ``table[n, c, p, i]`` is the bias between query ``p`` and key ``i`` (tile
  positions, row-major over dimensions) of a pair of class ``c``; entries of
  out-of-window pairs are clipped indices, removed by the kernels' fine mask.
  """
  ps = plans(*plan_key)
  D = len(ps)
  C = bplan.num_classes
  full = (C,) + tuple(p.t for p in ps) * 2
  idx = []
  for d, p in enumerate(ps):
    pos = np.arange(p.t)
    off = (bplan.deltas[:, d, None, None] * p.t + pos[None, None, :] - pos[None, :, None]
           + p.k - 1)  # [C, t (query), t (key)]
    shape = [C] + [1] * (2 * D)
    shape[1 + d], shape[1 + D + d] = p.t, p.t
    off = np.clip(off, 0, 2 * p.k - 2).reshape(shape)
    idx.append(jnp.asarray(np.broadcast_to(off, full).astype(np.int32)))
  tq = int(np.prod([p.t for p in ps]))
  table = rpb.astype(jnp.float32)[(slice(None),) + tuple(idx)]
  return table.reshape(rpb.shape[0], C, tq, tq)


def table_grad(ds_pairs, bplan: BiasPlan):
  """Per-pair dS [B, N, num_slots, tq, tq] -> d table float32 [N, C, tq, tq]."""
  ds = jnp.sum(ds_pairs[:, :, :bplan.num_pairs], axis=0)  # [N, P, tq, tq]
  out = jax.ops.segment_sum(jnp.moveaxis(ds, 1, 0), jnp.asarray(bplan.pair_class),
                            num_segments=bplan.num_classes)
  return jnp.moveaxis(out, 0, 1)
