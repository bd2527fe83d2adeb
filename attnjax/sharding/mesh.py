"""Device meshes with the named axes ``data``, ``heads`` and ``context``, and sharding rules.

Axis roles: ``data`` splits the batch, ``heads`` splits attention heads (and
the projections' head axis), ``context`` splits the sequence. Parameters
outside the attention projections are replicated; activations [B, T, D] are
sharded ``P("data", "context", None)``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "heads", "context")


def mesh_shape(data: int = 1, heads: int = 1, context: int = 1,
               num_devices: Optional[int] = None, field: str = "mesh") -> Dict[str, int]:
  """Resolves axis sizes; at most one may be -1 (all remaining devices).

  Raises ValueError naming ``<field>.<axis>`` when sizes are not positive or
  their product differs from the number of devices.
  """
  n = jax.device_count() if num_devices is None else int(num_devices)
  sizes = {"data": data, "heads": heads, "context": context}
  free = [k for k, v in sizes.items() if v == -1]
  for k, v in sizes.items():
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or (v < 1 and v != -1):
      raise ValueError(f"{field}.{k} must be a positive integer or -1, got {v!r}.")
  if len(free) > 1:
    raise ValueError(f"at most one of {field}.data/heads/context may be -1, got {free}.")
  fixed = int(np.prod([v for v in sizes.values() if v != -1]))
  if free:
    if n % fixed:
      raise ValueError(
          f"{field}: {n} devices are not divisible by the fixed axes' product {fixed} "
          f"({sizes}).")
    sizes[free[0]] = n // fixed
  total = int(np.prod(list(sizes.values())))
  if total != n:
    raise ValueError(
        f"{field}: data * heads * context = {sizes['data']} * {sizes['heads']} * "
        f"{sizes['context']} = {total} must equal the number of devices ({n}).")
  return {k: int(v) for k, v in sizes.items()}


def make_mesh(data: int = 1, heads: int = 1, context: int = 1,
              devices: Optional[Sequence] = None, field: str = "mesh") -> Mesh:
  """A Mesh with axes ("data", "heads", "context") over ``devices`` (default all).

  All sizes 1 means a single device (the first), whatever the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  if (data, heads, context) == (1, 1, 1):
    devices = devices[:1]
  s = mesh_shape(data, heads, context, len(devices), field)
  arr = np.asarray(devices, dtype=object).reshape(s["data"], s["heads"], s["context"])
  return Mesh(arr, AXES)


def check_divisible(mesh: Mesh, *, batch_size: int, seq_len: int, num_heads: int,
                    num_kv_heads: Optional[int] = None) -> None:
  """ValueError naming the config field when a size does not split over its axis."""
  s = dict(mesh.shape)
  checks = (("config.task.batch_size", batch_size, "data"),
            ("config.task.seq_len", seq_len, "context"),
            ("config.model.num_heads", num_heads, "heads"))
  for field, value, axis in checks:
    if value % s[axis]:
      raise ValueError(
          f"{field}={value} is not divisible by the mesh's {axis!r} axis "
          f"(config.mesh.{axis}={s[axis]}).")
  if num_kv_heads is not None and s["heads"] > 1 and num_kv_heads % s["heads"]:
    raise ValueError(
        f"config.model.num_kv_heads={num_kv_heads} is not divisible by the mesh's 'heads' "
        f"axis (config.mesh.heads={s['heads']}); the key/value heads are split with the query "
        "heads.")


def check_segment_ids(segment_ids, batch, seq_len):
  """int32 [B, T] document ids, or None; a (q ids, kv ids) pair must be one array
  (context parallelism is self-attention); ValueError naming ``segment_ids`` otherwise."""
  if segment_ids is None:
    return None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2 or segment_ids[0] is not segment_ids[1]:
      raise ValueError("segment_ids: context parallelism is self-attention, so the query and "
                       "key segment ids must be one array [B, T] (or the same array twice).")
    segment_ids = segment_ids[0]
  segs = jnp.asarray(segment_ids)
  if segs.shape != (batch, seq_len) or not jnp.issubdtype(segs.dtype, jnp.integer):
    raise ValueError(f"segment_ids must be an int array [B, T] = [{batch}, {seq_len}], got "
                     f"{segs.dtype} {segs.shape}.")
  return segs.astype(jnp.int32)


def activation_sharding(mesh: Mesh) -> NamedSharding:
  """[B, T, D] activations: batch over data, sequence over context."""
  return NamedSharding(mesh, P("data", "context", None))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Input arrays [B, T, ...]: batch over data, sequence over context ([B] arrays: data)."""
  if ndim == 1:
    return NamedSharding(mesh, P("data"))
  return NamedSharding(mesh, P("data", "context", *([None] * (ndim - 2))))


_HEAD_AXIS = {"query": 1, "key": 1, "value": 1, "out": 0}


def param_spec(path, shape) -> P:
  """PartitionSpec of one parameter from its path: attention projections split heads.

  The layer's projections are ``query``/``key``/``value`` kernels [D, N|K, H]
  (biases [N|K, H]) and the ``out`` kernel [N, H, D]; everything else is
  replicated.
  """
  names = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
  if len(names) >= 2 and names[-2] in _HEAD_AXIS:
    axis = _HEAD_AXIS[names[-2]]
    if names[-1] == "bias" and names[-2] != "out":
      axis = 0
    elif names[-1] != "kernel":
      return P()
    if len(shape) > axis:
      spec = [None] * len(shape)
      spec[axis] = "heads"
      return P(*spec)
  return P()


def param_shardings(mesh: Mesh, params):
  """NamedShardings for a params pytree (heads split where the size divides)."""
  n = dict(mesh.shape)["heads"]

  def one(path, x):
    spec = param_spec(path, x.shape)
    for i, a in enumerate(spec):
      if a == "heads" and x.shape[i] % n:
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, params)
