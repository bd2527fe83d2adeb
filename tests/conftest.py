"""Shared test settings: deterministic hypothesis profile sized for a 2-core CI.

The suite runs on the CPU whatever plugins are installed (the TPU and CUDA
compiler toolchains of the ``compile`` extra are used only through
deviceless topologies, ``pallas_kernels.targets``). ``requires_toolchain``
skips a compile test when its toolchain is not installed, except under CI
(``CI=true``), where a missing toolchain fails the test.
"""
import os

# The tests' shapes are tiny, so XLA:CPU spends most of their time compiling: LLVM at -O0
# without its expensive passes halves that (same numerics: XLA:CPU uses no fast-math
# either way), and the classic elemental fusion emitters instead of the MLIR fusion
# emitters cut the block-sparse engine's forward+backward compile another ~2.5x (measured:
# three masks 16.2 s -> 6.4 s). Deviceless TPU/GPU compiles (Mosaic, Triton) are not affected.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                      " --xla_cpu_use_fusion_emitters=false")
if FAST_COMPILE_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE_FLAGS).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=8, deadline=None, derandomize=True,
                          print_blob=True)
settings.load_profile("ci")


def requires_toolchain(target: str) -> None:
  """Skips (or, under CI, fails) when the compiler for ``target`` is not installed."""
  from pallas_kernels import targets  # pylint: disable=g-import-not-at-top
  platform = targets.platform_of(target)
  if targets.toolchain_available(platform):
    return
  message = (f"the {platform.upper()} compiler toolchain is not installed "
             "(pip install -e \".[compile]\")")
  if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    pytest.fail(message + "; CI installs it through the test extra.")
  pytest.skip(message)
