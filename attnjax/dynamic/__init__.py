"""Content-based sparse attention: layouts chosen from the data at run time.

Papers (full titles in each module's docstring): BiFormer (arXiv:2303.08810),
Routing Transformer (arXiv:2003.05997), SeerAttention (arXiv:2410.13276),
HyperAttention (arXiv:2310.05869), Sparsifiner (arXiv:2303.13755), Combiner
(arXiv:2107.05768), Landmark Attention (arXiv:2305.16300), HiP Attention
(arXiv:2406.09827) and LongHeads (arXiv:2402.10685).

Every family scores blocks or tokens from q/k, picks a fixed-size layout
under ``jit`` (:mod:`attnjax.dynamic.select`) and runs attention on it
(:mod:`attnjax.dynamic.gather`: the block-sparse engine when present, else a
gather whose cost follows the chosen blocks). ``FAMILIES`` holds the
parameter-free ones for ``attnjax.layers``; families with parameters or
state are Flax modules (``SeerAttention``, ``RoutingAttention``,
``SparsifinerAttention``, ``BiLevelRoutingAttention``).
"""
from attnjax.dynamic.biformer import BiLevelRoutingAttention, bi_level_routing_attention, lce
from attnjax.dynamic.combiner import combiner_attention, combiner_effective_matrix
from attnjax.dynamic.combiner_logsparse import logsparse_spans
from attnjax.dynamic.families import FAMILIES
from attnjax.dynamic.gather import block_gather_attention, gather_attention, layout_attention
from attnjax.dynamic.hip import hip_attention, hip_mask
from attnjax.dynamic.hyper import hyper_attention, sort_lsh_buckets
from attnjax.dynamic.landmark import (insert_landmarks, landmark_grouped_attention,
                                      landmark_retrieval_attention)
from attnjax.dynamic.longheads import (chunk_representations, longheads_attention,
                                       longheads_decode_step)
from attnjax.dynamic.routing import RoutingAttention, kmeans_ema_update, routing_attention
from attnjax.dynamic.seer import (SeerAttention, SeerAttnGate, gate_to_layout, seer_attention,
                                  seer_distillation_loss, seer_gate, seer_ground_truth)
from attnjax.dynamic.select import (attention_mass_recall, block_layout_to_mask, block_validity,
                                    pool_blocks, pooled_topk_blocks, token_indices_to_mask,
                                    topk_blocks)
from attnjax.dynamic.sparsifiner import (SparsifinerAttention, connectivity_scores,
                                         sparsifiner_attention, sparsifiner_distillation_loss)
