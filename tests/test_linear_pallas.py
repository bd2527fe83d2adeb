"""Pallas linear-attention kernels (GPU/Triton and TPU/Mosaic variants) in interpret mode vs the XLA path."""
import jax.numpy as jnp
import pytest

from pallas_kernels.linear import harness


@pytest.mark.parametrize("variant,decay,dtype", [
    ("gpu", True, jnp.float32), ("gpu", False, jnp.bfloat16),
    ("tpu", True, jnp.float32)])
def test_kernel_matches_xla(variant, decay, dtype):
  errs = harness.compare(variant, t=10, n=2, kh=1, h=8, chunk=4, decay=decay, dtype=dtype)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  assert all(e < tol for e in errs.values()), errs
