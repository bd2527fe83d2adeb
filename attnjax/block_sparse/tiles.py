"""Per-step tile math of the block-sparse XLA path: gathers, logits, visibility.

Internal layout: the inputs stay in their token layout, only reshaped
(no copy): queries ``q_t [B, nq, bq, Hl, R * H]`` where the ``Hl`` *layout
heads* share one list of k-blocks and ``R`` query heads are folded into the
rows of a tile (query head ``n = hl * R + r``); keys and values per KV head,
``k_t [B, nk, bk, K, H]``, and layout head ``hl`` reads KV head ``kvh[hl]``
(GQA without repeating K/V). Each step gathers its tiles from there (a global
transpose to a head-major layout costs about as much as a third of a
sliding-window forward on CPU). Per-row state (accumulators, lse, gradients
of q) is head-major, ``[B, Hl, nq, R * bq, ...]``; key gradients
``[B, K, nk, bk, ...]``. Item indices of one
step are int arrays: q-blocks ``qb [Bi, Hl, lanes]`` and groups of k-blocks
``kb [Bi, Hl, lanes, g]`` (``Bi`` is 1 for static layouts, B for run-time
ones). The ``g`` k-blocks of an item are gathered side by side into one
tile of width ``W = g * bk``. Element-level tensors of a step have the 6-D
shape ``[B, Hl, lanes, R, bq, W]``; matmuls use ``[B, Hl, lanes, R * bq, W]``.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from attnjax.core import dropout as DR


class Cfg(NamedTuple):
  """Static configuration of one engine call (hashable)."""
  B: int
  N: int
  K: int
  H: int
  Hv: int
  bq: int
  bk: int
  nq: int
  nk: int
  Hl: int
  R: int
  kvh: Tuple[int, ...]      # KV head of each layout head
  kv_len: int               # real (unpadded) number of keys
  scale: float
  norm: str                 # the score's normalization: softmax | sum | none
  mask: Any                 # Mask object or None
  segments: bool            # segment ids given (vis &= same segment unless mask reads them)
  pair_shape: Optional[Tuple[int, int, int, int]]  # normalised bool mask array shape
  bias_shape: Optional[Tuple[int, int, int, int]]  # normalised bias shape
  plain_softmax: bool       # score is plain softmax: skip transform
  dropout_rate: float = 0.0  # attention dropout (``Aux.drop`` holds the keys when > 0)


def head_index(cfg: Cfg) -> jnp.ndarray:
  """Query head of every (layout head, fold) pair, shaped [1, Hl, 1, R, 1, 1]."""
  n = np.arange(cfg.Hl)[:, None] * cfg.R + np.arange(cfg.R)[None, :]
  return jnp.asarray(n.reshape(1, cfg.Hl, 1, cfg.R, 1, 1), jnp.int32)


def take_rows(x_r, idx):
  """x_r [Bx, n, ...] (per-batch blocks) at idx [Bi, Hl, L, ...] -> [max(Bx, Bi), Hl, L, ...]."""
  Bx, Bi = x_r.shape[0], idx.shape[0]
  if Bx == 1:
    return x_r[0][idx]
  if Bi == 1:
    return x_r[:, idx[0]]
  return x_r[jnp.arange(Bx).reshape((-1,) + (1,) * (idx.ndim - 1)), idx]


def take_heads(x_r, heads, idx):
  """x_r [B, Hx, n, ...] at (heads [Hl], idx [Bi, Hl, L, ...]) -> [B, Hl, L, ...]."""
  h = jnp.asarray(np.asarray(heads, np.int32)).reshape((-1,) + (1,) * (idx.ndim - 2))
  if idx.shape[0] == 1:
    return x_r[:, h, idx[0]]
  b = jnp.arange(x_r.shape[0]).reshape((-1,) + (1,) * (idx.ndim - 1))
  return x_r[b, h[None], idx]


def take_queries(q_t, qb, R):
  """Query tiles straight from the token layout.

  q_t [B, nq, bq, Hl, R*H] (the [B, T, N, H] input reshaped, no copy) at
  qb [Bi, Hl, L] -> [B, Hl, L, R*bq, H] (rows ordered (r, i)).
  """
  B, Hl = q_t.shape[0], q_t.shape[3]
  h = jnp.arange(Hl, dtype=jnp.int32).reshape(Hl, 1)
  if qb.shape[0] == 1:
    t = jnp.moveaxis(q_t[:, qb[0], :, h], 2, 0)           # [B, Hl, L, bq, R*H]
  else:
    t = q_t[jnp.arange(B).reshape(B, 1, 1), qb, :, h[None]]
  if R == 1:
    return t
  t = jnp.swapaxes(t.reshape(t.shape[:4] + (R, -1)), 3, 4)  # [B, Hl, L, R, bq, H]
  return t.reshape(t.shape[:3] + (-1, t.shape[-1]))


def take_keys(x_t, heads, kb):
  """Key tiles straight from the token layout.

  x_t [B, nk, bk, K, D] (the [B, S, K, D] input reshaped, no copy) at (KV
  heads [Hl], kb [Bi, Hl, L, g]) -> [B, Hl, L, g*bk, D].
  """
  B = x_t.shape[0]
  h = jnp.asarray(np.asarray(heads, np.int32)).reshape(-1, 1, 1)
  if kb.shape[0] == 1:
    t = jnp.moveaxis(x_t[:, kb[0], :, h], 3, 0)            # [B, Hl, L, g, bk, D]
  else:
    t = x_t[jnp.arange(B).reshape(B, 1, 1, 1), kb, :, h[None]]
  return t.reshape(t.shape[:3] + (-1, t.shape[-1]))


def key_rows(x, kb):
  """Per-key side data x [Bx, nk, bk] at kb [Bi, Hl, L, g] -> [max(Bx, Bi), Hl, L, g*bk]."""
  t = take_rows(x, kb)
  return t.reshape(t.shape[:3] + (-1,))


def flat_keys(x):
  """[..., g, bk] -> [..., g * bk]."""
  return x.reshape(x.shape[:-2] + (-1,))


def pair_index(shape, cfg: Cfg, qb, kb):
  """Index arrays [., ., L, g] into a pair array regrouped as [Bp, Hp, nq', nk', R', bq', bk'].

  qb [Bi, Hl, L], kb [Bi, Hl, L, g]; a pair array without a key axis (Sp = 1)
  is indexed with g = 1.
  """
  Bp, Np, Tp, Sp = shape
  if Sp == 1:
    kb = kb[..., :1]
  b = jnp.arange(Bp)[:, None, None, None] if Bp > 1 else 0
  h = jnp.arange(cfg.Hl)[None, :, None, None] if Np > 1 else 0
  qi = qb[..., None] if Tp > 1 else jnp.zeros_like(qb)[..., None]
  ki = kb if Sp > 1 else jnp.zeros_like(kb)
  return b, h, qi, ki


def regroup_pair(x, cfg: Cfg):
  """[Bp, Np, Tp, Sp] (Np in {1, N}, Tp in {1, T}, Sp in {1, S}) -> blocked 7-D."""
  Bp, Np, Tp, Sp = x.shape
  Hp, Rp = (cfg.Hl, cfg.R) if Np > 1 else (1, 1)
  nq, bq = (cfg.nq, cfg.bq) if Tp > 1 else (1, 1)
  nk, bk = (cfg.nk, cfg.bk) if Sp > 1 else (1, 1)
  x = x.reshape(Bp, Hp, Rp, nq, bq, nk, bk)
  return x.transpose(0, 1, 3, 5, 2, 4, 6)


def ungroup_pair(xr, shape):
  """Inverse of regroup_pair."""
  Bp, Hp, nq, nk, Rp, bq, bk = xr.shape
  return xr.transpose(0, 1, 4, 2, 5, 3, 6).reshape(shape)


def gather_pair(xr, shape, cfg: Cfg, qb, kb):
  """Tile of a regrouped pair array at items (qb, kb) -> broadcastable [., ., L, R', bq', W']."""
  b, h, qi, ki = pair_index(shape, cfg, qb, kb)
  t = xr[b, h, qi, ki]                       # [., ., L, g', R', bq', bk']
  t = jnp.moveaxis(t, 3, 5)                  # [., ., L, R', bq', g', bk']
  return flat_keys(t)


class Aux(NamedTuple):
  """Integer/boolean side inputs of the engine (no gradients)."""
  q_pos: Any        # int32 [Bp, nq, bq]
  k_pos: Any        # int32 [Bp, nk, bk]
  q_seg: Any        # int32 [B, nq, bq] or None
  k_seg: Any        # int32 [B, nk, bk] or None
  pair: Any         # regrouped bool mask array or None
  lens: Any = None  # (q_len, kv_len) int32 [B] each: real lengths per batch, or None
  drop: Any = None  # dropout keys uint32 [B, N, 2] (``core.dropout.head_keys``), or None


def visibility(cfg: Cfg, aux: Aux, qb, kb, kval=None, partial=True):
  """Element visibility of the items' tiles, broadcastable to [B, Hl, L, R, bq, W], or None.

  ``partial`` evaluates the mask, segments, mask array and key padding;
  ``kval`` [Bi, Hl, L, g] (or None) masks the padding sub-blocks of groups;
  per-batch lengths (``aux.lens``) mask every item, partial or not.
  """
  vis = None
  if kval is not None:
    vis = jnp.repeat(kval, cfg.bk, axis=-1)[:, :, :, None, None, :]
  if aux.lens is not None:  # per-batch lengths: applied to full items too
    q_len, kv_len = (x.reshape(-1, 1, 1, 1, 1, 1) for x in aux.lens)
    qidx = (qb[..., None] * cfg.bq + jnp.arange(cfg.bq))[:, :, :, None, :, None]
    kidx = flat_keys(kb[..., None] * cfg.bk + jnp.arange(cfg.bk))[:, :, :, None, None, :]
    vis = _and(vis, (qidx < q_len) & (kidx < kv_len))
  if not partial:
    return vis
  qp = take_rows(aux.q_pos, qb)[:, :, :, None, :, None]
  kp = key_rows(aux.k_pos, kb)[:, :, :, None, None, :]
  if cfg.mask is not None:
    head = head_index(cfg)
    if cfg.mask.needs_segments:
      qs = take_rows(aux.q_seg, qb)[:, :, :, None, :, None]
      ks = key_rows(aux.k_seg, kb)[:, :, :, None, None, :]
      pred = cfg.mask.predicate(head, qp, kp, qs, ks)
    else:
      pred = cfg.mask.predicate(head, qp, kp)
    vis = _and(vis, jnp.asarray(pred, bool))
  if cfg.segments and not (cfg.mask is not None and cfg.mask.needs_segments):
    qs = take_rows(aux.q_seg, qb)[:, :, :, None, :, None]
    ks = key_rows(aux.k_seg, kb)[:, :, :, None, None, :]
    vis = _and(vis, qs == ks)
  if aux.pair is not None:
    vis = _and(vis, gather_pair(aux.pair, cfg.pair_shape, cfg, qb, kb))
  if cfg.nk * cfg.bk != cfg.kv_len:  # padded keys
    kidx = flat_keys(kb[..., None] * cfg.bk + jnp.arange(cfg.bk))
    vis = _and(vis, kidx[:, :, :, None, None, :] < cfg.kv_len)
  return vis


def _and(a, b):
  return b if a is None else a & b


def raw_logits(cfg: Cfg, qblk, kblk, bias_r, qb, kb):
  """Scaled (and biased) float32 logits [B, Hl, L, R, bq, W] of the items."""
  s = jnp.einsum("bhlqd,bhlkd->bhlqk", qblk, kblk, preferred_element_type=jnp.float32)
  s = s.reshape(s.shape[:3] + (cfg.R, cfg.bq, s.shape[-1])) * jnp.float32(cfg.scale)
  if bias_r is not None:
    s = s + gather_pair(bias_r, cfg.bias_shape, cfg, qb, kb).astype(jnp.float32)
  return s


def transform(cfg: Cfg, aux: Aux, score, s, qb, kb, row_count):
  """Applies the score's elementwise transform to raw logits (identity for softmax)."""
  if cfg.plain_softmax:
    return s
  qp = take_rows(aux.q_pos, qb)[:, :, :, None, :, None]
  kp = key_rows(aux.k_pos, kb)[:, :, :, None, None, :]
  rc = None
  if row_count is not None:
    rc = take_heads(row_count, range(cfg.Hl), qb).reshape(
        row_count.shape[:1] + (cfg.Hl, qb.shape[-1], cfg.R, cfg.bq, 1))
  return score.transform(s, head=head_index(cfg), q_pos=qp, k_pos=kp, row_count=rc)


def dropout_keep(cfg: Cfg, aux: Aux, qb, kb, key_major: bool = False):
  """Dropout multiplier of the items' tiles, [B, Hl, L, R*bq, W] float32, or None.

  The same values as ``core.dropout.dense_multiplier`` at the tiles' (batch,
  query head, query index, key index); ``key_major`` lays them out
  [B, Hl, L, W, R*bq] (the plain backward's transposed tiles).
  """
  if aux.drop is None or cfg.dropout_rate == 0.0:
    return None
  heads = np.arange(cfg.Hl)[:, None] * cfg.R + np.arange(cfg.R)[None, :]   # [Hl, R]
  keys = aux.drop[:, heads]                                                # [B, Hl, R, 2]
  qidx = qb[..., None] * cfg.bq + jnp.arange(cfg.bq)                       # [Bi, Hl, L, bq]
  kidx = flat_keys(kb[..., None] * cfg.bk + jnp.arange(cfg.bk))            # [Bi, Hl, L, W]
  if key_major:   # [B, Hl, L, W, R, bq] -> [B, Hl, L, W, R*bq]
    k0, k1 = (keys[:, :, None, None, :, None, w] for w in (0, 1))
    mult = DR.keep_multiplier(k0, k1, qidx[:, :, :, None, None, :], kidx[..., None, None],
                              cfg.dropout_rate)
    return mult.reshape(mult.shape[:4] + (-1,))
  # [B, Hl, L, R, bq, W] -> [B, Hl, L, R*bq, W]
  k0, k1 = (keys[:, :, None, :, None, None, w] for w in (0, 1))
  mult = DR.keep_multiplier(k0, k1, qidx[:, :, :, None, :, None],
                            kidx[:, :, :, None, None, :], cfg.dropout_rate)
  return mult.reshape(mult.shape[:3] + (-1, mult.shape[-1]))
