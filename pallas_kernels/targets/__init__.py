"""Compile targets: real TPU and GPU compilers on a machine without the device.

A target is a named chip: a TPU generation (a ``jax.experimental.topologies``
description from libtpu) or an NVIDIA compute capability (a
``GpuTargetConfigProto`` text file beside this module, read by the CUDA PJRT
plugin, which then runs Triton, XLA:GPU and ptxas with no GPU present).
``compile_on(target, fn, *specs)`` traces ``fn`` under
``jax.default_device(<the target's device>)`` (the kernels read the placed
device, see ``attnjax.core.placement``), lowers and compiles it, and returns
the compiled program with its compile time and memory analysis.

The toolchains are an optional extra (``pip install -e ".[compile]"``: libtpu,
jax-cuda12-plugin/-pjrt, nvidia-cuda-nvcc-cu12). Run with
``JAX_PLATFORMS=cpu`` so that neither plugin tries to start a device.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
import time
from typing import Any, Callable, Dict, Sequence

import jax

TPU_TARGETS: Dict[str, str] = {
    "tpu_v4": "v4:2x2x1",
    "tpu_v5e": "v5e:2x2",
    "tpu_v5p": "v5p:2x2x1",
    "tpu_v6e": "v6e:2x2",
    "tpu7x": "TPU7x:2x2x1",
}
GPU_TARGETS: Dict[str, str] = {
    "sm80": "sm80_a100.txtpb",
    "sm90": "sm90_h200.txtpb",
}
TARGETS = tuple(TPU_TARGETS) + tuple(GPU_TARGETS)
_KERNEL_MARKERS = {"tpu": ('custom_call_target="tpu_custom_call"',),
                   "gpu": ('custom_call_target="__gpu$xla.gpu.triton"',
                           'custom_call_target="mosaic_gpu')}

__all__ = ["TARGETS", "TPU_TARGETS", "GPU_TARGETS", "CompileResult", "device", "compile_on",
           "toolchain_available", "platform_of", "gpu_config", "require_kernels"]


def platform_of(target: str) -> str:
  """'tpu' or 'gpu' for a target name."""
  if target in TPU_TARGETS:
    return "tpu"
  if target in GPU_TARGETS:
    return "gpu"
  raise ValueError(f"target must be one of {TARGETS}, got {target!r}.")


def toolchain_available(platform: str) -> bool:
  """Whether the compiler for 'tpu' (libtpu) or 'gpu' (CUDA plugin + ptxas) is installed."""
  if platform == "tpu":
    return importlib.util.find_spec("libtpu") is not None
  if platform == "gpu":
    return (importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
            and importlib.util.find_spec("nvidia.cuda_nvcc") is not None)
  raise ValueError(f"platform must be 'tpu' or 'gpu', got {platform!r}.")


def gpu_config(target: str) -> str:
  """The GpuTargetConfigProto text of a GPU target."""
  path = os.path.join(os.path.dirname(__file__), GPU_TARGETS[target])
  with open(path, encoding="utf-8") as f:
    return f.read()


@functools.lru_cache(maxsize=None)
def device(target: str) -> jax.Device:
  """Device 0 of the target's deviceless topology (cached per process)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  platform = platform_of(target)
  if not toolchain_available(platform):
    raise RuntimeError(
        f"target {target!r} needs the {platform.upper()} compiler toolchain: "
        "pip install -e \".[compile]\".")
  if platform == "tpu":
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # several processes (test workers, a compile report beside a test run) may
    # each open a deviceless topology; libtpu's one-process lock is for chips
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    topo = topologies.get_topology_desc(TPU_TARGETS[target], "tpu")
  else:
    topo = topologies.get_topology_desc(
        platform="cuda", target_config=gpu_config(target), topology="1x1x1")
  return topo.devices[0]


@dataclasses.dataclass(frozen=True)
class CompileResult:
  """A compiled program and what its compile cost."""
  compiled: Any
  seconds: float
  code_bytes: int
  temp_bytes: int
  kernel_calls: int  # compiled Pallas kernels (Mosaic or Triton custom calls) in the program
  callbacks: int     # host callbacks (an interpret-mode kernel leaves these)


def _placed(spec, dev):
  sharding = jax.sharding.SingleDeviceSharding(dev)
  if isinstance(spec, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=sharding)
  if hasattr(spec, "shape") and hasattr(spec, "dtype"):
    return jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=sharding)
  return spec


def compile_on(target: str, fn: Callable, *specs, static_argnums: Sequence[int] = ()) -> CompileResult:
  """Traces, lowers and compiles ``jax.jit(fn)(*specs)`` for a target.

  Args:
    target: a name of ``TARGETS``.
    fn: the function; it is traced with the target's device as the default
      device, so every attnjax backend choice sees that platform.
    specs: pytrees of ``jax.ShapeDtypeStruct`` (or arrays: their shape/dtype).
    static_argnums: forwarded to ``jax.jit``.

  Returns:
    CompileResult (raises whatever the compiler raises).
  """
  dev = device(target)
  placed = jax.tree_util.tree_map(lambda s: _placed(s, dev), specs)
  start = time.perf_counter()
  with jax.default_device(dev):
    compiled = jax.jit(fn, static_argnums=static_argnums).trace(*placed).lower().compile()
  seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  code = int(getattr(stats, "generated_code_size_in_bytes", 0) or 0) if stats else 0
  temp = int(getattr(stats, "temp_size_in_bytes", 0) or 0) if stats else 0
  text = compiled.as_text() or ""
  marker = _KERNEL_MARKERS[platform_of(target)]
  kernels = sum(text.count(m) for m in marker)
  callbacks = len(re.findall(r'custom_call_target="[^"]*callback[^"]*"', text))
  return CompileResult(compiled, seconds, code, temp, kernels, callbacks)


def require_kernels(result: CompileResult, at_least: int = 1) -> CompileResult:
  """Raises AssertionError unless the program holds real compiled kernels and no callback."""
  if result.kernel_calls < at_least or result.callbacks:
    raise AssertionError(
        f"expected >= {at_least} compiled Pallas kernel(s) and no host callback; found "
        f"{result.kernel_calls} kernel call(s), {result.callbacks} callback(s) (an "
        "interpret-mode kernel or an XLA fallback).")
  return result
