"""The one reference both kernel variants are checked against (Lightning Attention-2, arXiv:2401.04658).

The per-chunk arithmetic the kernels run is attnjax.linear.chunk_math; the
oracles are the dense quadratic masked form and the token recurrence.
"""
from attnjax.linear.chunk_math import chunk_forward, chunk_grad_kv, chunk_grad_q  # noqa: F401
from attnjax.linear.reference import dense_linear_attention, recurrent_linear_attention  # noqa: F401
