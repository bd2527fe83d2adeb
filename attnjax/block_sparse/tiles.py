"""Per-step tile math of the block-sparse XLA path: gathers, logits, visibility.

Internal layout: queries are regrouped as ``q_r [B, Hl, nq, R * bq, H]``
where the ``Hl`` *layout heads* share one list of k-blocks and ``R`` query
heads are folded into the rows (query head ``n = hl * R + r``); keys and
values stay per KV head, ``k_r [B, K, nk, bk, H]``, and layout head ``hl``
reads KV head ``kvh[hl]`` (GQA without repeating K/V). Item indices of one
step are int arrays ``[Bi, Hl, lanes]`` (``Bi`` is 1 for static layouts, B
for run-time ones). Element-level tensors of a step have the 6-D shape
``[B, Hl, lanes, R, bq, bk]``; matmuls use ``[B, Hl, lanes, R * bq, bk]``.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np


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


def head_index(cfg: Cfg) -> jnp.ndarray:
  """Query head of every (layout head, fold) pair, shaped [1, Hl, 1, R, 1, 1]."""
  n = np.arange(cfg.Hl)[:, None] * cfg.R + np.arange(cfg.R)[None, :]
  return jnp.asarray(n.reshape(1, cfg.Hl, 1, cfg.R, 1, 1), jnp.int32)


def take_rows(x_r, idx):
  """x_r [Bx, n, ...] (per-batch blocks) at idx [Bi, Hl, L] -> [max(Bx, Bi), Hl, L, ...]."""
  Bx, Bi = x_r.shape[0], idx.shape[0]
  if Bx == 1:
    return x_r[0][idx]
  if Bi == 1:
    return x_r[:, idx[0]]
  return x_r[jnp.arange(Bx)[:, None, None], idx]


def take_heads(x_r, heads, idx):
  """x_r [B, Hx, n, ...] at (heads [Hl], idx [Bi, Hl, L]) -> [B, Hl, L, ...]."""
  h = jnp.asarray(np.asarray(heads, np.int32))[:, None]
  if idx.shape[0] == 1:
    return x_r[:, h, idx[0]]
  return x_r[jnp.arange(x_r.shape[0])[:, None, None], h[None], idx]


def pair_index(shape, cfg: Cfg, qb, kb):
  """Index arrays into a pair array regrouped as [Bp, Hp, nq', nk', R', bq', bk']."""
  Bp, Np, Tp, Sp = shape
  b = jnp.arange(Bp)[:, None, None] if Bp > 1 else 0
  h = jnp.arange(cfg.Hl)[None, :, None] if Np > 1 else 0
  qi = qb if Tp > 1 else jnp.zeros_like(qb)
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
  """Tile of a regrouped pair array at items (qb, kb) -> broadcastable 6-D."""
  b, h, qi, ki = pair_index(shape, cfg, qb, kb)
  return xr[b, h, qi, ki]


class Aux(NamedTuple):
  """Integer/boolean side inputs of the engine (no gradients)."""
  q_pos: Any        # int32 [Bp, nq, bq]
  k_pos: Any        # int32 [Bp, nk, bk]
  q_seg: Any        # int32 [B, nq, bq] or None
  k_seg: Any        # int32 [B, nk, bk] or None
  pair: Any         # regrouped bool mask array or None


def visibility(cfg: Cfg, aux: Aux, qb, kb):
  """Element visibility of the items' tiles, broadcastable to [B, Hl, L, R, bq, bk]."""
  qp = take_rows(aux.q_pos, qb)[:, :, :, None, :, None]
  kp = take_rows(aux.k_pos, kb)[:, :, :, None, None, :]
  vis = None
  if cfg.mask is not None:
    head = head_index(cfg)
    if cfg.mask.needs_segments:
      qs = take_rows(aux.q_seg, qb)[:, :, :, None, :, None]
      ks = take_rows(aux.k_seg, kb)[:, :, :, None, None, :]
      vis = cfg.mask.predicate(head, qp, kp, qs, ks)
    else:
      vis = cfg.mask.predicate(head, qp, kp)
    vis = jnp.asarray(vis, bool)
  if cfg.segments and not (cfg.mask is not None and cfg.mask.needs_segments):
    qs = take_rows(aux.q_seg, qb)[:, :, :, None, :, None]
    ks = take_rows(aux.k_seg, kb)[:, :, :, None, None, :]
    vis = _and(vis, qs == ks)
  if aux.pair is not None:
    vis = _and(vis, gather_pair(aux.pair, cfg.pair_shape, cfg, qb, kb))
  if cfg.nk * cfg.bk != cfg.kv_len:  # padded keys
    kidx = kb[:, :, :, None, None, None] * cfg.bk + jnp.arange(cfg.bk)
    vis = _and(vis, kidx < cfg.kv_len)
  return vis


def _and(a, b):
  return b if a is None else a & b


def raw_logits(cfg: Cfg, qblk, kblk, bias_r, qb, kb):
  """Scaled (and biased) float32 logits [B, Hl, L, R, bq, bk] of the items."""
  s = jnp.einsum("bhlqd,bhlkd->bhlqk", qblk, kblk, preferred_element_type=jnp.float32)
  s = s.reshape(s.shape[:3] + (cfg.R, cfg.bq, cfg.bk)) * jnp.float32(cfg.scale)
  if bias_r is not None:
    s = s + gather_pair(bias_r, cfg.bias_shape, cfg, qb, kb).astype(jnp.float32)
  return s


def transform(cfg: Cfg, aux: Aux, score, s, qb, kb, row_count):
  """Applies the score's elementwise transform to raw logits (identity for softmax)."""
  if cfg.plain_softmax:
    return s
  qp = take_rows(aux.q_pos, qb)[:, :, :, None, :, None]
  kp = take_rows(aux.k_pos, kb)[:, :, :, None, None, :]
  rc = None
  if row_count is not None:
    rc = take_heads(row_count, range(cfg.Hl), qb).reshape(
        row_count.shape[:1] + (cfg.Hl, qb.shape[-1], cfg.R, cfg.bq, 1))
  return score.transform(s, head=head_index(cfg), q_pos=qp, k_pos=kp, row_count=rc)
