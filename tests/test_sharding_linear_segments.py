"""Context-parallel linear attention: non-causal documents and custom positions, 8 CPU devices.

Two scripts in a subprocess (XLA_FLAGS must set the device count before jax
is imported). Every case compares the sharded op with a dense float32
reference built from an explicit [B, T, S] mask (documents: ``seg[j] ==
seg[i]``; causality: ``k_pos[j] <= q_pos[i]``; decay ``lambda^(q_pos[i] -
k_pos[j])``), forward and gradients of q, k, v, in one compiled program per
case.

Documents (non-causal): a document crossing two device boundaries, one inside
a device, one starting on a boundary, a padded tail with its own id; context
axes 2, 4 and 8, a data axis, a heads axis, GQA, identity / elu+1 / Taylor
feature maps, normalised or not, bfloat16; ids that decrease give NaN in their
row only; the bytes each device receives in the compiled program do not grow
with T. Positions (causal): arange(T) + offset with TNL decay, packed
documents whose positions restart at 0 (the registry's linear family); traced positions that break the rule give NaN in their
row only. Errors (in this process): concrete positions that break the rule
raise naming the argument, wrong shapes raise ValueError.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import multidevice
from attnjax.sharding import (context_parallel_family, context_parallel_linear_attention,
                              linear_communication_bytes, make_mesh)
from attnjax.sharding.linear_context import check_linear_positions

COMMON = r'''
import json, warnings
import jax, jax.numpy as jnp, numpy as np
from attnjax.linear.decay import tnl_decay_slopes
from attnjax.linear.feature_maps import resolve_feature_map
from attnjax.sharding import make_mesh, context_parallel_family, context_parallel_linear_attention
warnings.simplefilter("ignore")   # keep the child's output to the results line
out = {"devices": jax.device_count()}

def mesh_of(shape):
  return make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])


def docs(lengths, ids=None):
  return np.repeat(np.arange(len(lengths)) if ids is None else ids, lengths)

def restart(seg):   # positions restarting at 0 in every document
  s = np.asarray(seg)
  start = np.concatenate([np.ones(s.shape[:-1] + (1,), bool), s[..., 1:] != s[..., :-1]], -1)
  idx = np.broadcast_to(np.arange(s.shape[-1]), s.shape)
  return idx - np.maximum.accumulate(np.where(start, idx, 0), axis=-1)

def dense(q, k, v, mask, feature_map, normalize, slopes=None, dist=None, eps=1e-6):
  """Reference: mask bool [B, T, S]; dist [B, T, S] = q_pos - k_pos (with slopes)."""
  phi = resolve_feature_map(feature_map)
  g = q.shape[2] // k.shape[2]
  qf = phi(q.astype(jnp.float32))
  kf = jnp.repeat(phi(k.astype(jnp.float32)), g, axis=2)
  vv = jnp.repeat(v.astype(jnp.float32), g, axis=2)
  w = jnp.einsum("btnf,bsnf->bnts", qf, kf)
  if slopes is not None:
    w = w * jnp.exp(-jnp.asarray(slopes, jnp.float32)[None, :, None, None]
                    * jnp.where(mask, dist, 0)[:, None])
  w = jnp.where(jnp.asarray(mask)[:, None], w, 0.0)
  o = jnp.einsum("bnts,bsne->btne", w, vv)
  if normalize:
    o = o / (w.sum(-1).transpose(0, 2, 1)[..., None] + eps)
  return o.astype(q.dtype)


def build(sharded, reference):
  """One jitted program: (out, grads) of both sides; extra arguments are traced."""
  def side(f):
    def loss(q, k, v, w, *a):
      o = f(q, k, v, *a)
      return jnp.sum(o.astype(jnp.float32) * w), o
    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
  s, r = side(sharded), side(reference)
  return jax.jit(lambda *a: (s(*a), r(*a)))

def compare(name, run, *args):
  ((_, o1), g1), ((_, o2), g2) = run(*args)
  out[name] = {"fwd": rel(o1, o2), "grad": max(rel(a, b) for a, b in zip(g1, g2)),
               "dtype": str(o1.dtype)}

def nan_rows(run, *args):
  o = np.asarray(run(*args)[0][0][1], np.float32)   # the sharded side's output
  return [bool(np.isnan(o[b]).all()) for b in range(o.shape[0])] + [
      bool(np.isnan(o[b]).any()) for b in range(o.shape[0])]

'''

DOCUMENTS = r'''

# T = 32 over 4 devices (8 tokens each): doc 1 crosses two boundaries, doc 2 lies inside
# device 2, doc 3 crosses one, the padded tail (id 9) is its own document; row 1: a document
# that starts on a boundary, then one spanning three devices.
seg32 = np.stack([docs([3, 14, 4, 7, 4], [0, 1, 2, 3, 9]), docs([8, 24], [4, 5])])
seg64 = np.stack([docs([5, 30, 3, 26]), docs([40, 24], [7, 8])])
cases = [
    # name, mesh (data, heads, context), B T N K H, dtype, feature map, normalize, ids
    ("data2_c4_gqa", (2, 1, 4), (2, 32, 4, 2, 8), jnp.float32, "elu+1", True, seg32),
    ("heads2_c2_identity_bf16", (1, 2, 2), (2, 32, 4, 2, 8), jnp.bfloat16, "identity", False,
     seg32),
    ("c8_taylor", (1, 1, 8), (2, 64, 2, 1, 4), jnp.float32, "taylor", True, seg64),
]
for name, shape, (B, T, N, K, H), dtype, fm, norm, seg in cases:
  q, k, v, w = inputs((B, T), N, K, H, dtype, seed=len(name))
  m = mesh_of(shape)
  # positions are unused without causality (any values of the right shape run)
  kw = dict(feature_map=fm, normalize=norm, causal=False, chunk_size=4,
            q_positions=np.arange(T)[::-1], k_positions=np.zeros(T, int))
  run = build(lambda q, k, v, s: context_parallel_linear_attention(q, k, v, m, segment_ids=s,
                                                                   **kw),
              lambda q, k, v, s: dense(q, k, v, s[:, :, None] == s[:, None, :], fm, norm))
  compare(name, run, q, k, v, w, jnp.asarray(seg, jnp.int32))
  if name == "data2_c4_gqa":   # ids that decrease (row 0, across a device boundary)
    bad = seg.copy()
    bad[0, 20:] = 0
    out["decreasing_ids_nan"] = nan_rows(run, q, k, v, w, jnp.asarray(bad, jnp.int32))

# bytes received per device (compiled HLO, forward, 8 devices): two documents, T = 64 and 512
from experiments.benchmarks.context_parallel import received_bytes
m = mesh_of((1, 1, 8))
out["bytes"] = {}
for T in (64, 512):
  q, k, v, _ = inputs((1, T), 4, 2, 16, jnp.float32)
  s = jnp.asarray(docs([T // 2 + 3, T // 2 - 3])[None], jnp.int32)
  f = jax.jit(lambda q, k, v, s: context_parallel_linear_attention(
      q, k, v, m, feature_map="elu+1", normalize=True, causal=False, segment_ids=s))
  got = received_bytes(f.lower(q, k, v, s).compile().as_text(), 8)
  out["bytes"][T] = {"max": int(got.max()), "allgather": 7 * (T // 8) * 2 * (16 + 16) * 4}
g = jax.jit(lambda q, k, v, s: context_parallel_linear_attention(
    q, k, v, m, feature_map="elu+1", normalize=True, segment_ids=s))   # causal: one scan
out["bytes"]["causal"] = int(received_bytes(g.lower(q, k, v, s).compile().as_text(), 8).max())
print("RESULT" + json.dumps(out))
'''

POSITIONS = r'''

# a continuation chunk: arange(T) + 100, TNL decay (distances count), GQA, data axis,
# positions traced
pos = np.arange(32) + 100
slopes = tnl_decay_slopes(4, 0, 1)
m = mesh_of((2, 1, 4))
q, k, v, w = inputs((2, 32), 4, 2, 8, jnp.float32, seed=5)
mask = np.broadcast_to(pos[None, :, None] >= pos[None, None, :], (2, 32, 32))
run = build(lambda q, k, v, p: context_parallel_linear_attention(
                q, k, v, m, decay=slopes, chunk_size=4, q_positions=p, k_positions=p),
            lambda q, k, v, p: dense(q, k, v, mask, "identity", False, slopes,
                                     (p[:, None] - p[None, :])[None]))
compare("decay_offset_data2_c4", run, q, k, v, w, jnp.asarray(pos))
bad = pos.copy()
bad[20:] += 2                              # a gap: decay would count it; NaN in every row ([T])
out["offset_gap_nan"] = nan_rows(run, q, k, v, w, jnp.asarray(bad))

# packed documents whose positions restart at 0, [B, T] positions and ids, the registry's
# linear family (elu+1, normalised), context axis 8 with 8 tokens per device
seg = np.stack([docs([5, 30, 3, 26]), docs([40, 24], [7, 8])])
pp = restart(seg)
fam = context_parallel_family("linear", mesh_of((1, 1, 8)))
q, k, v, w = inputs((2, 64), 4, 2, 8, jnp.float32, seed=7)
run = build(lambda q, k, v, s, p: fam(q, k, v, causal=True, chunk_size=4, segment_ids=s,
                                      q_positions=p, k_positions=p),
            lambda q, k, v, s, p: dense(q, k, v, (s[:, :, None] == s[:, None, :])
                                        & (p[:, None, :] <= p[:, :, None]), "elu+1", True))
compare("packed_restarting_c8", run, q, k, v, w, jnp.asarray(seg), jnp.asarray(pp))
bad = pp.copy()
bad[1, 45] = bad[1, 44]                    # row 1 repeats a position inside its document
out["packed_repeat_nan"] = nan_rows(run, q, k, v, w, jnp.asarray(seg), jnp.asarray(bad))
print("RESULT" + json.dumps(out))
'''

multidevice.register("linear_documents", multidevice.HELPERS + COMMON + DOCUMENTS)
multidevice.register("linear_positions", multidevice.HELPERS + COMMON + POSITIONS)


@pytest.fixture(scope="module")
def documents():
  return multidevice.result("linear_documents")


@pytest.fixture(scope="module")
def positions():
  return multidevice.result("linear_positions")


def _close(r):
  tol = 1e-2 if r["dtype"] == "bfloat16" else 2e-5
  assert r["fwd"] < tol, r
  assert r["grad"] < 2 * tol, r


@pytest.mark.parametrize("case", ["data2_c4_gqa", "heads2_c2_identity_bf16", "c8_taylor"])
def test_noncausal_documents_equal_dense_reference(documents, case):
  assert documents["devices"] == 8
  _close(documents[case])


def test_noncausal_rows_whose_ids_decrease_are_nan(documents):
  # [all NaN in row 0, in row 1, any NaN in row 0, in row 1]
  assert documents["decreasing_ids_nan"] == [True, False, True, False]


def test_noncausal_document_bytes_do_not_grow_with_length(documents):
  b = documents["bytes"]
  plan = linear_communication_bytes(batch=1, seq_len=512, num_heads=4, num_kv_heads=2,
                                    features=16, value_dim=16, num_chunks=8, causal=False,
                                    decay=False, normalize=True, segment_ids=True,
                                    kv_itemsize=4)
  # 7 states [1, 2, 16, 17] and their ids (3 forward + 4 backward on devices 3 and 4), a flag
  assert plan["state_bytes"] == 7 * (2 * 16 * 17 * 4 + 16) + 4
  assert b["64"]["max"] == b["512"]["max"] == plan["state_bytes"], (b, plan)
  assert b["512"]["allgather"] == plan["allgather_bytes"]
  assert b["512"]["max"] < b["512"]["allgather"] / 4, b
  plan["causal"] = linear_communication_bytes(
      batch=1, seq_len=512, num_heads=4, num_kv_heads=2, features=16, value_dim=16,
      num_chunks=8, decay=False, normalize=True, segment_ids=True)["state_bytes"]
  assert b["causal"] == plan["causal"] == 4 * (2 * 16 * 17 * 4 + 16) + 4, (b, plan)


@pytest.mark.parametrize("case", ["decay_offset_data2_c4", "packed_restarting_c8"])
def test_custom_positions_equal_dense_reference(positions, case):
  assert positions["devices"] == 8
  _close(positions[case])


def test_traced_positions_breaking_the_rule_are_nan(positions):
  assert positions["offset_gap_nan"] == [True, True, True, True]       # [T] positions
  assert positions["packed_repeat_nan"] == [False, True, False, True]  # [B, T]: row 1 only


def _qkv(T=16):
  rng = np.random.default_rng(0)
  return tuple(jnp.asarray(rng.standard_normal((2, T, 2, 4), np.float32)) for _ in range(3))


def test_concrete_positions_breaking_the_rule_raise_naming_the_argument():
  q, k, v = _qkv()
  m, ar = make_mesh(), np.arange(16)
  with pytest.raises(NotImplementedError, match=r"custom q_positions and k_positions that break "
                     r"it at row 0, i=0 \(q_pos\[i\]=15, k_pos\[i\]=15, k_pos\[i \+ 1\]=14\)"):
    context_parallel_linear_attention(q, k, v, m, q_positions=ar[::-1], k_positions=ar[::-1])
  with pytest.raises(NotImplementedError, match="context-parallel 'linear' .*custom k_positions"):
    context_parallel_family("linear", m)(q, k, v, causal=True, k_positions=ar + 1)
  with pytest.raises(NotImplementedError, match="arange"):   # takes none unsharded
    context_parallel_family("lightning", m)(q, k, v, causal=True, q_positions=ar + 1,
                                            k_positions=ar + 1)
  with pytest.raises(NotImplementedError, match=r"k_pos\[i \+ 1\] == k_pos\[i\] \+ 1"):
    context_parallel_linear_attention(q, k, v, m, decay="tnl", q_positions=2 * ar,
                                      k_positions=2 * ar)
  with pytest.raises(NotImplementedError, match="q_positions and k_positions .* row 1, i=8"):
    seg = np.repeat([[0, 1]], 8, axis=1).repeat(2, 0)
    pos = np.stack([np.tile(np.arange(8), 2), np.tile(np.arange(8), 2)])
    pos[1, 9] = 0                          # row 1 repeats position 0 inside document 1
    context_parallel_linear_attention(q, k, v, m, segment_ids=seg, q_positions=pos,
                                      k_positions=pos)
  with pytest.raises(NotImplementedError, match="initial_state with decay and custom positions"):
    context_parallel_linear_attention(q, k, v, m, decay="tnl", initial_state=np.zeros((2, 2, 4, 4)),
                                      q_positions=ar + 3, k_positions=ar + 3)


def test_wrong_shapes_raise_value_error():
  q, k, v = _qkv()
  m, ar = make_mesh(), np.arange(16)
  with pytest.raises(ValueError, match=r"k_positions must have shape \[S\] or \[B, S\] with B=2, "
                     r"S=16, got \(8,\)"):
    context_parallel_linear_attention(q, k, v, m, k_positions=ar[:8])
  with pytest.raises(ValueError, match=r"q_positions must have shape .* got \(3, 16\)"):
    context_parallel_linear_attention(q, k, v, m, q_positions=np.stack([ar] * 3))
  with pytest.raises(ValueError, match=r"segment_ids needs self-attention \(T == S\)"):
    context_parallel_linear_attention(q, k[:, :8], v[:, :8], m, causal=False,
                                      segment_ids=np.zeros((2, 16), np.int32))


def test_valid_concrete_positions_need_no_run_time_check():
  ar = np.arange(16)
  seg = np.repeat([[0, 1]], 8, axis=1)
  restart = np.tile(np.arange(8), 2)[None]
  assert check_linear_positions(3 * ar, 3 * ar, 1, 16) is None           # gaps: no decay
  assert check_linear_positions(ar, ar, 1, 16, same_distances=True) is None
  assert check_linear_positions(restart, restart, 1, 16, segment_ids=seg,
                                same_distances=True) is None
  assert check_linear_positions(ar[::-1], None, 1, 16, causal=False) is None
