"""Context parallelism of every engine: bytes each device receives and work balance.

``python -m experiments.bench --family=context_parallel`` compiles, on 8
devices (a subprocess with 8 simulated CPU devices when this process has
fewer; compile only, nothing runs), the sharded function of every engine
through its public entry (``attnjax.sharding.context_parallel(family, mesh)``
where the family is in the layer registry) and reads, per device, the bytes
it receives off the collectives of the compiled HLO (``kind="measured_hlo"``):

* block-sparse static masks: sliding window of 4k keys, Longformer (window
  and global tokens), BigBird (blocks of 64, random blocks per head), dense
  causal with the contiguous and the zig-zag (balanced) assignment;
* S2-Attention (arXiv:2407.17678; heterogeneous strided heads);
* run-time top-k block lists (``context_parallel_block_lists``; 16 blocks of
  512 per KV head and q-block, scores decaying with the block distance, the
  capacity per device distance that the lists need; contiguous and zig-zag
  assignment);
* linear attention with decay (Lightning Attention-2 / TNL, arXiv:2401.04658):
  the state scan;
* neighborhood attention (NATTEN, arXiv:2403.04690): na1d and na2d (rows
  split), the halo exchange.

Columns: ``received_max_MB`` / ``received_mean_MB`` (collective-permute
buffers a device is the target of, plus all-gather / all-reduce results;
float32 K/V: the CPU backend would widen bfloat16 buffers), ``allgather_MB``
(the remote K/V an all-gather would bring to a device: (P - 1) shards of K and
V), ``ratio`` = received_max / allgather, ``plan_MB`` (the analytic count of
the route's plan, which the measured bytes must equal), ``imbalance`` (max /
mean over devices of the (query head, q-block, k-block) triples visited, from
the plan or the lists) and the issue's goal for the row with ``meets_goal``.
Rows ``kind="plan_block_lists"`` (host only) give the bytes of top-k lists
with the default, one-int and per-distance capacities.
"""
from __future__ import annotations

import re
from typing import Dict, List

import numpy as np
from absl import flags

from experiments.benchmarks import common

FLAGS = flags.FLAGS
DEFAULT_LENS = (8192, 32768, 131072)
QUICK_LENS = (8192,)
CHUNKS, HEADS, KV_HEADS, HEAD_DIM = 8, 8, 2, 64
LIST_BLOCK, LIST_ENTRIES = 512, 16
IMAGE, KERNEL = (256, 256), 7

GOALS = {
    "sliding_window_4k": ("received <= 5% of an all-gather at 128k on 8 devices",
                          lambda r: r["ratio"] <= 0.05 if r["seq_len"] >= 131072 else None),
    # one float32 state [N, F, E] per device (batch 1): 8 x 8 x 64 x 64 x 4 bytes = 1 MiB
    "linear_decay": ("O(devices x F x E): <= devices x N x F x E x 4 B = 1 MiB at every T",
                     lambda r: r["received_max_MB"] <= 1.0 and r["received_max_MB"] == r[
                         "plan_MB"]),
    "causal_zigzag": ("imbalance <= 1.1", lambda r: r["imbalance"] <= 1.1),
}

_ITEMSIZE = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "pred": 1}
_COLLECTIVES = ("collective-permute", "all-gather", "all-reduce")


def _shape_bytes(text: str) -> int:
  """Bytes of every ``dtype[dims]`` array shape in ``text`` (a result shape or tuple)."""
  total = 0
  for dt, dims in re.findall(r"(" + "|".join(_ITEMSIZE) + r")\[([0-9,]*)\]", text):
    total += _ITEMSIZE[dt] * int(np.prod([int(x) for x in dims.split(",") if x]))
  return total


def received_bytes(hlo: str, num_devices: int) -> np.ndarray:
  """int64 [P]: bytes each device receives through the collectives of an HLO module text.

  ``collective-permute``: the result buffer, counted for each target of its
  ``source_target_pairs``; ``all-gather``: (P - 1) / P of its result (the
  device's own part excluded); ``all-reduce``: its result, on every device
  (a ring receives 2 (P - 1) / P of it). One-axis meshes (every device in
  the collective's group); synchronous collectives (the CPU backend).
  """
  got = np.zeros(num_devices, np.float64)
  pat = r"= ([^=]*?) (" + "|".join(_COLLECTIVES) + r")\(([^\n]*)"
  for m in re.finditer(pat, hlo):
    size = _shape_bytes(m.group(1))
    if m.group(2) == "collective-permute":
      pairs = re.search(r"source_target_pairs=\{([0-9,{}]*)\}", m.group(3))
      for _, dst in re.findall(r"\{(\d+),(\d+)\}", pairs.group(1) if pairs else ""):
        got[int(dst)] += size
    elif m.group(2) == "all-gather":
      got += size * (num_devices - 1) / num_devices
    else:
      got += size
  return got.round().astype(np.int64)


def _row(engine, case, T, got, allgather, plan, imbalance, **extra) -> Dict:
  mb = lambda b: float(b) / 2**20
  r = {"kind": "measured_hlo", "engine": engine, "case": case, "seq_len": int(T),
       "devices": CHUNKS, **extra, "received_max_MB": mb(got.max()),
       "received_mean_MB": mb(got.mean()), "allgather_MB": mb(allgather),
       "ratio": float(got.max() / allgather) if allgather else 0.0,
       "plan_MB": None if plan is None else mb(plan), "imbalance": imbalance}
  goal = GOALS.get(case)
  r["goal"], r["meets_goal"] = (goal[0], goal[1](r)) if goal else ("", None)
  return r


def _hlo(fn, *args) -> str:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.jit(fn).lower(*args).compile().as_text()


def _static_masks(T):
  """case -> (registry family, options, block size)."""
  return {
      "sliding_window_4k": ("sliding_window", dict(causal=True, window=4096), 512),
      "longformer": ("longformer", dict(window=1024, global_positions=(0, T // 2)), 512),
      "bigbird": ("bigbird", dict(block_size=64), 64),
      "causal_contiguous": ("dense", dict(causal=True, assignment="contiguous"), 512),
      "causal_zigzag": ("dense", dict(causal=True, assignment="zigzag"), 512),
  }


def block_sparse_rows(seq_lens) -> List[Dict]:
  """Static masks through ``context_parallel(family, mesh)``: HLO bytes vs the plan."""
  import jax  # pylint: disable=g-import-not-at-top
  from attnjax.sharding import (block_sparse_context_plan, communication_report,  # pylint: disable=g-import-not-at-top
                                context_parallel, make_mesh)
  from attnjax.sharding.context_parallel import static_mask  # pylint: disable=g-import-not-at-top
  mesh = make_mesh(1, 1, CHUNKS, devices=jax.devices()[:CHUNKS])
  rows = []
  for T in seq_lens:
    q = jax.ShapeDtypeStruct((1, T, HEADS, HEAD_DIM), np.float32)
    kv = jax.ShapeDtypeStruct((1, T, KV_HEADS, HEAD_DIM), np.float32)
    for case, (family, opts, bs) in _static_masks(T).items():
      if case == "longformer" and T > 32768:
        continue   # the global queries need every key: an all-gather at any length
      o = dict(opts)
      assignment = o.get("assignment", "contiguous")
      if family != "bigbird":
        o["block_size"] = bs
      f = context_parallel(family, mesh, sequence_order="assignment", **o) if \
          assignment != "contiguous" else context_parallel(family, mesh, **o)
      got = received_bytes(_hlo(f, q, kv, kv), CHUNKS)
      mask = static_mask(family, T, HEADS, **{k: v for k, v in opts.items()
                                              if k != "assignment"})
      plan = block_sparse_context_plan(mask, T, HEADS, KV_HEADS, CHUNKS, 1, bs, assignment)
      rep = communication_report(plan, batch=1, head_dim=HEAD_DIM, itemsize=4)
      rows.append(_row("block_sparse", case, T, got, rep["allgather_bytes"],
                       rep["received_bytes_max"], round(rep["imbalance"], 4),
                       assignment=assignment, block=bs))
  return rows


def s2_rows(seq_lens) -> List[Dict]:
  """S2 (heterogeneous heads) through ``context_parallel("s2", mesh)``."""
  import jax  # pylint: disable=g-import-not-at-top
  from attnjax import masks as M  # pylint: disable=g-import-not-at-top
  from attnjax.sharding import (block_sparse_context_plan, communication_bytes,  # pylint: disable=g-import-not-at-top
                                context_parallel, make_mesh)
  mesh = make_mesh(1, 1, CHUNKS, devices=jax.devices()[:CHUNKS])
  opts = dict(block_size=64, local_blocks=16, vert_stride=8)
  rows = []
  for T in seq_lens:
    q = jax.ShapeDtypeStruct((1, T, HEADS, HEAD_DIM), np.float32)
    kv = jax.ShapeDtypeStruct((1, T, KV_HEADS, HEAD_DIM), np.float32)
    f = context_parallel("s2", mesh, causal=True, **opts)
    got = received_bytes(_hlo(f, q, kv, kv), CHUNKS)
    mask = M.S2(HEADS, num_kv_heads=KV_HEADS, **opts)
    b = communication_bytes(mask, batch=1, seq_len=T, num_heads=HEADS, num_kv_heads=KV_HEADS,
                            head_dim=HEAD_DIM, num_chunks=CHUNKS, itemsize=4)
    imb = block_sparse_context_plan(mask, T, HEADS, KV_HEADS, CHUNKS, 1, 64).imbalance()
    rows.append(_row("s2", "s2_hetero", T, got, b["allgather_bytes"], b["transferred_bytes"],
                     round(imb, 4), assignment="contiguous", block=64))
  return rows


def _topk_lists(T, decay=0.05, kv_heads=KV_HEADS, seed=0):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from attnjax.dynamic.select import block_validity, topk_blocks  # pylint: disable=g-import-not-at-top
  nq = T // LIST_BLOCK
  pos = jnp.arange(T)[None]
  valid = block_validity(pos, pos, LIST_BLOCK, LIST_BLOCK, causal=True)
  dist = np.abs(np.arange(nq)[:, None] - np.arange(nq)[None])
  rng = np.random.default_rng(seed)
  scores = rng.standard_normal((1, kv_heads, nq, nq)).astype(np.float32) - decay * dist
  idx, cnt = topk_blocks(jnp.asarray(scores), min(LIST_ENTRIES, nq), valid=valid,
                         force=jnp.eye(nq, dtype=bool)[None, None])
  return np.asarray(idx), np.asarray(cnt)


def block_list_rows(seq_lens) -> List[Dict]:
  """Run-time top-k lists (decaying scores) with their per-distance capacity: HLO bytes,
  contiguous and zig-zag assignment (arrays in assignment order: no permutation compiled)."""
  import jax  # pylint: disable=g-import-not-at-top
  from attnjax import masks as M  # pylint: disable=g-import-not-at-top
  from attnjax.sharding import (block_list_capacity, block_list_plan, block_list_report,  # pylint: disable=g-import-not-at-top
                                context_parallel_block_lists, make_mesh, owned_blocks)
  mesh = make_mesh(1, 1, CHUNKS, devices=jax.devices()[:CHUNKS])
  rows = []
  for T in seq_lens:
    idx, cnt = _topk_lists(T)
    for assignment in ("contiguous", "zigzag"):
      cap = block_list_capacity(idx, cnt, num_shards=CHUNKS, num_kv_heads=KV_HEADS,
                                per_distance=True, assignment=assignment)
      own = owned_blocks(T, CHUNKS, LIST_BLOCK, assignment)
      q = jax.ShapeDtypeStruct((1, T, HEADS, HEAD_DIM), np.float32)
      kv = jax.ShapeDtypeStruct((1, T, KV_HEADS, HEAD_DIM), np.float32)
      li = jax.ShapeDtypeStruct(idx.shape, np.int32)
      lc = jax.ShapeDtypeStruct(cnt.shape, np.int32)
      f = lambda q, k, v, i, c, cap=cap, a=assignment: context_parallel_block_lists(
          q, k, v, i, c, block_size=LIST_BLOCK, mesh=mesh, mask=M.Causal(), capacity=cap,
          assignment=a, sequence_order="assignment")
      got = received_bytes(_hlo(f, q, kv, kv, li, lc), CHUNKS)
      plan = block_list_plan(M.Causal(), T, HEADS, 1, idx.shape[-1], CHUNKS, LIST_BLOCK, cap,
                             assignment)
      rep = block_list_report(plan, batch=1, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                              itemsize=4)
      work = cnt[:, :, own].sum((0, 1, 3)).astype(np.float64)        # list entries per device
      rows.append(_row("block_lists", "topk_decay_0.05", T, got, rep["allgather_bytes"],
                       rep["received_bytes"], round(float(work.max() / work.mean()), 4),
                       assignment=assignment, block=LIST_BLOCK, capacity=str(cap)))
  return rows


def linear_rows(seq_lens) -> List[Dict]:
  """Lightning / TNL (decay) through ``context_parallel("lightning", mesh)``: the state scan."""
  import jax  # pylint: disable=g-import-not-at-top
  from attnjax.sharding import (context_parallel, context_parallel_family,  # pylint: disable=g-import-not-at-top
                                linear_communication_bytes, make_mesh)
  mesh = make_mesh(1, 1, CHUNKS, devices=jax.devices()[:CHUNKS])
  rows = []
  for T in seq_lens:
    q = jax.ShapeDtypeStruct((1, T, HEADS, HEAD_DIM), np.float32)
    kv = jax.ShapeDtypeStruct((1, T, KV_HEADS, HEAD_DIM), np.float32)
    got = received_bytes(_hlo(context_parallel("lightning", mesh, causal=True), q, kv, kv),
                         CHUNKS)
    plan = linear_communication_bytes(batch=1, seq_len=T, num_heads=HEADS,
                                      num_kv_heads=KV_HEADS, features=HEAD_DIM,
                                      value_dim=HEAD_DIM, num_chunks=CHUNKS, kv_itemsize=4)
    rows.append(_row("linear", "linear_decay", T, got, plan["allgather_bytes"],
                     plan["state_bytes"], 1.0, assignment="contiguous"))
    # Non-causal linear attention restricted to packed documents (the segmented scan both ways).
    seg = jax.ShapeDtypeStruct((1, T), np.int32)
    f = context_parallel_family("linear", mesh)
    got = received_bytes(_hlo(lambda q, k, v, s: f(q, k, v, causal=False, segment_ids=s),
                              q, kv, kv, seg), CHUNKS)
    plan = linear_communication_bytes(batch=1, seq_len=T, num_heads=HEADS,
                                      num_kv_heads=KV_HEADS, features=HEAD_DIM,
                                      value_dim=HEAD_DIM, num_chunks=CHUNKS, causal=False,
                                      decay=False, normalize=True, segment_ids=True,
                                      kv_itemsize=4)
    rows.append(_row("linear", "linear_documents_noncausal", T, got, plan["allgather_bytes"],
                     plan["state_bytes"], 1.0, assignment="contiguous"))
  return rows


def neighborhood_rows(seq_lens) -> List[Dict]:
  """na1d (kernel 1023, through ``context_parallel("na1d", mesh)``) and na2d (rows split)."""
  import jax  # pylint: disable=g-import-not-at-top
  from attnjax.sharding import (context_parallel, context_parallel_neighborhood_attention,  # pylint: disable=g-import-not-at-top
                                make_mesh, neighborhood_communication_bytes)
  mesh = make_mesh(1, 1, CHUNKS, devices=jax.devices()[:CHUNKS])
  rows = []
  cases = [("na1d_k1023", (T,), 1023) for T in seq_lens] + [(f"na2d_k{KERNEL}", IMAGE, KERNEL)]
  for case, spatial, ks in cases:
    q = jax.ShapeDtypeStruct((1,) + spatial + (HEADS, HEAD_DIM), np.float32)
    kv = jax.ShapeDtypeStruct((1,) + spatial + (KV_HEADS, HEAD_DIM), np.float32)
    if len(spatial) == 1:
      f = context_parallel("na1d", mesh, kernel_size=ks)
    else:
      f = lambda q, k, v, ks=ks: context_parallel_neighborhood_attention(q, k, v, mesh,
                                                                         kernel_size=ks)
    got = received_bytes(_hlo(f, q, kv, kv), CHUNKS)
    plan = neighborhood_communication_bytes(spatial, kernel_size=ks, batch=1,
                                            num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                                            num_shards=CHUNKS, itemsize=4)
    rows.append(_row("neighborhood", case, int(np.prod(spatial)), got,
                     plan["allgather_bytes"], plan["halo_bytes"], 1.0,
                     assignment="contiguous"))
  # The same image with both axes split over a 2 x 4 grid of devices.
  grid = jax.sharding.Mesh(np.asarray(jax.devices()[:CHUNKS]).reshape(2, CHUNKS // 2),
                           ("cx", "cy"))
  q = jax.ShapeDtypeStruct((1,) + IMAGE + (HEADS, HEAD_DIM), np.float32)
  kv = jax.ShapeDtypeStruct((1,) + IMAGE + (KV_HEADS, HEAD_DIM), np.float32)
  f = lambda q, k, v: context_parallel_neighborhood_attention(
      q, k, v, grid, kernel_size=KERNEL, spatial_axis=(0, 1), context_axis=("cx", "cy"))
  got = received_bytes(_hlo(f, q, kv, kv), CHUNKS)
  plan = neighborhood_communication_bytes(IMAGE, kernel_size=KERNEL, spatial_axis=(0, 1),
                                          batch=1, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                                          num_shards=(2, CHUNKS // 2), itemsize=4)
  rows.append(_row("neighborhood", f"na2d_k{KERNEL}_2x4_grid", int(np.prod(IMAGE)), got,
                   plan["allgather_bytes"], plan["max_received_bytes"], 1.0,
                   assignment="contiguous"))
  return rows


def measured_rows(seq_lens=DEFAULT_LENS):
  """Every engine, compiled on 8 devices (this process must have them)."""
  seq_lens = tuple(seq_lens)
  return (block_sparse_rows(seq_lens) + s2_rows(tuple(t for t in seq_lens if t <= 32768))
          + block_list_rows(seq_lens) + linear_rows(seq_lens) + neighborhood_rows(seq_lens))


def plan_block_list_rows(seq_lens, decays=(0.0, 0.05)) -> List[Dict]:
  """Top-k lists on the host: bytes with the default, one-int and per-distance capacity."""
  from attnjax import masks as M  # pylint: disable=g-import-not-at-top
  from attnjax.sharding import block_list_capacity, block_list_plan, block_list_report  # pylint: disable=g-import-not-at-top
  rows = []
  heads, kv_heads, head_dim = 32, 8, 128
  for T in seq_lens:
    for decay in decays:
      idx, cnt = _topk_lists(T, decay, kv_heads)
      per = block_list_capacity(idx, cnt, num_shards=CHUNKS, num_kv_heads=kv_heads,
                                per_distance=True)
      for label, cap in (("default", None), ("one_int", max(per)), ("per_distance", per)):
        plan = block_list_plan(M.Causal(), T, heads, 1, idx.shape[-1], CHUNKS, LIST_BLOCK, cap)
        r = block_list_report(plan, batch=1, num_kv_heads=kv_heads, head_dim=head_dim)
        rows.append({"kind": "plan_block_lists", "engine": "block_lists",
                     "case": f"topk_decay_{decay}", "seq_len": T, "devices": CHUNKS,
                     "assignment": "contiguous", "block": LIST_BLOCK, "capacity": str(cap),
                     "received_max_MB": r["received_bytes"] / 2**20,
                     "allgather_MB": r["allgather_bytes"] / 2**20,
                     "ratio": r["received_ratio"]})
  return rows


def run():
  lens = [int(x) for x in FLAGS.seq_lens] if FLAGS.seq_lens else (
      QUICK_LENS if FLAGS.quick else DEFAULT_LENS)
  import jax  # pylint: disable=g-import-not-at-top
  rows = (measured_rows(lens) if jax.device_count() >= CHUNKS else
          common.run_on_simulated_devices("context_parallel", "measured_rows", (tuple(lens),)))
  return rows + plan_block_list_rows(lens)
