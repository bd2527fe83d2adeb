"""SeerAttention: a learned block gate driving block-sparse attention (Gao et al., 2024; arXiv:2410.13276).

"SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs".

The AttnGate pools queries (average) and keys (max and min, concatenated)
over blocks of ``block`` tokens, maps them per head to ``hidden`` dims,
optionally rotates them with block-level RoPE positions, and scores every
(q-block, k-block) pair. The kept blocks (threshold on the gate's softmax,
or a fixed top-k) drive the block-sparse attention. The gate is trained with
the base model frozen, by KL divergence to the max-pooled true attention map.

Defaults: block 64, hidden 128, gate type ``Qavg_Kmaxmin``, threshold 2e-3,
the first quarter of query blocks left out of the loss.
Not confirmed: the RoPE base used on block positions (10000 here) and
whether the released code keeps a minimum of one block per row (we do, so a
row is never empty).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.core import validation as V
from attnjax.core.reference import reference_attention
from attnjax.dynamic.gather import layout_attention
from attnjax.dynamic.select import (block_validity, normalize_positions, pool_blocks,
                                    topk_blocks)
from attnjax.layers.rope import apply_rope
from attnjax.masks import Causal

__all__ = ["seer_gate", "seer_ground_truth", "seer_distillation_loss", "gate_to_layout",
           "seer_attention", "SeerAttnGate", "SeerAttention"]


def _pooled_keys(key, block, k_pool):
  return jnp.concatenate([pool_blocks(key, block, method=m) for m in k_pool], axis=-1)


def seer_gate(query, key, params, *, block: int = 64, k_pool: Sequence[str] = ("max", "min"),
              causal: bool = True, q_positions=None, k_positions=None,
              rope_base: Optional[float] = 10000.0):
  """AttnGate logits per (query head, q-block, k-block).

  Args:
    query: [B, T, N, H]; key: [B, S, K, H] (T, S multiples of ``block``).
    params: {"wq": [N, H, D], "wk": [K, len(k_pool) * H, D]} (D = hidden).
    block: pooling block size (64).
    k_pool: key poolings concatenated along features ("max", "min"[, "mean"]).
    causal: future blocks (no visible pair) get -inf.
    q_positions, k_positions: token positions; block positions are
      ``position // block`` of each block's first token.
    rope_base: RoPE on the projected pooled q/k at block positions; None: off.

  Returns:
    logits float32 [B, N, T/block, S/block] (-inf on invalid blocks).
  """
  d = V.check_qkv(query, key, key)
  wq, wk = params["wq"], params["wk"]
  D = wq.shape[-1]
  if wq.shape != (d.N, d.H, D) or wk.shape != (d.K, len(k_pool) * d.H, D):
    raise ValueError(f"params wq {wq.shape} / wk {wk.shape} must be [N, H, D]=({d.N}, {d.H}, D) "
                     f"and [K, {len(k_pool)}*H, D]=({d.K}, {len(k_pool) * d.H}, D).")
  q_pos, k_pos = normalize_positions(q_positions, k_positions, d)
  qt = jnp.einsum("bqnh,nhd->bqnd", pool_blocks(query.astype(jnp.float32), block), wq)
  kt = jnp.einsum("bknh,nhd->bknd", _pooled_keys(key.astype(jnp.float32), block, k_pool), wk)
  if rope_base is not None:
    qt = apply_rope(qt, q_pos[:, ::block] // block, rope_base)
    kt = apply_rope(kt, k_pos[:, ::block] // block, rope_base)
  g = d.N // d.K
  qt = qt.reshape(qt.shape[:2] + (d.K, g, D))
  logits = jnp.einsum("bqkgd,bskd->bkgqs", qt, kt).reshape(d.B, d.N, qt.shape[1], kt.shape[1])
  logits = logits / math.sqrt(D)
  valid = block_validity(q_pos, k_pos, block, block, causal=causal)
  return jnp.where(valid, logits, -jnp.inf)


def seer_ground_truth(query, key, *, block: int = 64, causal: bool = True, scale=None,
                      q_positions=None, k_positions=None):
  """Block-level target: true attention max-pooled over block x block tiles, row-normalised.

  Returns float32 [B, N, T/block, S/block] (rows sum to 1; zero rows stay zero).
  Dense O(T S) memory: a training-time tool for short sequences.
  """
  d = V.check_qkv(query, key, key)
  _, _, probs = reference_attention(query, key, key, mask=Causal() if causal else None,
                                    scale=scale, q_positions=q_positions,
                                    k_positions=k_positions, return_lse=True, return_probs=True)
  nq, nk = d.T // block, d.S // block
  if d.T % block or d.S % block:
    raise ValueError(f"block={block} must divide T={d.T} and S={d.S}.")
  pooled = probs.astype(jnp.float32).reshape(d.B, d.N, nq, block, nk, block).max(axis=(3, 5))
  total = pooled.sum(-1, keepdims=True)
  return jax.lax.stop_gradient(pooled / jnp.where(total > 0, total, 1.0))


def seer_distillation_loss(gate_logits, ground_truth, *, skip_fraction: float = 0.25):
  """KL(ground_truth || softmax(gate_logits)) per row, averaged over the kept rows.

  Args:
    gate_logits: [B, N, nq, nk] from :func:`seer_gate` (-inf = invalid block).
    ground_truth: [B, N, nq, nk] from :func:`seer_ground_truth`.
    skip_fraction: leading share of query blocks left out (0.25 in the paper).
  """
  if gate_logits.shape != ground_truth.shape:
    raise ValueError(f"gate_logits {gate_logits.shape} and ground_truth "
                     f"{ground_truth.shape} must have the same shape.")
  if not 0.0 <= skip_fraction < 1.0:
    raise ValueError(f"skip_fraction must be in [0, 1), got {skip_fraction}.")
  logq = jax.nn.log_softmax(gate_logits.astype(jnp.float32), axis=-1)
  gt = jax.lax.stop_gradient(ground_truth.astype(jnp.float32))
  pos = gt > 0
  kl = jnp.where(pos, gt * (jnp.log(jnp.where(pos, gt, 1.0)) - jnp.where(pos, logq, 0.0)), 0.0)
  kl = kl.sum(-1)  # [B, N, nq]
  start = int(gate_logits.shape[2] * skip_fraction)
  return kl[:, :, start:].mean()


def gate_to_layout(gate_logits, *, k: Optional[int] = None, threshold: Optional[float] = None,
                   max_blocks: Optional[int] = None, last_block_dense: Optional[bool] = None):
  """Gate logits -> block lists (indices [B, N, nq, kk], counts [B, N, nq]).

  Exactly one of:
    k: fixed number of blocks per row (top-k of the gate; a row with fewer
      valid blocks keeps all of them).
    threshold: keep blocks whose gate probability is >= threshold (always at
      least the best one). The list width is ``max_blocks`` (default: all
      nk blocks); when more blocks pass, the ``max_blocks`` best are kept.
  last_block_dense: keep every valid block of the last q-block row (the
    question at the end of a prompt). Default True with a threshold; with a
    fixed k it needs k == nk and defaults to False.
  """
  if (k is None) == (threshold is None):
    raise ValueError(f"give exactly one of k and threshold, got k={k!r}, "
                     f"threshold={threshold!r}.")
  nk = gate_logits.shape[-1]
  valid = jnp.isfinite(gate_logits)
  probs = jax.nn.softmax(jnp.where(valid, gate_logits, -1e30), axis=-1)
  probs = jnp.where(valid, probs, 0.0)
  if last_block_dense is None:
    last_block_dense = threshold is not None
  if k is not None:
    if last_block_dense and k < nk:
      raise ValueError(f"last_block_dense needs every block of the last row; with a fixed "
                       f"k={k} < nk={nk} pass last_block_dense=False or use threshold.")
    return topk_blocks(probs, k, valid=valid)
  width = nk if max_blocks is None else max_blocks
  best = jax.nn.one_hot(jnp.argmax(probs, -1), nk, dtype=bool)
  keep = valid & ((probs >= threshold) | best)
  if last_block_dense:
    keep = keep.at[:, :, -1, :].set(valid[:, :, -1, :])
  return topk_blocks(probs, width, valid=keep)


def seer_attention(query, key, value, gate_params, *, block: int = 64,
                   k: Optional[int] = None, threshold: Optional[float] = 2e-3,
                   max_blocks: Optional[int] = None, last_block_dense: Optional[bool] = None,
                   causal: bool = True, k_pool: Sequence[str] = ("max", "min"),
                   rope_base: Optional[float] = 10000.0, scale=None,
                   return_layout: bool = False, implementation=None):
  """SeerAttention: gate -> layout -> block-sparse attention.

  Shapes as ``attnjax.attention``; ``gate_params`` as in :func:`seer_gate`.
  The gate sees ``stop_gradient`` q/k (the paper trains it with the model
  frozen, by :func:`seer_distillation_loss`); the attention part gets the
  usual gradients. Give ``k`` to use a fixed top-k (then set threshold=None).
  Returns out [B, T, N, Hv] (and the layout (indices, counts)).
  """
  if k is not None:
    threshold = None
  logits = seer_gate(jax.lax.stop_gradient(query), jax.lax.stop_gradient(key), gate_params,
                     block=block, k_pool=k_pool, causal=causal, rope_base=rope_base)
  idx, cnt = gate_to_layout(logits, k=k, threshold=threshold, max_blocks=max_blocks,
                            last_block_dense=last_block_dense)
  out = layout_attention(query, key, value, idx, cnt, block_q=block, block_kv=block,
                         causal=causal, scale=scale, implementation=implementation)
  return (out, (idx, cnt)) if return_layout else out


class SeerAttnGate(nn.Module):
  """The AttnGate's parameters: per-head projections of pooled q [N, H, D] and k [K, P*H, D]."""
  hidden: int = 128
  block: int = 64
  k_pool: Sequence[str] = ("max", "min")
  causal: bool = True
  rope_base: Optional[float] = 10000.0

  @nn.compact
  def __call__(self, query, key):
    """query [B, T, N, H], key [B, S, K, H] -> gate logits [B, N, T/block, S/block]."""
    N, H, K = query.shape[2], query.shape[3], key.shape[2]
    init = nn.initializers.lecun_normal(in_axis=1, out_axis=2)
    params = {"wq": self.param("wq", init, (N, H, self.hidden)),
              "wk": self.param("wk", init, (K, len(self.k_pool) * H, self.hidden))}
    return seer_gate(query, key, params, block=self.block, k_pool=self.k_pool,
                     causal=self.causal, rope_base=self.rope_base)


class SeerAttention(nn.Module):
  """Gate + block-sparse attention on given q/k/v; ``return_gate`` also gives the gate logits.

  Train the gate alone with ``seer_distillation_loss(logits, seer_ground_truth(q, k))``
  (gradients reach only the gate's parameters: q/k enter it through stop_gradient).
  """
  hidden: int = 128
  block: int = 64
  k: Optional[int] = None
  threshold: Optional[float] = 2e-3
  max_blocks: Optional[int] = None
  causal: bool = True
  k_pool: Sequence[str] = ("max", "min")
  rope_base: Optional[float] = 10000.0

  @nn.compact
  def __call__(self, query, key, value, *, return_gate: bool = False):
    logits = SeerAttnGate(self.hidden, self.block, self.k_pool, self.causal, self.rope_base,
                          name="gate")(jax.lax.stop_gradient(query), jax.lax.stop_gradient(key))
    threshold = None if self.k is not None else self.threshold
    idx, cnt = gate_to_layout(logits, k=self.k, threshold=threshold, max_blocks=self.max_blocks)
    out = layout_attention(query, key, value, idx, cnt, block_q=self.block,
                           block_kv=self.block, causal=self.causal)
    return (out, logits) if return_gate else out
