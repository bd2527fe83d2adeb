"""Vision, structured and non-QK "attention" methods of the seed papers (papers_1 #8, #9, #11, #14, #17, #18, #22, #29, #30; papers_2 P2-03, P2-11, P2-12, P2-19, P2-21, P2-22).

Pure functions of explicit parameters plus thin Flax modules. Images are NHWC
([B, H, W, C]); token tensors are BTNH as everywhere in attnjax.
"""
from attnjax.vision.cnn import (ELA_VARIANTS, ULSAM, ClassSemanticsAttention, EfficientLocalAttention,
                                GaussianAdaptiveAttention, class_semantics_attention,
                                efficient_local_attention, gaussian_adaptive_gate, ulsam)
from attnjax.vision.dcal import (DCALAttention, attention_rollout, glca_attention, pairwise_cross_attention,
                                 partner_permutation, select_top_tokens)
from attnjax.vision.grid import (PointGridAttention, point_cells, point_to_grid_attention,
                                 sample_grid_bilinear, segment_softmax)
from attnjax.vision.hyperzzw import (HyperZZW, SirenMLP, coordinate_grid, coordinate_kernel, fft_long_conv,
                                     hyper_zzw)
from attnjax.vision.icl import (equivalent_data_shift, gd_step, icl_gd_closeness, self_attention_data_update,
                                softmax_regression_grad, softmax_regression_loss)
from attnjax.vision.misc import (MultiScaleAttentionGates, NiNformerBlock, box_positional_encoding,
                                 eccentricity_pool, ninformer_block, target_correlation_map)
from attnjax.vision.tokens import (LowRankPoolingAttention, TokenAwarePooling, attention_diversification_loss,
                                   attention_guided_topk, coarse_fine_attention, dilated_avg_pool,
                                   low_rank_pooling_attention, token_aware_avg_pool)
