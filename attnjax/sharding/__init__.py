"""Sharding: named device meshes, parameter/activation rules, S2 head-sharded context parallelism."""
from attnjax.sharding.mesh import (AXES, activation_sharding, batch_sharding, check_divisible,
                                   make_mesh, mesh_shape, param_shardings, param_spec)
from attnjax.sharding.s2_context import (ContextPlan, communication_bytes, s2_family_for_mesh,
                                         context_parallel_attention, kv_block_needs, make_plan)
