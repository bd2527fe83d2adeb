"""Device check of the fused neighborhood kernels (pallas_kernels/neighborhood).

check: ``neighborhood_attention(implementation="pallas")`` vs the dense oracle
(``implementation="reference"`` in float32): forward and gradients of q, k, v
(and rpb), 1D/2D/3D, dilation, per-dimension causality, GQA, float32 and
bfloat16.
bench (bfloat16, B=2, N=8, H=64): na2d 128x128 (k 7 and 13) and na3d 16x32x32
(k 7), forward and forward+backward of the fused kernels against the tiled XLA
path and cuDNN dense attention (no mask) on the same tokens.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attnjax.neighborhood import neighborhood_attention
from experiments.gpu_checks import common as C

#: (name, spatial, kernel, dilation, causal, with rpb); smoke shapes in SMOKE_CASES
CASES = (("na1d", (512,), 9, 2, True, False),
         ("na2d rpb", (32, 32), 7, 1, False, True),
         ("na2d dilated causal", (32, 48), (5, 7), (2, 1), (True, False), False),
         ("na3d", (8, 16, 16), (3, 5, 5), 1, False, False))
SMOKE_CASES = (("na1d", (32,), 5, 2, True, False),
               ("na2d rpb", (8, 8), 3, 1, False, True),
               ("na2d dilated causal", (8, 12), (3, 3), (2, 1), (True, False), False),
               ("na3d", (4, 6, 6), 3, 1, False, False))
BENCH = ((("na2d", (128, 128), 7), ("na2d", (128, 128), 13), ("na3d", (16, 32, 32), 7)))


def _rpb_shape(N, kernel, D):
  ks = (kernel,) * D if isinstance(kernel, int) else tuple(kernel)
  return (N,) + tuple(2 * k - 1 for k in ks)


def check(rows, smoke: bool) -> bool:
  B, N, K, H = (1, 2, 1, 16) if smoke else (2, 4, 2, 32)
  ok = True
  for dtype, (name, spatial, kernel, dil, causal, has_rpb) in C.check_cases(
      smoke, (jnp.float32, jnp.bfloat16), SMOKE_CASES if smoke else CASES):
    D = len(spatial)
    shapes = [(B,) + spatial + (N, H), (B,) + spatial + (K, H), (B,) + spatial + (K, H),
              (B,) + spatial + (N, H)]
    q, k, v, g = C.normal(jax.random.PRNGKey(len(name)), shapes, dtype)
    args = [q, k, v]
    if has_rpb:
      args.append(0.5 * jax.random.normal(jax.random.PRNGKey(7), _rpb_shape(N, kernel, D)))

    def attn(q, k, v, rpb=None, impl="pallas"):
      return neighborhood_attention(q, k, v, kernel_size=kernel, dilation=dil,
                                    is_causal=causal, rpb=rpb, implementation=impl)
    n = len(args)
    got = C.fwd_bwd(attn, g, argnums=n)(*args)
    f32 = [a.astype(jnp.float32) for a in args]
    want = C.fwd_bwd(lambda *a: attn(*a, impl="reference"), g.astype(jnp.float32),
                     argnums=n)(*f32)
    ok &= C.compare(rows, f"neighborhood {name}", got, want, dtype,
                    "out/dq/dk/dv" + ("/drpb" if has_rpb else ""))
  return ok


def bench(rows, quick: bool):
  dt = jnp.bfloat16
  B, N, H = 2, 8, 64
  for name, spatial, kernel in (BENCH[:1] + BENCH[2:] if quick else BENCH):
    L = math.prod(spatial)
    shape = (B,) + spatial + (N, H)
    q, k, v, g = C.normal(jax.random.PRNGKey(0), [shape] * 4, dt)
    times = {}
    for impl in ("pallas", "xla"):
      f = lambda q, k, v, impl=impl: neighborhood_attention(q, k, v, kernel_size=kernel,
                                                            implementation=impl)
      times[impl] = (C.median_time(jax.jit(f), q, k, v), C.median_time(C.fwd_bwd(f, g), q, k, v))
    flat = lambda x: x.reshape(B, L, N, H)
    dense = lambda q, k, v: jax.nn.dot_product_attention(flat(q), flat(k), flat(v),
                                                         implementation="cudnn")
    times["cudnn"] = (C.median_time(jax.jit(dense), q, k, v),
                      C.median_time(C.fwd_bwd(dense, flat(g)), q, k, v))
    p, x, c = times["pallas"], times["xla"], times["cudnn"]
    rows.append(dict(
        case=f"{name} {'x'.join(map(str, spatial))} k{kernel} bf16 B={B} N={N} H={H}",
        detail=(f"fwd pallas {p[0]*1e3:.2f} xla {x[0]*1e3:.2f} cudnn-dense {c[0]*1e3:.2f} ms; "
                f"fwd+bwd {p[1]*1e3:.2f} / {x[1]*1e3:.2f} / {c[1]*1e3:.2f} ms"),
        result=(f"vs xla {x[0]/p[0]:.2f}x/{x[1]/p[1]:.2f}x, "
                f"vs cudnn {c[0]/p[0]:.2f}x/{c[1]/p[1]:.2f}x")))
