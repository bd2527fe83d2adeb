"""Device check of the block-sparse kernels on run-time block lists (content-based sparsity).

check: ``block_sparse_pallas_indices`` vs the dense oracle on the lists'
visibility (``block_sparse_attention_indices(implementation="reference")``
in float32), causal, lists per query head and per KV head (GQA), rows with
fewer entries than k, float32 and bfloat16; forward and gradients.
bench (bfloat16, B=1, N=16, H=128, causal): pooled top-k lists (64-key blocks,
64- and 128-row query blocks) with k about 10% of the causal triangle, at
T=8k and 32k: selection time, attention forward and forward+backward, against
cuDNN dense causal attention on the same inputs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax import masks as M
from attnjax.block_sparse import block_sparse_attention_indices
from attnjax.dynamic import select as S
from experiments.gpu_checks import common as C
from pallas_kernels.block_sparse import block_sparse_pallas_indices


def check(rows, smoke: bool) -> bool:
  B, T, N, K, H, blk, kb = (1, 128, 2, 1, 16, 32, 2) if smoke else (2, 1024, 8, 2, 64, 64, 4)
  ok = True
  for dtype, per_kv in C.check_cases(smoke, (jnp.float32, jnp.bfloat16), (False, True)):
    shapes = [(B, T, N, H), (B, T, K, H), (B, T, K, H), (B, T, N, H)]
    q, k, v, g = C.normal(jax.random.PRNGKey(3), shapes, dtype)
    idx, cnt = S.pooled_topk_blocks(q, k, kb, block_q=blk, block_kv=blk,
                                    per_kv_head=per_kv)
    kw = dict(block_q=blk, block_kv=blk, mask=M.Causal())
    got = C.fwd_bwd(lambda q, k, v, i, n: block_sparse_pallas_indices(q, k, v, i, n, **kw),
                    g)(q, k, v, idx, cnt)
    ref = lambda q, k, v, i, n: block_sparse_attention_indices(
        q, k, v, i, n, implementation="reference", **kw)
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    want = C.fwd_bwd(ref, g.astype(jnp.float32))(*f32, idx, cnt)
    ok &= C.compare(rows, f"lists per {'kv' if per_kv else 'query'} head", got, want, dtype,
                    "out/dq/dk/dv")
  return ok


def bench(rows, quick: bool):
  dt = jnp.bfloat16
  B, N, H, bkv = 1, 16, 128, 64
  cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                       implementation="cudnn")
  for T in ((8192,) if quick else (8192, 32768)):
    q, k, v, g = C.normal(jax.random.PRNGKey(1), [(B, T, N, H)] * 4, dt)
    t_c = (C.median_time(jax.jit(cudnn), q, k, v), C.median_time(C.fwd_bwd(cudnn, g), q, k, v))
    kb = max(1, round(0.05 * (T // bkv)))  # about 10% of the causal triangle
    for bq in (64, 128):
      sel = jax.jit(lambda q, k, bq=bq: S.pooled_topk_blocks(q, k, kb, block_q=bq,
                                                               block_kv=bkv))
      t_sel = C.median_time(sel, q, k)
      idx, cnt = sel(q, k)
      share = float(cnt.sum()) * bq * bkv / (cnt.shape[1] * T * (T + bkv) / 2)
      f = lambda q, k, v, i, n, bq=bq: block_sparse_pallas_indices(
          q, k, v, i, n, block_q=bq, block_kv=bkv, mask=M.Causal())
      t_f = C.median_time(jax.jit(f), q, k, v, idx, cnt)
      t_b = C.median_time(C.fwd_bwd(f, g), q, k, v, idx, cnt)
      rows.append(dict(
          case=f"dynamic lists T={T} bq={bq} bkv={bkv} k={kb} bf16 N={N} H={H}",
          detail=(f"{share:.1%} of causal; select {t_sel*1e3:.2f} ms; attention fwd "
                  f"{t_f*1e3:.2f} fwd+bwd {t_b*1e3:.2f} ms; cuDNN causal {t_c[0]*1e3:.2f} / "
                  f"{t_c[1]*1e3:.2f} ms"),
          result=(f"/(0.1 x cudnn) fwd {t_f/(0.1*t_c[0]):.2f} fwd+bwd {t_b/(0.1*t_c[1]):.2f}; "
                  f"per element {t_f/(share*t_c[0]):.2f}")))
