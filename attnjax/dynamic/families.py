"""Parameter-free content-sparse families for the layer registry.

Combiner (arXiv:2107.05768), Landmark Attention (arXiv:2305.16300), HiP Attention
(arXiv:2406.09827), LongHeads (arXiv:2402.10685), BiFormer (arXiv:2303.08810) and
HyperAttention (arXiv:2310.05869).

Each entry has the registry signature ``fn(query, key, value, *, causal,
q_positions=None, k_positions=None, segment_ids=None, **options)``.
Arguments a family cannot honour raise instead of being dropped.
"""
from __future__ import annotations

import functools

from attnjax.dynamic.biformer import bi_level_routing_attention
from attnjax.dynamic.combiner import combiner_attention
from attnjax.dynamic.hip import hip_attention
from attnjax.dynamic.hyper import hyper_attention
from attnjax.dynamic.landmark import landmark_grouped_attention
from attnjax.dynamic.longheads import longheads_attention

__all__ = ["FAMILIES"]


def _family(name, fn, *, causal_modes=(True, False), positions=False):
  """Wraps ``fn`` with the registry signature and checks of what it supports.

  ``positions=True`` families take ``causal``, ``q_positions`` and ``k_positions``.
  """

  @functools.wraps(fn)
  def family(query, key, value, *, causal: bool, q_positions=None, k_positions=None,
             segment_ids=None, **options):
    if segment_ids is not None:
      raise NotImplementedError(f"family {name!r} does not support segment_ids (packed "
                                "documents): its layout is chosen from content only.")
    if causal not in causal_modes:
      raise NotImplementedError(f"family {name!r} is defined for causal={causal_modes[0]} "
                                f"only, got causal={causal}.")
    if positions:
      return fn(query, key, value, causal=causal, q_positions=q_positions,
                k_positions=k_positions, **options)
    if q_positions is not None or k_positions is not None:
      raise NotImplementedError(f"family {name!r} uses the default (bottom-right aligned) "
                                "positions; q_positions/k_positions are not supported.")
    if len(causal_modes) == 2:
      return fn(query, key, value, causal=causal, **options)
    return fn(query, key, value, **options)

  family.supports_kv_cache = positions
  return family


def _bi_level_1d(query, key, value, *, num_regions=8, topk=4, **options):
  """BiFormer routing on a 1D sequence: regions are contiguous blocks (queries and keys
  are each cut into ``num_regions`` of them, so T and S must both be divisible)."""
  return bi_level_routing_attention(query, key, value, num_regions=num_regions, topk=topk,
                                    **options)


FAMILIES = {
    "hip": _family("hip", hip_attention, positions=True),
    "hyper": _family("hyper", hyper_attention),
    "combiner": _family("combiner", combiner_attention),
    "longheads": _family("longheads", longheads_attention, causal_modes=(True,)),
    "landmark": _family("landmark", landmark_grouped_attention, causal_modes=(True,)),
    "bi_level_routing": _family("bi_level_routing", _bi_level_1d, causal_modes=(False,)),
}

# How MultiHeadAttention hands these families a padded batch (attnjax.layers.padding).
# Causal Combiner, LongHeads and Landmark compute query i from tokens <= i only (spans,
# chunks and landmark blocks are read once they lie wholly before the query), so right
# padding needs nothing; the others pick keys from the whole padded sequence.
for _name in ("combiner", "longheads", "landmark"):
  FAMILIES[_name].key_padding = "causal_prefix"
_NO_KEY_PADDING = {
    "hip": "HiP picks the top_k key blocks of each query block from the content, one "
           "selection shared by block_size_q queries, and takes no mask: padded keys compete "
           "for the budget and padded queries share a selection with real ones.",
    "hyper": "HyperAttention sorts all queries and keys into LSH buckets and samples "
             "sample_size keys from the whole sequence, and takes no mask: padded keys land in "
             "real queries' buckets and samples.",
    "combiner": "non-causal Combiner summarises every span of segment_len keys, future ones "
                "included, by pooling, and takes no mask: the spans that hold padding pool "
                "padded keys into summaries every query reads (causal Combiner takes right "
                "padding).",
    "bi_level_routing": "bi-level routing cuts queries and keys into num_regions regions of "
                        "the padded length and routes by region means, so padded tokens enter "
                        "the region means that every query's routing reads (and the regions "
                        "differ from the unpadded sequence's); the function takes no mask.",
}
for _name, _why in _NO_KEY_PADDING.items():
  FAMILIES[_name].no_key_padding = _why
