"""Context parallelism for run-time block lists (content-based block-sparse attention).

Top-k selection (``attnjax.dynamic.select.topk_blocks``: Routing, SeerAttention,
BiFormer-style lists, ...) gives, per (batch, head, q-block), a list of key
blocks that exists only at run time, so no static exchange plan can be read
off a mask. Here the sequence is split contiguously over the mesh axis
``axis`` (device c holds q- and k-blocks [c nbl, (c+1) nbl)) and every device
fetches, from each other device, the *union* of the key blocks its local
lists name (per batch row and KV head), through a request/response pair of
``ppermute`` calls per device distance: first the block ids (int32), then
those K/V blocks. The local block-sparse engine
(``attnjax.block_sparse.block_sparse_attention_indices``) then runs over
[own blocks, received blocks] with the lists rewritten to buffer slots, and
the mask (e.g. ``Causal()``) evaluated on global positions: one online
softmax, equal to the unsharded call.

Buffer sizes must be static, so each distance receives at most ``capacity``
blocks per (batch row, KV head). The default is the exact worst case (the
source's blocks that the static ``mask`` leaves visible to the device's
q-blocks, at most the number of list entries); a smaller ``capacity`` is the
caller's bound (``block_list_capacity`` computes the one a set of lists
needs). The collectives move the whole buffer, so the bytes received are
``sum_r capacity_r`` blocks per KV head, not the union's run-time size. A
query row whose lists name more blocks of one device than ``capacity`` gets
NaN in its output (never a silently wrong value). List entries that name a
device whose blocks the static mask hides from every local q-block are
dropped (the mask would zero them anyway).

``assignment="zigzag"`` (as the static route's: the sequence in 2P chunks,
device d holding chunks d and 2P-1-d) balances causal work: a device's
q-blocks then see as many causal key blocks as any other's. The lists keep
their global block numbering; ``sequence_order`` says whether the arrays (and
the q-block axis of the lists) come in natural order (permuted here) or
already in ``sequence_permutation(T, P, "zigzag")`` order.
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

from attnjax.block_sparse import block_sparse_attention_indices
from attnjax.core import validation as V
from attnjax.masks import layout as LY
from attnjax.masks.base import Mask
from attnjax.sharding.block_sparse_plan import SEQUENCE_ORDERS, sequence_permutation

IMPLEMENTATIONS = (None, "xla", "pallas", "reference")


@dataclasses.dataclass(frozen=True, eq=False)
class BlockListPlan:
  """Static part of a run-time block-list exchange (what the mask and sizes fix).

  Attributes:
    num_shards: P; local_blocks: nbl = T / (P block_size); block_size.
    owned: int [P, nbl] global blocks of each device, in its local order
      (contiguous: c nbl + arange(nbl); zigzag: two chunks).
    entries_per_row: list entries one (local head, q-block) row holds (k).
    reachable: bool [P, P]: device ``dst`` may need blocks of device ``src``
      (some q-block of dst sees some block of src under the static mask).
    rounds: per device distance r with something to move, (r, capacity M_r,
      pairs ((src, dst), ...)): dst = src + r (mod P).
    buffer_blocks: nbl + sum of M_r (slots per KV head).
  """
  num_shards: int
  local_blocks: int
  block_size: int
  entries_per_row: int
  reachable: np.ndarray
  owned: np.ndarray
  rounds: Tuple[Tuple[int, int, Tuple[Tuple[int, int], ...]], ...]
  buffer_blocks: int

  def received_blocks(self) -> int:
    """Blocks per (batch row, local KV head) each device's receive buffers hold."""
    return int(sum(m for _, m, _ in self.rounds))


def owned_blocks(seq_len: int, num_shards: int, block_size: int,
                 assignment: str = "contiguous") -> np.ndarray:
  """int [P, nbl]: the global blocks each device holds, in its local order."""
  perm = sequence_permutation(seq_len, num_shards, assignment)
  if (seq_len // num_shards) % block_size or (assignment == "zigzag" and
                                              (seq_len // (2 * num_shards)) % block_size):
    raise ValueError(f"block_size={block_size} must divide the chunks of the {assignment!r} "
                     f"assignment of T={seq_len} over {num_shards} context shards.")
  return (perm.reshape(num_shards, -1, block_size)[:, :, 0] // block_size).astype(np.int64)


def _visible(mask, seq_len, bs, num_heads, own):
  """bool [P, P] dst sees some block of src, and int [P, P] how many of src's blocks."""
  P_, nbl = own.shape
  if mask is None:
    return np.ones((P_, P_), bool), np.full((P_, P_), nbl)
  cls = np.asarray(mask.block_layout(seq_len, seq_len, bs, bs, num_heads).block_mask)
  seen = (cls != LY.EMPTY).any(0)                                        # [nq, nk]
  per = seen[own.reshape(-1)][:, own.reshape(-1)].reshape(P_, nbl, P_, nbl).any(1)
  return per.any(-1), per.sum(-1)                                        # [dst, src(, nbl)]


@functools.lru_cache(maxsize=32)
def block_list_plan(mask, seq_len: int, num_heads: int, list_heads_per_kv: int,
                    entries_per_row: int, num_shards: int, block_size: int,
                    capacity=None, assignment: str = "contiguous") -> BlockListPlan:
  """The exchange rounds for lists of ``entries_per_row`` blocks (cached).

  ``list_heads_per_kv``: list rows per (KV head, q-block): G = N / K for
  per-query-head lists, 1 for per-KV-head lists. ``capacity``: at most this
  many blocks per (distance, batch row, KV head), an int or one int per device
  distance 1..P-1 (a tuple, as ``block_list_capacity(..., per_distance=True)``
  returns); default the exact bound. ``assignment``: "contiguous" or "zigzag".
  """
  if seq_len % (num_shards * block_size):
    raise ValueError(f"block_size={block_size} x the context axis size {num_shards} must "
                     f"divide the sequence length T={seq_len}.")
  own = owned_blocks(seq_len, num_shards, block_size, assignment)
  nbl = own.shape[1]
  caps = [None] * num_shards
  if isinstance(capacity, (tuple, list)):
    if len(capacity) != num_shards - 1:
      raise ValueError(f"capacity has {len(capacity)} entries; expected one per device "
                       f"distance 1..{num_shards - 1}.")
    caps = [None] + [V.check_positive_int("capacity", c, minimum=0) for c in capacity]
  elif capacity is not None:
    caps = [None] + [V.check_positive_int("capacity", capacity)] * (num_shards - 1)
  reach, count = _visible(mask, seq_len, block_size, num_heads, own)
  np.fill_diagonal(reach, False)
  bound = np.minimum(count, nbl * list_heads_per_kv * entries_per_row)
  rounds, off = [], nbl
  for r in range(1, num_shards):
    pairs = tuple((s, (s + r) % num_shards) for s in range(num_shards)
                  if reach[(s + r) % num_shards, s])
    if not pairs:
      continue
    m = int(max(bound[d, s] for s, d in pairs))
    m = m if caps[r] is None else min(m, int(caps[r]))
    if m == 0:
      continue
    rounds.append((r, m, pairs))
    off += m
  return BlockListPlan(num_shards, nbl, block_size, entries_per_row, reach, own, tuple(rounds),
                       off)


def block_list_capacity(kv_block_indices, kv_block_counts, *, num_shards: int,
                        num_kv_heads: int, per_distance: bool = False,
                        assignment: str = "contiguous"):
  """The smallest ``capacity`` under which these lists lose no block (NumPy, on the host).

  The largest number of distinct key blocks that the rows of one context
  shard name in another shard, over batch rows and KV heads; with
  ``per_distance`` a tuple, one such maximum per device distance 1..P-1
  (distance r: shard c reading shard c - r mod P). Lists in natural q-block
  order; ``assignment`` as :func:`context_parallel_block_lists`.
  """
  idx = np.asarray(kv_block_indices)
  B, Hi, nq, k = idx.shape
  cnt = np.full((B, Hi, nq), k) if kv_block_counts is None else np.asarray(kv_block_counts)
  if nq % num_shards or Hi % num_kv_heads:
    raise ValueError(f"kv_block_indices {idx.shape}: q-blocks {nq} must be divisible by "
                     f"num_shards={num_shards} and list heads {Hi} by num_kv_heads="
                     f"{num_kv_heads}.")
  own = owned_blocks(nq, num_shards, 1, assignment)            # [P, nbl] (blocks as tokens)
  owner = np.argsort(own.reshape(-1)) // own.shape[1]
  valid = np.arange(k) < cnt[..., None]
  g = np.arange(Hi) // (Hi // num_kv_heads)
  most = np.zeros(num_shards, np.int64)
  for b in range(B):
    for kv in range(num_kv_heads):
      rows = idx[b, g == kv]                                   # [heads, nq, k]
      ok = valid[b, g == kv]
      for dst in range(num_shards):
        sel = rows[:, own[dst]][ok[:, own[dst]]]
        src = owner[sel]
        for s in np.unique(src[src != dst]):
          r = (dst - s) % num_shards
          most[r] = max(most[r], len(np.unique(sel[src == s])))
  return tuple(int(m) for m in most[1:]) if per_distance else int(most.max())


def _axis(mesh, name, field):
  if name is None:
    return None, 1
  if name not in mesh.axis_names:
    raise ValueError(f"{field}={name!r} is not an axis of the mesh {mesh.axis_names}.")
  return name, int(mesh.shape[name])


def context_parallel_block_lists(query, key, value, kv_block_indices, kv_block_counts=None, *,
                                 block_size: int, mesh: Mesh, axis: str = "context",
                                 head_axis: Optional[str] = None,
                                 data_axis: Optional[str] = None, mask: Optional[Mask] = None,
                                 capacity: Optional[int] = None, scale=None,
                                 return_lse: bool = False, implementation=None,
                                 assignment: str = "contiguous",
                                 sequence_order: str = "natural"):
  """Self-attention over run-time block lists, the sequence split over ``axis``.

  Args:
    query: [B, T, N, H]; key: [B, T, K, H]; value: [B, T, K, Hv] (global arrays,
      sharded here as P(data_axis, axis, head_axis, None)).
    kv_block_indices: int [B, N or K, T / block_size, k]: global key blocks per
      (batch, head, q-block), as ``block_sparse_attention_indices`` takes them
      (first ``count`` entries distinct); kv_block_counts: int [B, N or K,
      T / block_size] or None (all k).
    block_size: q- and k-block size; ``block_size * P`` must divide T.
    mesh, axis, head_axis, data_axis, assignment, sequence_order: as
      ``context_parallel_block_sparse`` ("contiguous" or "zigzag"; with
      ``sequence_order="assignment"`` the q-block axis of the lists is in that
      order too, their entries stay global block numbers).
    mask: optional static Mask applied inside the listed blocks on global
      positions (e.g. ``Causal()``); head-dependent masks need no head axis.
    capacity: blocks per (device distance, batch row, KV head) a device
      receives, an int or a tuple per distance 1..P-1; default the exact
      bound (see the module docstring). Rows whose lists need more get NaN.
    implementation: the local engine's: None/"xla", "pallas" (interpret mode
      off TPU/GPU) or "reference".

  Returns:
    out [B, T, N, Hv] (and lse [B, T, N]), equal to
    ``block_sparse_attention_indices(query, key, value, kv_block_indices,
    kv_block_counts, block_q=block_size, block_kv=block_size, mask=mask)``.
  """
  query, key, value = V.as_arrays(query, key, value)
  d = V.check_qkv(query, key, value)
  if d.T != d.S:
    raise ValueError(f"context parallelism here is for self-attention: query {query.shape} and "
                     f"key {key.shape} must have the same length.")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got "
                     f"{implementation!r}.")
  if mask is not None and not isinstance(mask, Mask):
    raise TypeError(f"mask must be an attnjax Mask or None, got {type(mask).__name__}.")
  if mask is not None and mask.needs_segments:
    raise NotImplementedError(f"mask {mask!r} reads segment ids, which "
                              "context_parallel_block_lists does not take.")
  if axis is None or axis not in mesh.axis_names:
    raise ValueError(f"axis={axis!r} is not an axis of the mesh {mesh.axis_names}.")
  hax, X = _axis(mesh, head_axis, "head_axis")
  dax, D = _axis(mesh, data_axis, "data_axis")
  if hax is not None and mask is not None and mask.head_dependent:
    raise NotImplementedError(f"mask {mask!r} depends on the head; with head_axis={hax!r} the "
                              "local engine sees local head numbers. Split no heads.")
  Pn = int(mesh.shape[axis])
  V.check_positive_int("block_size", block_size)
  if d.T % (Pn * block_size):
    raise ValueError(f"sequence length T={d.T} is not divisible by block_size={block_size} x "
                     f"the context axis {axis!r} size {Pn}.")
  if d.B % D:
    raise ValueError(f"batch {d.B} is not divisible by the data axis {dax!r} size {D}.")
  if d.N % X or d.K % X:
    raise ValueError(f"num_heads N={d.N} and num_kv_heads K={d.K} must be divisible by the "
                     f"head axis {hax!r} size {X}.")
  idx, cnt = V.check_block_lists(kv_block_indices, kv_block_counts, d, block_size, block_size)
  Hi, k = idx.shape[1], idx.shape[3]
  G = d.N // d.K
  per_kv = G if (Hi == d.N and G > 1) else 1
  if sequence_order not in SEQUENCE_ORDERS:
    raise ValueError(f"sequence_order must be one of {SEQUENCE_ORDERS}, got {sequence_order!r}.")
  plan = block_list_plan(mask, d.T, d.N, per_kv, k, Pn, block_size, capacity, assignment)
  scale = float(V.check_scale(scale, d.H))
  bs, nbl, nbuf, nb = block_size, plan.local_blocks, plan.buffer_blocks, d.T // block_size
  Kl, Nl, Hil = d.K // X, d.N // X, Hi // X
  reach = jnp.asarray(plan.reachable | np.eye(Pn, dtype=bool))   # own blocks are kept
  owned = jnp.asarray(plan.owned, jnp.int32)                       # [P, nbl]
  owner = jnp.asarray(np.argsort(plan.owned.reshape(-1)) // nbl, jnp.int32)   # [nb]

  def local_fn(q, k_, v, li, lc):
    c = jax.lax.axis_index(axis)
    Bl, Tl = q.shape[:2]
    head_kv = jnp.arange(Hil) // (Hil // Kl)                      # list head -> local KV head
    valid = jnp.arange(k) < lc[..., None]                         # [Bl, Hil, nbl, k]
    # entries of devices the static mask hides from every local q-block: dropped (no-ops)
    keep = valid & reach[c, owner[li]]
    bi = jnp.arange(Bl)[:, None, None, None]
    gi = head_kv[None, :, None, None]
    need = jnp.zeros((Bl, Kl, nb + 1), bool).at[bi, gi, jnp.where(keep, li, nb)].set(True)
    kb = k_.reshape(Bl, nbl, bs, Kl, d.H)
    vb = v.reshape(Bl, nbl, bs, Kl, d.Hv)
    slot = jnp.full((Bl, Kl, nb + 1), -1, jnp.int32)
    own = owned[c]
    slot = slot.at[:, :, own].set(jnp.arange(nbl, dtype=jnp.int32))
    k_blocks, v_blocks, blk = [kb], [vb], [jnp.broadcast_to(own, (Bl, Kl, nbl))]
    off = nbl
    bk = jnp.arange(Bl)[:, None, None]
    gk = jnp.arange(Kl)[None, :, None]
    for r, m, pairs in plan.rounds:
      src = (c - r) % Pn
      flag = jnp.take(need, owned[src], axis=2)                          # [Bl, Kl, nbl]
      order = jnp.argsort(~flag, axis=-1, stable=True)[..., :m].astype(jnp.int32)
      got = jnp.arange(m) < flag.sum(-1, keepdims=True)                  # [Bl, Kl, m]
      # request (block ids) goes dst -> src, the blocks come back src -> dst
      req = jax.lax.ppermute(order, axis, [(dd, s) for s, dd in pairs])
      take = lambda x: jnp.moveaxis(x[bk, req, :, gk], 1, 3)            # [Bl, m, bs, Kl, D]
      k_blocks.append(jax.lax.ppermute(take(kb), axis, list(pairs)))
      v_blocks.append(jax.lax.ppermute(take(vb), axis, list(pairs)))
      gblk = owned[src][order]
      slot = slot.at[bk, gk, jnp.where(got, gblk, nb)].set(
          jnp.broadcast_to(off + jnp.arange(m, dtype=jnp.int32), (Bl, Kl, m)))
      blk.append(jnp.where(got, gblk, 0))
      off += m
    # KV heads side by side on the key axis: [Bl, Kl * nbuf * bs, 1, D]
    kr = jnp.moveaxis(jnp.concatenate(k_blocks, 1), 3, 1).reshape(Bl, Kl * nbuf * bs, 1, d.H)
    vr = jnp.moveaxis(jnp.concatenate(v_blocks, 1), 3, 1).reshape(Bl, Kl * nbuf * bs, 1, d.Hv)
    k_pos = (jnp.concatenate(blk, -1)[..., None] * bs + jnp.arange(bs)).reshape(Bl, -1)
    s = slot[bi, gi, jnp.where(keep, li, nb)]                          # [Bl, Hil, nbl, k]
    lost = (keep & (s < 0)).any(-1)                                    # over capacity
    ok = keep & (s >= 0)
    # kept entries first (stable), as the engine reads the first `count` entries
    order = jnp.argsort(~ok, axis=-1, stable=True)
    new = jnp.take_along_axis(jnp.where(ok, s + head_kv[None, :, None, None] * nbuf, 0),
                              order, -1)
    n_ok = ok.sum(-1).astype(jnp.int32)
    new = jnp.where(jnp.arange(k) < n_ok[..., None], new,
                    jnp.take_along_axis(new, jnp.maximum(n_ok - 1, 0)[..., None], -1))
    if Hil != Nl and Kl > 1:          # per-KV-head lists: one row per query head
      new, n_ok, lost = (jnp.repeat(a, Nl // Hil, axis=1) for a in (new, n_ok, lost))
    q_pos = (owned[c][:, None] * bs + jnp.arange(bs, dtype=jnp.int32)).reshape(-1)
    out, lse = block_sparse_attention_indices(
        q, kr, vr, new, n_ok, block_q=bs, block_kv=bs, mask=mask, scale=scale,
        q_positions=q_pos, k_positions=k_pos, return_lse=True, implementation=implementation)
    lost = jnp.repeat(jnp.moveaxis(lost, 1, 2), bs, axis=1)            # [Bl, Tl, Hil|Nl]
    if lost.shape[-1] != Nl:
      lost = jnp.repeat(lost, Nl // lost.shape[-1], axis=-1)
    out = jnp.where(lost[..., None], jnp.nan, out)
    return out, lse

  spec = P(dax, axis, hax, None)
  lspec = P(dax, hax, axis, None)
  fn = jax.shard_map(local_fn, mesh=mesh, in_specs=(spec, spec, spec, lspec, P(dax, hax, axis)),
                     out_specs=(spec, P(dax, axis, hax)), check_vma=False)
  permute = sequence_order == "natural" and assignment != "contiguous"
  if permute:
    perm = jnp.asarray(sequence_permutation(d.T, Pn, assignment))
    qperm = jnp.asarray(plan.owned.reshape(-1))
    query, key, value = query[:, perm], key[:, perm], value[:, perm]
    idx, cnt = idx[:, :, qperm], cnt[:, :, qperm]
  out, lse = fn(query, key, value, idx, cnt)
  if permute:
    inv = jnp.argsort(perm)
    out, lse = out[:, inv], lse[:, inv]
  return (out, lse) if return_lse else out


def block_list_report(plan: BlockListPlan, *, batch: int, num_kv_heads: int, head_dim: int,
                      value_dim: Optional[int] = None, itemsize: int = 2) -> Dict[str, float]:
  """Bytes a device receives (ids and K/V buffers) vs an all-gather of the K/V."""
  value_dim = head_dim if value_dim is None else value_dim
  per_block = batch * num_kv_heads * plan.block_size * (head_dim + value_dim) * itemsize
  allgather = (plan.num_shards - 1) * plan.local_blocks * per_block
  kv = plan.received_blocks() * per_block
  ids = plan.received_blocks() * batch * num_kv_heads * 4
  return {"allgather_bytes": float(allgather), "received_bytes": float(kv + ids),
          "received_ratio": float((kv + ids) / allgather) if allgather else 0.0}
