"""Selection toolkit shared by the content-based sparse families (papers listed in attnjax.dynamic).

Every content-based method turns scores computed from the data into a
*layout*: either block lists ``(kv_block_indices [B, N|K, nq, k],
kv_block_counts [B, N|K, nq])`` for the block-sparse path, or token lists
``indices [B, T, N, k]`` with a ``valid`` flag for the gather path. Sizes are
static (``k`` is a Python int) so selection runs under ``jit`` without
recompiling when the data changes.

Padding convention (the one of :class:`attnjax.masks.BlockLayout`): a row of
block indices holds ``count`` distinct valid entries in increasing order,
followed by copies of the last valid entry (0 for an empty row).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.core import validation as V

__all__ = [
    "pool_blocks", "block_validity", "topk_blocks", "attention_mass_recall",
    "block_layout_to_mask", "token_indices_to_mask", "expand_block_heads",
    "normalize_positions", "pooled_topk_blocks",
]

_POOLS = ("mean", "max", "min")


def pool_blocks(x, block: int, *, method: str = "mean", axis: int = 1):
  """Pools ``x`` over consecutive blocks of ``block`` elements along ``axis``.

  Args:
    x: e.g. queries [B, T, N, H] or keys [B, S, K, H].
    block: block length; must divide ``x.shape[axis]``.
    method: "mean", "max" or "min".
    axis: the sequence axis (1 for BTNH).

  Returns:
    x with ``x.shape[axis] // block`` along ``axis`` (e.g. [B, T/block, N, H]).
  """
  block = V.check_positive_int("block", block)
  if method not in _POOLS:
    raise ValueError(f"method must be one of {_POOLS}, got {method!r}.")
  axis = axis % x.ndim
  L = x.shape[axis]
  if L % block:
    raise ValueError(f"block={block} does not divide the length {L} of axis {axis} "
                     f"of x with shape {x.shape}.")
  xr = x.reshape(x.shape[:axis] + (L // block, block) + x.shape[axis + 1:])
  fn = {"mean": jnp.mean, "max": jnp.max, "min": jnp.min}[method]
  return fn(xr, axis=axis + 1)


def normalize_positions(q_positions, k_positions, d: V.Dims):
  """(q_pos [B|1, T], k_pos [B|1, S]) int32 from the contract's defaults or overrides."""
  q_pos, k_pos = V.check_positions(q_positions, k_positions, d)
  return (q_pos if q_pos.ndim == 2 else q_pos[None]), (k_pos if k_pos.ndim == 2 else k_pos[None])


def block_validity(q_pos, k_pos, block_q: int, block_kv: int, *, causal: bool):
  """Which (q-block, k-block) pairs hold at least one visible pair.

  Args:
    q_pos: int [B|1, T]; k_pos: int [B|1, S] (see :func:`normalize_positions`).
    block_q, block_kv: block sizes dividing T and S.
    causal: when False every block is valid.

  Returns:
    bool [B|1, 1, nq, nk]: True where some key of the k-block has
    ``k_pos <= q_pos`` for some query of the q-block (causal), else all True.
  """
  T, S = q_pos.shape[-1], k_pos.shape[-1]
  _check_block_sizes(T, S, block_q, block_kv)
  nq, nk = T // block_q, S // block_kv
  if not causal:
    return jnp.ones((1, 1, nq, nk), bool)
  qmax = q_pos.reshape(q_pos.shape[0], nq, block_q).max(-1)
  kmin = k_pos.reshape(k_pos.shape[0], nk, block_kv).min(-1)
  return (kmin[:, None, :] <= qmax[:, :, None])[:, None]


def _check_block_sizes(T, S, block_q, block_kv):
  for name, b, L, letter in (("block_q", block_q, T, "T"), ("block_kv", block_kv, S, "S")):
    V.check_positive_int(name, b)
    if L % b:
      raise ValueError(f"{name}={b} must divide the sequence length {letter}={L}.")


def topk_blocks(scores, k: int, *, valid=None, force=None):
  """Fixed-size top-k block lists per (batch, head, q-block), jit-friendly.

  Args:
    scores: float [B, H, nq, nk] block scores (higher = keep); H is N or K.
    k: static number of blocks per row, 1 <= k <= nk. ``k > nk`` raises.
    valid: optional bool broadcastable to scores (e.g. :func:`block_validity`):
      invalid blocks are never selected, so a row may hold fewer than k.
    force: optional bool broadcastable to scores: valid blocks that are taken
      before any other (sinks, the diagonal, local blocks); when more than k
      are forced, the lowest-index forced blocks win.

  Returns:
    (indices int32 [B, H, nq, k], counts int32 [B, H, nq]): valid selected
    blocks in increasing order, then copies of the last one.
  """
  scores = jnp.asarray(scores)
  if scores.ndim != 4:
    raise ValueError(f"scores must have rank 4 [B, H, nq, nk], got shape {scores.shape}.")
  nk = scores.shape[-1]
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f"k must be a positive Python int (static), got {k!r}.")
  if k > nk:
    raise ValueError(f"k={k} is larger than the number of key blocks nk={nk} "
                     f"(scores shape {scores.shape}).")
  s = scores.astype(jnp.float32)
  ok = jnp.ones(s.shape, bool) if valid is None else _bool_flags("valid", valid, s.shape)
  s = jnp.where(jnp.isnan(s), -jnp.inf, s)
  # Finite ranks keep invalid blocks last and forced blocks first without inf ties.
  big = jnp.float32(3e38)
  s = jnp.clip(s, -1e38, 1e38)
  if force is not None:
    s = jnp.where(_bool_flags("force", force, s.shape), big, s)
  s = jnp.where(ok, s, -big)
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(s), k)
  sel_ok = jnp.take_along_axis(ok, idx, axis=-1)
  counts = sel_ok.sum(-1).astype(jnp.int32)
  idx = jnp.sort(jnp.where(sel_ok, idx, nk), axis=-1)
  return pad_block_lists(idx.astype(jnp.int32), counts), counts


def _bool_flags(name, x, shape):
  """``x`` broadcast to ``shape``; TypeError unless boolean (an int 2 would count twice)."""
  x = jnp.asarray(x)
  if x.dtype != bool:
    raise TypeError(f"{name} must be a boolean array broadcastable to the scores "
                    f"{shape}, got dtype {x.dtype} (shape {x.shape}); use {name} != 0.")
  try:
    return jnp.broadcast_to(x, shape)
  except ValueError as e:
    raise ValueError(f"{name} of shape {x.shape} does not broadcast to the scores "
                     f"[B, H, nq, nk]={shape}.") from e


def pooled_topk_blocks(query, key, k: int, *, block_q: int, block_kv: int, causal: bool = True,
                       per_kv_head: bool = False, q_positions=None, k_positions=None):
  """Block lists from pooled scores: the cheapest content-based selector.

  A q-block's score for a k-block is the dot product of the mean query of the
  block (also averaged over the query heads of a KV head when
  ``per_kv_head``) and the mean key of the k-block. With ``causal``, blocks
  with no visible pair are never chosen, and the valid k-blocks that overlap
  the q-block's own positions (the diagonal in self-attention) are always
  kept (the lowest-index ones if there are more than k).

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; k: static blocks per row.
    block_q, block_kv: block sizes dividing T and S.
    per_kv_head: one list per KV head, shared by its N // K query heads (the
      engine then stacks those heads into one tile) instead of one per head.

  Returns:
    (indices int32 [B, N or K, T // block_q, k], counts int32 [B, N or K, T // block_q]),
    as :func:`topk_blocks`.
  """
  d = V.check_qkv(query, key, key)
  _check_block_sizes(d.T, d.S, block_q, block_kv)
  nq, nk = d.T // block_q, d.S // block_kv
  qp = pool_blocks(query.astype(jnp.float32), block_q)  # [B, nq, N, H]
  kp = pool_blocks(key.astype(jnp.float32), block_kv)  # [B, nk, K, H]
  if per_kv_head:
    qp = qp.reshape(d.B, nq, d.K, d.N // d.K, d.H).mean(3)
  else:
    kp = jnp.repeat(kp, d.N // d.K, axis=2)
  scores = jnp.einsum("bqnh,bknh->bnqk", qp, kp)
  if not causal:
    return topk_blocks(scores, k)
  q_pos, k_pos = normalize_positions(q_positions, k_positions, d)
  valid = block_validity(q_pos, k_pos, block_q, block_kv, causal=True)
  qb = q_pos.reshape(q_pos.shape[0], nq, block_q)
  kb = k_pos.reshape(k_pos.shape[0], nk, block_kv)
  own = ((kb.min(-1)[:, None, :] <= qb.max(-1)[:, :, None])
         & (kb.max(-1)[:, None, :] >= qb.min(-1)[:, :, None]))  # [B|1, nq, nk]
  return topk_blocks(scores, k, valid=valid, force=own[:, None] & valid)


def pad_block_lists(indices, counts):
  """Replaces entries at positions >= count by the last valid entry (0 if none)."""
  pos = jnp.arange(indices.shape[-1])
  last = jnp.take_along_axis(indices, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
  last = jnp.where(counts[..., None] > 0, last, 0)
  return jnp.where(pos < counts[..., None], indices, last).astype(jnp.int32)


def expand_block_heads(x, num_heads: int):
  """[B, K, ...] per-KV-head lists -> [B, N, ...] per query head (N % K == 0)."""
  Hi = x.shape[1]
  if Hi == num_heads:
    return x
  if num_heads % Hi:
    raise ValueError(f"block lists have {Hi} heads (shape {x.shape}); expected N={num_heads} "
                     f"or a divisor of it (K).")
  return jnp.repeat(x, num_heads // Hi, axis=1)


def block_layout_to_mask(indices, counts, q_len: int, kv_len: int, block_q: int,
                         block_kv: int, num_heads: int):
  """Dense bool [B, N, T, S] of the blocks listed in (indices, counts) (for tests/oracles)."""
  _check_block_sizes(q_len, kv_len, block_q, block_kv)
  indices = expand_block_heads(jnp.asarray(indices), num_heads)
  counts = expand_block_heads(jnp.asarray(counts), num_heads)
  nk = kv_len // block_kv
  slot_ok = jnp.arange(indices.shape[-1]) < counts[..., None]
  onehot = jax.nn.one_hot(indices, nk, dtype=jnp.int32) * slot_ok[..., None]
  bm = onehot.sum(-2) > 0  # [B, N, nq, nk]
  return jnp.repeat(jnp.repeat(bm, block_q, axis=2), block_kv, axis=3)


def token_indices_to_mask(indices, kv_len: int, valid=None):
  """Dense bool [B, N, T, S] of token lists ``indices [B, T, N, k]`` (for tests/oracles)."""
  indices = jnp.asarray(indices)
  ok = jnp.ones(indices.shape, bool) if valid is None else jnp.broadcast_to(valid, indices.shape)
  onehot = jax.nn.one_hot(indices, kv_len, dtype=jnp.int32) * ok[..., None]
  return jnp.transpose(onehot.sum(-2) > 0, (0, 2, 1, 3))


def attention_mass_recall(query, key, selection, *, block_q=None, block_kv=None, valid=None,
                          causal: bool = True, q_positions=None, k_positions=None,
                          scale=None, reduce: bool = True):
  """Fraction of the true softmax attention mass that a layout keeps.

  Args:
    query: [B, T, N, H]; key: [B, S, K, H].
    selection: block lists ``(indices [B, N|K, nq, k], counts [B, N|K, nq])``
      (then give block_q and block_kv), or token lists ``indices [B, T, N, k]``
      (block_q None) with optional ``valid`` bool [B, T, N, k]. Entries must be
      distinct within a row (what every selector here returns).
    causal, q_positions, k_positions, scale: the attention whose mass is
      measured (dense softmax with causality by positions).
    reduce: mean over rows that see at least one key (a float32 scalar), or
      the per-row recall [B, T, N] (NaN for rows that see no key).

  The true probabilities are computed one query block at a time, so memory is
  O(block * S) per head, never T * S.
  """
  d = V.check_qkv(query, key, key)
  scale = V.check_scale(scale, d.H)
  q_pos, k_pos = normalize_positions(q_positions, k_positions, d)
  token_level = block_q is None
  if token_level:
    idx = jnp.asarray(selection)
    if idx.ndim != 4 or idx.shape[:3] != (d.B, d.T, d.N):
      raise ValueError(f"token indices must have shape [B, T, N, k]=({d.B}, {d.T}, {d.N}, k), "
                       f"got {idx.shape}.")
    ok = jnp.ones(idx.shape, bool) if valid is None else jnp.broadcast_to(valid, idx.shape)
    rows = _row_block(d.T)
  else:
    if block_kv is None:
      raise ValueError("block_kv is required with block lists (block_q was given).")
    _check_block_sizes(d.T, d.S, block_q, block_kv)
    idx, cnt = selection
    idx = expand_block_heads(jnp.asarray(idx), d.N)
    cnt = expand_block_heads(jnp.asarray(cnt), d.N)
    rows = block_q
  n_chunks = d.T // rows
  g = d.N // d.K
  qf = query.astype(jnp.float32).reshape(d.B, n_chunks, rows, d.N, d.H)
  kf = key.astype(jnp.float32)
  qp = jnp.broadcast_to(q_pos, (d.B, d.T)).reshape(d.B, n_chunks, rows)

  def one(c):
    qc = qf[:, c].reshape(d.B, rows, d.K, g, d.H)
    logits = jnp.einsum("brkgh,bskh->bkgrs", qc, kf, precision=jax.lax.Precision.HIGHEST)
    logits = logits.reshape(d.B, d.N, rows, d.S) * scale
    vis = jnp.ones((1, 1, 1, 1), bool)
    if causal:
      vis = (k_pos[:, None, None, :] <= qp[:, c][:, None, :, None])
    logits = jnp.where(vis, logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    p = jnp.where(jnp.isfinite(lse), jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.)), 0.)
    if token_level:
      sel = jnp.transpose(jax.lax.dynamic_slice_in_dim(idx, c * rows, rows, 1), (0, 2, 1, 3))
      sok = jnp.transpose(jax.lax.dynamic_slice_in_dim(ok, c * rows, rows, 1), (0, 2, 1, 3))
      got = (jnp.take_along_axis(p, sel, axis=-1) * sok).sum(-1)
    else:
      pb = p.reshape(d.B, d.N, rows, d.S // block_kv, block_kv).sum(-1)
      sel, n = idx[:, :, c], cnt[:, :, c]
      take = jnp.take_along_axis(pb, jnp.broadcast_to(sel[:, :, None], (d.B, d.N, rows, sel.shape[-1])), -1)
      slot_ok = jnp.arange(sel.shape[-1]) < n[..., None]
      got = (take * slot_ok[:, :, None]).sum(-1)
    return jnp.where(jnp.isfinite(lse[..., 0]), got, jnp.nan)  # [B, N, rows]

  per = jax.lax.map(one, jnp.arange(n_chunks))  # [chunks, B, N, rows]
  per = jnp.transpose(per, (1, 0, 3, 2)).reshape(d.B, d.T, d.N)
  if not reduce:
    return per
  return jnp.nanmean(per)


def _row_block(T):
  for r in (128, 64, 32, 16, 8, 4, 2, 1):
    if T % r == 0:
      return r
  return 1
