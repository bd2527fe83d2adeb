"""Sharding: named device meshes, parameter/activation rules, S2 head-sharded context parallelism."""
from attnjax.sharding.mesh import (AXES, activation_sharding, batch_sharding, check_divisible,
                                   make_mesh, mesh_shape, param_shardings, param_spec)
