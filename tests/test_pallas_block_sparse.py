"""Pallas block-sparse kernels (TPU Mosaic and GPU Triton) in interpret mode vs the dense oracle.

Shapes are tiny (T <= 64): every case compiles a forward and two backward
kernels through the Pallas interpreters.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks as M
from attnjax import reference_attention
from attnjax.masks.base import Mask
from attnjax.masks.layout import layout_from_block_mask
from pallas_kernels.block_sparse import block_sparse_pallas

BACKENDS = ("gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class S2Like(Mask):
  """S2-Attention's per-head pattern: causal, local blocks plus head-strided key blocks."""
  block: int
  local_blocks: int
  vert_stride: int

  @property
  def head_dependent(self):
    return True

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    qb, kb = q_pos // self.block, k_pos // self.block
    local = (qb - kb) < self.local_blocks
    vertical = (kb + head) % self.vert_stride == 0
    return (k_pos <= q_pos) & (local | vertical)


class SoftplusSum:
  """Softplus weights normalised by their row sum (normalization='sum')."""
  normalization = "sum"
  needs_row_count = False
  has_reweight = False

  def transform(self, logits, *, head=None, q_pos=None, k_pos=None, row_count=None):
    return logits

  def weights(self, logits):
    return jax.nn.softplus(logits)

  def sink_logits(self):
    return None


class ReluNone(SoftplusSum):
  """ReLU weights without normalisation (normalization='none')."""
  normalization = "none"

  def weights(self, logits):
    return jax.nn.relu(logits)


class SoftCap(SoftplusSum):
  """cap * tanh(s / cap) before softmax."""
  normalization = "softmax"

  def transform(self, logits, *, head=None, q_pos=None, k_pos=None, row_count=None):
    return 5.0 * jnp.tanh(logits / 5.0)


@dataclasses.dataclass
class Sink(SoftplusSum):
  """Per-head sink logits (may be traced)."""
  logits: object = 0.0
  normalization = "softmax"

  def sink_logits(self):
    return self.logits


def _qkv(B, T, S, N, K, H, dtype, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (B, S, K, H), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (B, S, K, H), jnp.float32).astype(dtype)
  g = jax.random.normal(ks[3], (B, T, N, H), jnp.float32).astype(dtype)
  return q, k, v, g


def _run(fn, q, k, v, g, g_lse=None):
  """(out, lse or None, grads) of fn through one jitted vjp."""
  def go(q, k, v):
    res, pull = jax.vjp(fn, q, k, v)
    if isinstance(res, tuple):
      return res, pull((g, g_lse))
    return (res, None), pull(g)
  (out, lse), grads = jax.jit(go)(q, k, v)
  return out, lse, grads


def _close(name, got, want, atol, rtol=1e-4):
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=atol, rtol=rtol, err_msg=name)


def _compare(backend, q, k, v, g, layout, mask, *, atol=1e-4, return_lse=False, tiles=None,
             **kw):
  g_lse = None
  if return_lse:
    g_lse = jax.random.normal(jax.random.PRNGKey(7), q.shape[:3], jnp.float32)
  extra = {} if tiles is None else {"tiles": tiles}
  kern = lambda q, k, v: block_sparse_pallas(q, k, v, layout, mask=mask, backend=backend,
                                             return_lse=return_lse, **extra, **kw)
  ref = lambda q, k, v: reference_attention(q, k, v, mask=mask, return_lse=return_lse, **kw)
  out, lse, grads = _run(kern, q, k, v, g, g_lse)
  r_out, r_lse, r_grads = _run(ref, q, k, v, g, g_lse)
  assert out.dtype == q.dtype and out.shape == q.shape[:3] + v.shape[-1:]
  _close("out", out, r_out, atol)
  if return_lse:
    assert lse.dtype == jnp.float32 and lse.shape == q.shape[:3]
    _close("lse", lse, r_lse, atol)
  for name, a, b in zip(("dq", "dk", "dv"), grads, r_grads):
    assert a.dtype == b.dtype
    _close(name, a, b, atol)
  return out, lse, grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_gqa_float32(backend):
  q, k, v, g = _qkv(1, 64, 64, 4, 2, 16, jnp.float32)
  mask = M.Causal()
  layout = mask.block_layout(64, 64, 16, 16, 4)
  assert layout.num_full and layout.num_visited < layout.block_mask.size
  _compare(backend, q, k, v, g, layout, mask, return_lse=True)


def _naive_bf16_error(q, k, v, mask, g):
  """Max error of a naive bfloat16 implementation (the tolerance yardstick)."""
  def naive(q, k, v):
    G = q.shape[2] // k.shape[2]
    kk, vv = jnp.repeat(k, G, 2), jnp.repeat(v, G, 2)
    s = jnp.einsum("btnh,bsnh->bnts", q, kk) * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    vis = jnp.asarray(mask.to_dense(q.shape[1], k.shape[1], q.shape[2]))[None]
    p = jax.nn.softmax(jnp.where(vis, s, -jnp.inf), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", p.astype(q.dtype), vv)
  ref = lambda q, k, v: reference_attention(q, k, v, mask=mask)
  out, _, grads = _run(naive, q, k, v, g)
  r_out, _, r_grads = _run(ref, q, k, v, g)
  return [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
          for a, b in zip((out,) + tuple(grads), (r_out,) + tuple(r_grads))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_s2_per_head_layout_bfloat16(backend):
  T, N, K = 64, 4, 2
  mask = S2Like(block=16, local_blocks=1, vert_stride=2)
  layout = mask.block_layout(T, T, 16, 16, N)
  dense = layout.block_mask != 0
  assert not np.array_equal(dense[0], dense[1]), "heads must differ"
  q, k, v, g = _qkv(1, T, T, N, K, 16, jnp.bfloat16, seed=1)
  out, _, grads = _run(lambda q, k, v: block_sparse_pallas(q, k, v, layout, mask=mask,
                                                             backend=backend), q, k, v, g)
  r_out, _, r_grads = _run(lambda q, k, v: reference_attention(q, k, v, mask=mask), q, k, v, g)
  naive = _naive_bf16_error(q, k, v, mask, g)
  for name, a, b, tol in zip(("out", "dq", "dk", "dv"), (out,) + tuple(grads),
                             (r_out,) + tuple(r_grads), naive):
    assert a.dtype == jnp.bfloat16, name
    err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
    assert err <= 2 * tol + 1e-3, (name, err, tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_cross_fully_masked_rows(backend):
  # T > S with bottom-right aligned positions: the first T - S queries see no key.
  T, S = 64, 32
  q, k, v, g = _qkv(1, T, S, 2, 1, 16, jnp.float32, seed=2)
  mask = M.Causal()
  layout = mask.block_layout(T, S, 16, 16, 1)
  assert layout.q_offset == S - T and (layout.fwd_counts == 0).any()
  out, lse, grads = _compare(backend, q, k, v, g, layout, mask, return_lse=True)
  assert np.all(np.asarray(out[:, :T - S]) == 0)
  assert np.all(np.isneginf(np.asarray(lse[:, :T - S])))
  assert all(np.isfinite(np.asarray(x)).all() for x in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_segments_window_and_position_arrays(backend):
  B, T = 2, 48
  q, k, v, g = _qkv(B, T, T, 2, 2, 16, jnp.float32, seed=3)
  mask = M.SlidingWindow(40, 16)
  layout = mask.block_layout(T, T, 16, 16)
  seg = jnp.asarray(np.stack([np.repeat([0, 1], [20, 28]), np.repeat([0, 1, 2], [30, 14, 4])]),
                    jnp.int32)
  pos = jnp.tile(jnp.arange(T, dtype=jnp.int32)[None], (B, 1))
  _compare(backend, q, k, v, g, layout, mask, segment_ids=seg, q_positions=pos,
           k_positions=pos, return_lse=True)


def test_softcap_transform_gpu():
  q, k, v, g = _qkv(1, 32, 32, 2, 1, 16, jnp.float32, seed=4)
  q = q * 4.0  # large logits, so the cap matters
  mask = M.Causal()
  _compare("gpu", q, k, v, g, mask.block_layout(32, 32, 16, 16), mask, score=SoftCap())


def test_sink_logits_and_their_gradient_tpu():
  q, k, v, g = _qkv(1, 32, 32, 2, 1, 16, jnp.float32, seed=5)
  mask = M.Causal()
  layout = mask.block_layout(32, 32, 16, 16)
  sinks = jnp.asarray([0.5, -1.0], jnp.float32)

  def loss(fn, sinks):
    return jnp.sum(fn(q, k, v, mask=mask, score=Sink(sinks)) * g)

  kern = lambda *a, **kw: block_sparse_pallas(*a, layout, backend="tpu", **kw)
  got = jax.jit(jax.value_and_grad(lambda s: loss(kern, s)))(sinks)
  want = jax.value_and_grad(lambda s: loss(reference_attention, s))(sinks)
  _close("loss", got[0], want[0], 1e-4)
  _close("d_sinks", got[1], want[1], 1e-4)


@pytest.mark.parametrize("backend,score", [("gpu", SoftplusSum()), ("tpu", ReluNone())])
def test_sum_and_none_normalisations(backend, score):
  q, k, v, g = _qkv(1, 32, 32, 2, 1, 16, jnp.float32, seed=6)
  mask = M.SlidingWindow(12, 0)
  _compare(backend, q, k, v, g, mask.block_layout(32, 32, 8, 8), mask, score=score)


def test_validation_errors():
  q, k, v, _ = _qkv(1, 32, 32, 2, 1, 16, jnp.float32)
  layout = M.Causal().block_layout(32, 32, 16, 16)
  with pytest.raises(ValueError, match="layout was built for"):
    block_sparse_pallas(q[:, :16], k, v, layout, backend="gpu")
  with pytest.raises(ValueError, match="num_heads"):
    block_sparse_pallas(q, k, v, M.Causal().block_layout(32, 32, 16, 16, 3), backend="gpu")
  partial = layout_from_block_mask(np.asarray(layout.block_mask), 32, 32, 16, 16)
  with pytest.raises(ValueError, match="partial blocks but no mask"):
    block_sparse_pallas(q, k, v, partial, backend="gpu")
  with pytest.raises(ValueError, match="backend"):
    block_sparse_pallas(q, k, v, layout, backend="cuda")
  with pytest.raises(ValueError, match="interpret"):
    block_sparse_pallas(q, k, v, layout, backend="gpu", interpret=False)
  with pytest.raises(ValueError, match="return_lse"):
    block_sparse_pallas(q, k, v, layout, score=ReluNone(), return_lse=True, backend="gpu")
  with pytest.raises(ValueError, match="q_positions"):
    shifted = M.Causal().block_layout(32, 32, 16, 16, q_offset=5)
    block_sparse_pallas(q, k, v, shifted, backend="gpu")


def test_gpu_tiles_smaller_than_layout_blocks():
  # Each listed 32 x 32 block is visited as several kernel tiles (as the
  # compiled GPU defaults do for the backward passes).
  q, k, v, g = _qkv(1, 64, 64, 2, 1, 16, jnp.float32, seed=8)
  mask = M.Causal()
  layout = mask.block_layout(64, 64, 32, 32)
  assert layout.num_full and layout.num_visited > layout.num_full
  _compare("gpu", q, k, v, g, layout, mask, tiles=((16, 32), (32, 16), (16, 16)))


def test_merge_q_layout_matches_fine_layout():
  from pallas_kernels.block_sparse.merge_q import merge_q_blocks
  mask = S2Like(block=16, local_blocks=1, vert_stride=2)
  fine = mask.block_layout(64, 64, 16, 16, 2)
  merged = merge_q_blocks(fine, 2)
  assert merged.block_q == 32 and merged.num_visited < fine.num_visited
  assert np.array_equal(merged.block_mask != 0,
                        (fine.block_mask != 0).reshape(2, 2, 2, 4).any(axis=2))
  q, k, v, g = _qkv(1, 64, 64, 2, 1, 16, jnp.float32, seed=9)
  _compare("gpu", q, k, v, g, merged, mask)
  with pytest.raises(ValueError, match="factor"):
    merge_q_blocks(fine, 3)


def _lower_compiled(backend, layout, mask, dtype, H, **kw):
  """Lowers the compiled (not interpreted) forward + backward for another platform."""
  from pallas_kernels.block_sparse import api, gpu, tpu
  module = {"gpu": gpu, "tpu": tpu}[backend]
  T, N = layout.q_len, 4
  q = jnp.zeros((1, T, N, H), dtype)
  k = jnp.zeros((1, T, 2, H), dtype)
  tiles = gpu.default_tiles(layout.block_q, layout.block_kv, False) if backend == "gpu" else ()
  cfg, aux, sinks = api._prepare(q, k, k, layout, mask, None, None, None, None,
                                 kw.get("segment_ids"), False, tiles)
  attend = api._make_attention(cfg, module.prepare_lists(layout), module)

  def f(q, k, v):
    out, pull = jax.vjp(lambda q, k, v: attend(q, k, v, aux, sinks)[0], q, k, v)
    return pull(out)
  platform = "cuda" if backend == "gpu" else "tpu"
  return jax.jit(f).trace(q, k, k).lower(lowering_platforms=(platform,)).as_text()


def test_compiled_gpu_kernels_lower_to_triton():
  # Compiled tiles (sub-block backward tiles), head_dim padding 96 -> 128, GQA,
  # per-head layouts with full and partial blocks.
  mask = S2Like(block=64, local_blocks=1, vert_stride=2)
  text = _lower_compiled("gpu", mask.block_layout(256, 256, 64, 64, 4), mask, jnp.bfloat16, 96)
  assert text.count("custom_call @__gpu$xla.gpu.triton") == 3  # forward, dQ, dK/dV


def test_compiled_tpu_kernels_lower_to_mosaic():
  from jax._src.mesh import AbstractDevice, AbstractMesh
  mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice("TPU v5 lite", 1, "tpu"))
  mask = M.Causal() & M.SlidingWindow(200)
  seg = jnp.zeros((1, 512), jnp.int32)
  with jax.sharding.use_abstract_mesh(mesh):
    text = _lower_compiled("tpu", mask.block_layout(512, 512, 128, 128, 4), mask,
                           jnp.bfloat16, 128, segment_ids=seg)
  assert text.count("custom_call @tpu_custom_call") == 3  # forward, dQ, dK/dV
