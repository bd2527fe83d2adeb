"""Linear engine: chunked linear attention and the families built on it.

Lightning Attention-2 / TNL (papers_1 #25, #27), Agent Attention (#23),
Flowformer (P2-02), DSF (P2-05), BASED (P2-09), Titans (P2-27).
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
from attnjax.linear.lightning import lightning_attention, srms_norm
from attnjax.linear.titans import linear_memory, memory_recurrence, neural_memory
from attnjax.linear.layers import (AgentAttention, SlidingWindowBlock, TitansMAG, TitansMAL,
                                   TitansMemory, TNLTokenMixer)
from attnjax.linear.titans_mac import TitansMAC
