"""attnjax: the attention mechanisms of the efficient-attention literature in JAX/Flax.

Three ways in: call a function (``attnjax.attention``), use a Flax layer
(``attnjax.layers``), or launch an experiment (``python -m experiments.train``).
"""
from attnjax import masks
from attnjax.api import attention, default_implementation, dot_product_attention, merge_attention
from attnjax.core.reference import reference_attention

__version__ = "0.1.0"
