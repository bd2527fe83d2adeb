"""Flax layers over the attnjax attention families, and the shared RoPE helper."""
from attnjax.layers.attention import (MultiHeadAttention, apply_selective_token_temperatures,
                                      bind_score_params)
from attnjax.layers.flax_adapter import make_attention_fn
from attnjax.layers.registry import get_family, list_families, register_family
from attnjax.layers.rope import RopeScaling, apply_rope, rotary_dims
