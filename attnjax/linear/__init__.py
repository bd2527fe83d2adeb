"""Linear engine: chunked linear attention and the families built on it.

Papers (full titles in each module's docstring): Lightning Attention-2
(arXiv:2401.04658) / TNL (arXiv:2405.17381), Agent Attention (arXiv:2312.08874),
Flowformer (arXiv:2202.06258), DSF (arXiv:2405.15731), BASED (arXiv:2402.18668),
Titans (arXiv:2501.00663).
"""
from attnjax.linear.agent import agent_attention, pool_agents
from attnjax.linear.api import init_state, linear_attention, linear_attention_step
from attnjax.linear.based import based_attention
from attnjax.linear.decay import alibi_slopes, tnl_decay_slopes
from attnjax.linear.dsf import (dsf_scan, linear_attention_dsf, linear_attention_mixing_matrix,
                                materialize_mixing_matrix)
from attnjax.linear.families import FAMILIES
from attnjax.linear.feature_maps import elu_plus_one, identity, relu, resolve_feature_map, taylor
from attnjax.linear.flow import flow_attention
from attnjax.linear.lightning import (lightning_attention, lrpe_rotate, lrpe_thetas, sglu,
                                      srms_norm)
from attnjax.linear.titans import (linear_memory, memory_recurrence, neural_memory,
                                   short_causal_conv)
from attnjax.linear.layers import (SGLU, AgentAttention, SlidingWindowBlock, TitansMAG, TitansMAL,
                                   TitansMemory, TNLTokenMixer)
from attnjax.linear.titans_mac import TitansMAC
