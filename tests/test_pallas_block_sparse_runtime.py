"""Pallas block-sparse kernels on run-time block lists (interpret mode) vs the dense oracle.

The oracle is ``block_sparse_attention_indices(..., implementation="reference")``
(the lists as a dense [B, N, T, S] mask). Shapes are tiny: every case compiles
a forward and two backward kernels through a Pallas interpreter.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks as M
from attnjax.block_sparse.sparse import block_sparse_attention_indices
from attnjax import plan as PL
from attnjax.core import validation as V
from pallas_kernels.block_sparse import block_sparse_pallas_indices


def _qkv(B, T, S, N, K, H, dtype, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (B, S, K, H), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (B, S, K, H), jnp.float32).astype(dtype)
  g = jax.random.normal(ks[3], (B, T, N, H), jnp.float32).astype(dtype)
  g_lse = jax.random.normal(ks[4], (B, T, N), jnp.float32)
  return q, k, v, g, g_lse


def _lists(B, heads, nq, nk, k, seed, full_rows=False):
  """Random distinct k-block lists [B, heads, nq, k] and counts in [0, k] (some < k)."""
  rng = np.random.default_rng(seed)
  rows = [rng.permutation(nk)[:k] for _ in range(B * heads * nq)]
  idx = np.stack(rows).reshape(B, heads, nq, k).astype(np.int32)
  counts = np.full((B, heads, nq), k, np.int32) if full_rows else \
      rng.integers(0, k + 1, (B, heads, nq)).astype(np.int32)
  # Garbage past the counts must be ignored (out of range is fine there too).
  idx = np.where(np.arange(k) < counts[..., None], idx, 10 * nk + 3)
  return jnp.asarray(idx), jnp.asarray(counts)


def _run(fn, q, k, v, g, g_lse):
  """(out, lse, (dq, dk, dv)) of fn through one jitted vjp."""
  def go(q, k, v):
    res, pull = jax.vjp(fn, q, k, v)
    return res, pull((g, g_lse))
  (out, lse), grads = jax.jit(go)(q, k, v)
  return out, lse, grads


def _compare(backend, q, k, v, g, g_lse, idx, counts, *, bq, bk, atol=1e-4, rel=0.0, **kw):
  common = dict(block_q=bq, block_kv=bk, return_lse=True, **kw)
  kern = lambda q, k, v: block_sparse_pallas_indices(q, k, v, idx, counts, backend=backend,
                                                     **common)
  ref = lambda q, k, v: block_sparse_attention_indices(q, k, v, idx, counts,
                                                       implementation="reference", **common)
  got = _run(kern, q, k, v, g, g_lse)
  want = _run(ref, q, k, v, g, g_lse)
  assert got[0].dtype == q.dtype and got[0].shape == q.shape[:3] + v.shape[-1:]
  assert got[1].dtype == jnp.float32 and got[1].shape == q.shape[:3]
  for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got[:2] + tuple(got[2]),
                        want[:2] + tuple(want[2])):
    assert a.dtype == b.dtype, name
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    tol = atol + rel * float(np.max(np.abs(np.where(np.isfinite(b), b, 0.0))))
    np.testing.assert_allclose(a, b, atol=tol, rtol=1e-4, err_msg=name)
  return got


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_causal_gqa_lists_per_kv_head_batched(backend):
  # B=2 with different lists per batch, one list set per KV head (G=2), rows
  # with counts below k (some empty), Causal inside the visited blocks on
  # per-batch query positions.
  B, T, N, K, bq = 2, 64, 4, 2, 16
  q, k, v, g, g_lse = _qkv(B, T, T, N, K, 16, jnp.float32, seed=1)
  idx, counts = _lists(B, K, 4, 4, 3, seed=1)
  assert not np.array_equal(idx[0], idx[1]) and (np.asarray(counts) < 3).any()
  q_pos = jnp.arange(T, dtype=jnp.int32)[None] + jnp.asarray([[0], [7]], jnp.int32)
  out, lse, _ = _compare(backend, q, k, v, g, g_lse, idx, counts, bq=bq, bk=bq,
                         mask=M.Causal(), q_positions=q_pos)
  empty = np.repeat(np.repeat(np.asarray(counts) == 0, bq, 2), N // K, 1)   # [B, N, T]
  assert np.all(np.isneginf(np.asarray(lse).transpose(0, 2, 1)[empty]))


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_cross_lists_per_query_head_with_segments(backend):
  # Non-causal cross attention (T != S), one list set per query head, no mask:
  # full blocks, with the segment-id test applied inside them.
  B, T, S, N, K = 2, 32, 64, 4, 1
  q, k, v, g, g_lse = _qkv(B, T, S, N, K, 16, jnp.float32, seed=2)
  idx, counts = _lists(B, N, 2, 4, 2, seed=2)
  q_seg = jnp.asarray(np.repeat([[0, 1], [0, 0]], [10, 22], axis=1), jnp.int32)
  k_seg = jnp.asarray(np.repeat([[0, 1], [0, 1]], [20, 44], axis=1), jnp.int32)
  _compare(backend, q, k, v, g, g_lse, idx, counts, bq=16, bk=16,
           segment_ids=(q_seg, k_seg))


def test_bfloat16_full_lists_gqa_tpu():
  B, T, N, K = 2, 64, 4, 2
  q, k, v, g, g_lse = _qkv(B, T, T, N, K, 16, jnp.bfloat16, seed=3)
  idx, _ = _lists(B, K, 4, 4, 2, seed=3, full_rows=True)
  _compare("tpu", q, k, v, g, g_lse, idx, None, bq=16, bk=16, mask=M.Causal(),
           atol=2e-2, rel=2e-2)


def test_no_retrace_when_list_contents_change():
  B, T, N, K = 1, 32, 2, 1
  q, k, v, g, _ = _qkv(B, T, T, N, K, 8, jnp.float32, seed=4)
  traces = []

  @jax.jit
  def f(q, k, v, idx, counts):
    traces.append(1)
    fn = lambda q, k, v: block_sparse_pallas_indices(q, k, v, idx, counts, block_q=8,
                                                     block_kv=8, mask=M.Causal(), backend="gpu")
    out, pull = jax.vjp(fn, q, k, v)
    return out, pull(g)

  ref = jax.jit(lambda idx, counts: block_sparse_attention_indices(
      q, k, v, idx, counts, block_q=8, block_kv=8, mask=M.Causal(), implementation="reference"))
  results = []
  for seed in (5, 6):
    idx, counts = _lists(B, K, 4, 4, 2, seed=seed)
    out, _ = f(q, k, v, idx, counts)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref(idx, counts)), atol=1e-4,
                               rtol=1e-4)
    results.append(out)
  assert len(traces) == 1
  assert not np.allclose(np.asarray(results[0]), np.asarray(results[1]))


def test_csc_from_csr_matches_numpy():
  B, Hl, nq, nk, k = 2, 3, 5, 7, 4
  idx, counts = _lists(B, Hl, nq, nk, k, seed=7)
  idx = jnp.clip(idx, 0, nk - 1)
  q_idx, q_counts = jax.jit(PL.csc_from_csr, static_argnums=(2, 3))(idx, counts, nq, nk)
  assert q_idx.shape == (B, Hl, nk, nq) and q_counts.shape == (B, Hl, nk)
  idx, counts = np.asarray(idx), np.asarray(counts)
  for b in range(B):
    for h in range(Hl):
      for kb in range(nk):
        want = [i for i in range(nq) if kb in idx[b, h, i, :counts[b, h, i]]]
        n = int(q_counts[b, h, kb])
        assert n == len(want)
        assert list(np.asarray(q_idx[b, h, kb, :n])) == want
        # padding repeats the last listed q-block (no new copy on TPU)
        assert np.all(np.asarray(q_idx[b, h, kb, n:]) == (want[-1] if want else 0))
  padded = PL.pad_rows(jnp.asarray(idx), jnp.asarray(counts))
  last = np.where(counts > 0, np.take_along_axis(idx, np.maximum(counts - 1, 0)[..., None],
                                                 -1)[..., 0], 0)
  assert np.all(np.where(np.arange(k) < counts[..., None], idx, last[..., None]) == padded)


def test_validation_errors():
  q, k, v, _, _ = _qkv(1, 32, 32, 2, 1, 8, jnp.float32)
  idx, counts = _lists(1, 2, 2, 2, 1, seed=0)
  call = lambda i=idx, c=counts, **kw: block_sparse_pallas_indices(
      q, k, v, i, c, **{"block_q": 16, "block_kv": 16, "backend": "gpu", **kw})
  with pytest.raises(ValueError, match="block_q=12 does not divide T=32"):
    call(block_q=12)
  with pytest.raises(ValueError, match="block_kv=24 does not divide S=32"):
    call(block_kv=24)
  with pytest.raises(ValueError, match="kv_block_indices must have shape"):
    call(i=idx[:, :, :1])
  with pytest.raises(ValueError, match="kv_block_indices must have shape"):
    call(i=jnp.concatenate([idx] * 3, axis=1))
  with pytest.raises(ValueError, match="kv_block_indices must be an integer"):
    call(i=idx.astype(jnp.float32))
  with pytest.raises(ValueError, match="kv_block_counts must have shape"):
    call(c=counts[..., :1])
  with pytest.raises(ValueError, match="kv_block_counts must be an integer"):
    call(c=counts.astype(jnp.float32))
  with pytest.raises(ValueError, match="mask must be an attnjax Mask"):
    call(mask=np.ones((32, 32), bool))
  with pytest.raises(ValueError, match="backend"):
    call(backend="cuda")


def _lower_runtime(backend, T, block, dtype, H, mask):
  """Lowers the compiled forward + backward on traced lists for another platform."""
  from pallas_kernels.block_sparse import api, gpu, tpu
  module = {"gpu": gpu, "tpu": tpu}[backend]
  B, N, K, kk = 2, 4, 2, 2
  q = jnp.zeros((B, T, N, H), dtype)
  kv = jnp.zeros((B, T, K, H), dtype)
  tiles = gpu.default_tiles(block, block, False) if backend == "gpu" else ()
  d = V.check_qkv(q, kv, kv)
  lists = lambda idx, counts: PL.from_lists(idx, counts, d, block, block, mask=mask)
  zeros = lists(jnp.zeros((B, K, T // block, kk), jnp.int32), None)
  cfg, aux, sinks = api._prepare(q, kv, kv, zeros, None, None, None, None, None, None, False,
                                 tiles)
  attend = api.make_attention(cfg, module, api.runtime_expander(cfg, module))

  def f(q, k, v, idx, counts):
    fn = lambda q, k, v: attend(q, k, v, aux, sinks, lists(idx, counts))[0]
    out, pull = jax.vjp(fn, q, k, v)
    return pull(out)
  idx = jnp.zeros((B, K, T // block, kk), jnp.int32)
  counts = jnp.zeros((B, K, T // block), jnp.int32)
  platform = "cuda" if backend == "gpu" else "tpu"
  return jax.jit(f).trace(q, kv, kv, idx, counts).lower(lowering_platforms=(platform,)).as_text()


def test_compiled_runtime_gpu_kernels_lower_to_triton():
  text = _lower_runtime("gpu", 256, 64, jnp.bfloat16, 64, M.Causal())
  assert text.count("custom_call @__gpu$xla.gpu.triton") == 3  # forward, dQ, dK/dV


def test_compiled_runtime_tpu_kernels_lower_to_mosaic():
  from jax._src.mesh import AbstractDevice, AbstractMesh
  mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice("TPU v5 lite", 1, "tpu"))
  with jax.sharding.use_abstract_mesh(mesh):
    text = _lower_runtime("tpu", 512, 128, jnp.bfloat16, 128, None)
  assert text.count("custom_call @tpu_custom_call") == 3  # forward, dQ, dK/dV
