"""Combiner-Logsparse (Ren et al., NeurIPS 2021; arXiv:2107.05768): causal, O(L log L).

"Combiner: Full Attention Transformer with Sparse Computation Cost".

The paper derives Combiner-Logsparse from the Logsparse Transformer's
pattern (log-spaced supports) and draws it in its Figure 1 (E) without an
exact span rule; the released code has no Logsparse form. The project's
reading, written here as a rule:

* The sequence is cut into n = T / s segments of s = ``segment_len`` tokens
  (s = 1 gives the paper's form, whose direct support is the token itself).
* Direct support of query i in segment g: the causal prefix of its own
  segment, as in Combiner-Fixed.
* Regions: the earlier segments [0, g) are split into dyadic spans by the
  binary expansion of g. For every set bit l of g there is one region, the
  2^l segments [(g >> l) * 2^l - 2^l, (g >> l) * 2^l), i.e. the aligned block
  number m = (g >> l) - 1 of level l (blocks of 2^l segments). E.g. g = 7
  (binary 111) gives the spans [0, 4), [4, 6), [6, 7); g = 4 gives [0, 4);
  g = 0 gives none. The spans have distinct power-of-two sizes, at most
  ceil(log2 n) of them, and partition [0, g): every earlier position lies in
  exactly one region.
* Each region is one abstraction, as in the other patterns: key
  ``k_r = pool(k_j, j in r)``, value ``s_r = sum_j softmax_j(q_r . k_j) v_j``
  with ``q_r = pool(q_j, j in r)``, and direct and region logits share one
  softmax. Every j <= i thus gets a positive weight (full causal support).

Why aligned spans: spans placed relative to each query (sizes 1, 2, 4, ...
ending at i - 1) would need their own summary per query, O(L^2) in all.
Aligned dyadic spans are shared by every query whose binary expansion
contains them, so level l holds n >> l summaries over 2^l s tokens each:
O(T) per level, O(T log n) for all summaries, plus s + log2 n logits per
query, O(T (s + log(T / s))) in all. The far past is summarised in large
spans and the near past in small ones only where g's low bits are set (for
g = 4 the whole past is one span): the price of sharing.

Limits: s = T (one segment) is dense causal attention; with n <= 2 segments
Combiner-Logsparse equals Combiner-Fixed (the only region is segment 0).
Causal self-attention only (the pattern is defined over left spans).

Shapes inside: heads first, q [B, N, T, H], k [B, N, T, H], v [B, N, T, Hv]
(KV heads repeated to the N query heads).
"""
from __future__ import annotations

from typing import List, Tuple

import jax
import jax.numpy as jnp

from attnjax.dynamic.gather import masked_softmax_attend
from attnjax.dynamic.select import pool_blocks

_HI = jax.lax.Precision.HIGHEST


def logsparse_spans(segment: int) -> List[Tuple[int, int]]:
  """The regions of a query in segment ``segment``, as [start, stop) segment spans.

  The dyadic split of [0, segment) by its binary expansion, far to near:
  logsparse_spans(7) == [(0, 4), (4, 6), (6, 7)].
  """
  spans = []
  for level in reversed(range(segment.bit_length())):
    if (segment >> level) & 1:
      stop = (segment >> level) << level
      spans.append((stop - (1 << level), stop))
  return spans


def num_levels(num_segments: int) -> int:
  """Levels l with a possible region (2^l <= n - 1): the most regions of one query."""
  return max(num_segments - 1, 0).bit_length()


def logsparse_regions(q, k, v, s: int, pool: str, scale: float):
  """Region keys, summaries and within-region weights of every query, per level.

  Args:
    q, k: float32 [B, N, T, H]; v: float32 [B, N, T, Hv] (heads matched).

  Returns:
    dict with k_reg [B, N, T, nL, H] (the pooled key of query i's region at
    level l), summary [B, N, T, nL, Hv], valid [T, nL] (bit l of i's segment
    is set), block [T, nL] (the block index at level l) and inner: per level
    l, the weight [B, N, T] of key j inside its level-l block (zero for keys
    past the last whole block). Cost O(T H) per level: blocks are reshaped,
    never compared with keys outside them.
  """
  B, N, T, H = q.shape
  n = T // s
  g = jnp.arange(T) // s
  k_reg, summ, valid, block, inner = [], [], [], [], []
  for level in range(num_levels(n)):
    width = s << level  # tokens per block
    nb = n >> level
    used = nb * width
    q_b = pool_blocks(q[:, :, :used], width, method=pool, axis=2)  # [B, N, nb, H]
    k_b = pool_blocks(k[:, :, :used], width, method=pool, axis=2)
    kb_all = k[:, :, :used].reshape(B, N, nb, width, H)
    vb_all = v[:, :, :used].reshape(B, N, nb, width, v.shape[-1])
    logits = jnp.einsum("bnrh,bnrwh->bnrw", q_b, kb_all, precision=_HI) * scale
    w = jax.nn.softmax(logits, axis=-1)  # [B, N, nb, width]: within-block weights
    s_b = jnp.einsum("bnrw,bnrwh->bnrh", w, vb_all, precision=_HI)  # [B, N, nb, Hv]
    idx = jnp.clip((g >> level) - 1, 0, nb - 1)
    k_reg.append(k_b[:, :, idx])
    summ.append(s_b[:, :, idx])
    valid.append(((g >> level) & 1) == 1)
    block.append(idx)
    inner.append(jnp.pad(w.reshape(B, N, used), ((0, 0), (0, 0), (0, T - used))))
  if not k_reg:  # one segment: no region at all
    return dict(k_reg=jnp.zeros((B, N, T, 0, H), q.dtype),
                summary=jnp.zeros((B, N, T, 0, v.shape[-1]), v.dtype),
                valid=jnp.zeros((T, 0), bool), block=jnp.zeros((T, 0), jnp.int32), inner=[])
  return dict(k_reg=jnp.stack(k_reg, 3), summary=jnp.stack(summ, 3),
              valid=jnp.stack(valid, 1), block=jnp.stack(block, 1), inner=inner)


def region_attention(q, regions, scale: float):
  """Softmax of q [B, N, T, H] over its regions: (out [B, N, T, Hv], lse [B, N, T]) float32.

  The region half of the joint softmax; queries of segment 0 have no region
  (zeros, lse = -inf), merged with the direct half through the lse.
  """
  valid = regions["valid"][None, None, :, None, :]  # [1, 1, T, 1, nL]
  out, lse = masked_softmax_attend(q[:, :, :, None], regions["k_reg"], regions["summary"],
                                   valid, scale)
  return out[:, :, :, 0], lse[:, :, :, 0]


def logsparse_effective_matrix(q, k, regions, s: int, scale: float):
  """P_eff [B, N, T, T] of Combiner-Logsparse from q, k [B, N, T, H] (heads matched)."""
  T = q.shape[2]
  pos = jnp.arange(T)
  direct = (pos[None, :] // s == pos[:, None] // s) & (pos[None, :] <= pos[:, None])
  l_dir = jnp.where(direct, jnp.einsum("bnth,bnsh->bnts", q, k, precision=_HI) * scale,
                    -jnp.inf)
  l_reg = jnp.einsum("bnth,bntlh->bntl", q, regions["k_reg"], precision=_HI) * scale
  l_reg = jnp.where(regions["valid"], l_reg, -jnp.inf)
  p = jax.nn.softmax(jnp.concatenate([l_dir, l_reg], -1), axis=-1)
  peff = jnp.where(direct, p[..., :T], 0.0)
  for level, w in enumerate(regions["inner"]):
    width = s << level
    blk = regions["block"][:, level]  # [T] query -> block at this level
    same = pos[None, :] // width == blk[:, None]  # [T(query), T(key)]
    peff = peff + p[..., T + level, None] * jnp.where(same, w[:, :, None, :], 0.0)
  return peff
