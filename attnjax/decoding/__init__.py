"""Decoding and KV-cache methods: contiguous/paged decode, RazorAttention, DuoAttention,
TidalDecode, TokenSelect, H2O."""
from attnjax.decoding.cache import (PageAllocator, decode_attention, gather_pages,
                                    paged_decode_attention, simulate_trace)
from attnjax.decoding.razor import (RazorCache, alibi_buffer_length, razor_compress,
                                    razor_decode_attention, razor_keep_mask, repeated_random_tokens, retrieval_head_scores,
                                    select_protected_heads)
from attnjax.decoding.duo import (DuoGateFit, SinkRecentKVCache, duo_attention, duo_gate_loss, duo_mask,
                                  duo_mixed_attention, fit_duo_gates, mix_heads,
                                  select_retrieval_heads)
from attnjax.decoding.select import (SelectionCache, TidalSchedule, sparse_decode_attention,
                                     tidal_decode_step, tokenselect_indices, topk_positions)
from attnjax.decoding.h2o import (H2OCache, empty_h2o_cache, h2o_accumulate, h2o_decode_step,
                                  h2o_keep_indices, h2o_prefill)
