"""S2-Attention head-sharded context parallelism (Lin, Zhang et al.; arXiv:2407.17678).

"Efficient LLM Training and Serving with Heterogeneous Context Sharding among
Attention Heads".

The sequence is split into ``C`` contiguous chunks over the mesh's
``context`` axis (and the heads, optionally, over ``heads``). With an
S2 mask each KV head needs, from a remote chunk, only the key blocks of its
own stride residue class plus the local band that crosses the chunk
boundary. The plan below reads those blocks from the mask's ``BlockLayout``;
inside ``shard_map`` every device gathers, per KV head, exactly the blocks
each other device needs, sends them with one ``ppermute`` per chunk distance,
attends its queries to its local chunk and to every received set, and merges
the partial results through their log-sum-exp (``attnjax.merge_attention``).
Compared with an all-gather of the full K/V, a device receives about
``1 / vert_stride`` of the remote keys (plus the band).

Works for any static ``attnjax.masks.Mask`` (causal or not; the S2 mask is
the case that profits), self-attention (T == S) with default positions.
Segment ids (packed documents) travel with their key blocks (one more
``ppermute`` of int32 ids per chunk distance) and mask keys of other documents.
Per-device compute is dense over [local chunk + received blocks] with an
explicit boolean mask; the saving here is communication and memory.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from attnjax.core import validation as V
from attnjax.core.merge import merge_attention
from attnjax import api
from attnjax.masks import S2
from attnjax.sharding.mesh import check_segment_ids


@dataclasses.dataclass(frozen=True, eq=False)
class ContextPlan:
  """Static communication plan: which key blocks go from chunk c to chunk c + s.

  Attributes:
    num_chunks: C (context axis size); head_shards: X (heads axis size).
    chunk_len: T / C tokens; block_size: the layout's block; blocks_per_chunk.
    kv_heads_local: K / X KV heads per device.
    send: {s: int32 [C, X, M_s, Kl]} block index inside the source chunk that
      device (c, x) sends to chunk c + s, for each local KV head (padded with 0).
    recv: {s: int32 [C, X, M_s, Kl]} global block index that device (c, x)
      receives from chunk c - s (-1 = padding).
  """
  num_chunks: int
  head_shards: int
  chunk_len: int
  block_size: int
  blocks_per_chunk: int
  kv_heads_local: int
  send: Dict[int, np.ndarray]
  recv: Dict[int, np.ndarray]

  @property
  def shifts(self) -> Tuple[int, ...]:
    return tuple(sorted(self.send))

  def received_blocks(self) -> np.ndarray:
    """Valid key blocks (summed over local KV heads) each device receives: int [C, X]."""
    tot = np.zeros((self.num_chunks, self.head_shards), np.int64)
    for r in self.recv.values():
      tot += (r >= 0).sum(axis=(2, 3))
    return tot

  def transferred_blocks(self) -> int:
    """Blocks (x local KV heads) in each device's receive buffers, padding included."""
    return int(sum(r.shape[2] * r.shape[3] for r in self.recv.values()))


def kv_block_needs(mask, seq_len: int, num_heads: int, num_kv_heads: int,
                   block_size: int) -> np.ndarray:
  """bool [K, nb, nb]: KV head g's key block kb is read by some query of q-block qb.

  From the mask's ``BlockLayout`` (blocks that are partial or full for any
  query head of the KV group).
  """
  layout = mask.block_layout(seq_len, seq_len, block_size, block_size, num_heads)
  visited = np.asarray(layout.block_mask) != 0
  g = num_heads // num_kv_heads
  return visited.reshape(num_kv_heads, g, *visited.shape[1:]).any(axis=1)


@functools.lru_cache(maxsize=64)
def make_plan(mask, seq_len: int, num_heads: int, num_kv_heads: int, num_chunks: int,
              head_shards: int = 1, block_size: Optional[int] = None) -> ContextPlan:
  """The communication plan of ``mask`` for C chunks and X head shards (cached)."""
  bs = int(block_size or getattr(mask, "block_size", 0) or 0)
  if bs < 1:
    raise ValueError(f"block_size is needed for mask {mask!r} (it has no block_size).")
  if seq_len % num_chunks:
    raise ValueError(f"sequence length {seq_len} is not divisible by the context axis size "
                     f"{num_chunks}.")
  tl = seq_len // num_chunks
  if tl % bs:
    raise ValueError(f"chunk length {tl} (= {seq_len} / {num_chunks} context shards) must be "
                     f"a multiple of the mask's block_size {bs}.")
  for name, n in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
    if n % head_shards:
      raise ValueError(f"{name}={n} is not divisible by the heads axis size {head_shards}.")
  need = kv_block_needs(mask, seq_len, num_heads, num_kv_heads, bs)
  nbc = tl // bs
  kl = num_kv_heads // head_shards
  lists = {}
  for s in range(-(num_chunks - 1), num_chunks):
    if s == 0:
      continue
    per = {}
    for c in range(num_chunks):
      d = c + s
      if not 0 <= d < num_chunks:
        continue
      rows = need[:, d * nbc:(d + 1) * nbc, c * nbc:(c + 1) * nbc].any(axis=1)  # [K, nbc]
      for x in range(head_shards):
        for gl in range(kl):
          per[(c, x, gl)] = np.nonzero(rows[x * kl + gl])[0]
    width = max((len(v) for v in per.values()), default=0)
    if width:
      lists[s] = (per, width)
  send, recv = {}, {}
  for s, (per, width) in lists.items():
    snd = np.zeros((num_chunks, head_shards, width, kl), np.int32)
    rcv = np.full((num_chunks, head_shards, width, kl), -1, np.int32)
    for (c, x, gl), blocks in per.items():
      snd[c, x, :len(blocks), gl] = blocks
      rcv[c + s, x, :len(blocks), gl] = blocks + c * nbc
    send[s], recv[s] = snd, rcv
  return ContextPlan(num_chunks, head_shards, tl, bs, nbc, kl, send, recv)


def _axis(mesh: Mesh, name: Optional[str]):
  return name if name is not None and name in mesh.axis_names else None


def _index(name):
  return jax.lax.axis_index(name) if name is not None else 0


def context_parallel_attention(query, key, value, mask, mesh: Mesh, *, scale=None,
                               implementation=None, data_axis: Optional[str] = "data",
                               heads_axis: Optional[str] = "heads",
                               context_axis: str = "context", block_size: Optional[int] = None,
                               segment_ids=None):
  """Self-attention with a static block mask, the sequence split over ``context_axis``.

  Args:
    query: [B, T, N, H]; key: [B, T, K, H]; value: [B, T, K, Hv] (global
      arrays; sharded here as P(data, context, heads, None)).
    mask: a static ``attnjax.masks.Mask`` with a ``block_size`` (e.g.
      ``attnjax.masks.S2``) or ``block_size`` given.
    mesh: a Mesh containing ``context_axis`` (and optionally the others).
    scale: logit scale (default 1/sqrt(H)).
    implementation: passed to ``attnjax.attention`` for the partial blocks.
    segment_ids: optional int [B, T] document ids (packed sequences): a query
      sees only keys of its own document.

  Returns:
    out [B, T, N, Hv], equal to dense attention with ``mask``.
  """
  d = V.check_qkv(query, key, value)
  if d.T != d.S:
    raise ValueError(f"context parallelism here is for self-attention: query {query.shape} and "
                     f"key {key.shape} must have the same length.")
  if context_axis not in mesh.axis_names:
    raise ValueError(f"mesh axes {mesh.axis_names} lack the context axis {context_axis!r}.")
  dax, hax = _axis(mesh, data_axis), _axis(mesh, heads_axis)
  C = mesh.shape[context_axis]
  X = mesh.shape[hax] if hax else 1
  if dax and d.B % mesh.shape[dax]:
    raise ValueError(f"batch {d.B} is not divisible by the {dax!r} axis size {mesh.shape[dax]}.")
  segs = check_segment_ids(segment_ids, d.B, d.T)
  plan = make_plan(mask, d.T, d.N, d.K, C, X, block_size)
  scale = V.check_scale(scale, d.H)
  nl, kl, tl, bs = d.N // X, d.K // X, plan.chunk_len, plan.block_size
  tables = {s: (jnp.asarray(plan.send[s]), jnp.asarray(plan.recv[s])) for s in plan.shifts}

  def local_fn(q, k, v, *seg):
    c, x = _index(context_axis), _index(hax)
    heads = x * nl + jnp.arange(nl)
    group = jnp.arange(nl) // (nl // kl)
    q_pos = c * tl + jnp.arange(tl)
    vis = mask.predicate(heads[:, None, None], q_pos[None, :, None], q_pos[None, None, :])
    out, lse = api.attention(q, k, v, mask=jnp.asarray(vis, bool)[None], scale=scale,
                             segment_ids=seg[0] if seg else None, return_lse=True,
                             implementation=implementation)
    kb = k.reshape(k.shape[0], plan.blocks_per_chunk, bs, kl, k.shape[-1])
    vb = v.reshape(v.shape[0], plan.blocks_per_chunk, bs, kl, v.shape[-1])
    if seg:   # document ids as one more "feature" of every key block and KV head
      sb = jnp.broadcast_to(seg[0].reshape(k.shape[0], plan.blocks_per_chunk, bs, 1, 1),
                            kb.shape[:4] + (1,))
    for s in plan.shifts:
      snd, rcv = tables[s][0][c, x], tables[s][1][c, x]          # [M, Kl]
      ks, vs = _gather_blocks(kb, snd), _gather_blocks(vb, snd)  # [B, M*bs, Kl, H]
      perm = [(i, i + s) for i in range(C) if 0 <= i + s < C]
      ks = jax.lax.ppermute(ks, context_axis, perm)
      vs = jax.lax.ppermute(vs, context_axis, perm)
      k_pos = (rcv.T[:, :, None] * bs + jnp.arange(bs)).reshape(kl, -1)   # [Kl, M*bs]
      valid = jnp.repeat(rcv.T >= 0, bs, axis=1)
      kp, ok = k_pos[group], valid[group]                                  # [Nl, M*bs]
      vis = (ok[:, None, :] & jnp.asarray(
          mask.predicate(heads[:, None, None], q_pos[None, :, None], kp[:, None, :]), bool))[None]
      if seg:   # [B, Nl, tl, M*bs]: the received blocks differ per KV head
        ss = jax.lax.ppermute(_gather_blocks(sb, snd), context_axis, perm)[..., 0]  # [B, M*bs, Kl]
        vis = vis & (seg[0][:, None, :, None] == jnp.moveaxis(ss, 1, 2)[:, group, None, :])
      o2, l2 = api.attention(q, ks, vs, mask=vis, scale=scale, return_lse=True,
                             implementation=implementation)
      out, lse = merge_attention(out, lse, o2, l2)
    return out

  spec = P(dax, context_axis, hax, None)
  extra = () if segs is None else (segs,)
  fn = jax.shard_map(local_fn, mesh=mesh, in_specs=(spec,) * 3 + (P(dax, context_axis),) * len(
      extra), out_specs=spec, check_vma=False)
  return fn(query, key, value, *extra)


def _gather_blocks(blocks, idx):
  """blocks [B, nb, bs, Kl, H], idx int [M, Kl] -> [B, M * bs, Kl, H] (per-head blocks)."""
  b = jnp.moveaxis(blocks, 3, 1)                                   # [B, Kl, nb, bs, H]
  g = jnp.take_along_axis(b, idx.T[None, :, :, None, None], axis=2)  # [B, Kl, M, bs, H]
  g = jnp.moveaxis(g, 1, 3)                                        # [B, M, bs, Kl, H]
  return g.reshape(g.shape[0], -1, g.shape[3], g.shape[4])


def communication_bytes(mask, *, batch: int, seq_len: int, num_heads: int, num_kv_heads: int,
                        head_dim: int, value_dim: Optional[int] = None, num_chunks: int,
                        head_shards: int = 1, itemsize: int = 2,
                        block_size: Optional[int] = None) -> Dict[str, float]:
  """Bytes of K/V each device receives with the plan vs an all-gather of the full K/V.

  Returns a dict with ``allgather_bytes`` ((C-1)/C of the local heads' K/V),
  ``needed_bytes_max`` / ``needed_bytes_mean`` (valid blocks only),
  ``transferred_bytes`` (receive buffers, padding included) and the ratios
  to the all-gather.
  """
  value_dim = head_dim if value_dim is None else value_dim
  plan = make_plan(mask, seq_len, num_heads, num_kv_heads, num_chunks, head_shards, block_size)
  per_block = batch * plan.block_size * (head_dim + value_dim) * itemsize
  allgather = (num_chunks - 1) * plan.blocks_per_chunk * plan.kv_heads_local * per_block
  need = plan.received_blocks() * per_block
  moved = plan.transferred_blocks() * per_block
  return {"allgather_bytes": float(allgather), "needed_bytes_max": float(need.max()),
          "needed_bytes_mean": float(need.mean()), "transferred_bytes": float(moved),
          "needed_ratio_max": float(need.max() / allgather) if allgather else 0.0,
          "transferred_ratio": float(moved / allgather) if allgather else 0.0}


_S2_FIELDS = ("block_size", "local_blocks", "vert_stride", "homo_head", "num_dense_heads",
              "head_sliding_step", "head_sliding_offset", "vert_position_type")


def s2_family_for_mesh(mesh: Mesh, **axes):
  """An attention family (registry signature) running S2 context-parallel on ``mesh``.

  ``fn(query, key, value, *, causal, q_positions=None, k_positions=None,
  segment_ids=None, implementation=None, scale=None, **s2_options)`` builds
  ``attnjax.masks.S2(num_heads=N, num_kv_heads=K, causal=causal, **s2_options)``
  and calls :func:`context_parallel_attention`. Self-attention with default
  positions only (custom ones raise; traced ones are checked at run time and
  give NaN unless they are ``arange(T)``); segment ids (packed documents)
  travel with the key blocks.
  """

  def fn(query, key, value, *, causal, q_positions=None, k_positions=None, segment_ids=None,
         implementation=None, scale=None, **options):
    unknown = sorted(set(options) - set(_S2_FIELDS))
    if unknown:
      raise ValueError(f"S2 context-parallel attention got unknown options {unknown}; "
                       f"expected some of {list(_S2_FIELDS)}.")
    T = query.shape[1]
    ok = True
    for name, pos in (("q_positions", q_positions), ("k_positions", k_positions)):
      if pos is None:
        continue
      if isinstance(pos, jax.core.Tracer):   # checked at run time: other positions give NaN
        ok = ok & jnp.all(jnp.asarray(pos).reshape(-1, T) == jnp.arange(T))
      elif not np.array_equal(np.asarray(pos).reshape(-1, T),
                              np.broadcast_to(np.arange(T), (np.size(pos) // T, T))):
        raise NotImplementedError(
            f"S2 context-parallel attention runs at the default positions arange(T); got "
            f"custom {name}.")
    mask = S2(query.shape[2], causal=bool(causal), num_kv_heads=key.shape[2], **options)
    out = context_parallel_attention(query, key, value, mask, mesh, scale=scale,
                                     implementation=implementation, segment_ids=segment_ids,
                                     **axes)
    return out if ok is True else jnp.where(ok, out, jnp.nan).astype(out.dtype)

  return fn
