"""The block-sparse engine's families for the layer registry (``FAMILIES``).

Each is declared once with ``attnjax.core.registry.family`` and has the
registry signature ``fn(query, key, value, *, causal, q_positions=None,
k_positions=None, segment_ids=None, **options) -> out [B, T, N, Hv]``. Option
names: ``docs/naming.md``.
"""
from __future__ import annotations

from attnjax.block_sparse import families as F
from attnjax.block_sparse import strided as ST
from attnjax.block_sparse.api import attention
from attnjax.core.registry import families_of, family

#: Options of ``attnjax.attention`` that every mask family forwards.
ATTEND_OPTIONS = ("score", "scale", "return_lse", "implementation", "bias", "query_seq_lengths",
                  "key_value_seq_lengths")
#: Options of the shifted-group function besides its pattern's.
_SHIFTED_OPTIONS = ("group_ratio", "group_size", "wrap", "num_sink", "score", "scale",
                    "return_lse", "implementation")


def _causal_only(name, causal):
  if not causal:
    raise NotImplementedError(f"the {name} family is defined for causal attention only.")


def sliding_window_sides(causal: bool, window: int = 256, left=None, right=None):
  """(left, right) of the registry's ``window``: causal ``window - 1`` before the query,
  else ``window // 2`` each side; explicit ``left``/``right`` win."""
  if left is None:
    left = window - 1 if causal else window // 2
  if right is None:
    right = 0 if causal else window // 2
  return left, right


@family("sliding_window", options=ATTEND_OPTIONS, supports_kv_cache=True, padding="segment_ids")
def sliding_window(query, key, value, *, causal, q_positions=None, k_positions=None,
                   segment_ids=None, window: int = 256, left=None, right=None, **kw):
  """Causal: ``window`` keys (the query and ``window - 1`` before it); non-causal:
  ``window // 2`` on each side. ``left``/``right`` override."""
  left, right = sliding_window_sides(causal, window, left, right)
  return F.sliding_window_attention(query, key, value, left=left, right=right, causal=causal,
                                    q_positions=q_positions, k_positions=k_positions,
                                    segment_ids=segment_ids, **kw)


@family("longformer", options=ATTEND_OPTIONS, padding="segment_ids")
def longformer(query, key, value, *, causal, q_positions=None, k_positions=None,
               segment_ids=None, window: int = 512, global_positions=None, global_qkv=None,
               **kw):
  """Longformer: ``window // 2`` keys each side plus ``global_positions``."""
  return F.longformer_attention(query, key, value, causal=causal, q_positions=q_positions,
                                k_positions=k_positions, segment_ids=segment_ids,
                                window=window, global_positions=global_positions,
                                global_qkv=global_qkv, **kw)


@family("bigbird", options=ATTEND_OPTIONS, padding="segment_ids")
def bigbird(query, key, value, *, causal, q_positions=None, k_positions=None,
            segment_ids=None, block_size: int = 64, window_blocks: int = 3,
            num_global_blocks: int = 1, num_random_blocks: int = 3, seed: int = 0, **kw):
  """BigBird-ITC: block window, global and random blocks (``bigbird_attention``)."""
  return F.bigbird_attention(query, key, value, causal=causal, q_positions=q_positions,
                             k_positions=k_positions, segment_ids=segment_ids,
                             block_size=block_size, window_blocks=window_blocks,
                             num_global_blocks=num_global_blocks,
                             num_random_blocks=num_random_blocks, seed=seed, **kw)


@family("s2", options=ATTEND_OPTIONS, supports_kv_cache=True, padding="segment_ids")
def s2(query, key, value, *, causal, q_positions=None, k_positions=None, segment_ids=None,
       block_size: int = 64, local_blocks=16, vert_stride: int = 8, homo_head: bool = False,
       num_dense_heads: int = 0, head_sliding_step=None, head_sliding_offset: int = 0,
       vert_position_type=None, **kw):
  """S2-Attention's per-head strided pattern (``s2_mask``) on ``attnjax.attention``."""
  N, K = query.shape[2], key.shape[2]
  mask = ST.s2_mask(N, block_size=block_size, local_blocks=local_blocks,
                    vert_stride=vert_stride, causal=causal, homo_head=homo_head,
                    num_dense_heads=num_dense_heads, num_kv_heads=K if K != N else None,
                    head_sliding_step=head_sliding_step,
                    head_sliding_offset=head_sliding_offset,
                    vert_position_type=vert_position_type)
  return attention(query, key, value, mask=mask, q_positions=q_positions,
                   k_positions=k_positions, segment_ids=segment_ids, **kw)


_SHIFTED_NO_PADDING = (
    "shifted-group attention's pattern is a function of the padded length T: groups of "
    "G = group_ratio * T tokens, and LongLoRA's shifted heads wrap the first G/2 tokens "
    "into one group with the last G/2 (which would be padding), so a padded sequence cannot "
    "equal the unpadded one; the function also takes no segment ids. LongLoRA uses it for "
    "training on full-length sequences (pack documents instead of padding).")


@family("shifted_group", options=_SHIFTED_OPTIONS, aliases=("longlora",),
        no_padding=_SHIFTED_NO_PADDING)
def shifted_group(query, key, value, *, causal, q_positions=None, k_positions=None,
                  segment_ids=None, **kw):
  """LongLoRA S2-Attn (training-time; positions are the absolute [0, T))."""
  _causal_only("shifted_group", causal)
  if q_positions is not None or k_positions is not None or segment_ids is not None:
    raise NotImplementedError(
        "shifted_group attention is a training-time pattern over positions [0, T); it takes "
        "no q_positions/k_positions/segment_ids (use full attention at inference, as LongLoRA).")
  return ST.shifted_group_attention(query, key, value, **kw)


@family("sinklora", options=_SHIFTED_OPTIONS, no_padding=(
    "SinkLoRA's shifted groups are fixed to positions [0, T) of the padded sequence (groups "
    "of G = group_ratio * T tokens unless group_size is given) and the shifted-group function "
    "takes no segment ids or mask, so padded keys would stay in the groups of real queries."))
def sinklora(query, key, value, *, causal, q_positions=None, k_positions=None,
             segment_ids=None, num_sink: int = 4, wrap: str = "none", **kw):
  """SinkLoRA SF-Attn: shifted groups without the wrap-around leak, plus sink tokens."""
  return shifted_group.family_spec.impl(
      query, key, value, causal=causal, q_positions=q_positions, k_positions=k_positions,
      segment_ids=segment_ids, num_sink=num_sink, wrap=wrap, **kw)


@family("streaming", options=ATTEND_OPTIONS, supports_kv_cache=True, padding="segment_ids")
def streaming(query, key, value, *, causal, q_positions=None, k_positions=None,
              segment_ids=None, num_sink: int = 4, window: int = 256, **kw):
  """StreamingLLM sinks + the recent ``window`` keys (causal)."""
  _causal_only("streaming", causal)
  return F.streaming_attention(query, key, value, num_sink=num_sink, window=window,
                               q_positions=q_positions, k_positions=k_positions,
                               segment_ids=segment_ids, **kw)


@family("anchor", options=ATTEND_OPTIONS, padding="segment_ids")
def anchor(query, key, value, *, causal, q_positions=None, k_positions=None,
           segment_ids=None, doc_ids=None, anchor_id: int = 0, **kw):
  """Document ids from ``doc_ids`` or, if absent, from ``segment_ids``."""
  _causal_only("anchor", causal)
  if doc_ids is None:
    doc_ids, segment_ids = segment_ids, None
  return F.anchor_attention(query, key, value, doc_ids=doc_ids, anchor_id=anchor_id,
                            q_positions=q_positions, k_positions=k_positions,
                            segment_ids=segment_ids, **kw)


@family("composite", options=ATTEND_OPTIONS, padding="segment_ids")
def composite(query, key, value, *, causal, q_positions=None, k_positions=None,
              segment_ids=None, num_visual: int = None, **kw):
  """EE-MLLM composite attention over ``[visual; text]`` (``num_visual`` visual tokens)."""
  _causal_only("composite", causal)
  if num_visual is None:
    raise TypeError("the composite family needs num_visual (the number of leading visual "
                    "tokens).")
  return F.composite_attention(query, key, value, num_visual=num_visual,
                               q_positions=q_positions, k_positions=k_positions,
                               segment_ids=segment_ids, **kw)


@family("block_local", options=ATTEND_OPTIONS, supports_kv_cache=True, padding="segment_ids")
def block_local(query, key, value, *, causal, q_positions=None, k_positions=None,
                segment_ids=None, block_size: int, include_prev_block: bool = False, **kw):
  """MASFormer's block-local attention in blocks of ``block_size`` positions."""
  return F.block_local_attention(query, key, value, causal=causal, block_size=block_size,
                                 include_prev_block=include_prev_block,
                                 q_positions=q_positions, k_positions=k_positions,
                                 segment_ids=segment_ids, **kw)


FAMILIES = families_of(__name__)
