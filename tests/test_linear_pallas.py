"""Pallas linear-attention kernels (GPU/Triton and TPU/Mosaic variants) in interpret mode vs the XLA path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.linear as kernels
from attnjax.linear.api import linear_attention
from pallas_kernels.linear import harness, resources


def _compare(variant, *, b=1, t=12, n=2, kh=1, h=8, chunk=4, decay=True, dtype=jnp.float32,
             seed=0):
  """harness.compare's check (same inputs, loss and relative errors) with both paths' values
  and gradients computed in one compiled program instead of op by op."""
  q, k, v, s0 = harness._inputs(seed, b, t, n, kh, h, dtype)
  slopes = np.linspace(0.05, 0.5, n).astype(np.float32) if decay else None

  def loss(impl):
    def fn(q, k, v, s0, slopes):
      o, s = linear_attention(q, k, v, decay=slopes, chunk_size=chunk, initial_state=s0,
                              return_state=True, implementation=impl)
      return jnp.sum(jnp.sin(o.astype(jnp.float32))) + jnp.sum(s ** 2), (o, s)
    return fn

  argnums = (0, 1, 2, 3, 4) if decay else (0, 1, 2, 3)
  rel = lambda a, r: (jnp.max(jnp.abs(a.astype(jnp.float32) - r.astype(jnp.float32)))
                      / (jnp.max(jnp.abs(r.astype(jnp.float32))) + 1e-30))

  def run(*args):
    vg = lambda impl: jax.value_and_grad(loss(impl), argnums, has_aux=True)(*args)
    (_, (o_p, s_p)), g_p = vg("pallas")
    (_, (o_x, s_x)), g_x = vg("xla")
    out = {"out": rel(o_p, o_x), "state": rel(s_p, s_x)}
    out.update({nm: rel(a, r) for nm, a, r in zip(("dq", "dk", "dv", "ds0", "dslopes"), g_p, g_x)})
    return out

  previous = kernels._CHOICE["variant"]
  kernels.set_variant(variant)  # read while tracing
  try:
    errs = jax.jit(run)(q, k, v, s0, slopes)
  finally:
    kernels.set_variant(previous)
  assert len(errs) == len(argnums) + 2
  return {name: float(e) for name, e in errs.items()}


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

