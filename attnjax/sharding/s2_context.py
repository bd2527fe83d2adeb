"""S2-Attention head-sharded context parallelism (Lin, Zhang et al.; arXiv:2407.17678).

"Efficient LLM Training and Serving with Heterogeneous Context Sharding among
Attention Heads".

S2 is one instance of the static-mask exchange of
:func:`attnjax.sharding.context_parallel_block_sparse`: the sequence is split
into contiguous chunks over the ``context`` axis and the heads over ``heads``
(the plan's head shards). With an S2 mask each KV head needs, from a remote
chunk, only the key blocks of its own stride residue class plus the local
band that crosses the chunk boundary; the plan
(:func:`attnjax.sharding.block_sparse_context_plan`) sends exactly those, per
KV head, so a device receives about ``1 / vert_stride`` of the remote keys
(plus the band) instead of an all-gather. The functions here keep the S2
route's names and argument spelling: mesh axes named ``"data"``, ``"heads"``
and ``"context"`` are used when the mesh has them.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional

from jax.sharding import Mesh

from attnjax.sharding.block_sparse_context import context_parallel_block_sparse
from attnjax.sharding.block_sparse_plan import (BlockSparseContextPlan,
                                                block_sparse_context_plan, communication_report)
from attnjax.sharding.context_parallel import context_parallel_family


def _axis(mesh: Mesh, name: Optional[str]):
  return name if name is not None and name in mesh.axis_names else None


def context_parallel_attention(query, key, value, mask, mesh: Mesh, *, scale=None,
                               implementation=None, data_axis: Optional[str] = "data",
                               heads_axis: Optional[str] = "heads",
                               context_axis: str = "context", block_size: Optional[int] = None,
                               segment_ids=None, q_positions=None, k_positions=None):
  """Self-attention with a static mask, the sequence split over ``context_axis``.

  :func:`context_parallel_block_sparse` with the contiguous assignment, the
  heads split over ``heads_axis`` and the batch over ``data_axis`` (each used
  only when the mesh has it).

  Args:
    query: [B, T, N, H]; key: [B, T, K, H]; value: [B, T, K, Hv] (global
      arrays; sharded here as P(data, context, heads, None)).
    mask: a static ``attnjax.masks.Mask`` (e.g. ``attnjax.masks.S2``).
    mesh: a Mesh containing ``context_axis`` (and optionally the others).
    scale: logit scale (default 1/sqrt(H)).
    implementation: None, "xla" or "reference" (the block-sparse XLA engine
      inside ``shard_map``), or "pallas" (the Pallas kernels on block lists).
    block_size: exchange block (default the mask's ``block_size`` when it
      divides T / C).
    segment_ids: optional int [B, T] document ids (packed sequences): a query
      sees only keys of its own document.
    q_positions, k_positions: optional concrete positions [T] (see
      :func:`context_parallel_block_sparse`).

  Returns:
    out [B, T, N, Hv], equal to dense attention with ``mask``.
  """
  if context_axis not in mesh.axis_names:
    raise ValueError(f"mesh axes {mesh.axis_names} lack the context axis {context_axis!r}.")
  if implementation not in (None, "xla", "reference", "pallas"):
    raise ValueError(f"implementation must be None, 'xla', 'reference' or 'pallas', got "
                     f"{implementation!r}.")
  return context_parallel_block_sparse(
      query, key, value, mask=mask, mesh=mesh, axis=context_axis,
      head_axis=_axis(mesh, heads_axis), data_axis=_axis(mesh, data_axis),
      block_size=block_size, scale=scale, segment_ids=segment_ids, q_positions=q_positions,
      k_positions=k_positions, implementation="pallas" if implementation == "pallas" else None)


def make_plan(mask, seq_len: int, num_heads: int, num_kv_heads: int, num_chunks: int,
              head_shards: int = 1, block_size: Optional[int] = None) -> BlockSparseContextPlan:
  """Deprecated: the S2 plan is ``block_sparse_context_plan`` (contiguous assignment)."""
  warnings.warn("attnjax.sharding.make_plan is deprecated: S2 runs on the block-sparse context "
                "plan; call block_sparse_context_plan(mask, seq_len, num_heads, num_kv_heads, "
                "num_shards, head_shards, block_size).", DeprecationWarning, stacklevel=2)
  return block_sparse_context_plan(mask, seq_len, num_heads, num_kv_heads, num_chunks,
                                   head_shards, block_size)


def communication_bytes(mask, *, batch: int, seq_len: int, num_heads: int, num_kv_heads: int,
                        head_dim: int, value_dim: Optional[int] = None, num_chunks: int,
                        head_shards: int = 1, itemsize: int = 2,
                        block_size: Optional[int] = None) -> Dict[str, float]:
  """Bytes of K/V each device receives vs an all-gather of the full K/V.

  ``communication_report`` of the plan for ``num_chunks`` contiguous context
  shards and ``head_shards`` head shards: ``allgather_bytes`` ((C-1)/C of the
  local heads' K/V), ``needed_bytes_max`` / ``needed_bytes_mean`` (valid
  blocks only), ``transferred_bytes`` (receive buffers, padding included),
  their ratios to the all-gather and the work balance.
  """
  plan = block_sparse_context_plan(mask, seq_len, num_heads, num_kv_heads, num_chunks,
                                   head_shards, block_size, batch=batch)
  return communication_report(plan, batch=batch, head_dim=head_dim, value_dim=value_dim,
                              itemsize=itemsize)


def s2_family_for_mesh(mesh: Mesh, *, data_axis: Optional[str] = "data",
                       heads_axis: Optional[str] = "heads", context_axis: str = "context"):
  """An attention family (registry signature) running S2 context-parallel on ``mesh``.

  ``context_parallel_family("s2", mesh, ...)`` with the mesh's ``"data"`` and
  ``"heads"`` axes used when present: ``fn(query, key, value, *, causal,
  q_positions=None, k_positions=None, segment_ids=None, implementation=None,
  scale=None, **s2_options)`` builds ``attnjax.masks.S2(num_heads=N,
  num_kv_heads=K, causal=causal, **s2_options)``. Concrete custom positions
  run (the plan is read off the mask at them); traced ones are checked at run
  time and give NaN unless they are ``arange(T)``; segment ids (packed
  documents) travel with the key blocks.
  """
  return context_parallel_family("s2", mesh, axis=context_axis,
                                 head_axis=_axis(mesh, heads_axis),
                                 data_axis=_axis(mesh, data_axis))
