"""Where a computation is placed: the device that kernel and backend choices follow.

Kernels are chosen for the device the computation runs on, not for
``jax.default_backend()``: a program traced under
``with jax.default_device(tpu_device):`` (a real chip, or one of a
``jax.experimental.topologies`` description for compiling without a device)
gets the TPU kernels even when the host's default backend is the CPU. The
order of evidence:

1. concrete input arrays that are committed to devices (their sharding);
2. the ``jax.default_device`` setting (a device or a platform name);
3. the devices of the mesh set with ``jax.set_mesh`` / ``with mesh:``;
4. ``jax.default_backend()``.
"""
from __future__ import annotations

from typing import Optional

import jax

from pallas_kernels.targets import budgets as _budgets
from pallas_kernels.targets import support as _support

_GPU_NAMES = ("gpu", "cuda", "rocm")

__all__ = ["target_platform", "pallas_backend", "target_device", "on_accelerator", "device_kind",
           "compile_target", "default_kernel_implementation"]


def _normalise(platform: str) -> str:
  platform = str(platform).lower()
  return "gpu" if platform in _GPU_NAMES else platform


def _from_arrays(arrays) -> Optional[jax.Device]:
  for x in arrays:
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
      try:
        if not x.committed:
          continue
        devices = x.sharding.device_set
      except Exception:  # pylint: disable=broad-except
        continue
      if devices:
        return next(iter(devices))
  return None


def _from_mesh() -> Optional[jax.Device]:
  try:
    from jax._src import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
    mesh = mesh_lib.get_concrete_mesh()
  except Exception:  # pylint: disable=broad-except
    return None
  if mesh is None or getattr(mesh, "empty", True):
    return None
  return mesh.devices.flat[0]


def target_device(*arrays) -> Optional[jax.Device]:
  """The device the computation is placed on, or None when only a platform is known."""
  device = _from_arrays(arrays)
  if device is not None:
    return device
  setting = jax.config.jax_default_device
  if isinstance(setting, jax.Device):
    return setting
  return _from_mesh()


def target_platform(*arrays) -> str:
  """'tpu', 'gpu', 'cpu' (or another platform name) of the placed computation."""
  device = _from_arrays(arrays)
  if device is not None:
    return _normalise(device.platform)
  setting = jax.config.jax_default_device
  if setting is not None:
    return _normalise(setting.platform if isinstance(setting, jax.Device) else setting)
  device = _from_mesh()
  if device is not None:
    return _normalise(device.platform)
  return _normalise(jax.default_backend())


def pallas_backend(*arrays) -> Optional[str]:
  """'tpu' or 'gpu' when the placed computation runs on one, else None."""
  platform = target_platform(*arrays)
  return platform if platform in ("tpu", "gpu") else None


def on_accelerator(*arrays) -> bool:
  """True when the computation is placed on a TPU or GPU."""
  return pallas_backend(*arrays) is not None


def device_kind(*arrays) -> str:
  """The placed device's kind (e.g. 'TPU v5 lite', 'NVIDIA H100'), '' when unknown."""
  device = target_device(*arrays)
  if device is None:
    return ""
  return str(getattr(device, "device_kind", ""))


def compile_target(*arrays) -> Optional[str]:
  """The kernels' compile-target name of the placed device ('tpu_v5e', 'sm90', ...), or None."""
  return _budgets.target_of_device(target_device(*arrays))


def default_kernel_implementation(engine: str, *arrays) -> str:
  """'pallas' where ``engine``'s kernels are the default for the placed device, else 'xla'.

  The evidence is ``pallas_kernels.targets.support`` (the targets the compile
  tests show the kernels compile for).
  """
  if not on_accelerator(*arrays):
    return "xla"
  return "pallas" if _support.kernel_is_default(engine, target_device(*arrays)) else "xla"
