"""Device check of the Pallas GPU block-sparse kernel: correctness (compiled) and speed vs cuDNN.

check: compiled Triton kernel vs ``attnjax.reference_attention`` (float32
oracle), forward and gradients, float32 and bfloat16, GQA, causal and
S2-Attention per-head layouts.
bench (bfloat16, head_dim 128) against
``jax.nn.dot_product_attention(implementation="cudnn")``:
- dense causal at T=8k (target: >= 0.7x cuDNN's speed, forward and fwd+bwd);
- S2-Attention (local 1024 tokens, vert_stride 8, 64-token blocks,
  heterogeneous heads) at T=32k, forward+backward, vs cuDNN dense causal
  (target: >= 4x faster).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks as M
from attnjax import reference_attention
from attnjax.masks.base import Mask
from attnjax.masks.layout import layout_from_block_mask
from experiments.gpu_checks import common as C
from pallas_kernels.block_sparse import block_sparse_pallas
from pallas_kernels.block_sparse.merge_q import merge_q_blocks


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
  shapes = [(B, T, N, H), (B, T, K, H), (B, T, K, H), (B, T, N, H)]
  return C.normal(jax.random.PRNGKey(seed), shapes, dtype)


def check(rows, smoke: bool) -> bool:
  ok = True
  B, T, N, K, H, blk = (1, 128, 4, 2, 16, 32) if smoke else (2, 1024, 8, 2, 128, 64)
  cases = (("causal", causal_layout(T, blk)), ("s2", s2_layout(T, N, blk, 1, 2)))
  for dtype, (name, (layout, mask)) in C.check_cases(smoke, (jnp.float32, jnp.bfloat16), cases):
    q, k, v, g = _inputs(B, T, N, K, H, dtype)
    kern = C.fwd_bwd(lambda q, k, v: block_sparse_pallas(q, k, v, layout, mask=mask), g)
    ref = C.fwd_bwd(lambda q, k, v: reference_attention(q, k, v, mask=mask), g)
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    ok &= C.compare(rows, f"block-sparse {name}", kern(q, k, v), ref(*f32), dtype,
                    "out/dq/dk/dv")
  return ok


def bench(rows, quick: bool, sweep: bool = False):
  dt = jnp.bfloat16
  H = 128
  # Dense causal at 8k.
  T, B, N = (4096 if quick else 8192), 2, 16
  q, k, v, g = _inputs(B, T, N, N, H, dt)
  cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                       implementation="cudnn")
  t_c_f = C.median_time(jax.jit(cudnn), q, k, v)
  t_c_b = C.median_time(C.fwd_bwd(cudnn, g), q, k, v)
  configs = [(128, None)] + ([(64, None), (128, ((128, 128), (128, 32), (32, 128))),
                              (128, ((128, 64), (64, 64), (64, 64)))] if sweep else [])
  for block, tiles in configs:
    layout, mask = causal_layout(T, block)
    f = lambda q, k, v: block_sparse_pallas(q, k, v, layout, mask=mask, tiles=tiles)
    t_f = C.median_time(jax.jit(f), q, k, v)
    t_b = C.median_time(C.fwd_bwd(f, g), q, k, v)
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
  t_c = C.median_time(C.fwd_bwd(cudnn, g), q, kr, vr)
  layout, mask = s2_layout(T, N, 64, 16, 8)
  variants = [("block 64", layout, None)]
  variants.append(("merge-q 128", merge_q_blocks(layout, 2), None))
  for name, lay, tiles in variants:
    f = lambda q, k, v: block_sparse_pallas(q, k, v, lay, mask=mask, tiles=tiles)
    t = C.median_time(C.fwd_bwd(f, g), q, k, v)
    rows.append(dict(case=f"s2 T={T} {name} density={lay.density:.3f}",
                     detail=f"fwd+bwd {t*1e3:.1f}ms vs cuDNN dense causal {t_c*1e3:.1f}ms",
                     result=f"{t_c/t:.2f}x faster (target >= 4x)"))
