"""Sharding: named device meshes, parameter/activation rules, context parallelism.

The exchange of visited K/V blocks for static masks (S2's head-sharded context
parallelism is one instance) and for run-time block lists, a prefix scan of states for the
linear engine and a halo exchange for the neighborhood engine;
``context_parallel(family, mesh)`` picks the route of any registered family.
"""
from attnjax.sharding.mesh import (AXES, activation_sharding, batch_sharding, check_divisible,
                                   make_mesh, mesh_shape, param_shardings, param_spec)
from attnjax.sharding.linear_context import (check_context_mesh,
                                             context_parallel_based_attention,
                                             context_parallel_linear_attention,
                                             exclusive_state_scan, linear_communication_bytes,
                                             scan_steps)
from attnjax.sharding.neighborhood_context import (HaloPlan,
                                                   context_parallel_neighborhood_attention,
                                                   halo_plan, neighborhood_communication_bytes)
from attnjax.sharding.block_sparse_plan import (BlockSparseContextPlan,
                                                block_sparse_context_plan, communication_report,
                                                sequence_permutation)
from attnjax.sharding.block_sparse_context import context_parallel_block_sparse
from attnjax.sharding.block_list_context import (BlockListPlan, block_list_capacity,
                                                 block_list_plan, block_list_report,
                                                 context_parallel_block_lists, owned_blocks)
from attnjax.sharding.context_parallel import (context_parallel, context_parallel_family,
                                               context_parallel_support, static_mask)
from attnjax.sharding.s2_context import (communication_bytes, context_parallel_attention,
                                         make_plan, s2_family_for_mesh)

_REMOVED = {
    "ContextPlan": "the S2 route runs on BlockSparseContextPlan (block_sparse_context_plan)",
    "kv_block_needs": "the blocks each device needs are block_sparse_context_plan(...)"
                      ".needed_blocks / .slot_blocks",
}


def __getattr__(name):
  if name in _REMOVED:
    raise AttributeError(f"attnjax.sharding.{name} was removed: {_REMOVED[name]}.")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
