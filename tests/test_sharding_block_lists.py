"""Context parallelism for run-time block lists (top-k selection) on 8 simulated CPU devices.

In the shared ``multidevice`` child: lists from ``attnjax.dynamic.select.topk_blocks``
(per query head and per KV head) run context-parallel and equal the unsharded
``block_sparse_attention_indices`` (the dense oracle of the lists), forward and
gradients, on context axes of 2, 4 and 8, with data and head axes, GQA,
bfloat16 and a capacity computed from the lists (the Pallas kernels inside
shard_map are checked through the static route, test_sharding_block_sparse), and the
zig-zag assignment (natural order, and arrays already in zig-zag order); a capacity one
short gives NaN in exactly the rows that lose a block.
In this process: the plan's rounds and bounds, and the capacity of hand-built lists.
"""
import numpy as np
import pytest

import multidevice
from attnjax import masks as M
from attnjax.sharding import block_list_capacity, block_list_plan, block_list_report

SCRIPT = r'''
import json
import jax, jax.numpy as jnp, numpy as np
from attnjax import masks as M
from attnjax.block_sparse import block_sparse_attention_indices
from attnjax.dynamic.select import block_validity, topk_blocks
from attnjax.sharding import block_list_capacity, context_parallel_block_lists, make_mesh
out = {"devices": jax.device_count()}
B, T, N, K, H, bs = 2, 64, 4, 2, 8, 8
nq = T // bs
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, H), np.float32)) for n in (N, K, K))

def lists(heads, kk, causal, seed):
  scores = jnp.asarray(np.random.default_rng(seed).standard_normal((B, heads, nq, nq),
                                                                   np.float32))
  pos = jnp.arange(T)[None]
  return topk_blocks(scores, kk, valid=block_validity(pos, pos, bs, bs, causal=causal),
                     force=jnp.eye(nq, dtype=bool)[None, None])

def mesh_of(shape):
  return make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])

f32 = lambda a: np.asarray(a, np.float32)
cases = {  # name: (list heads, k, causal, mesh, options, dtype, capacity from the lists)
    "topk_causal_c8": (N, 2, True, (1, 1, 8), {}, "float32", False),
    "topk_kv_lists_d2h2c2_bf16": (K, 4, False, (2, 2, 2),
                                  dict(data_axis="data", head_axis="heads"), "bfloat16", False),
    "topk_causal_capacity_c4": (N, 3, True, (1, 1, 4), {}, "float32", True),
}
for name, (heads, kk, causal, shape, opts, dtype, fit) in cases.items():
  idx, cnt = lists(heads, kk, causal, seed=len(name))
  mask = M.Causal() if causal else None
  if fit:
    opts = dict(opts, capacity=block_list_capacity(idx, cnt, num_shards=shape[2],
                                                   num_kv_heads=K))
    out[name + "/capacity"] = opts["capacity"]
  mesh = mesh_of(shape)
  sharded = lambda q, k, v: context_parallel_block_lists(q, k, v, idx, cnt, block_size=bs,
                                                         mesh=mesh, mask=mask, **opts)
  ref = lambda q, k, v: block_sparse_attention_indices(q, k, v, idx, cnt, block_q=bs,
                                                       block_kv=bs, mask=mask,
                                                       implementation="reference")
  def vg(fn):
    def loss(*a):
      o = fn(*a)
      return jnp.sum(o.astype(jnp.float32) ** 2), o
    return jax.value_and_grad(loss, (0, 1, 2), has_aux=True)
  x = [a.astype(dtype) for a in (q, k, v)]
  ((_, o1), g1), ((_, o2), g2) = jax.jit(lambda *a: (vg(sharded)(*a), vg(ref)(*a)))(*x)
  out[name] = {"fwd": float(np.abs(f32(o1) - f32(o2)).max()),
               "grad": max(float(np.abs(f32(a) - f32(b)).max() / (np.abs(f32(b)).max() + 1e-6))
                           for a, b in zip(g1, g2)), "dtype": str(o1.dtype)}

# zig-zag assignment (natural order in and out; and arrays already in that order), causal lists
from attnjax.sharding import sequence_permutation
idx, cnt = lists(N, 3, True, seed=11)
cap = block_list_capacity(idx, cnt, num_shards=4, num_kv_heads=K, per_distance=True,
                          assignment="zigzag")
mesh = mesh_of((1, 1, 4))
perm = sequence_permutation(T, 4, "zigzag")
qperm, inv = perm[::bs] // bs, np.argsort(perm)
zz = lambda q, k, v: context_parallel_block_lists(q, k, v, idx, cnt, block_size=bs, mesh=mesh,
                                                  mask=M.Causal(), capacity=cap,
                                                  assignment="zigzag")
zz_a = lambda q, k, v: context_parallel_block_lists(
    q[:, perm], k[:, perm], v[:, perm], idx[:, :, qperm], cnt[:, :, qperm], block_size=bs,
    mesh=mesh, mask=M.Causal(), capacity=cap, assignment="zigzag",
    sequence_order="assignment")[:, inv]
ref = lambda q, k, v: block_sparse_attention_indices(q, k, v, idx, cnt, block_q=bs, block_kv=bs,
                                                     mask=M.Causal(), implementation="reference")
res = jax.jit(lambda *a: [vg(fn)(*a) for fn in (zz, zz_a, ref)])(q, k, v)
for name, ((_, o1), g1) in zip(("zigzag", "zigzag_assignment_order"), res[:2]):
  (_, o2), g2 = res[2]
  out[name] = {"fwd": float(np.abs(f32(o1) - f32(o2)).max()),
               "grad": max(float(np.abs(f32(a) - f32(b)).max() / (np.abs(f32(b)).max() + 1e-6))
                           for a, b in zip(g1, g2)), "dtype": str(o1.dtype)}

# a capacity one short: NaN in exactly the rows whose lists lose a block, the others exact
idx, cnt = lists(N, 3, True, seed=7)
cap = block_list_capacity(idx, cnt, num_shards=4, num_kv_heads=K)
mesh = mesh_of((1, 1, 4))
o, ref = jax.jit(lambda q, k, v: (
    context_parallel_block_lists(q, k, v, idx, cnt, block_size=bs, mesh=mesh, mask=M.Causal(),
                                 capacity=cap - 1),
    block_sparse_attention_indices(q, k, v, idx, cnt, block_q=bs, block_kv=bs, mask=M.Causal(),
                                   implementation="reference")))(q, k, v)
nan_rows = np.isnan(f32(o)).any(-1)                                   # [B, T, N]
out["short"] = {"capacity": cap, "nan_rows": int(nan_rows.sum()),
                "partial_nan_rows": int((np.isnan(f32(o)).any(-1) != np.isnan(f32(o)).all(-1)).sum()),
                "others": float(np.abs(np.where(nan_rows[..., None], 0, f32(o) - f32(ref))).max())}
# the rows that lose a block, from the lists on the host (q-block rows, per query head)
ii, cc = np.asarray(idx), np.asarray(cnt)
nbl = nq // 4
lost = np.zeros((B, N, nq), bool)
for b in range(B):
  for g in range(K):
    heads = range(g * (N // K), (g + 1) * (N // K))
    for dst in range(4):
      for src in range(dst):
        need = sorted({int(e) for h in heads for r in range(dst * nbl, (dst + 1) * nbl)
                       for e in ii[b, h, r, :cc[b, h, r]] if e // nbl == src})
        dropped = set(need[cap - 1:])
        for h in heads:
          for r in range(dst * nbl, (dst + 1) * nbl):
            lost[b, h, r] |= bool(dropped & set(ii[b, h, r, :cc[b, h, r]].tolist()))
out["short"]["expected_nan_rows"] = int(lost.sum()) * bs
out["short"]["match"] = bool((np.repeat(lost, bs, axis=2).transpose(0, 2, 1) == nan_rows).all())
print("RESULT" + json.dumps(out))
'''

multidevice.register("block_lists", SCRIPT)


@pytest.fixture(scope="module")
def result():
  return multidevice.result("block_lists")


@pytest.mark.parametrize("case", ["topk_causal_c8", "topk_kv_lists_d2h2c2_bf16",
                                  "topk_causal_capacity_c4", "zigzag",
                                  "zigzag_assignment_order"])
def test_sharded_equals_unsharded(result, case):
  r = result[case]
  tol = 3e-2 if r["dtype"] == "bfloat16" else 1e-5
  assert r["fwd"] < tol, r
  assert r["grad"] < tol, r


def test_capacity_from_the_lists_is_below_the_default_bound(result):
  # 2 q-blocks per device x 2 query heads x 3 entries could name both blocks of a device
  assert 1 <= result["topk_causal_capacity_c4/capacity"] <= 2


def test_capacity_one_short_gives_nan_in_exactly_the_rows_that_lose_a_block(result):
  r = result["short"]
  assert r["nan_rows"] > 0 and r["nan_rows"] == r["expected_nan_rows"], r
  assert r["match"] and r["partial_nan_rows"] == 0
  assert r["others"] < 1e-5


# -- plans (NumPy only) ------------------------------------------------------------------
def test_causal_plan_skips_the_wrapping_transfers_and_bounds_the_buffers():
  plan = block_list_plan(M.Causal(), 1024, 8, 4, 2, 8, 32)     # 4 blocks per device
  assert [r for r, _, _ in plan.rounds] == list(range(1, 8))
  for r, m, pairs in plan.rounds:
    assert all(dst == src + r for src, dst in pairs)            # only earlier devices send
    assert m == 4                                               # min(4 blocks, 4 x 4 x 2 entries)
  assert plan.buffer_blocks == 4 + 7 * 4
  small = block_list_plan(M.Causal(), 1024, 8, 4, 2, 8, 32, capacity=1)
  assert small.received_blocks() == 7
  rep = block_list_report(small, batch=1, num_kv_heads=2, head_dim=64)
  assert rep["received_ratio"] < 0.26      # 1 of 4 blocks per device, plus the ids


def test_window_plan_talks_to_the_neighbour_only():
  plan = block_list_plan(M.Causal() & M.SlidingWindow(31, 0), 1024, 8, 1, 2, 8, 32)
  assert [(r, m) for r, m, _ in plan.rounds] == [(1, 1)]       # the last block of the left device


def test_capacity_of_hand_built_lists():
  # 2 devices x 2 q-blocks; device 1's rows name block 0 of device 0 (head 0) and block 1
  # (head 1): one block per KV head, two when both heads share a KV head
  idx = np.array([[[[0, 0], [1, 1], [0, 2], [0, 3]], [[0, 0], [1, 1], [1, 2], [2, 2]]]])
  cnt = np.array([[[1, 1, 2, 2], [1, 1, 2, 1]]])
  assert block_list_capacity(idx, cnt, num_shards=2, num_kv_heads=1) == 2
  assert block_list_capacity(idx, cnt, num_shards=2, num_kv_heads=2) == 1
  assert block_list_capacity(idx, cnt, num_shards=2, num_kv_heads=1, per_distance=True) == (2,)


def test_per_distance_capacity_drops_empty_rounds():
  plan = block_list_plan(M.Causal(), 1024, 8, 4, 2, 8, 32, capacity=(3, 1, 0, 0, 0, 0, 0))
  assert [(r, m) for r, m, _ in plan.rounds] == [(1, 3), (2, 1)]
  assert plan.buffer_blocks == 4 + 3 + 1
  with pytest.raises(ValueError, match="capacity has 2 entries; expected one per device"):
    block_list_plan(M.Causal(), 1024, 8, 4, 2, 8, 32, capacity=(1, 1))


def test_zigzag_plan_balances_causal_work_and_owns_two_chunks():
  from attnjax.sharding import owned_blocks
  own = owned_blocks(1024, 8, 32, "zigzag")                      # 2 chunks of 2 blocks each
  assert own[0].tolist() == [0, 1, 30, 31] and own[7].tolist() == [14, 15, 16, 17]
  plan = block_list_plan(M.Causal(), 1024, 8, 4, 2, 8, 32, assignment="zigzag")
  assert (plan.owned == own).all()
  # causal key blocks visible to each device's q-blocks: equal on every device
  work = [sum(int(b) + 1 for b in own[d]) for d in range(8)]
  assert max(work) == min(work)
  contiguous = [sum(int(b) + 1 for b in owned_blocks(1024, 8, 32)[d]) for d in range(8)]
  assert max(contiguous) / np.mean(contiguous) > 1.8
  with pytest.raises(ValueError, match="block_size=128 must divide the chunks"):
    owned_blocks(1024, 8, 128, "zigzag")                         # chunks of 64 tokens


def test_capacity_of_hand_built_lists_zigzag():
  # 2 devices, 4 q-blocks: device 0 holds blocks 0 and 3, device 1 blocks 1 and 2; the
  # rows of block 3 (device 0) name blocks 1 and 2 (device 1)
  idx = np.array([[[[0, 0], [1, 0], [2, 1], [3, 1]]]])
  cnt = np.array([[[1, 2, 2, 2]]])
  assert block_list_capacity(idx, cnt, num_shards=2, num_kv_heads=1,
                             assignment="zigzag") == 1
  idx[0, 0, 3] = [1, 2]
  assert block_list_capacity(idx, cnt, num_shards=2, num_kv_heads=1,
                             assignment="zigzag") == 2
  assert block_list_capacity(idx, cnt, num_shards=2, num_kv_heads=1) == 1   # both on device 0
