"""Helpers shared by the device checks: inputs, forward+backward, timing, error rows."""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np

#: tolerance on max |error| / max |reference| (float32 dots may run as TF32 on GPU)
TOLERANCE = {"float32": 2e-3, "bfloat16": 2e-2}


def normal(key, shapes: Sequence[tuple], dtype) -> List[jax.Array]:
  """One standard-normal array per shape, drawn in float32 then cast to ``dtype``."""
  ks = jax.random.split(key, len(shapes))
  return [jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(ks, shapes)]


def fwd_bwd(fn: Callable, cotangent, argnums: int = 3) -> Callable:
  """jit of ``args -> (fn(*args), grads of <fn, cotangent> w.r.t. the first argnums args)``."""
  def run(*args):
    out, pull = jax.vjp(lambda *a: fn(*a, *args[argnums:]), *args[:argnums])
    return (out,) + tuple(pull(cotangent.astype(out.dtype)))
  return jax.jit(run)


def check_cases(smoke: bool, dtypes: Sequence, cases: Sequence) -> List[tuple]:
  """(dtype, case) pairs a check runs: every pair on a device; in smoke mode each
  case once, the dtypes taken in turn (every dtype still appears when there are
  at least as many cases), which keeps the interpret-mode plumbing test short."""
  if not smoke:
    return [(dt, c) for dt in dtypes for c in cases]
  return [(dtypes[i % len(dtypes)], c) for i, c in enumerate(cases)]


def median_time(f: Callable, *args, repeats: int = 5) -> float:
  """Median wall seconds of ``f(*args)`` after one warm-up (compiling) call."""
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def compare(rows: List[Dict], case: str, got, want, dtype, names: str) -> bool:
  """Appends a PASS/FAIL row of relative errors of ``got`` vs ``want`` (tuples of arrays)."""
  errs = []
  for a, b in zip(got, want):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    errs.append(float(jnp.max(jnp.abs(a - b))) / (1e-6 + float(jnp.max(jnp.abs(b)))))
  tol = TOLERANCE[jnp.dtype(dtype).name]
  passed = all(np.isfinite(e) and e <= tol for e in errs)
  rows.append(dict(case=f"check {case} {jnp.dtype(dtype).name}",
                   detail=f"rel err {names} " + " ".join(f"{e:.1e}" for e in errs),
                   result="PASS" if passed else f"FAIL (tol {tol:g})"))
  return passed
