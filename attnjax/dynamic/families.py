"""The content-sparse engine's families for the layer registry (``FAMILIES``).

Combiner (arXiv:2107.05768), Landmark Attention (arXiv:2305.16300), HiP Attention
(arXiv:2406.09827), LongHeads (arXiv:2402.10685), BiFormer (arXiv:2303.08810) and
HyperAttention (arXiv:2310.05869).

Each is declared once with ``attnjax.core.registry.family`` and has the
registry signature ``fn(query, key, value, *, causal, q_positions=None,
k_positions=None, segment_ids=None, **options)``; option names:
``docs/naming.md``. Arguments a family cannot honour raise instead of being
dropped.
"""
from __future__ import annotations

from attnjax.core.registry import families_of, family
from attnjax.dynamic.biformer import bi_level_routing_attention
from attnjax.dynamic.combiner import combiner_attention
from attnjax.dynamic.hip import hip_attention
from attnjax.dynamic.hyper import hyper_attention
from attnjax.dynamic.landmark import landmark_grouped_attention
from attnjax.dynamic.longheads import longheads_attention

__all__ = ["FAMILIES"]


def _check_call(name, causal, q_positions, k_positions, segment_ids, *,
                causal_modes=(True, False), positions=False):
  """NotImplementedError for what family ``name`` cannot honour.

  ``positions=True`` families take ``q_positions`` and ``k_positions``.
  """
  if segment_ids is not None:
    raise NotImplementedError(f"family {name!r} does not support segment_ids (packed "
                              "documents): its layout is chosen from content only.")
  if causal not in causal_modes:
    raise NotImplementedError(f"family {name!r} is defined for causal={causal_modes[0]} "
                              f"only, got causal={causal}.")
  if not positions and (q_positions is not None or k_positions is not None):
    raise NotImplementedError(f"family {name!r} uses the default (bottom-right aligned) "
                              "positions; q_positions/k_positions are not supported.")


@family("hip", supports_kv_cache=True, options=(
    "top_k", "block_size_q", "block_stride_q", "block_size_k", "scale", "return_lse",
    "return_indices", "implementation"), no_padding=(
        "HiP picks the top_k key blocks of each query block from the content, one selection "
        "shared by block_size_q queries, and takes no mask: padded keys compete for the "
        "budget and padded queries share a selection with real ones."))
def hip(query, key, value, *, causal, q_positions=None, k_positions=None, segment_ids=None,
        **options):
  """``hip_attention``; options are its keyword arguments."""
  _check_call("hip", causal, q_positions, k_positions, segment_ids, positions=True)
  return hip_attention(query, key, value, causal=causal, q_positions=q_positions,
                       k_positions=k_positions, **options)


@family("hyper", options=("rng", "lsh_num_projs", "block_size", "sample_size", "min_seq_len",
                          "scale", "return_lse", "implementation"), no_padding=(
    "HyperAttention sorts all queries and keys into LSH buckets and samples sample_size keys "
    "from the whole sequence, and takes no mask: padded keys land in real queries' buckets "
    "and samples."))
def hyper(query, key, value, *, causal, q_positions=None, k_positions=None, segment_ids=None,
          **options):
  """``hyper_attention``; options are its keyword arguments."""
  _check_call("hyper", causal, q_positions, k_positions, segment_ids)
  return hyper_attention(query, key, value, causal=causal, **options)


# Causal Combiner, LongHeads and Landmark compute query i from tokens <= i only (spans,
# chunks and landmark blocks are read once they lie wholly before the query), so right
# padding needs nothing; the others pick keys from the whole padded sequence.
@family("combiner", padding="causal_prefix", options=(
    "segment_len", "pool", "scale", "return_lse", "implementation", "pattern"), no_padding=(
        "non-causal Combiner summarises every span of segment_len keys, future ones included, "
        "by pooling, and takes no mask: the spans that hold padding pool padded keys into "
        "summaries every query reads (causal Combiner takes right padding)."))
def combiner(query, key, value, *, causal, q_positions=None, k_positions=None,
             segment_ids=None, **options):
  """``combiner_attention``; options are its keyword arguments."""
  _check_call("combiner", causal, q_positions, k_positions, segment_ids)
  return combiner_attention(query, key, value, causal=causal, **options)


@family("longheads", padding="causal_prefix", options=(
    "chunk_size", "attn_len", "begin_selective_length", "query_block", "rope_base", "scale",
    "return_chunks"))
def longheads(query, key, value, *, causal, q_positions=None, k_positions=None,
              segment_ids=None, **options):
  """``longheads_attention`` (causal); options are its keyword arguments."""
  _check_call("longheads", causal, q_positions, k_positions, segment_ids, causal_modes=(True,))
  return longheads_attention(query, key, value, **options)


@family("landmark", padding="causal_prefix", options=("block_size", "scale"))
def landmark(query, key, value, *, causal, q_positions=None, k_positions=None,
             segment_ids=None, **options):
  """``landmark_grouped_attention`` (causal); options are its keyword arguments."""
  _check_call("landmark", causal, q_positions, k_positions, segment_ids, causal_modes=(True,))
  return landmark_grouped_attention(query, key, value, **options)


@family("bi_level_routing", options=("scale", "detach_routing", "return_regions",
                                     "implementation"), no_padding=(
    "bi-level routing cuts queries and keys into num_regions regions of the padded length and "
    "routes by region means, so padded tokens enter the region means that every query's "
    "routing reads (and the regions differ from the unpadded sequence's); the function takes "
    "no mask."))
def bi_level_routing(query, key, value, *, causal, q_positions=None, k_positions=None,
                     segment_ids=None, num_regions=8, top_k=4, **options):
  """BiFormer routing on a 1D sequence: regions are contiguous blocks (queries and keys
  are each cut into ``num_regions`` of them, so T and S must both be divisible); each
  query region attends to its ``top_k`` routed regions (the function's ``topk``)."""
  _check_call("bi_level_routing", causal, q_positions, k_positions, segment_ids,
              causal_modes=(False,))
  return bi_level_routing_attention(query, key, value, num_regions=num_regions, topk=top_k,
                                    **options)


FAMILIES = families_of(__name__)
