"""Context parallelism of the linear and neighborhood engines: bytes each device receives.

``python -m experiments.bench --family=context_parallel`` compiles, on 8
devices (a subprocess with 8 simulated CPU devices when this process has
fewer), the sharded ops of ``attnjax.sharding`` and sums the result buffers
of the collectives in the compiled HLO, forward and forward+backward:

* linear attention (Lightning Attention-2 / TNL, arXiv:2401.04658, with
  decay; 16 query / 4 KV heads, head_dim 64): the state scan moves
  ``scan_steps(8) = 4`` states [B, N, F, E] per device in the forward,
  whatever T; the comparison row is an all-gather of K and V compiled the
  same way (grows with T);
* 2D neighborhood attention (NATTEN, arXiv:2403.04690; kernel 7, rows split
  over 8 devices): the halo rows vs an all-gather of K/V.

Every row also carries the analytic count of
``attnjax.sharding.linear_communication_bytes`` /
``neighborhood_communication_bytes``, which the measured forward bytes must
equal. Nothing runs: the functions are only compiled.
"""
from __future__ import annotations

import re
from typing import Dict

import numpy as np
from absl import flags

from experiments.benchmarks import common

FLAGS = flags.FLAGS
DEFAULT_LENS = (8192, 16384, 32768, 65536)
QUICK_LENS = (8192,)
CHUNKS, HEADS, KV_HEADS, HEAD_DIM = 8, 16, 4, 64
IMAGE, KERNEL = (256, 256), 7

_ITEMSIZE = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1}
_COLLECTIVES = ("collective-permute", "all-gather", "all-reduce", "all-to-all",
                "reduce-scatter")


def collective_bytes(hlo: str) -> Dict[str, int]:
  """Bytes of the result buffers of each collective kind in a compiled HLO module text.

  One device's receive buffers for ``collective-permute`` and ``all-gather``
  (the all-gather's result includes the device's own shard); the result size
  for ``all-reduce`` (a ring receives 2 (C-1)/C of it). Only array results
  are counted (the synchronous collectives of the CPU backend).
  """
  total = {name: 0 for name in _COLLECTIVES}
  pattern = (r"= (" + "|".join(_ITEMSIZE) + r")\[([0-9,]*)\][^\n=]*? ("
             + "|".join(_COLLECTIVES) + r")\(")
  for m in re.finditer(pattern, hlo):
    dims = [int(d) for d in m.group(2).split(",") if d]
    total[m.group(3)] += _ITEMSIZE[m.group(1)] * int(np.prod(dims))
  return total


def _compiled_bytes(fn, *args):
  import jax  # pylint: disable=g-import-not-at-top
  fwd = collective_bytes(jax.jit(fn).lower(*args).compile().as_text())
  loss = lambda *a: fn(*a).astype(np.float32).sum()
  grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
  both = collective_bytes(grad.lower(*args).compile().as_text())
  return sum(fwd.values()), sum(both.values())


def _allgather_kv(mesh, seq_axis):
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  def fn(q, k, v):
    def local(q, k, v):
      kk = jax.lax.all_gather(k, "context", axis=seq_axis, tiled=True)
      vv = jax.lax.all_gather(v, "context", axis=seq_axis, tiled=True)
      return q * (kk.sum() + vv.sum())   # keeps the gathers alive
    spec = [None] * q.ndim
    spec[seq_axis] = "context"
    return jax.shard_map(local, mesh=mesh, in_specs=(P(*spec),) * 3, out_specs=P(*spec),
                         check_vma=False)(q, k, v)
  return fn


def measured_rows(seq_lens=DEFAULT_LENS):
  """Compiles the sharded ops on 8 devices; HLO collective bytes per device."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from attnjax.sharding import (context_parallel_linear_attention,  # pylint: disable=g-import-not-at-top
                                context_parallel_neighborhood_attention,
                                linear_communication_bytes, make_mesh,
                                neighborhood_communication_bytes)
  mesh = make_mesh(1, 1, CHUNKS, devices=jax.devices()[:CHUNKS])
  rows = []
  mb = lambda b: b / 2**20
  for T in seq_lens:
    q = jnp.zeros((1, T, HEADS, HEAD_DIM), jnp.float32)
    k = jnp.zeros((1, T, KV_HEADS, HEAD_DIM), jnp.float32)
    lin = lambda q, k, v: context_parallel_linear_attention(q, k, v, mesh, decay="tnl")
    fwd, both = _compiled_bytes(lin, q, k, k)
    ag_fwd, ag_both = _compiled_bytes(_allgather_kv(mesh, 1), q, k, k)
    plan = linear_communication_bytes(batch=1, seq_len=T, num_heads=HEADS,
                                      num_kv_heads=KV_HEADS, features=HEAD_DIM,
                                      value_dim=HEAD_DIM, num_chunks=CHUNKS, kv_itemsize=4)
    rows.append({"op": "linear_decay", "seq_len": T, "context": CHUNKS,
                 "fwd_MB": mb(fwd), "fwd_bwd_MB": mb(both),
                 "allgather_kv_fwd_MB": mb(ag_fwd), "allgather_kv_fwd_bwd_MB": mb(ag_both),
                 "plan_state_MB": mb(plan["state_bytes"]),
                 "ratio_fwd": fwd / ag_fwd if ag_fwd else 0.0})
  q = jnp.zeros((1,) + IMAGE + (HEADS, HEAD_DIM), jnp.float32)
  k = jnp.zeros((1,) + IMAGE + (KV_HEADS, HEAD_DIM), jnp.float32)
  na = lambda q, k, v: context_parallel_neighborhood_attention(q, k, v, mesh,
                                                               kernel_size=KERNEL)
  fwd, both = _compiled_bytes(na, q, k, k)
  ag_fwd, ag_both = _compiled_bytes(_allgather_kv(mesh, 1), q, k, k)
  plan = neighborhood_communication_bytes(IMAGE, kernel_size=KERNEL, batch=1,
                                          num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                                          num_shards=CHUNKS, itemsize=4)
  rows.append({"op": f"na2d_k{KERNEL}", "seq_len": int(np.prod(IMAGE)), "context": CHUNKS,
               "fwd_MB": mb(fwd), "fwd_bwd_MB": mb(both),
               "allgather_kv_fwd_MB": mb(ag_fwd), "allgather_kv_fwd_bwd_MB": mb(ag_both),
               "plan_state_MB": mb(plan["halo_bytes"]),
               "ratio_fwd": fwd / ag_fwd if ag_fwd else 0.0})
  return rows



def run():
  lens = [int(x) for x in FLAGS.seq_lens] if FLAGS.seq_lens else (
      QUICK_LENS if FLAGS.quick else DEFAULT_LENS)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.device_count() >= CHUNKS:
    return measured_rows(lens)
  return common.run_on_simulated_devices("context_parallel", "measured_rows", (tuple(lens),))
