"""S2-Attention head-sharded context parallelism: bytes each device receives (arXiv:2407.17678).

``python -m experiments.bench --family=s2_sharding`` reports, for a
Phi-3-small-like S2 layer (32 query / 8 KV heads, head_dim 128, blocks of 64,
16 local blocks, stride 8) split over 8 context shards, the K/V bytes each
device receives with the plan of ``attnjax.sharding.context_parallel_attention``
(the block-sparse context plan, contiguous chunks, heads split over the head
shards) against an all-gather of the full K/V; homogeneous S2 and dense causal
attention (same plan machinery) are the comparison rows. A measured row
compiles the sharded function on 8 devices (a subprocess with 8 simulated
CPU devices when this process has fewer) and sums the collective-permute
buffers in the compiled HLO, which must equal the plan's transferred bytes.
"""
from __future__ import annotations

import re

import numpy as np
from absl import flags

from attnjax import masks as M
from attnjax.sharding import communication_bytes

from experiments.benchmarks import common

FLAGS = flags.FLAGS
DEFAULT_LENS = (4096, 16384, 65536)
QUICK_LENS = (2048, 8192)
HEADS, KV_HEADS, HEAD_DIM, BLOCK, CHUNKS = 32, 8, 128, 64, 8


def _masks():
  kw = dict(block_size=BLOCK, local_blocks=16, vert_stride=8, num_kv_heads=KV_HEADS)
  return {"s2_hetero": M.S2(HEADS, **kw), "s2_homo": M.S2(HEADS, homo_head=True, **kw),
          "dense_causal": M.Causal()}


def analytic_rows(seq_lens, head_shards=(1, 2)):
  rows = []
  for T in seq_lens:
    for name, mask in _masks().items():
      for x in head_shards:
        b = communication_bytes(mask, batch=1, seq_len=T, num_heads=HEADS,
                                num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, num_chunks=CHUNKS,
                                head_shards=x, itemsize=2, block_size=BLOCK)
        rows.append({"kind": "plan", "mask": name, "seq_len": T, "context": CHUNKS,
                     "heads_shards": x, "allgather_MB": b["allgather_bytes"] / 2**20,
                     "needed_max_MB": b["needed_bytes_max"] / 2**20,
                     "needed_mean_MB": b["needed_bytes_mean"] / 2**20,
                     "transferred_MB": b["transferred_bytes"] / 2**20,
                     "needed_ratio_max": b["needed_ratio_max"],
                     "transferred_ratio": b["transferred_ratio"]})
  return rows


def _permute_bytes(hlo: str) -> int:
  """Sum of collective-permute result buffers in an HLO module text."""
  sizes = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4}
  total = 0
  for m in re.finditer(r"= (f32|bf16|f16|s32)\[([0-9,]*)\][^\n]*collective-permute\(", hlo):
    dims = [int(d) for d in m.group(2).split(",") if d]
    total += sizes[m.group(1)] * int(np.prod(dims))
  return total


def measured_row(seq_len=1024):
  """Compiles the sharded S2 attention on 8 devices; HLO permute bytes vs the plan."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from attnjax.sharding import context_parallel_attention, make_mesh  # pylint: disable=g-import-not-at-top
  N, K, H, bs = 8, 4, 32, 16
  mask = M.S2(N, block_size=bs, local_blocks=2, vert_stride=8, num_kv_heads=K)
  mesh = make_mesh(1, 1, CHUNKS)
  # float32: XLA's CPU backend would widen bfloat16 buffers before the permute.
  q = jnp.zeros((1, seq_len, N, H), jnp.float32)
  k = jnp.zeros((1, seq_len, K, H), jnp.float32)
  f = jax.jit(lambda q, k, v: context_parallel_attention(q, k, v, mask, mesh))
  hlo = f.lower(q, k, k).compile().as_text()
  plan = communication_bytes(mask, batch=1, seq_len=seq_len, num_heads=N, num_kv_heads=K,
                             head_dim=H, num_chunks=CHUNKS, itemsize=4)
  return {"kind": "measured_hlo", "mask": "s2_hetero", "seq_len": seq_len, "context": CHUNKS,
          "heads_shards": 1, "allgather_MB": plan["allgather_bytes"] / 2**20,
          "needed_max_MB": plan["needed_bytes_max"] / 2**20,
          "transferred_MB": _permute_bytes(hlo) / 2**20,
          "plan_transferred_MB": plan["transferred_bytes"] / 2**20,
          "transferred_ratio": _permute_bytes(hlo) / plan["allgather_bytes"]}



def run():
  lens = [int(x) for x in FLAGS.seq_lens] if FLAGS.seq_lens else (
      QUICK_LENS if FLAGS.quick else DEFAULT_LENS)
  rows = analytic_rows(lens)
  import jax  # pylint: disable=g-import-not-at-top
  rows.append(measured_row() if jax.device_count() >= CHUNKS else
              common.run_on_simulated_devices("s2_sharding", "measured_row", timeout=600))
  return rows
