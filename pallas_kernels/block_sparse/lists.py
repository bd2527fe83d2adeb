"""Block lists of the block-sparse kernels: layout lists, run-time lists, lengths.

- TPU (``tpu.py``): packed entries ``2 * block + full`` and counts, flat for
  scalar prefetch, cut into chunks that fit SMEM; with per-batch lengths, per
  batch counts of the entries that start inside the lengths.
- GPU (``gpu.py``): one row per block ``[n_full, n_listed, full blocks...,
  partial blocks...]``; with lengths, per batch and row the counts of full
  blocks inside the lengths, full blocks kept and partial blocks kept.

Rows are ascending (within the full and the partial parts on GPU), so the
entries kept by a length are a prefix of each row (part).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse import resources as R


def encoded_lists(indices: np.ndarray, full: np.ndarray) -> np.ndarray:
  """Packs block indices and full flags into one int32: ``2 * index + full``."""
  return (indices.astype(np.int64) * 2 + full.astype(np.int64)).astype(np.int32)


def ascending_lists(indices: np.ndarray, full: np.ndarray, counts: np.ndarray):
  """Padded lists with each row's listed entries in ascending block order.

  Entries past a row's count repeat its last listed entry (0 for an empty
  row). With lengths, the kernels keep a prefix of each row (the blocks that
  start inside the length), which needs ascending rows.
  """
  width = indices.shape[-1]
  listed = np.arange(width) < counts[..., None]
  key = np.where(listed, indices.astype(np.int64), np.iinfo(np.int64).max)
  order = np.argsort(key, axis=-1, kind="stable")
  idx = np.take_along_axis(indices, order, -1)
  fl = np.take_along_axis(full, order, -1)
  last = np.maximum(counts - 1, 0)[..., None]
  idx = np.where(listed, idx, np.take_along_axis(idx, last, -1) * (counts[..., None] > 0))
  fl = listed & fl
  return idx.astype(np.int32), fl, counts


# -- TPU --------------------------------------------------------------------------
def tpu_runtime_lists(cfg, fwd, bwd=None):
  """Packed scalar-prefetch lists from run-time lists (built under jit).

  ``fwd`` = (k-block indices [B, Hl, nq, max_kb], counts [B, Hl, nq]) and
  ``bwd`` = (q-block indices [B, Hl, nk, max_qb], counts [B, Hl, nk]), int32,
  entries past a row's count repeating its last listed block (no new copy).
  Every block gets the config's kind (full iff there is nothing to mask).
  """
  full = 0 if cfg.any_partial else 1
  out = {}
  for name, lists in (("fwd", fwd), ("bwd", bwd)):
    if lists is not None:
      out[f"{name}_code"] = (lists[0] * 2 + full).reshape(-1)
      out[f"{name}_counts"] = lists[1].reshape(-1)
  return out


def tpu_prepare_lists(layout):
  """Flattened packed lists for scalar prefetch (int32 1-D arrays), rows ascending."""
  out = {}
  for name in ("fwd", "bwd"):
    idx, full, counts = ascending_lists(getattr(layout, f"{name}_indices"),
                                        getattr(layout, f"{name}_full"),
                                        getattr(layout, f"{name}_counts"))
    out[f"{name}_code"] = jnp.asarray(encoded_lists(idx, full).reshape(-1))
    out[f"{name}_counts"] = jnp.asarray(counts.reshape(-1).astype("int32"))
  return out


def tpu_length_counts(cfg, code, counts, n, width, lens, forward):
  """[B * Rl * n] int32: per batch, the listed entries of each row inside the lengths.

  Rows are q-blocks and entries k-blocks (``forward``), or the reverse. Lists
  are ascending, so the kept entries are the first ones of each row.
  """
  q_len, kv_len = lens
  idx = (code // 2).reshape(-1, n, width)
  listed = jnp.arange(width, dtype=jnp.int32) < counts.reshape(-1, n)[..., None]
  row_len, ent_len = (q_len, kv_len) if forward else (kv_len, q_len)
  row_size, ent_size = ((cfg.block_q, cfg.block_kv) if forward
                        else (cfg.block_kv, cfg.block_q))
  row_ok = jnp.arange(n, dtype=jnp.int32)[None, :] * row_size < row_len[:, None]   # [B, n]
  ent_ok = idx[None] * ent_size < ent_len[:, None, None, None]                   # [B,Rl,n,w]
  keep = listed[None] & ent_ok & row_ok[:, None, :, None]
  return jnp.sum(keep, axis=-1, dtype=jnp.int32).reshape(-1)


def tpu_list_slices(cfg, code, counts, n, width):
  """[(start, stop, code slice, counts slice)]: the lists cut along the block axis.

  ``code`` is the flat [Rl * n * width] list, ``counts`` [Rl * n] (Rl = list
  heads, times B for run-time lists); each chunk keeps rows [start, stop) of
  every list head, so it fits ``cfg.smem_list_entries`` (``resources``).
  """
  bounds = R.list_chunks(cfg, n, width)
  if len(bounds) == 1:
    return [(0, n, code, counts)]
  code3 = code.reshape(-1, n, width)
  counts2 = counts.reshape(-1, n)
  return [(a, b, code3[:, a:b].reshape(-1), counts2[:, a:b].reshape(-1)) for a, b in bounds]


# -- GPU --------------------------------------------------------------------------
def gpu_rows(indices, full, counts):
  """[heads, rows, 2 + width]: n_full, n_listed, then full blocks, then partial ones."""
  width = indices.shape[-1]
  listed = np.arange(width) < counts[..., None]
  is_full = full & listed
  # Full blocks first, then partial ones (each ascending), then the padding.
  key = np.where(is_full, 0, np.where(listed, 1, 2)) * (int(indices.max(initial=0)) + 1)
  key = key + np.where(listed, indices, 0)
  order = np.argsort(key, axis=-1, kind="stable")
  entries = np.take_along_axis(indices, order, -1).astype(np.int32)
  head = np.stack([is_full.sum(-1), counts], -1).astype(np.int32)
  return np.concatenate([head, entries], axis=-1)


def gpu_runtime_lists(cfg, fwd, bwd=None):
  """Row lists from run-time lists (built under jit), see ``gpu_rows``.

  ``fwd`` = (k-block indices [B, Hl, nq, max_kb], counts [B, Hl, nq]) and
  ``bwd`` = (q-block indices [B, Hl, nk, max_qb], counts [B, Hl, nk]), int32.
  Every block gets the config's kind (full iff there is nothing to mask).
  """
  out = {}
  for name, lists in (("fwd", fwd), ("bwd", bwd)):
    if lists is not None:
      idx, counts = lists
      n_full = counts if cfg.any_full else jnp.zeros_like(counts)
      out[f"{name}_rows"] = jnp.concatenate([n_full[..., None], counts[..., None], idx], -1)
  return out


def gpu_prepare_lists(layout):
  """Per-row lists for the kernels (see ``gpu_rows``)."""
  return {
      "fwd_rows": jnp.asarray(gpu_rows(layout.fwd_indices, layout.fwd_full, layout.fwd_counts)),
      "bwd_rows": jnp.asarray(gpu_rows(layout.bwd_indices, layout.bwd_full, layout.bwd_counts)),
  }


def gpu_length_rows(cfg, rows, lens, forward):
  """[B, Hl, n, 8] int32: per batch element and list row (full inside, full kept,
  partial kept, q_len, kv_len, 0, 0, 0).

  ``rows`` [Hl, n, 2 + width] as ``gpu_rows`` makes them; rows are q-blocks
  (entries k-blocks) when ``forward``, else the reverse.
  """
  q_len, kv_len = lens
  n_full, n_listed, idx = rows[..., 0:1], rows[..., 1:2], rows[..., 2:]
  j = jnp.arange(idx.shape[-1], dtype=jnp.int32)
  is_full, is_part = j < n_full, (j >= n_full) & (j < n_listed)
  row_len, ent_len = (q_len, kv_len) if forward else (kv_len, q_len)
  rs, es = (cfg.block_q, cfg.block_kv) if forward else (cfg.block_kv, cfg.block_q)
  r = jnp.arange(rows.shape[1], dtype=jnp.int32)[None, None, :, None]
  bl = lambda x: x[:, None, None, None]
  row_in, row_kept = (r + 1) * rs <= bl(row_len), r * rs < bl(row_len)
  ent_in, ent_kept = (idx[None] + 1) * es <= bl(ent_len), idx[None] * es < bl(ent_len)
  count = lambda m: jnp.sum(m, axis=-1, dtype=jnp.int32)
  f_in = count(is_full & ent_in & row_in)
  f_kept = count(is_full & ent_kept & row_kept)
  p_kept = count(is_part & ent_kept & row_kept)
  shape = f_in.shape
  qk = [jnp.broadcast_to(bl(x)[..., 0], shape) for x in (q_len, kv_len)]
  zero = jnp.zeros(shape, jnp.int32)
  return jnp.stack([f_in, f_kept, p_kept] + qk + [zero] * 3, -1)
