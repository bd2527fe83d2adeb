"""Linear engine: chunked linear attention and the families built on it."""
from attnjax.linear.api import init_state, linear_attention, linear_attention_step
from attnjax.linear.decay import alibi_slopes, tnl_decay_slopes
from attnjax.linear.feature_maps import elu_plus_one, identity, relu, resolve_feature_map, taylor
