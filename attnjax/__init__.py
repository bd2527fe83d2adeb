"""attnjax: the attention mechanisms of the efficient-attention literature in JAX/Flax.

Three ways in: call a function (``attnjax.attention`` and the family
functions below), use a Flax layer (``attnjax.layers.MultiHeadAttention``),
or launch an experiment (``python -m experiments.train``).

Layout BTNH: q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv], N % K == 0.
Causality is by positions (key j visible to query i iff k_pos[j] <= q_pos[i]),
bottom-right aligned by default.
"""
from attnjax import masks
from attnjax import scores
from attnjax.api import (attention, default_implementation, dot_product_attention, explain,
                         merge_attention)
from attnjax.core.reference import reference_attention

# Engines and families.
from attnjax.block_sparse import (anchor_attention, bigbird_attention, block_sparse_attention,
                                  block_sparse_attention_indices, composite_attention,
                                  longformer_attention, masformer_layer_specs, s2_attention,
                                  s2_block_layout, shifted_group_attention, sliding_window_attention,
                                  streaming_attention)
from attnjax.linear import (agent_attention, based_attention, flow_attention, lightning_attention,
                            linear_attention, linear_attention_step, neural_memory, tnl_decay_slopes)
from attnjax.neighborhood import (blend_overlaps, halo_attention, hilo_attention, na1d, na2d, na3d,
                                  neighborhood_attention, sliding_window_denoise_plan,
                                  spatiotemporal_attention)
from attnjax.dynamic import (bi_level_routing_attention, combiner_attention, gather_attention,
                             hip_attention, hyper_attention, landmark_grouped_attention,
                             landmark_retrieval_attention, longheads_attention, routing_attention,
                             seer_attention, sparsifiner_attention, topk_blocks)
from attnjax import analysis, decoding, dynamic, layers, linear, neighborhood, block_sparse
from attnjax import pooling, training, variants, vision

__version__ = "0.1.0"
