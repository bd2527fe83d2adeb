"""Device check of the chunked linear-attention kernels (pallas_kernels/linear).

check: ``linear_attention(implementation="pallas")`` vs the dense oracle
(``implementation="reference"`` in float32): forward and gradients of q, k, v,
causal, with and without per-head decay, normalised or not, GQA, float32 and
bfloat16.
bench (bfloat16, B=2, N=8, H=128, chunk 64): causal linear attention with
TNL decay at T = 8k and 32k, forward and forward+backward of the kernel
against the chunked XLA path and cuDNN causal softmax attention on the same
tokens (the quadratic baseline linear attention replaces).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.linear.api import linear_attention
from experiments.gpu_checks import common as C

#: (name, T, N, K, H, decay, normalize)
CASES = (("causal", 512, 4, 4, 64, None, False),
         ("tnl decay gqa", 512, 4, 2, 64, "tnl", False),
         ("normalised elu", 384, 2, 2, 128, None, True))
SMOKE_CASES = (("causal", 32, 2, 2, 16, None, False),
               ("tnl decay gqa", 32, 2, 1, 16, "tnl", False),
               ("normalised", 24, 2, 2, 16, None, True))
BENCH_T = (8192, 32768)


def check(rows, smoke: bool) -> bool:
  ok = True
  chunk = 8 if smoke else 64
  for dtype, (name, T, N, K, H, decay, normalize) in C.check_cases(
      smoke, (jnp.float32, jnp.bfloat16), SMOKE_CASES if smoke else CASES):
    shapes = [(1, T, N, H), (1, T, K, H), (1, T, K, H), (1, T, N, H)]
    q, k, v, g = C.normal(jax.random.PRNGKey(T + N), shapes, dtype)
    # Scaled inputs keep the unnormalised sums of O(T) terms in a range
    # where the bfloat16 comparison measures the kernel, not the overflow.
    q, k = q * 0.25, k * 0.25
    fmap = "elu+1" if normalize else "identity"

    def attn(q, k, v, impl="pallas", fmap=fmap, decay=decay, normalize=normalize):
      return linear_attention(q, k, v, feature_map=fmap, decay=decay, normalize=normalize,
                              chunk_size=chunk, implementation=impl)
    got = C.fwd_bwd(attn, g)(q, k, v)
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    want = C.fwd_bwd(lambda *a: attn(*a, impl="reference"), g.astype(jnp.float32))(*f32)
    ok &= C.compare(rows, f"linear {name}", got, want, dtype, "out/dq/dk/dv")
  return ok


def bench(rows, quick: bool):
  dt = jnp.bfloat16
  B, N, H = 2, 8, 128
  for T in (BENCH_T[:1] if quick else BENCH_T):
    shape = (B, T, N, H)
    q, k, v, g = C.normal(jax.random.PRNGKey(0), [shape] * 4, dt)
    q, k = q * 0.1, k * 0.1
    times = {}
    for impl in ("pallas", "xla"):
      f = lambda q, k, v, impl=impl: linear_attention(q, k, v, decay="tnl", chunk_size=64,
                                                      implementation=impl)
      times[impl] = (C.median_time(jax.jit(f), q, k, v), C.median_time(C.fwd_bwd(f, g), q, k, v))
    dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                         implementation="cudnn")
    times["cudnn"] = (C.median_time(jax.jit(dense), q, k, v),
                      C.median_time(C.fwd_bwd(dense, g), q, k, v))
    p, x, c = times["pallas"], times["xla"], times["cudnn"]
    rows.append(dict(
        case=f"linear tnl T={T} bf16 B={B} N={N} H={H} chunk 64",
        detail=(f"fwd pallas {p[0]*1e3:.2f} xla {x[0]*1e3:.2f} cudnn-causal {c[0]*1e3:.2f} ms; "
                f"fwd+bwd {p[1]*1e3:.2f} / {x[1]*1e3:.2f} / {c[1]*1e3:.2f} ms"),
        result=(f"vs xla {x[0]/p[0]:.2f}x/{x[1]/p[1]:.2f}x, "
                f"vs cudnn {c[0]/p[0]:.2f}x/{c[1]/p[1]:.2f}x")))
