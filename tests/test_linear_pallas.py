"""Pallas linear-attention kernels (GPU/Triton and TPU/Mosaic variants) in interpret mode vs the XLA path."""
import jax.numpy as jnp
import pytest

import linear_harness as harness
from pallas_kernels.linear import resources


def _compare(variant, *, decay=True, **kw):
  """harness.compare (both paths in one compiled program), with the error names checked."""
  errs = harness.compare(variant, decay=decay, **kw)
  assert len(errs) == (5 if decay else 4) + 2, sorted(errs)
  return errs


@pytest.mark.parametrize("variant,decay,dtype", [
    ("gpu", True, jnp.float32), ("gpu", False, jnp.bfloat16),
    ("tpu", True, jnp.float32)])
def test_kernel_matches_xla(variant, decay, dtype):
  errs = _compare(variant, t=10, n=2, kh=1, h=8, chunk=4, decay=decay, dtype=dtype)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  assert all(e < tol for e in errs.values()), errs


def test_gpu_kernels_with_the_state_split_into_slabs_match_xla(monkeypatch):
  # 32 x 32 state, at most 256 floats per slab: two 16-wide slabs per program
  # (value columns for forward/dv, feature rows for dq/dk); 2 query heads share a KV head.
  monkeypatch.setattr(resources, "SLAB_FLOATS", 256)
  assert all(resources.slab_block(kind, 32, 32) == 16 for kind in resources.GPU_KERNELS)
  errs = _compare("gpu", t=16, n=2, kh=1, h=32, chunk=8, decay=True)
  assert all(e < 1e-5 for e in errs.values()), errs

