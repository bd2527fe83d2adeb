"""Shared test harness for the linear-attention kernels: a variant against the XLA path.

`compare(variant, ...)` runs linear_attention with implementation="pallas" on
the chosen kernel variant and with implementation="xla", forward and the
gradients of a fixed scalar loss w.r.t. q, k, v, the initial state and the
decay slopes, and returns the largest absolute differences, each divided by
the largest magnitude of the XLA value (relative errors).
"""
from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp

import pallas_kernels.linear as kernels
from attnjax.linear.api import linear_attention


def _inputs(seed, b, t, n, kh, h, dtype):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (b, t, n, h), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, t, kh, h), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, kh, h), jnp.float32).astype(dtype)
  s0 = 0.1 * jax.random.normal(ks[3], (b, n, h, h), jnp.float32)
  return q, k, v, s0


def compare(variant: str, *, b=1, t=12, n=2, kh=1, h=8, chunk=4, decay=True,
            dtype=jnp.float32, seed=0) -> Dict[str, float]:
  """Relative max errors {"out", "state", "dq", "dk", "dv", "ds0"[, "dslopes"]}.

  Both paths' values and gradients run in one compiled program (the kernel
  variant is read while tracing).
  """
  q, k, v, s0 = _inputs(seed, b, t, n, kh, h, dtype)
  slopes = jnp.linspace(0.05, 0.5, n) if decay else None

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
  kernels.set_variant(variant)
  try:
    errs = jax.jit(run)(q, k, v, s0, slopes)
  finally:
    kernels.set_variant(previous)
  return {name: float(e) for name, e in errs.items()}
