"""Context parallelism for the block-sparse engine with any static mask.

The sequence of a self-attention call is split over a mesh axis (context
parallelism, as Ring Attention, Liu et al., arXiv:2310.01889) and, optionally,
the heads over another. Instead of passing every K/V block around the ring,
the plan reads the static mask's ``BlockLayout`` at trace time and computes,
for every device and KV head, exactly which key blocks of other devices its
query rows visit; those blocks, and only those, are exchanged with one
``ppermute`` per device distance that has something to send (distances with
nothing needed are skipped). Each device then runs the block-sparse XLA
engine once, over its queries and a key buffer [own blocks, received blocks]:
a query's attention to its own and to remote keys is one online softmax, so
there are no partial results to merge inside the call (``return_lse=True``
gives the lse, to merge with other key sets through
``attnjax.merge_attention``). Causality is by global positions: the engine
evaluates the mask on the global positions of the local queries and of every
buffered key. Forward and backward (the engine's custom VJP; the transpose of
a ``ppermute`` is the reverse ``ppermute``) run only the visited blocks.

Assignments of the sequence to the context axis (P devices):

* ``"contiguous"``: device d holds tokens [d T/P, (d+1) T/P).
* ``"zigzag"`` (the causal load balance of Llama 3's context parallelism,
  arXiv:2407.21783): the sequence is cut into 2P chunks and device d holds
  chunks d and 2P-1-d, so under a causal mask every device visits the same
  number of blocks.

``sequence_permutation`` returns the order in which the sharded arrays hold
the tokens. With ``sequence_order="natural"`` (default) the function takes
and returns arrays in natural token order and permutes them itself (for
zig-zag this reshards q/k/v and the output); with
``sequence_order="assignment"`` the caller passes and receives arrays already
in that order (``x[:, perm]``), e.g. a whole model kept in zig-zag order
(positional encodings then take ``perm`` as the positions).

SPMD execution: every device runs the same program on its own static work
list. The plan builds, for every device, the engine's work items (q-block,
k-blocks) from its exact block classes and pads the lists to the longest, so
a device runs ``executed_blocks`` = the busiest device's blocks (plus the
engine's item padding): balanced assignments cost no more than their mean.
The ``"xla"`` engine runs inside ``shard_map`` on these schedules;
``implementation="pallas"`` hands the same work, as run-time block lists, to
the Pallas kernels (interpret mode off TPU/GPU). Segment ids (packed
documents) travel with their K/V blocks; the plan then treats every visited
block as partial. The plans live in ``attnjax.sharding.block_sparse_plan``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from attnjax.block_sparse import block_sparse_attention_indices
from attnjax.block_sparse import engine as E
from attnjax.block_sparse import tiles as Tl
from attnjax.core import precision
from attnjax.core import scoring
from attnjax.core import validation as V
from attnjax.masks.base import Mask
from attnjax.sharding.block_sparse_plan import (SEQUENCE_ORDERS, block_sparse_context_plan,
                                                check_mask, sequence_permutation)
from attnjax.sharding.mesh import check_segment_ids


@dataclasses.dataclass(frozen=True)
class _HeadOffset(Mask):
  """``inner`` on global heads (and documents): the engine's segment ids carry both.

  Inside the device function a segment id is ``document * heads + x * N / X``
  (``heads`` = N, the first global query head of the device's head shard);
  the predicate adds the second part to the engine's local head and, when
  ``documents``, requires the same document.
  """
  inner: Mask
  heads: int
  documents: bool
  needs_segments = True

  @property
  def head_dependent(self):
    return True

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    qd, kd = q_seg // self.heads, k_seg // self.heads
    vis = jnp.asarray(self.inner.predicate(q_seg % self.heads + head, q_pos, k_pos), bool)
    return vis & (qd == kd) if self.documents else vis


def _take_blocks(blocks, idx):
  """blocks [B, n, bs, Kl, D] at idx int [M, Kl] (per KV head) -> [B, M, bs, Kl, D]."""
  i = jnp.moveaxis(idx, 0, 1)[None, :, :, None, None]                  # [1, Kl, M, 1, 1]
  g = jnp.take_along_axis(jnp.moveaxis(blocks, 3, 1), i, axis=2)      # [B, Kl, M, bs, D]
  return jnp.moveaxis(g, 1, 3)


def _mesh_axis(mesh: Mesh, name, field):
  if name is None:
    return None, 1
  if name not in mesh.axis_names:
    raise ValueError(f"{field}={name!r} is not an axis of the mesh {mesh.axis_names}.")
  return name, int(mesh.shape[name])


def context_parallel_block_sparse(query, key, value, *, mask, mesh: Mesh, axis: str = "context",
                                  head_axis: Optional[str] = None,
                                  data_axis: Optional[str] = None,
                                  assignment: str = "contiguous",
                                  sequence_order: str = "natural",
                                  block_size: Optional[int] = None, scale=None,
                                  segment_ids=None, q_positions=None, k_positions=None,
                                  return_lse: bool = False,
                                  implementation: Optional[str] = None):
  """Self-attention with any static mask, the sequence split over the mesh axis ``axis``.

  Args:
    query: [B, T, N, H]; key: [B, T, K, H]; value: [B, T, K, Hv] (global
      arrays, sharded here as P(data_axis, axis, head_axis, None)).
    mask: a static ``attnjax.masks.Mask`` (causal, sliding window, Longformer,
      BigBird, S2, ...), evaluated on global positions ``arange(T)``.
    mesh: a ``jax.sharding.Mesh``; ``axis`` splits the sequence (P devices),
      ``head_axis`` (optional) the heads (X devices: N and K divisible by X),
      ``data_axis`` (optional) the batch.
    assignment: "contiguous" or "zigzag" (device d holds chunks d and 2P-1-d
      of 2P: balanced work under causal masks).
    sequence_order: "natural" (arrays in token order; permuted inside when the
      assignment is not contiguous) or "assignment" (arrays already in
      ``sequence_permutation(T, P, assignment)`` order; the output too).
    block_size: exchange and engine block (default ``default_block_size``);
      must divide T / P (T / 2P for zigzag).
    scale: logit scale, default 1/sqrt(H).
    segment_ids: optional int [B, T] document ids (packed sequences): a query
      sees only keys of its document; they travel with the K/V blocks.
    q_positions, k_positions: optional concrete (NumPy or Python, not traced)
      int positions [T] or [B, T] (equal rows), in the order of the arrays;
      default ``arange(T)``. The plan is read off the mask at these positions
      (e.g. ``arange(T) + offset`` for a continuation chunk, or a permuted
      order), so the exchange is exact for them.
    return_lse: also return the lse [B, T, N] float32.
    implementation: None or "xla" (the engine's static schedules) or "pallas"
      (the plan's work as run-time block lists to the Pallas kernels; interpret
      mode off TPU/GPU; head-dependent masks with a head axis are not
      supported there).

  Returns:
    out [B, T, N, Hv] (and lse), equal to ``attnjax.attention(q, k, v,
    mask=mask)``, in the order of the inputs.
  """
  check_mask(mask)
  query, key, value = V.as_arrays(query, key, value)
  d = V.check_qkv(query, key, value)
  if d.T != d.S:
    raise ValueError(f"context parallelism here is for self-attention: query {query.shape} and "
                     f"key {key.shape} must have the same length.")
  if sequence_order not in SEQUENCE_ORDERS:
    raise ValueError(f"sequence_order must be one of {SEQUENCE_ORDERS}, got {sequence_order!r}.")
  if axis is None or axis not in mesh.axis_names:
    raise ValueError(f"axis={axis!r} is not an axis of the mesh {mesh.axis_names}.")
  hax, X = _mesh_axis(mesh, head_axis, "head_axis")
  dax, D = _mesh_axis(mesh, data_axis, "data_axis")
  named = [a for a in (axis, hax, dax) if a is not None]
  if len(set(named)) != len(named):
    raise ValueError(f"axis, head_axis and data_axis must differ, got {axis!r}, {head_axis!r}, "
                     f"{data_axis!r}.")
  Pn = int(mesh.shape[axis])
  if d.B % D:
    raise ValueError(f"batch {d.B} is not divisible by the data axis {dax!r} size {D}.")
  if d.T % (Pn * (2 if assignment == "zigzag" else 1)):
    raise ValueError(f"sequence length T={d.T} is not divisible by the context axis {axis!r} "
                     f"size {Pn}" + (" x 2 chunks (zigzag)." if assignment == "zigzag" else "."))
  if d.N % X:
    raise ValueError(f"num_heads N={d.N} is not divisible by the head axis {hax!r} size {X}.")
  if d.K % X:
    raise ValueError(f"num_kv_heads K={d.K} is not divisible by the head axis {hax!r} size {X}.")
  if implementation not in (None, "xla", "pallas"):
    raise ValueError(f"implementation must be None, 'xla' or 'pallas', got {implementation!r}.")
  segs = check_segment_ids(segment_ids, d.B, d.T)
  pos = [_concrete_positions(name, p, d.B, d.T) for name, p in (("q_positions", q_positions),
                                                                 ("k_positions", k_positions))]
  if sequence_order == "assignment" and any(p is not None for p in pos):
    order = sequence_permutation(d.T, Pn, assignment)   # arrays hold tokens in this order
    pos = [None if p is None else tuple(np.asarray(p)[np.argsort(order)].tolist())
           for p in pos]
  plan = block_sparse_context_plan(mask, d.T, d.N, d.K, Pn, X, block_size, assignment,
                                   d.B // D, segs is not None, *pos)
  scale = float(V.check_scale(scale, d.H))
  precision.warn_float32_accumulation("context_parallel_block_sparse (the block-sparse XLA "
                                      "engine)", query, key, value)
  bs, nbl, nbuf, Kl = plan.block_size, plan.local_blocks, plan.buffer_blocks, plan.kv_heads_local
  Nl, Hl, R = d.N // X, plan.layout_heads, plan.fold
  head_offset = hax is not None and mask.head_dependent
  pallas = implementation == "pallas"
  if pallas and head_offset:
    raise NotImplementedError(
        f"implementation='pallas' with head_axis={hax!r}: mask {mask!r} depends on the head and "
        "the kernels see local head numbers; use implementation='xla' or split no heads.")
  wrap = head_offset or (segs is not None and pallas is False)
  local_mask = _HeadOffset(mask, d.N, segs is not None) if wrap else mask
  cfg = Tl.Cfg(B=d.B // D, N=Nl, K=1, H=d.H, Hv=d.Hv, bq=bs, bk=bs, nq=nbl, nk=Kl * nbuf, Hl=Hl,
               R=R, kvh=(0,) * Hl, kv_len=Kl * nbuf * bs, scale=scale, norm="softmax",
               mask=local_mask, segments=wrap, pair_shape=None, bias_shape=None,
               plain_softmax=True)
  score = E.as_pytree(scoring.resolve_score(None))

  def local_fn(q, k, v, *seg):
    c = jax.lax.axis_index(axis)
    x = jax.lax.axis_index(hax) if hax else 0
    Bl, Tl_ = q.shape[:2]
    kb = k.reshape(Bl, nbl, bs, Kl, d.H)
    vb = v.reshape(Bl, nbl, bs, Kl, d.Hv)
    ks, vs = [kb], [vb]
    sb_ = (jnp.broadcast_to(seg[0].reshape(Bl, nbl, bs, 1, 1), (Bl, nbl, bs, Kl, 1))
           if seg else None)
    ss = [sb_]
    for snd, links in zip(plan.send, plan.pairs):
      idx = jnp.asarray(snd)[c, x]
      ks.append(jax.lax.ppermute(_take_blocks(kb, idx), axis, links))
      vs.append(jax.lax.ppermute(_take_blocks(vb, idx), axis, links))
      if seg:    # document ids travel with their blocks
        ss.append(jax.lax.ppermute(_take_blocks(sb_, idx), axis, links))
    # KV heads side by side along the key axis: [Bl, Kl * nbuf, bs, 1, D]
    k_r = jnp.moveaxis(jnp.concatenate(ks, 1), 3, 1).reshape(Bl, Kl * nbuf, bs, 1, d.H)
    v_r = jnp.moveaxis(jnp.concatenate(vs, 1), 3, 1).reshape(Bl, Kl * nbuf, bs, 1, d.Hv)
    q_r = q.reshape(Bl, nbl, bs, Hl, R * d.H)
    sb = jnp.asarray(plan.slot_blocks)[c, x].reshape(1, Kl * nbuf, 1)
    k_pos = jnp.asarray(plan.k_positions.reshape(-1, bs))[jnp.maximum(sb[0, :, 0], 0)][None]
    q_pos = jnp.asarray(plan.q_positions)[c].reshape(1, nbl, bs)
    q_seg = k_seg = None
    if seg:
      q_seg = seg[0].reshape(Bl, nbl, bs)
      k_seg = jnp.moveaxis(jnp.concatenate(ss, 1)[..., 0], 3, 1).reshape(Bl, Kl * nbuf, bs)
    if pallas:
      return _list_engine(plan, c, x, q, k_r, v_r, q_pos, k_pos, q_seg, k_seg, mask, scale, Nl)
    if wrap:
      q_seg = (0 if q_seg is None else q_seg * d.N) + jnp.full((1, nbl, bs), x * Nl, jnp.int32)
      k_seg = (0 if k_seg is None else k_seg * d.N) + jnp.full((1, Kl * nbuf, bs), x * Nl,
                                                               jnp.int32)
    scheds = tuple(E.Sched(*(jnp.asarray(a)[c, x][None] for a in arrays))
                   for arrays in plan.schedules)
    out, lse = E.attend(cfg, plan.kinds, q_r, k_r, v_r, None, score,
                        Tl.Aux(q_pos, k_pos, q_seg, k_seg, None), scheds, None)
    out = out.reshape(Bl, Hl, nbl, R, bs, d.Hv).transpose(0, 2, 4, 1, 3, 5)
    lse = lse.reshape(Bl, Hl, nbl, R, bs).transpose(0, 2, 4, 1, 3)
    return out.reshape(Bl, Tl_, Nl, d.Hv).astype(q.dtype), lse.reshape(Bl, Tl_, Nl)

  spec = P(dax, axis, hax, None)
  extra = () if segs is None else (segs,)
  fn = jax.shard_map(local_fn, mesh=mesh, in_specs=(spec, spec, spec) + (P(dax, axis),) * len(
      extra), out_specs=(spec, P(dax, axis, hax)), check_vma=False)
  if pallas:     # the kernels' custom VJP traces inside shard_map only under jit
    fn = jax.jit(fn)
  permute = sequence_order == "natural" and assignment != "contiguous"
  if permute:
    perm = jnp.asarray(plan.positions.reshape(-1))
    query, key, value = query[:, perm], key[:, perm], value[:, perm]
    extra = tuple(e[:, perm] for e in extra)
  out, lse = fn(query, key, value, *extra)
  if permute:
    inv = jnp.asarray(np.argsort(plan.positions.reshape(-1)))
    out, lse = out[:, inv], lse[:, inv]
  return (out, lse) if return_lse else out


def _concrete_positions(name, pos, batch, seq_len):
  """Concrete positions [T] or [B, T] with equal rows -> tuple of T ints (None for arange(T))."""
  if pos is None:
    return None
  if isinstance(pos, jax.core.Tracer):
    raise TypeError(f"{name} must be concrete (NumPy or Python) positions: the exchange plan is "
                    "built from them at trace time; got a traced array.")
  p = np.asarray(pos)
  if (p.ndim not in (1, 2) or p.shape[-1] != seq_len or (p.ndim == 2 and p.shape[0] != batch)
      or not np.issubdtype(p.dtype, np.integer)):
    raise ValueError(f"{name} must be int positions [T] or [B, T] = [{batch}, {seq_len}], got "
                     f"{p.dtype} {p.shape}.")
  p = p.reshape(-1, seq_len)
  if (p != p[:1]).any():
    raise NotImplementedError(f"{name} differ between batch rows: the exchange plan is one per "
                              "call; split the batch or pass one row [T].")
  p = p[0]
  return None if np.array_equal(p, np.arange(seq_len)) else tuple(int(i) for i in p)


def _list_engine(plan, c, x, q, k_r, v_r, q_pos, k_pos, q_seg, k_seg, mask, scale, Nl):
  """The device's work as run-time lists on the Pallas kernels: (out, lse) [Bl, T/P, Nl(, Hv)]."""
  Bl, Tl_ = q.shape[:2]
  lists = jnp.asarray(plan.lists)[c, x]                          # [Hl, nbl, k]
  counts = jnp.asarray(plan.list_counts)[c, x]
  if lists.shape[0] not in (1, Nl):                              # per KV head: per query head
    lists, counts = (jnp.repeat(a, plan.group, axis=0) for a in (lists, counts))
  lists = jnp.broadcast_to(lists[None], (Bl,) + lists.shape)
  counts = jnp.broadcast_to(counts[None], (Bl,) + counts.shape)
  segment_ids = None
  if q_seg is not None:
    segment_ids = (q_seg.reshape(Bl, Tl_), k_seg.reshape(Bl, -1))
  return block_sparse_attention_indices(
      q, k_r[:, :, :, 0].reshape(Bl, -1, 1, k_r.shape[-1]),
      v_r[:, :, :, 0].reshape(Bl, -1, 1, v_r.shape[-1]), lists, counts, block_q=plan.block_size,
      block_kv=plan.block_size, mask=mask, scale=scale, q_positions=q_pos.reshape(-1),
      k_positions=k_pos.reshape(-1), segment_ids=segment_ids, return_lse=True,
      implementation="pallas")
