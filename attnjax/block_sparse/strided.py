"""S2-Attention heterogeneous context sharding ("Efficient LLM Training and Serving with
Heterogeneous Context Sharding among Attention Heads", arXiv:2407.17678) and LongLoRA /
SinkLoRA shifted group attention ("LongLoRA: Efficient Fine-tuning of Long-Context Large
Language Models", arXiv:2309.12307; "SinkLoRA: Enhanced Efficiency and Chat Capabilities for
Long-Context Large Language Models", arXiv:2406.05678) on the block-sparse engine.

Shapes: query [B, T, N, H], key [B, S, K, H], value [B, S, K, Hv] -> [B, T, N, Hv].
"""
from __future__ import annotations

from typing import Optional

from attnjax.block_sparse import sparse as SP
from attnjax.core import validation as V
from attnjax.masks import S2, ShiftedGroups


def s2_mask(num_heads: int, *, block_size: int = 64, local_blocks=16, vert_stride: int = 8,
            causal: bool = True, homo_head: bool = False, num_dense_heads: int = 0,
            num_kv_heads: Optional[int] = None, head_sliding_step: Optional[int] = None,
            head_sliding_offset: int = 0, vert_position_type: Optional[str] = None) -> S2:
  """The ``attnjax.masks.S2`` pattern with DKernel's argument names (validated there:
  ``vert_stride < 1`` or ``local_blocks < 1`` raise ValueError)."""
  return S2(num_heads, block_size, local_blocks, vert_stride, causal, homo_head,
            num_dense_heads, num_kv_heads, head_sliding_step, head_sliding_offset,
            vert_position_type)


def s2_block_layout(num_heads: int, seq_len: int, *, kv_len: Optional[int] = None,
                    block_size: int = 64, local_blocks=16, vert_stride: int = 8,
                    causal: bool = True, homo_head: bool = False, num_dense_heads: int = 0,
                    num_kv_heads: Optional[int] = None,
                    head_sliding_step: Optional[int] = None, head_sliding_offset: int = 0,
                    vert_position_type: Optional[str] = None, q_start: Optional[int] = None,
                    kv_start: int = 0):
  """S2-Attention's per-head block layout as a ``BlockLayout`` ([num_heads, nqb, nkb]).

  ``seq_len`` queries at positions ``q_start + arange(seq_len)`` (default
  bottom-right: ``kv_len - seq_len``) against ``kv_len`` keys from
  ``kv_start``; both lengths must be multiples of ``block_size``.
  ``layout.block_mask != 0`` is DKernel's boolean layout
  (``attnjax.masks.s2_block_mask`` gives it directly). Pass the layout to
  ``block_sparse_attention``.
  """
  mask = s2_mask(num_heads, block_size=block_size, local_blocks=local_blocks,
                 vert_stride=vert_stride, causal=causal, homo_head=homo_head,
                 num_dense_heads=num_dense_heads, num_kv_heads=num_kv_heads,
                 head_sliding_step=head_sliding_step, head_sliding_offset=head_sliding_offset,
                 vert_position_type=vert_position_type)
  kv_len = seq_len if kv_len is None else kv_len
  for name, L in (("seq_len", seq_len), ("kv_len", kv_len)):
    V.check_positive_int(name, L)
    if L % block_size:
      raise ValueError(f"block_size={block_size} does not divide {name}={L}.")
  return mask.block_layout(seq_len, kv_len, block_size, block_size, num_heads,
                           q_offset=q_start, k_offset=kv_start)


def s2_attention(query, key, value, *, block_size: int = 64, local_blocks=16,
                 vert_stride: int = 8, causal: bool = True, homo_head: bool = False,
                 num_dense_heads: int = 0, head_sliding_step: Optional[int] = None,
                 head_sliding_offset: int = 0, vert_position_type: Optional[str] = None,
                 score=None, scale=None, segment_ids=None, return_lse=False,
                 implementation=None):
  """S2-Attention: local blocks plus a per-head strided shard of the distant blocks.

  Head h keeps key block kb when ``(kb + h * step + offset) % vert_stride == 0``
  (heterogeneous shards; with GQA the pattern is per KV head, shared by its
  query heads); ``num_dense_heads`` last heads are dense; ``causal=False``
  uses the bidirectional relative-stride variant. Defaults: Phi-3-small's
  released config (block 64, 16 local blocks, stride 8). T and S must be
  multiples of ``block_size``; queries are bottom-right aligned.
  """
  d = V.check_qkv(query, key, value)
  layout = s2_block_layout(d.N, d.T, kv_len=d.S, block_size=block_size,
                           local_blocks=local_blocks, vert_stride=vert_stride, causal=causal,
                           homo_head=homo_head, num_dense_heads=num_dense_heads,
                           num_kv_heads=d.K if d.K != d.N else None,
                           head_sliding_step=head_sliding_step,
                           head_sliding_offset=head_sliding_offset,
                           vert_position_type=vert_position_type)
  return SP.block_sparse_attention(query, key, value, layout, score=score, scale=scale,
                                   segment_ids=segment_ids, return_lse=return_lse,
                                   implementation=implementation)


def shifted_group_attention(query, key, value, *, group_ratio: float = 0.25,
                            group_size: Optional[int] = None, wrap: str = "cyclic",
                            num_sink: int = 0, score=None, scale=None, return_lse=False,
                            implementation=None):
  """LongLoRA S2-Attn (``wrap="cyclic"``) and SinkLoRA SF-Attn (``wrap="none"``, sinks).

  Causal self-attention over positions ``[0, T)`` cut into groups of
  ``G = group_size or T * group_ratio`` tokens; heads ``[N/2, N)`` use groups
  shifted by ``G/2``. ``wrap="cyclic"`` keeps LongLoRA's wrap-around group, in
  which the first ``G/2`` tokens see the last ``G/2`` (a causal leak, as in
  the released code); ``wrap="none"`` splits it (SinkLoRA's reassembly, our
  reading of the paper) and ``num_sink`` sink tokens are visible to every
  query (SinkLoRA; 4 in StreamingLLM, unconfirmed for SinkLoRA).
  """
  d = V.check_qkv(query, key, value)
  if d.T != d.S:
    raise NotImplementedError(f"shifted_group_attention is defined for self-attention only "
                              f"(its pattern has no cross-attention form): T={d.T} must equal S={d.S}.")
  if group_size is None:
    if not 0 < group_ratio <= 1:
      raise ValueError(f"group_ratio must be in (0, 1], got {group_ratio}.")
    group_size = int(round(d.T * group_ratio))
    if group_size < 1 or abs(group_size - d.T * group_ratio) > 1e-6:
      raise ValueError(f"group_ratio={group_ratio} does not give an integer group size for "
                       f"T={d.T}; pass group_size.")
  mask = ShiftedGroups(group_size, d.T, d.N, wrap=wrap, num_sink=num_sink)
  return SP.block_sparse_attention(query, key, value, mask, score=score, scale=scale,
                                   return_lse=return_lse, implementation=implementation)
