"""Config-name -> family function table (``FAMILIES``) for the Flax layer registry.

Each entry is ``fn(query, key, value, *, causal, q_positions=None,
k_positions=None, segment_ids=None, **options) -> out [B, T, N, Hv]``.
"""
from __future__ import annotations

from attnjax.block_sparse import families as F
from attnjax.block_sparse import strided as ST


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


def sliding_window(query, key, value, *, causal, q_positions=None, k_positions=None,
                   segment_ids=None, window: int = 256, left=None, right=None, **kw):
  """Causal: ``window`` keys (the query and ``window - 1`` before it); non-causal:
  ``window // 2`` on each side. ``left``/``right`` override."""
  left, right = sliding_window_sides(causal, window, left, right)
  return F.sliding_window_attention(query, key, value, left=left, right=right, causal=causal,
                                    q_positions=q_positions, k_positions=k_positions,
                                    segment_ids=segment_ids, **kw)


def longformer(query, key, value, *, causal, q_positions=None, k_positions=None,
               segment_ids=None, **kw):
  return F.longformer_attention(query, key, value, causal=causal, q_positions=q_positions,
                                k_positions=k_positions, segment_ids=segment_ids, **kw)


def bigbird(query, key, value, *, causal, q_positions=None, k_positions=None,
            segment_ids=None, **kw):
  return F.bigbird_attention(query, key, value, causal=causal, q_positions=q_positions,
                             k_positions=k_positions, segment_ids=segment_ids, **kw)


def s2(query, key, value, *, causal, q_positions=None, k_positions=None, segment_ids=None,
       block_size: int = 64, local_blocks=16, vert_stride: int = 8, homo_head: bool = False,
       num_dense_heads: int = 0, head_sliding_step=None, head_sliding_offset: int = 0,
       vert_position_type=None, **kw):
  N, K = query.shape[2], key.shape[2]
  mask = ST.s2_mask(N, block_size=block_size, local_blocks=local_blocks,
                    vert_stride=vert_stride, causal=causal, homo_head=homo_head,
                    num_dense_heads=num_dense_heads, num_kv_heads=K if K != N else None,
                    head_sliding_step=head_sliding_step,
                    head_sliding_offset=head_sliding_offset,
                    vert_position_type=vert_position_type)
  return F._attend(query, key, value, mask, q_positions=q_positions,  # pylint: disable=protected-access
                   k_positions=k_positions, segment_ids=segment_ids, **kw)


def shifted_group(query, key, value, *, causal, q_positions=None, k_positions=None,
                  segment_ids=None, **kw):
  """LongLoRA S2-Attn (training-time; positions are the absolute [0, T))."""
  _causal_only("shifted_group", causal)
  if q_positions is not None or k_positions is not None or segment_ids is not None:
    raise NotImplementedError(
        "shifted_group attention is a training-time pattern over positions [0, T); it takes "
        "no q_positions/k_positions/segment_ids (use full attention at inference, as LongLoRA).")
  return ST.shifted_group_attention(query, key, value, **kw)


def sinklora(query, key, value, *, causal, q_positions=None, k_positions=None,
             segment_ids=None, num_sink: int = 4, **kw):
  """SinkLoRA SF-Attn: shifted groups without the wrap-around leak, plus sink tokens."""
  kw.setdefault("wrap", "none")
  return shifted_group(query, key, value, causal=causal, q_positions=q_positions,
                       k_positions=k_positions, segment_ids=segment_ids, num_sink=num_sink,
                       **kw)


def streaming(query, key, value, *, causal, q_positions=None, k_positions=None,
              segment_ids=None, **kw):
  _causal_only("streaming", causal)
  return F.streaming_attention(query, key, value, q_positions=q_positions,
                               k_positions=k_positions, segment_ids=segment_ids, **kw)


def anchor(query, key, value, *, causal, q_positions=None, k_positions=None,
           segment_ids=None, doc_ids=None, **kw):
  """Document ids from ``doc_ids`` or, if absent, from ``segment_ids``."""
  _causal_only("anchor", causal)
  if doc_ids is None:
    doc_ids, segment_ids = segment_ids, None
  return F.anchor_attention(query, key, value, doc_ids=doc_ids, q_positions=q_positions,
                            k_positions=k_positions, segment_ids=segment_ids, **kw)


def composite(query, key, value, *, causal, q_positions=None, k_positions=None,
              segment_ids=None, **kw):
  _causal_only("composite", causal)
  return F.composite_attention(query, key, value, q_positions=q_positions,
                               k_positions=k_positions, segment_ids=segment_ids, **kw)


def block_local(query, key, value, *, causal, q_positions=None, k_positions=None,
                segment_ids=None, **kw):
  return F.block_local_attention(query, key, value, causal=causal, q_positions=q_positions,
                                 k_positions=k_positions, segment_ids=segment_ids, **kw)


for _fn in (sliding_window, s2, streaming, block_local):
  _fn.supports_kv_cache = True
# A layer's key-padding mask reaches these as segment ids (a padded key's segment matches
# no query), so their fast paths skip padded keys like other documents' keys.
for _fn in (sliding_window, longformer, bigbird, s2, streaming, anchor, composite, block_local):
  _fn.key_padding = "segment_ids"
shifted_group.no_key_padding = (
    "shifted-group attention's pattern is a function of the padded length T: groups of "
    "G = group_ratio * T tokens, and LongLoRA's shifted heads wrap the first G/2 tokens "
    "into one group with the last G/2 (which would be padding), so a padded sequence cannot "
    "equal the unpadded one; the function also takes no segment ids. LongLoRA uses it for "
    "training on full-length sequences (pack documents instead of padding).")
sinklora.no_key_padding = (
    "SinkLoRA's shifted groups are fixed to positions [0, T) of the padded sequence (groups "
    "of G = group_ratio * T tokens unless group_size is given) and the shifted-group function "
    "takes no segment ids or mask, so padded keys would stay in the groups of real queries.")

FAMILIES = {
    "sliding_window": sliding_window,
    "longformer": longformer,
    "bigbird": bigbird,
    "s2": s2,
    "shifted_group": shifted_group,
    "longlora": shifted_group,
    "sinklora": sinklora,
    "streaming": streaming,
    "anchor": anchor,
    "composite": composite,
    "block_local": block_local,
}
