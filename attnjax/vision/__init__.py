"""Vision, structured and non-QK "attention" methods of the seed papers.

Papers (full titles in each module's docstring): HyperZ.Z.W (arXiv:2401.17948),
GridFormer (arXiv:2401.02292), NiNformer (arXiv:2403.02411), ULSAM
(arXiv:2006.15102), OAT (arXiv:2407.13335), CSA (arXiv:2109.02613), ELA
(arXiv:2403.01123), ICL vs weight shifting for softmax regression
(arXiv:2304.13276), Visual Search Asymmetry (arXiv:2106.02953), GAAM
(arXiv:2401.11143), LSceneLLM (arXiv:2412.01292), MEDUSA (arXiv:2110.06063), DCAL
(arXiv:2205.02151), TAP + ADL (arXiv:2303.11126) and low-rank factorised
multi-head self-attention (arXiv:1912.00835).

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
