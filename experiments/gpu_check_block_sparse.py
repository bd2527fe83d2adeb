"""Device check of the Pallas GPU block-sparse kernel: correctness (compiled) and speed vs cuDNN.

    python -m experiments.gpu_check_block_sparse [--quick] [--sweep]

1. Correctness: compiled Triton kernel vs ``attnjax.reference_attention``
   (float32 oracle), forward and gradients, float32 and bfloat16, GQA, causal
   and S2-Attention per-head layouts.
2. Speed, bfloat16, head_dim 128, against
   ``jax.nn.dot_product_attention(implementation="cudnn")``:
   - dense causal at T=8k (target: >= 0.7x cuDNN's speed, forward and fwd+bwd);
   - S2-Attention (local 1024 tokens, vert_stride 8, 64-token blocks,
     heterogeneous heads) at T=32k, forward+backward, vs cuDNN dense causal
     (target: >= 4x faster).
Prints one compact table and exits 1 if a correctness check fails, 2 when no
NVIDIA GPU is present.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from attnjax import masks as M  # noqa: E402
from attnjax import reference_attention  # noqa: E402
from attnjax.masks.base import Mask  # noqa: E402
from attnjax.masks.layout import layout_from_block_mask  # noqa: E402
from pallas_kernels.block_sparse import block_sparse_pallas  # noqa: E402
from pallas_kernels.block_sparse.merge_q import merge_q_blocks  # noqa: E402


class S2Mask(Mask):
  """S2-Attention element mask: causal and (local blocks or head-strided key blocks)."""

  def __init__(self, block, local_blocks, vert_stride, num_heads):
    self.block, self.local, self.stride = block, local_blocks, vert_stride
    self.step = max(1, vert_stride // num_heads)

  @property
  def head_dependent(self):
    return True

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    qb, kb = q_pos // self.block, k_pos // self.block
    vertical = (kb + head * self.step) % self.stride == 0
    return (k_pos <= q_pos) & (((qb - kb) < self.local) | vertical)

  def __hash__(self):
    return hash((self.block, self.local, self.stride, self.step))


def s2_layout(T, N, block=64, local_blocks=16, vert_stride=8):
  """Exact S2 layout from the block rule (no T x T evaluation): diagonal blocks partial."""
  mask = S2Mask(block, local_blocks, vert_stride, N)
  nb = T // block
  qb, kb = np.arange(nb)[:, None], np.arange(nb)[None, :]
  h = np.arange(N)[:, None, None]
  visited = (qb >= kb) & (((qb - kb) < local_blocks) | ((kb + h * mask.step) % vert_stride == 0))
  classes = np.where(visited, np.where(qb == kb, 1, 2), 0).astype(np.int8)
  return layout_from_block_mask(classes, T, T, block, block, mask=mask), mask


def causal_layout(T, block):
  return M.Causal().block_layout(T, T, block, block), M.Causal()


def _inputs(B, T, N, K, H, dtype, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  shapes = [(B, T, N, H), (B, T, K, H), (B, T, K, H), (B, T, N, H)]
  return [jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(ks, shapes)]


def _fwd_bwd(fn, g):
  def run(q, k, v):
    out, pull = jax.vjp(fn, q, k, v)
    return (out,) + tuple(pull(g))
  return jax.jit(run)


def _time(f, *args, repeats=5):
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def check_correctness(rows, quick):
  ok = True
  T = 512 if quick else 1024
  for dtype in (jnp.float32, jnp.bfloat16):
    for name, (layout, mask) in (("causal", causal_layout(T, 64)),
                                 ("s2", s2_layout(T, 8, 64, 2, 4))):
      q, k, v, g = _inputs(2, T, 8, 2, 128, dtype)
      kern = _fwd_bwd(lambda q, k, v: block_sparse_pallas(q, k, v, layout, mask=mask), g)
      ref = _fwd_bwd(lambda q, k, v: reference_attention(q, k, v, mask=mask), g)
      got, want = kern(q, k, v), ref(q, k, v)
      errs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                    / (1e-6 + float(jnp.max(jnp.abs(b.astype(jnp.float32))))))
              for a, b in zip(got, want)]
      tol = 2e-2 if dtype == jnp.bfloat16 else 2e-3  # relative to max |ref|; f32 dots use TF32
      passed = all(np.isfinite(e) and e <= tol for e in errs)
      ok &= passed
      rows.append(dict(case=f"check {name} {jnp.dtype(dtype).name}",
                       detail="rel err out/dq/dk/dv " + " ".join(f"{e:.1e}" for e in errs),
                       result="PASS" if passed else "FAIL"))
  return ok


def bench(rows, quick, sweep):
  dt = jnp.bfloat16
  H = 128
  # Dense causal at 8k.
  T, B, N = (4096 if quick else 8192), 2, 16
  q, k, v, g = _inputs(B, T, N, N, H, dt)
  cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                       implementation="cudnn")
  t_c_f = _time(jax.jit(cudnn), q, k, v)
  t_c_b = _time(_fwd_bwd(cudnn, g), q, k, v)
  configs = [(128, None)] + ([(64, None), (128, ((128, 128), (128, 32), (32, 128))),
                              (128, ((128, 64), (64, 64), (64, 64)))] if sweep else [])
  for block, tiles in configs:
    layout, mask = causal_layout(T, block)
    f = lambda q, k, v: block_sparse_pallas(q, k, v, layout, mask=mask, tiles=tiles)
    t_f = _time(jax.jit(f), q, k, v)
    t_b = _time(_fwd_bwd(f, g), q, k, v)
    flops = 4.0 * B * N * H * T * T / 2
    rows.append(dict(case=f"causal T={T} block={block} tiles={tiles or 'default'}",
                     detail=(f"fwd {t_f*1e3:.2f}ms ({flops/t_f/1e12:.0f} TF/s) vs cuDNN "
                             f"{t_c_f*1e3:.2f}ms; fwd+bwd {t_b*1e3:.2f} vs {t_c_b*1e3:.2f}ms"),
                     result=f"{t_c_f/t_f:.2f}x / {t_c_b/t_b:.2f}x (target >= 0.7x)"))
  del q, k, v, g
  # S2 at 32k vs cuDNN dense causal, forward + backward (Phi-3-small-like heads).
  T, B, N, K = (16384 if quick else 32768), 1, 32, 8
  q, k, v, g = _inputs(B, T, N, K, H, dt, seed=1)
  kr, vr = jnp.repeat(k, N // K, 2), jnp.repeat(v, N // K, 2)
  t_c = _time(_fwd_bwd(cudnn, g), q, kr, vr)
  layout, mask = s2_layout(T, N, 64, 16, 8)
  variants = [("block 64", layout, None)]
  variants.append(("merge-q 128", merge_q_blocks(layout, 2), None))
  for name, lay, tiles in variants:
    f = lambda q, k, v: block_sparse_pallas(q, k, v, lay, mask=mask, tiles=tiles)
    t = _time(_fwd_bwd(f, g), q, k, v)
    rows.append(dict(case=f"s2 T={T} {name} density={lay.density:.3f}",
                     detail=f"fwd+bwd {t*1e3:.1f}ms vs cuDNN dense causal {t_c*1e3:.1f}ms",
                     result=f"{t_c/t:.2f}x faster (target >= 4x)"))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="smaller shapes")
  parser.add_argument("--sweep", action="store_true", help="also try other blocks/tiles")
  parser.add_argument("--skip_bench", action="store_true")
  args = parser.parse_args(argv)
  if jax.default_backend() not in ("gpu", "cuda"):
    print(f"gpu_check_block_sparse: no NVIDIA GPU found (jax backend is "
          f"{jax.default_backend()!r}); this check needs a CUDA GPU and a jax[cuda] install.")
    return 2
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  rows = []
  ok = check_correctness(rows, args.quick)
  if not args.skip_bench:
    try:
      bench(rows, args.quick, args.sweep)
    except Exception as e:  # pylint: disable=broad-except
      rows.append(dict(case="bench", detail=f"{type(e).__name__}: {str(e)[:300]}",
                       result="ERROR"))
  width = max(len(r["case"]) for r in rows)
  for r in rows:
    print(f"{r['case']:<{width}}  {r['result']:<34}  {r['detail']}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
