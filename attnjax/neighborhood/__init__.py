"""Neighborhood engine: NATTEN neighborhood attention (arXiv:2403.04690) and local/structured
vision families: HaloNets (arXiv:2103.12731), HiLo (arXiv:2205.13213), PredFormer
(arXiv:2410.04733), MagicInfinite temporal sliding windows and region-masked cross-attention (arXiv:2503.05978); full titles
in each module's docstring.
"""
from attnjax.masks.neighborhood import Neighborhood
from attnjax.neighborhood.api import na1d, na2d, na3d, neighborhood_attention
from attnjax.neighborhood.families import FAMILIES
from attnjax.neighborhood.halo import halo_attention, halo_mask, window_attention
from attnjax.neighborhood.hilo import avg_pool, hilo_attention, pooled_kv_attention
from attnjax.neighborhood.layers import (GatedTransformerBlock, HaloAttention, HiLoAttention,
                                         NeighborhoodAttention, PredFormerLayer,
                                         SpatioTemporalAttention)
from attnjax.neighborhood.region import (region_cross_mask, region_ids_from_masks,
                                         region_masked_cross_attention)
from attnjax.neighborhood.spatiotemporal import (blend_overlaps, blend_weights,
                                                 sliding_window_denoise_plan,
                                                 spatiotemporal_attention,
                                                 temporal_window_attention)
from attnjax.plan.neighborhood import default_tile_shape
