"""Padded batches on the block-sparse XLA path: cost follows the real lengths.

Per-batch sequence lengths (``query_seq_lengths`` / ``key_value_seq_lengths``)
are not turned into a dense [B, T, S] mask. The engine runs once per batch
element (a ``lax.map``); for each, the work items of the static schedules
whose q-block starts at or after ``q_len[b]`` or whose first k-block starts at
or after ``kv_len[b]`` are dropped, the rest are compacted (stable, so rows
stay contiguous) and a loop with a run-time trip count visits them
(``engine.DynSched``). Partial blocks at the boundaries are masked element-wise
(``tiles.visibility`` reads ``Aux.lens``). The total work is the sum of every
sequence's real work, plus per batch element at most ``lanes`` idle item slots.

Lanes: item i runs in lane ``i // steps``; with ``steps`` at least the longest
row's item count a row spans at most two lanes, so two accumulator slot groups
per q-block suffice (one when there is one lane).
"""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.block_sparse import engine as E
from attnjax.block_sparse import schedule as SC
from attnjax.block_sparse import tiles as Tl


def check_lengths(name: str, x, B: int):
  """Sequence lengths [B] int32 (an integer array), or None when ``x`` is None."""
  if x is None:
    return None
  x = jnp.asarray(x)
  if x.shape != (B,):
    raise ValueError(f"{name} must have shape [B]=({B},), got {x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(
        f"{name} must be an integer array of shape [B]=({B},) (lengths are not "
        f"truncated), got dtype {x.dtype}.")
  return x.astype(jnp.int32)


def full_lengths(q_len, kv_len, B: int, T: int, S: int):
  """(q_len, kv_len) [B] int32 with omitted ones as the full lengths, or None if both are."""
  if q_len is None and kv_len is None:
    return None
  q_len = jnp.full((B,), T, jnp.int32) if q_len is None else q_len
  kv_len = jnp.full((B,), S, jnp.int32) if kv_len is None else kv_len
  return q_len, kv_len


def lengths_mask(lens, T: int, S: int):
  """The visibility the lengths define, [B, 1, T, S] bool (for the dense reference)."""
  q_len, kv_len = lens
  return ((jnp.arange(T)[None, :, None] < q_len[:, None, None])
          & (jnp.arange(S)[None, None, :] < kv_len[:, None, None]))[:, None]


def _flatten(s: SC.Schedule):
  """Row-major item arrays [Hl, P] (P = lanes * most steps), lanes, most steps, slot groups."""
  _, Hl, lanes, steps = s.qb.shape
  g = s.kb.shape[-1]
  qb = s.qb.reshape(Hl, -1)
  kb = s.kb.reshape(Hl, -1, g)
  valid = s.valid.reshape(Hl, -1)
  kval = s.kval.reshape(Hl, -1, g)
  n = int(valid.sum(1).max())
  longest = max(int(np.bincount(qb[h][valid[h]]).max(initial=0)) for h in range(Hl))
  if lanes == 1:
    most, groups = n, 1
  else:
    most, groups = max(-(-n // lanes), longest), 2
  size = lanes * most
  pad = size - qb.shape[1]
  if pad > 0:
    qb, valid = np.pad(qb, ((0, 0), (0, pad))), np.pad(valid, ((0, 0), (0, pad)))
    kb, kval = np.pad(kb, ((0, 0), (0, pad), (0, 0))), np.pad(kval, ((0, 0), (0, pad), (0, 0)))
  else:
    qb, kb, valid, kval = qb[:, :size], kb[:, :size], valid[:, :size], kval[:, :size]
  return (qb, kb, valid, kval), lanes, longest, groups


def compact(s: SC.Schedule, q_len, kv_len, *, bq: int, bk: int, nq: int):
  """The items of ``s`` inside the real lengths (scalars), compacted: (slot groups, DynSched)."""
  (qb, kb, valid, kval), lanes, longest, groups = _flatten(s)
  Hl, size = qb.shape
  keep = jnp.asarray(valid) & (qb * bq < q_len) & (kb[..., 0] * bk < kv_len)
  order = jnp.argsort(~keep, axis=1, stable=True)
  take = lambda x: jnp.take_along_axis(jnp.asarray(x), order.reshape(
      order.shape + (1,) * (np.ndim(x) - 2)), axis=1)
  qb_c, kb_c, kval_c, ok = take(qb), take(kb), take(kval), take(keep)
  n = keep.sum(1).max().astype(jnp.int32)
  if lanes == 1:
    steps = n
  else:
    steps = jnp.maximum(-(-n // lanes), longest).astype(jnp.int32)
  i = jnp.arange(size, dtype=jnp.int32)
  lane_of = i // jnp.maximum(steps, 1)
  heads = jnp.arange(Hl, dtype=jnp.int32)[:, None]
  first = jnp.full((Hl, nq), size, jnp.int32).at[heads, qb_c].min(
      jnp.where(ok, i[None], size))
  piece = lane_of[None] - first[heads, qb_c] // jnp.maximum(steps, 1)
  slot = jnp.where(ok, qb_c + nq * piece, nq * groups).astype(jnp.int32)
  sched = E.DynSched(qb_c[None], kb_c[None], slot[None], ok[None], kval_c[None], steps,
                     jnp.arange(lanes, dtype=jnp.int32))
  return groups, sched


def attend_by_batch(cfg: Tl.Cfg, kinds, scheds: Tuple[SC.Schedule, ...], q_r, k_r, v_r,
                    bias_r, score, aux: Tl.Aux, needs_row_count: bool):
  """``engine.attend`` once per batch element over its compacted items.

  ``scheds``: the plan's numpy schedules (built for B = 1); ``aux.lens`` the
  lengths [B]. Other arguments as ``engine.attend``. Returns out
  [B, Hl, nq, R*bq, Hv] and lse [B, Hl, nq, R*bq] float32.
  """
  B = cfg.B
  one = lambda shape: None if shape is None else (1,) + tuple(shape[1:])
  cfg1 = cfg._replace(B=1, bias_shape=one(cfg.bias_shape), pair_shape=one(cfg.pair_shape))
  per_batch = lambda x: x is not None and x.shape[0] == B and B > 1
  batched = dict(q=q_r, k=k_r, v=v_r, q_len=aux.lens[0], kv_len=aux.lens[1])
  if aux.drop is not None:   # per-(batch, head) dropout keys: batch b keeps its own
    batched["drop"] = aux.drop
  fixed = {}
  for name, x in (("bias", bias_r), ("q_pos", aux.q_pos), ("k_pos", aux.k_pos),
                  ("q_seg", aux.q_seg), ("k_seg", aux.k_seg), ("pair", aux.pair)):
    (batched if per_batch(x) else fixed)[name] = x

  def one_batch(xs):
    get = lambda name: xs[name][None] if name in xs else fixed[name]
    q_len, kv_len = xs["q_len"], xs["kv_len"]
    aux1 = Tl.Aux(get("q_pos"), get("k_pos"), get("q_seg"), get("k_seg"), get("pair"),
                  (q_len[None], kv_len[None]), xs["drop"][None] if "drop" in xs else None)
    kinds1, dyn = [], []
    for kind, s in zip(kinds, scheds):
      groups, d = compact(s, q_len, kv_len, bq=cfg.bq, bk=cfg.bk, nq=cfg.nq)
      kinds1.append((kind[0], groups, kind[2]))
      dyn.append(d)
    kinds1, dyn = tuple(kinds1), tuple(dyn)
    row_count = None
    if needs_row_count:
      row_count = jax.lax.stop_gradient(E.row_counts(cfg1, kinds1, aux1, dyn))
    out, lse = E.attend(cfg1, kinds1, get("q"), get("k"), get("v"), get("bias"), score, aux1,
                        dyn, row_count)
    return out[0], lse[0]

  return jax.lax.map(one_batch, batched)
