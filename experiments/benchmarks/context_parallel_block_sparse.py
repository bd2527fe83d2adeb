"""Context parallelism of the block-sparse engine: bytes received and work balance.

``python -m experiments.bench --family=context_parallel_block_sparse`` reports,
for a sliding window of 4k tokens, dense causal attention and BigBird (blocks
of 64, 3 random blocks per head) at T = 8k..128k split over 8 context shards
(32 query / 8 KV heads, head_dim 128, bfloat16 K/V), the plan of
``attnjax.sharding.context_parallel_block_sparse``:

* K/V bytes each device receives (the most loaded device and the mean) and
  the size of its receive buffers, against an all-gather of the full K/V;
* per-device work imbalance: max / mean of the (query head, q-block, k-block)
  triples each device visits, for the contiguous and the zig-zag assignment,
  and what the SPMD program runs on every device (``executed_over_mean``:
  the busiest device's work list over the mean).

Run-time top-k block lists (``context_parallel_block_lists``; blocks of 512, 16
blocks per KV head and q-block from ``topk_blocks`` on random scores, uniform
or decaying with the block distance): the bytes a device receives (K/V and
block ids) with the default capacity and with the capacity the lists need
(one int, or one per device distance), against the all-gather.

Measured rows compile the sharded function on 8 devices (a subprocess with 8
simulated CPU devices when this process has fewer; compile only, nothing runs)
and add up, per device, the collective-permute buffers it is a target of in
the compiled HLO; they must equal the plan's received bytes.
"""
from __future__ import annotations

import re

import numpy as np
from absl import flags

from attnjax import masks as M
from attnjax.block_sparse import bigbird_mask
from attnjax.sharding import (block_list_capacity, block_list_plan, block_list_report,
                              block_sparse_context_plan, communication_report)

from experiments.benchmarks import common

FLAGS = flags.FLAGS
DEFAULT_LENS = (8192, 32768, 131072)
QUICK_LENS = (8192,)
HEADS, KV_HEADS, HEAD_DIM, CHUNKS = 32, 8, 128, 8
ASSIGNMENTS = ("contiguous", "zigzag")


def _masks(seq_len):
  """name -> (mask, block size of the plan)."""
  return {"window_4k": (M.SlidingWindow(4095, 0), 512),
          "causal": (M.Causal(), 512),
          "bigbird": (bigbird_mask(seq_len, block_size=64, num_heads=HEADS), 64)}


def analytic_rows(seq_lens):
  rows = []
  for T in seq_lens:
    for name, (mask, bs) in _masks(T).items():
      for assignment in ASSIGNMENTS:
        plan = block_sparse_context_plan(mask, T, HEADS, KV_HEADS, CHUNKS, 1, bs, assignment)
        r = communication_report(plan, batch=1, head_dim=HEAD_DIM, itemsize=2)
        rows.append({"kind": "plan", "mask": name, "seq_len": T, "assignment": assignment,
                     "block": bs, "allgather_MB": r["allgather_bytes"] / 2**20,
                     "received_max_MB": r["received_bytes_max"] / 2**20,
                     "received_mean_MB": r["received_bytes_mean"] / 2**20,
                     "received_ratio_max": r["received_ratio_max"],
                     "buffer_ratio": r["transferred_ratio"],
                     "imbalance": r["imbalance"],
                     "executed_over_mean": r["executed_over_mean"]})
  return rows


def block_list_rows(seq_lens, block=512, entries=16, decays=(0.0, 0.05)):
  """Bytes received for top-k lists: default, one-int and per-distance capacities."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from attnjax.dynamic.select import block_validity, topk_blocks  # pylint: disable=g-import-not-at-top
  rows = []
  rng = np.random.default_rng(0)
  for T in seq_lens:
    nq = T // block
    pos = jnp.arange(T)[None]
    valid = block_validity(pos, pos, block, block, causal=True)
    for decay in decays:
      dist = np.abs(np.arange(nq)[:, None] - np.arange(nq)[None])
      scores = rng.standard_normal((1, KV_HEADS, nq, nq)).astype(np.float32) - decay * dist
      idx, cnt = topk_blocks(jnp.asarray(scores), min(entries, nq), valid=valid,
                             force=jnp.eye(nq, dtype=bool)[None, None])
      per = block_list_capacity(idx, cnt, num_shards=CHUNKS, num_kv_heads=KV_HEADS,
                                per_distance=True)
      for label, cap in (("default", None), ("one_int", max(per)), ("per_distance", per)):
        plan = block_list_plan(M.Causal(), T, HEADS, 1, min(entries, nq), CHUNKS, block, cap)
        r = block_list_report(plan, batch=1, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
        rows.append({"kind": "plan_block_lists", "mask": f"topk_decay_{decay}", "seq_len": T,
                     "assignment": "contiguous", "block": block, "capacity": label,
                     "capacity_value": str(cap), "allgather_MB": r["allgather_bytes"] / 2**20,
                     "received_max_MB": r["received_bytes"] / 2**20,
                     "received_ratio_max": r["received_ratio"]})
  return rows


_SIZES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4}


def received_bytes(hlo: str, num_devices: int) -> np.ndarray:
  """Bytes each device receives through the collective-permutes of an HLO module text."""
  got = np.zeros(num_devices, np.int64)
  pat = (r"= (f32|bf16|f16|s32)\[([0-9,]*)\][^\n]*collective-permute\([^\n]*"
         r"source_target_pairs=\{([0-9,{}]*)\}")
  for m in re.finditer(pat, hlo):
    size = _SIZES[m.group(1)] * int(np.prod([int(d) for d in m.group(2).split(",") if d]))
    for _, dst in re.findall(r"\{(\d+),(\d+)\}", m.group(3)):
      got[int(dst)] += size
  return got


def measured_rows(cases=(("window_4k", 32768, "contiguous"), ("causal", 32768, "zigzag"),
                         ("bigbird", 8192, "contiguous"))):
  """Compiles the sharded attention on 8 devices; HLO permute bytes vs the plan."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  from attnjax.sharding import context_parallel_block_sparse  # pylint: disable=g-import-not-at-top
  N, K, H = 8, 2, 64
  mesh = Mesh(np.asarray(jax.devices()[:CHUNKS]), ("context",))
  rows = []
  for name, T, assignment in cases:
    mask, bs = _masks(T)[name]
    if name == "bigbird":
      mask = bigbird_mask(T, block_size=64, num_heads=N)
    # float32: XLA's CPU backend would widen bfloat16 buffers before the permute.
    x = jax.ShapeDtypeStruct((1, T, N, H), np.float32)
    kv = jax.ShapeDtypeStruct((1, T, K, H), np.float32)
    f = jax.jit(lambda q, k, v, mask=mask, bs=bs, a=assignment: context_parallel_block_sparse(
        q, k, v, mask=mask, mesh=mesh, block_size=bs, assignment=a,
        sequence_order="assignment"))
    hlo = f.lower(x, kv, kv).compile().as_text()
    got = received_bytes(hlo, CHUNKS)
    plan = block_sparse_context_plan(mask, T, N, K, CHUNKS, 1, bs, assignment)
    rep = communication_report(plan, batch=1, head_dim=H, itemsize=4)
    rows.append({"kind": "measured_hlo", "mask": name, "seq_len": T, "assignment": assignment,
                 "block": bs, "allgather_MB": rep["allgather_bytes"] / 2**20,
                 "received_max_MB": got.max() / 2**20, "received_mean_MB": got.mean() / 2**20,
                 "plan_received_max_MB": rep["received_bytes_max"] / 2**20,
                 "received_ratio_max": got.max() / rep["allgather_bytes"],
                 "imbalance": rep["imbalance"],
                 "executed_over_mean": rep["executed_over_mean"]})
  return rows



def run():
  lens = [int(x) for x in FLAGS.seq_lens] if FLAGS.seq_lens else (
      QUICK_LENS if FLAGS.quick else DEFAULT_LENS)
  rows = analytic_rows(lens) + block_list_rows(lens)
  import jax  # pylint: disable=g-import-not-at-top
  rows += measured_rows() if jax.device_count() >= CHUNKS else common.run_on_simulated_devices(
      "context_parallel_block_sparse", "measured_rows")
  return rows
