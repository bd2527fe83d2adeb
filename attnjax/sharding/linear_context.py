"""Sequence-parallel linear attention: a prefix scan of chunk states across devices.

Lightning Attention-2 (arXiv:2401.04658) / TNL (arXiv:2405.17381) chunking,
lifted from chunks inside one device to one chunk per device.

The sequence is split into ``C`` contiguous shards over the mesh's
``context`` axis (heads optionally over ``heads``, batch over ``data``).
Causal: every device runs the chunked engine (``attnjax.linear_attention``)
on its shard from a zero state, which gives its local output and the state
``S_c = sum_j lambda^(Tl - 1 - j) phi(k_j) v_j^T`` [F, E] of its keys. The
state entering shard ``c`` is the decayed prefix
``P_c = sum_{c' < c} lambda^(Tl (c - 1 - c')) S_c'`` (the decay of a whole
shard composes multiplicatively: ``lambda^Tl``), computed by a
Hillis-Steele scan of ``ppermute`` steps on the states only: one shift and
``ceil(log2(C - 1))`` doubling steps, each moving one [B, h, F, E] state per
device, so a device receives ``O(log C * F * E)`` numbers whatever the
sequence length (never keys or values). Each query then adds its share
``lambda^(i + 1) phi(q_i) . P_c`` of the incoming state. Without decay the
states of the query heads of one GQA group are equal and only the KV heads'
states travel. Non-causal attention needs one ``psum`` of the states.
Autodiff through ``shard_map`` gives the backward (the transpose of a
``ppermute`` is the reverse ``ppermute``).

Segment ids (packed documents): each device also sends, with its
state, the ids of its first and last token and whether it is one document
throughout; the scan is then a segmented scan (a shard that continues the
previous document adds to its state, a new document restarts it), the state
a shard sends holds only the keys of its last document, and only the queries
of a shard's first document read the incoming state. Non-causal adds the
same scan of the reversed sequence (the next shards' keys, read by the
shard's last document) before the normaliser. Every document must be one
run of equal ids, ids non-decreasing along T (as packing writes them; a
padded tail takes an id of its own, at least the last one); a row that
breaks this returns NaN (one ``psum`` of a flag per row), so equal ids are
one document, as unsharded, wherever the output is not NaN. Within a shard
the documents take ``attnjax.linear_attention``'s chunked document path (the
state is cleared at each document start), as unsharded. A scan step moves one
state and [B, 4] ids.

Custom positions run where their causal order is the order along T
(:func:`check_linear_positions`).
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from attnjax.block_sparse.families import sliding_window_attention
from attnjax.core import precision
from attnjax.core import validation as V
from attnjax.linear.api import linear_attention, scan_order_violations
from attnjax.linear.based import BRANCHES, window_sides
from attnjax.linear.decay import resolve_decay
from attnjax.linear.feature_maps import resolve_feature_map
from attnjax.sharding.mesh import check_segment_ids


def _mesh_axis(mesh: Mesh, name: Optional[str]) -> Optional[str]:
  return name if name is not None and name in mesh.axis_names else None


def check_context_mesh(mesh: Mesh, *, batch: int, num_heads: int, num_kv_heads: int,
                       context_axis: str, data_axis: Optional[str],
                       heads_axis: Optional[str]):
  """Resolves the mesh axes of a context-parallel call; ValueError naming the field.

  Returns (data axis or None, heads axis or None, C, X): the context and
  heads axis sizes.
  """
  if context_axis not in mesh.axis_names:
    raise ValueError(f"context_axis={context_axis!r} is not an axis of the mesh "
                     f"{tuple(mesh.axis_names)}.")
  dax, hax = _mesh_axis(mesh, data_axis), _mesh_axis(mesh, heads_axis)
  if context_axis in (dax, hax):
    raise ValueError(f"context_axis={context_axis!r} must differ from data_axis and heads_axis.")
  if dax and batch % mesh.shape[dax]:
    raise ValueError(f"batch B={batch} is not divisible by the {dax!r} axis size "
                     f"{mesh.shape[dax]}.")
  X = mesh.shape[hax] if hax else 1
  for field, n in (("num_heads N", num_heads), ("num_kv_heads K", num_kv_heads)):
    if n % X:
      raise ValueError(f"{field}={n} is not divisible by the {hax!r} axis size {X}.")
  return dax, hax, mesh.shape[context_axis], X


def check_linear_positions(q_positions, k_positions, batch: int, seq_len: int, *,
                           segment_ids=None, causal: bool = True, same_distances: bool = False,
                           key_len: Optional[int] = None,
                           what: str = "context-parallel linear attention"):
  """Custom positions of a linear route: exact when their causal order is the order along T.

  Key j is visible to query i iff ``k_pos[j] <= q_pos[i]``, the scan's order
  iff ``k_pos[i] <= q_pos[i] < k_pos[i + 1]`` for every i (i + 1 in the same
  document): e.g. ``arange(T) + offset``, or positions restarting at each
  packed document. ``same_distances`` (decay): also equal and consecutive
  within each document. Non-causal attention without decay ignores positions.
  Shapes [T] or [B, T] ([S] / [B, S] for keys); None is ``arange(T)``.

  Raises ValueError for a wrong shape, NotImplementedError naming the argument
  and the first index for concrete positions that break the rule. Returns
  None, or (traced positions or ids) a bool [R, 1, 1, 1] (R = 1 or B): False
  where the rows' outputs must be NaN.
  """
  given = [(n, p) for n, p in (("q_positions", q_positions), ("k_positions", k_positions))
           if p is not None]
  rows = []
  for name, pos in given:
    p = pos if isinstance(pos, jax.core.Tracer) else np.asarray(pos)
    n, t = (("S", key_len or seq_len) if name[0] == "k" else ("T", seq_len))
    if p.ndim not in (1, 2) or p.shape[-1] != t or (p.ndim == 2 and p.shape[0] != batch):
      raise ValueError(f"{name} must have shape [{n}] or [B, {n}] with B={batch}, {n}={t}, got "
                       f"{tuple(p.shape)}.")
    rows.append(p.shape[0] if p.ndim == 2 else 1)
  if not given or not (causal or same_distances):
    return None
  seg = check_segment_ids(segment_ids, batch, seq_len)
  traced = any(isinstance(x, jax.core.Tracer) for x in (q_positions, k_positions, seg))
  xp = jnp if traced else np
  r = max(rows + ([batch] if seg is not None else [1]))
  pos = lambda p: xp.broadcast_to(xp.reshape(xp.arange(seq_len) if p is None else xp.asarray(p),
                                             (-1, seq_len)), (r, seq_len))
  q, k = pos(q_positions), pos(k_positions)
  same = (xp.ones((r, seq_len - 1), bool) if seg is None else
          xp.asarray(seg)[:, 1:] == xp.asarray(seg)[:, :-1])
  rule = ("q_pos[i] == k_pos[i] and k_pos[i + 1] == k_pos[i] + 1 (decay counts distances)"
          if same_distances else "k_pos[i] <= q_pos[i] < k_pos[i + 1]")
  bad = scan_order_violations(q, k, same, same_distances, xp)
  if traced:
    return ~bad.any(axis=1).reshape(r, 1, 1, 1)
  if bad.any():
    b, i = np.argwhere(bad)[0]
    nxt = f", k_pos[i + 1]={k[b, i + 1]}" if i + 1 < seq_len else ""
    raise NotImplementedError(
        f"{what} runs custom positions only where their causal order is the order along T: "
        f"{rule} for every i (i + 1 in the same document), as arange(T) + offset or positions "
        f"restarting in each packed document; got custom {' and '.join(n for n, _ in given)} "
        f"that break it at row {b}, i={i} (q_pos[i]={q[b, i]}, k_pos[i]={k[b, i]}{nxt}).")
  return None


def scan_steps(num_shards: int) -> int:
  """``ppermute`` steps of the exclusive state scan over C shards: 1 + ceil(log2(C - 1))."""
  if num_shards <= 1:
    return 0
  return 1 + (math.ceil(math.log2(num_shards - 1)) if num_shards > 2 else 0)


def exclusive_state_scan(states, chunk_log_decay, axis_name: str, num_shards: int):
  """Per device c: ``sum_{c' < c} exp(chunk_log_decay * (c - 1 - c')) states[c']``.

  Inside ``shard_map``. ``states`` [B, h, F, E] (this device's); ``chunk_log_decay``
  [h] the log-decay of a whole shard (<= 0) or None (no decay). Device 0 gets
  zeros. :func:`scan_steps` ``ppermute`` calls, each of one state.
  """
  C = num_shards
  if C == 1:
    return jnp.zeros_like(states)
  x = jax.lax.ppermute(states, axis_name, [(i, i + 1) for i in range(C - 1)])
  d = 1
  while d < C - 1:   # x_c covers the d shards before c; add the d before those
    y = jax.lax.ppermute(x, axis_name, [(i, i + d) for i in range(C - d)])
    if chunk_log_decay is not None:
      y = y * jnp.exp(chunk_log_decay * d).astype(y.dtype)[None, :, None, None]
    x = x + y
    d *= 2
  return x


def segmented_exclusive_scan(states, meta, chunk_log_decay, axis_name: str, num_shards: int,
                             reverse: bool = False):
  """:func:`exclusive_state_scan` over documents: per device c, the state of the keys of the
  last document before shard c (0 when it ended before), and that document's ids.

  Inside ``shard_map``. ``states`` [B, h, F, E]: this device's keys of its last
  document; ``meta`` int32 [B, 4]: (first id, last id, 1 if the shard is one
  document, 1). Returns (state [B, h, F, E], meta [B, 4]) of shards 0..c-1 (meta
  column 3 is 0 on device 0: nothing before). Two ``ppermute`` calls per step.
  ``reverse``: the same scan from the last device down (shards c+1..C-1, with
  the states and ids of the reversed sequence).
  """
  C = num_shards
  if C == 1:
    return jnp.zeros_like(states), jnp.zeros_like(meta)
  shift = lambda a, d: jax.lax.ppermute(a, axis_name, [(i + d, i) if reverse else (i, i + d)
                                                       for i in range(C - d)])
  x, xm = shift(states, 1), shift(meta, 1)
  d = 1
  while d < C - 1:   # x covers the d shards before c; y the d before those
    y, ym = shift(x, d), shift(xm, d)
    if chunk_log_decay is not None:
      y = y * jnp.exp(chunk_log_decay * d).astype(y.dtype)[None, :, None, None]
    a_ne = ym[:, 3] == 1
    join = a_ne & (xm[:, 2] == 1) & (ym[:, 1] == xm[:, 0])
    x = jnp.where(join[:, None, None, None], y + x, x)
    xm = jnp.stack([jnp.where(a_ne, ym[:, 0], xm[:, 0]), xm[:, 1],
                    jnp.where(a_ne, ym[:, 2] * join, xm[:, 2]), jnp.maximum(ym[:, 3], xm[:, 3])],
                   axis=1)
    d *= 2
  return x, xm


def _segmented_local(qf, kf, vv, seg, sl, has_decay, group, tl, axis_name, C, dt,
                     reverse=False):
  """Carry of the previous shards' last document into this shard's first one, and the
  NaN flag of rows whose ids decrease (segmented scan; see the module docstring).

  qf [b, tl, N, F], kf [b, tl, K, F], vv [b, tl, K, E], seg int32 [b, tl].
  Returns (carry [b, tl, N, E], bad [b] bool). ``reverse`` (no decay): the
  carry of the next shards' first document into this shard's last one (the
  scan of the reversed sequence, ids negated so that they still increase);
  bad is then None (the forward scan checks the ids).
  """
  if reverse:
    qf, kf, vv = (jnp.flip(x, 1) for x in (qf, kf, vv))
    seg = -jnp.flip(seg, 1)
  b, n = qf.shape[0], qf.shape[2]
  first, last = seg[:, 0], seg[:, -1]
  in_first = jnp.cumprod((seg == first[:, None]).astype(jnp.int32), axis=1) == 1
  in_last = jnp.flip(jnp.cumprod(jnp.flip(seg == last[:, None], 1).astype(jnp.int32), axis=1),
                     1) == 1
  kk = kf.shape[2]
  # state of the last document's keys, decayed to the end of the shard: [b, h, F, E]
  if has_decay:   # per query head
    w = jnp.exp(-sl[:, None] * (tl - 1 - jnp.arange(tl, dtype=dt))[None]).reshape(
        kk, group, tl)
    s_loc = jnp.einsum("bjkf,bjke,kgj,bj->bkgfe", kf, vv, w, in_last.astype(dt)).reshape(
        b, n, kf.shape[-1], vv.shape[-1])
  else:           # the query heads of a GQA group share one state: the KV heads'
    s_loc = jnp.einsum("bjkf,bjke,bj->bkfe", kf, vv, in_last.astype(dt))
  meta = jnp.stack([first, last, in_first[:, -1].astype(jnp.int32), jnp.ones_like(first)], 1)
  s_in, m_in = segmented_exclusive_scan(s_loc, meta, -sl * tl if has_decay else None,
                                        axis_name, C, reverse)
  if not has_decay:
    s_in = jnp.repeat(s_in, group, axis=1)
  use = (m_in[:, 3:] == 1) & in_first & (seg == m_in[:, 1:2])               # [b, tl]
  carry = jnp.einsum("btnf,bnfe->btne", qf, s_in) * use[:, :, None, None].astype(dt)
  if has_decay:
    carry = carry * jnp.exp(-sl[None, :] * (jnp.arange(tl, dtype=dt)[:, None] + 1))[..., None]
  if reverse:
    return jnp.flip(carry, 1), None
  bad = (seg[:, 1:] < seg[:, :-1]).any(1) | ((m_in[:, 3] == 1) & (first < m_in[:, 1]))
  bad = jax.lax.psum(bad.astype(jnp.int32), axis_name) > 0
  return carry, bad


def context_parallel_linear_attention(query, key, value, mesh: Mesh, *,
                                      feature_map="identity", causal: bool = True, decay=None,
                                      normalize: bool = False, eps: float = 1e-6,
                                      chunk_size: int = 64, initial_state=None,
                                      return_state: bool = False,
                                      implementation: Optional[str] = None,
                                      segment_ids=None, q_positions=None, k_positions=None,
                                      data_axis: Optional[str] = "data",
                                      heads_axis: Optional[str] = "heads",
                                      context_axis: str = "context"):
  """``attnjax.linear_attention`` with the sequence split over ``context_axis``.

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv]; N % K == 0
      (global arrays; sharded here as P(data, context, heads, None)). Causal
      needs T == S; T and S must be divisible by the context axis size.
    mesh: a Mesh with ``context_axis`` (``data_axis`` / ``heads_axis`` are used
      when the mesh has them; pass None to leave one out).
    feature_map, causal, decay, normalize, eps, chunk_size, initial_state,
      return_state, implementation: as :func:`attnjax.linear_attention`
      (``feature_map="taylor", normalize=True`` is BASED's linear branch);
      ``chunk_size`` and ``implementation`` apply to each device's shard.
    segment_ids: optional int [B, T] document ids (packed sequences; T == S,
      without initial_state / return_state): each document one run of equal
      ids, ids non-decreasing along T; a row that is not returns NaN. The
      states of the scan then hold one document each (module docstring);
      with causal=False a query sees every key of its document.
    q_positions, k_positions: optional int [T] / [B, T] ([S] / [B, S]), where
      :func:`check_linear_positions` holds (e.g. ``arange(T) + offset``, or
      positions restarting at 0 in each packed document; not with decay and
      initial_state); traced ones that break it give NaN rows. Non-causal
      attention ignores them.

  Returns:
    out [B, T, N, Hv] in query.dtype (and the final state [B, N, F, E] if
    return_state), equal to the unsharded :func:`attnjax.linear_attention`.
  """
  query, key, value, initial_state = V.as_arrays(query, key, value, initial_state)
  d = V.check_qkv(query, key, value)
  V.check_positive_int("chunk_size", chunk_size)
  dax, hax, C, _ = check_context_mesh(mesh, batch=d.B, num_heads=d.N, num_kv_heads=d.K,
                                      context_axis=context_axis, data_axis=data_axis,
                                      heads_axis=heads_axis)
  for field, n in (("query length T", d.T), ("key length S", d.S)):
    if n % C:
      raise ValueError(f"{field}={n} is not divisible by the {context_axis!r} axis size {C}.")
  if causal and d.T != d.S:
    raise ValueError(f"causal context-parallel linear attention needs T == S (self-attention); "
                     f"got query {query.shape} and key {key.shape}.")
  slopes = resolve_decay(decay, d.N)
  if slopes is not None and not causal:
    raise NotImplementedError(
        "decay needs causal=True: a non-causal decayed form has no single linear state.")
  phi = resolve_feature_map(feature_map)
  dt = precision.accumulation_dtype(query)
  f = jax.eval_shape(phi, jax.ShapeDtypeStruct(query.shape, dt)).shape[-1]
  e = d.Hv + int(normalize)
  if initial_state is not None and tuple(initial_state.shape) != (d.B, d.N, f, e):
    raise ValueError(
        f"initial_state must have shape [B, N, F, E]={(d.B, d.N, f, e)} (E = Hv + 1 when "
        f"normalize=True), got {tuple(initial_state.shape)}.")
  segs = check_segment_ids(segment_ids, d.B, d.T)
  if segs is not None:
    if d.T != d.S:
      raise ValueError(f"segment_ids needs self-attention (T == S); got query {query.shape} "
                       f"and key {key.shape}.")
    if initial_state is not None or return_state:
      raise NotImplementedError("segment_ids cannot be combined with initial_state or "
                                "return_state (which document would the state belong to?).")
  has_decay, has_s0 = slopes is not None, initial_state is not None
  ok = check_linear_positions(q_positions, k_positions, d.B, d.T, segment_ids=segs,
                              causal=causal, same_distances=has_decay, key_len=d.S)
  if has_decay and has_s0 and (q_positions is not None or k_positions is not None):
    raise NotImplementedError("initial_state with decay and custom positions: the initial "
                              "state stands for keys before position 0 and decays with the "
                              "positions, not with the index along T; shift the state instead.")
  tl, group = d.T // C, d.N // d.K
  slopes = jnp.zeros((d.N,), jnp.float32) if slopes is None else slopes
  s0 = jnp.zeros((d.B, d.N, 1, 1), dt) if initial_state is None else initial_state.astype(dt)

  def local_fn(q, k, v, sl, s0, *seg):
    c = jax.lax.axis_index(context_axis)
    vv = v.astype(dt)
    if normalize:
      vv = jnp.concatenate([vv, jnp.ones(vv.shape[:-1] + (1,), dt)], axis=-1)
    qf = phi(q.astype(dt)).astype(dt)
    sl = sl.astype(dt)
    if seg:
      o = linear_attention(q.astype(dt), k.astype(dt), vv, feature_map=phi, causal=causal,
                           decay=sl if has_decay else None, chunk_size=chunk_size,
                           segment_ids=seg[0], implementation=implementation)
      args = (qf, phi(k.astype(dt)).astype(dt), vv, seg[0], sl, has_decay, group, tl,
              context_axis, C, dt)
      carry, bad = _segmented_local(*args)
      if not causal:   # and the keys of the shard's last document on the next devices
        carry = carry + _segmented_local(*args, reverse=True)[0]
      o = jnp.where(bad[:, None, None, None], jnp.nan, o + carry)
    elif causal:
      o, s_loc = linear_attention(q.astype(dt), k.astype(dt), vv, feature_map=phi,
                                  causal=True, decay=sl if has_decay else None,
                                  chunk_size=chunk_size, return_state=True,
                                  implementation=implementation)
      b, n = s_loc.shape[:2]
      if has_decay:
        s_in = exclusive_state_scan(s_loc, -sl * tl, context_axis, C)
      else:   # the query heads of a GQA group share one state: send the KV heads'
        s_kv = s_loc.reshape((b, n // group, group) + s_loc.shape[2:])[:, :, 0]
        s_in = jnp.repeat(exclusive_state_scan(s_kv, None, context_axis, C), group, axis=1)
      if has_s0:
        s_in = s_in + s0 * (jnp.exp(-sl * tl * c)[None, :, None, None] if has_decay else 1)
      carry = jnp.einsum("btnf,bnfe->btne", qf, s_in)
      if has_decay:
        carry = carry * jnp.exp(-sl[None, :] * (jnp.arange(tl, dtype=dt)[:, None] + 1))[..., None]
      o = o + carry
      if return_state:
        final = s_in * jnp.exp(-sl * tl)[None, :, None, None] + s_loc
        state = jax.lax.psum(jnp.where(c == C - 1, final, 0), context_axis)
    else:
      kf = phi(k.astype(dt)).astype(dt)
      kv = jax.lax.psum(jnp.einsum("bskf,bske->bkfe", kf, vv), context_axis)
      b, t, n = qf.shape[:3]
      qg = qf.reshape(b, t, n // group, group, qf.shape[-1])
      o = jnp.einsum("btkgf,bkfe->btkge", qg, kv).reshape(b, t, n, e)
      if has_s0:
        o = o + jnp.einsum("btnf,bnfe->btne", qf, s0)
      if return_state:
        state = jnp.repeat(kv, group, axis=1) + (s0 if has_s0 else 0)
    if normalize:
      o = o[..., :-1] / (o[..., -1:] + eps)
    out = o.astype(query.dtype)
    return (out, state.astype(dt)) if return_state else out

  spec = P(dax, context_axis, hax, None)
  state_spec = P(dax, hax, None, None)
  out_specs = (spec, state_spec) if return_state else spec
  extra = () if segs is None else (segs,)
  fn = jax.shard_map(local_fn, mesh=mesh, in_specs=(spec, spec, spec, P(hax), state_spec) + (
      P(dax, context_axis),) * len(extra), out_specs=out_specs, check_vma=False)
  res = fn(query, key, value, slopes, s0, *extra)
  if ok is None:
    return res
  nan = lambda x: jnp.where(ok, x, jnp.nan).astype(x.dtype)
  return (nan(res[0]), nan(res[1])) if return_state else nan(res)


def context_parallel_based_attention(query, key, value, mesh: Mesh, *, causal: bool = True,
                                     window=None, feature_map="taylor", eps: float = 1e-12,
                                     chunk_size: int = 64, branch: str = "sum", scale=None,
                                     implementation: Optional[str] = None,
                                     data_axis: Optional[str] = "data",
                                     heads_axis: Optional[str] = "heads",
                                     context_axis: str = "context"):
  """``attnjax.based_attention`` (BASED, arXiv:2402.18668) with the sequence split.

  The linear branch is :func:`context_parallel_linear_attention` (state scan);
  the sliding-window branch receives the ``left`` key/value rows before the
  shard from the previous device and the ``right`` rows after it from the
  next (two ``ppermute`` calls; a window longer than a shard raises), and
  attends on the block-sparse engine with the shard's positions, the rows
  past the global borders in a segment no query has. Self-attention (T == S);
  arguments and result as :func:`attnjax.based_attention`.
  """
  if branch not in BRANCHES:
    raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}.")
  query, key, value = V.as_arrays(query, key, value)
  d = V.check_qkv(query, key, value)
  axes = dict(data_axis=data_axis, heads_axis=heads_axis, context_axis=context_axis)
  out = None
  if branch in ("sum", "linear"):
    out = context_parallel_linear_attention(
        query, key, value, mesh, feature_map=feature_map, causal=causal, normalize=True,
        eps=eps, chunk_size=chunk_size, implementation=implementation, **axes)
  if branch in ("sum", "window"):
    local = _window_branch(query, key, value, mesh, d, window_sides(window, causal), causal,
                           scale, **axes)
    out = local if out is None else out + local
  return out


def _window_branch(query, key, value, mesh, d, sides, causal, scale, *, data_axis, heads_axis,
                   context_axis):
  dax, hax, C, _ = check_context_mesh(mesh, batch=d.B, num_heads=d.N, num_kv_heads=d.K,
                                      context_axis=context_axis, data_axis=data_axis,
                                      heads_axis=heads_axis)
  if d.T != d.S:
    raise ValueError(f"context-parallel BASED needs T == S (self-attention); got query "
                     f"{query.shape} and key {key.shape}.")
  if d.T % C:
    raise ValueError(f"query length T={d.T} is not divisible by the {context_axis!r} axis "
                     f"size {C}.")
  tl = d.T // C
  left, right = sides if C > 1 else (0, 0)
  for side, h in (("left", left), ("right", right)):
    if h > tl:
      raise ValueError(f"window: the {side} side of {h} keys is longer than the local shard "
                       f"of {tl} tokens ({d.T} / {C} shards); use fewer shards.")
  q_pos = left + np.arange(tl)
  k_pos = np.arange(left + tl + right)

  def local_fn(q, k, v):
    c = jax.lax.axis_index(context_axis)

    def halo(x):
      parts = [x]
      if left:
        parts.insert(0, jax.lax.ppermute(x[:, tl - left:], context_axis,
                                         [(i, i + 1) for i in range(C - 1)]))
      if right:
        parts.append(jax.lax.ppermute(x[:, :right], context_axis,
                                      [(i + 1, i) for i in range(C - 1)]))
      return jnp.concatenate(parts, axis=1)

    outside = ((k_pos < left) & (c == 0)) | ((k_pos >= left + tl) & (c == C - 1))
    k_seg = jnp.broadcast_to(outside.astype(jnp.int32), (q.shape[0], k_pos.size))
    q_seg = jnp.zeros((q.shape[0], tl), jnp.int32)
    return sliding_window_attention(q, halo(k), halo(v), left=sides[0], right=sides[1],
                                    causal=causal, scale=scale, q_positions=q_pos,
                                    k_positions=k_pos, segment_ids=(q_seg, k_seg))

  spec = P(dax, context_axis, hax, None)
  return jax.shard_map(local_fn, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                       check_vma=False)(query, key, value)


def linear_communication_bytes(*, batch: int, seq_len: int, num_heads: int, num_kv_heads: int,
                               features: int, value_dim: int, head_dim: Optional[int] = None,
                               num_chunks: int, head_shards: int = 1, causal: bool = True,
                               decay: bool = True, normalize: bool = False,
                               segment_ids: bool = False, state_itemsize: int = 4,
                               kv_itemsize: int = 2) -> Dict[str, float]:
  """Forward bytes each device receives: the state scan vs an all-gather of K/V.

  ``state_bytes`` is (C-1)/C of an all-reduce for ``causal=False`` (ring);
  the scan's :func:`scan_steps` states of [B, h, F, E] otherwise (h: local
  query heads with decay, local KV heads without); ``segment_ids``: the busiest
  device's steps of the segmented scan(s) (a state and [B, 4] int32 ids each)
  and a flag per row. ``allgather_bytes``: (C - 1) remote shards of K and V.
  """
  head_dim = features if head_dim is None else head_dim
  kl, nl = num_kv_heads // head_shards, num_heads // head_shards
  h = nl if (causal and decay) else kl
  one_state = batch * h * features * (value_dim + int(normalize)) * state_itemsize
  if segment_ids and num_chunks > 1:
    shifts = [1] + [2 ** i for i in range(scan_steps(num_chunks) - 1)]
    got = lambda c: sum(c >= d for d in shifts)   # the steps device c receives
    steps = max(got(c) + (0 if causal else got(num_chunks - 1 - c)) for c in range(num_chunks))
    state = steps * (one_state + batch * 4 * 4) + batch * 4
  elif causal:
    state = scan_steps(num_chunks) * one_state
  else:
    state = 2 * (num_chunks - 1) / num_chunks * one_state
  tl = seq_len // num_chunks
  allgather = (num_chunks - 1) * batch * tl * kl * (head_dim + value_dim) * kv_itemsize
  return {"state_bytes": float(state), "allgather_bytes": float(allgather),
          "ratio": float(state / allgather) if allgather else 0.0}
