"""The block-sparse Pallas kernels compile with the real TPU and GPU compilers.

Programs are traced under the target's device (``pallas_kernels.targets``)
through the public API, so block sizes, GPU tiles, VMEM limits and list chunks
are the ones a user on that chip gets; each gradient program holds the
forward, dQ and dK/dV kernels. Every target compiles the representative case;
the sweep over head dims, dtypes, score variants, segment ids, run-time lists
and lengths runs on one TPU generation and on the smaller GPU (sm80) (per-batch
lengths with a bias and a mask array on tpu_v5e and sm90), and the
resource model is checked against the compilers at its boundaries.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import requires_toolchain

import attnjax
from attnjax import masks as M
from attnjax.block_sparse.sparse import block_sparse_attention_indices
from pallas_kernels import targets as TG
from pallas_kernels.block_sparse import block_sparse_pallas
from pallas_kernels.block_sparse import resources as R
from pallas_kernels.targets import budgets as BG

S = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16
SWEEP = ("tpu_v5e", "sm80")


def _grad(fn):
  return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), (0, 1, 2))


def _specs(T, H, dtype=BF16, N=4, K=2, B=1):
  return S((B, T, N, H), dtype), S((B, T, K, H), dtype)


def _window(q, k, v):
  return attnjax.attention(q, k, v, mask=M.Causal() & M.SlidingWindow(1024))


@pytest.mark.parametrize("target", TG.TARGETS)
def test_sliding_window_gqa_forward_and_backward_compile(target):
  requires_toolchain(target)
  q, kv = _specs(8192, 128)
  TG.require_kernels(TG.compile_on(target, _grad(_window), q, kv, kv), 3)


@pytest.mark.parametrize("target,H,dtype", [
    ("tpu_v5e", 64, jnp.float32), ("tpu_v5e", 256, BF16), ("sm80", 96, BF16),
    ("sm80", 256, jnp.float32), ("tpu_v5e", 96, jnp.float32)])
def test_head_dims_and_dtypes_compile(target, H, dtype):
  requires_toolchain(target)
  q, kv = _specs(2048, H, dtype)
  TG.require_kernels(TG.compile_on(target, _grad(_window), q, kv, kv), 3)


@pytest.mark.parametrize("target", SWEEP)
def test_segments_and_softcap_compile(target):
  requires_toolchain(target)
  q, kv = _specs(2048, 128, B=2)
  seg = jnp.repeat(jnp.arange(4, dtype=jnp.int32), 512)[None].repeat(2, 0)
  fn = lambda q, k, v: attnjax.attention(q, k, v, mask=M.Causal(), segment_ids=seg,
                                         score=attnjax.scores.SoftCap(30.0))
  TG.require_kernels(TG.compile_on(target, _grad(fn), q, kv, kv), 3)


@pytest.mark.parametrize("target", SWEEP)
def test_learned_sinks_and_s2_compile(target):
  requires_toolchain(target)
  q, kv = _specs(4096, 128)
  sinks = jnp.zeros((4,), jnp.float32)
  fn = lambda q, k, v: attnjax.s2_attention(q, k, v, score=attnjax.scores.Sink(sinks))
  TG.require_kernels(TG.compile_on(target, _grad(fn), q, kv, kv), 3)


@pytest.mark.parametrize("target", SWEEP)
def test_run_time_block_lists_compile(target):
  requires_toolchain(target)
  q, kv = _specs(4096, 128)
  nq = 4096 // 128
  # q-block i visits k-blocks i, i-1, ..., i-7 (reflected at 0: distinct per row)
  idx = jnp.abs(jnp.arange(nq)[:, None] - jnp.arange(8)).astype(jnp.int32)
  idx = jnp.broadcast_to(idx, (1, 2, nq, 8))                 # [B, K, nq, 8]
  fn = lambda q, k, v: block_sparse_attention_indices(
      q, k, v, idx, block_q=128, block_kv=128, mask=M.Causal(), implementation="pallas")
  TG.require_kernels(TG.compile_on(target, _grad(fn), q, kv, kv), 3)


@pytest.mark.parametrize("target", SWEEP)
def test_chooser_at_512_and_128k_compiles(target):
  requires_toolchain(target)
  q, kv = _specs(512, 128)
  TG.require_kernels(TG.compile_on(target, _grad(_window), q, kv, kv), 3)
  q, kv = _specs(131072, 128, N=2, K=1)
  TG.require_kernels(TG.compile_on(target, _window, q, kv, kv), 1)


@pytest.mark.parametrize("target", ["tpu_v5e", "sm90"])
def test_lengths_bias_gradient_and_mask_array_compile(target):
  """Per-batch lengths (scalar-prefetched / kernel inputs), a differentiated key bias
  (tile reads + the dS output) and a [B, 1, T, S] boolean mask array (int8 tiles)."""
  requires_toolchain(target)
  q, kv = _specs(1024, 128, B=2)
  bias = S((2, 1, 1, 1024), BF16)
  keep = S((2, 1, 1024, 1024), jnp.bool_)
  lens = S((2,), jnp.int32)

  def fn(q, k, v, bias, keep, q_len, kv_len):
    def loss(q, k, v, bias):
      out = attnjax.attention(q, k, v, mask=keep, bias=bias, query_seq_lengths=q_len,
                              key_value_seq_lengths=kv_len)
      return jnp.sum(out.astype(jnp.float32))
    return jax.grad(loss, (0, 1, 2, 3))(q, k, v, bias)
  TG.require_kernels(TG.compile_on(target, fn, q, kv, kv, bias, keep, lens, lens), 3)


@pytest.mark.parametrize("target", ["tpu_v5e", "sm90"])
def test_dropout_compiles(target):
  """Attention dropout: Threefry rounds (uint32 adds, xors, shifts) in the forward, dQ and
  dK/dV kernels; the per-(batch, head) keys scalar-prefetched (TPU) or a kernel input (GPU)."""
  requires_toolchain(target)
  q, kv = _specs(256, 64)

  def fn(q, k, v, rng):
    return _grad(lambda q, k, v: attnjax.attention(q, k, v, mask=M.Causal(), dropout_rate=0.1,
                                                   dropout_rng=rng))(q, k, v)
  TG.require_kernels(TG.compile_on(target, fn, q, kv, kv, S((2,), jnp.uint32)), 3)


def test_lists_longer_than_smem_are_cut_into_kernel_calls():
  """128k keys in 128-blocks: 1024 x 1025 causal list words, four times SMEM."""
  requires_toolchain("tpu_v4")
  T = 131072
  q = S((1, T, 1, 64), BF16)
  layout = M.Causal().block_layout(T, T, 128, 128, 1)
  fn = lambda q, k, v: attnjax.block_sparse_attention(q, k, v, layout, implementation="pallas")
  fwd = TG.require_kernels(TG.compile_on("tpu_v4", fn, q, q, q), 2)
  grad = TG.require_kernels(TG.compile_on("tpu_v4", _grad(fn), q, q, q), 6)
  assert fwd.kernel_calls > 1 and grad.kernel_calls > 3


def test_large_blocks_raise_the_vmem_limit_and_compile():
  """(1024, 2048) blocks at H=256 need more than v5e's 16 MiB default scoped VMEM."""
  requires_toolchain("tpu_v5e")
  T = 2048
  q = S((1, T, 2, 256), BF16)
  layout = M.Causal().block_layout(T, T, 1024, 2048, 1)
  fn = lambda q, k, v: block_sparse_pallas(q, k, v, layout)
  TG.require_kernels(TG.compile_on("tpu_v5e", _grad(fn), q, q, q), 3)


def test_blocks_too_big_for_vmem_are_refused_before_compiling():
  requires_toolchain("tpu_v4")
  T = 8192
  q = S((1, T, 2, 256), BF16)
  layout = M.Causal().block_layout(T, T, 2048, 4096, 1)
  fn = lambda q, k, v: block_sparse_pallas(q, k, v, layout)
  with pytest.raises(ValueError, match=r"block_q=2048, block_kv=4096.*MiB of VMEM"):
    TG.compile_on("tpu_v4", fn, q, q, q)


def test_forced_gpu_tiles_too_big_are_refused_with_the_numbers():
  requires_toolchain("sm80")
  q = S((1, 1024, 2, 256), BF16)
  layout = M.Causal().block_layout(1024, 1024, 128, 128, 1)
  fn = lambda q, k, v: block_sparse_pallas(q, k, v, layout, tiles=((128, 128),) * 3)
  with pytest.raises(ValueError, match=r"tiles.*shared memory.*166912"):
    TG.compile_on("sm80", fn, q, q, q)


# -- the model without compiling ------------------------------------------------------
@pytest.mark.parametrize("target", [t for t in TG.TARGETS if TG.platform_of(t) == "tpu"])
@pytest.mark.parametrize("T", [512, 8192, 131072])
@pytest.mark.parametrize("H", [64, 128, 256])
def test_tpu_chooser_picks_blocks_that_fit_the_default_limit(target, T, H):
  bq, bk = R.choose_tpu_blocks(T, T, H, H, 2, target)
  assert T % bq == 0 and T % bk == 0 and bq % 8 == 0 and bk % 128 == 0
  need = R.tpu_need_bytes(bq, bk, H, H, 2, 2, 0)
  assert max(need.values()) <= BG.budget(target).vmem_bytes


class _Cfg:
  """The fields of a KernelConfig the chunker reads."""

  def __init__(self, limit, heads=2, B=1, batched=False, N=2, dropout_rate=0.0):
    self.smem_list_entries, self.layout_heads, self.B, self.lists_batched = limit, heads, B, batched
    self.N, self.dropout_rate = N, dropout_rate


def test_list_chunks_cover_every_block_once_within_the_limit():
  chunks = R.list_chunks(_Cfg(limit=1000), n=100, width=9)       # 2 heads x 10 words per block
  assert chunks[0][0] == 0 and chunks[-1][1] == 100
  assert all(a == b for (_, a), (b, _) in zip(chunks, chunks[1:]))
  assert all(R.list_entries(b - a, 9, 2) <= 1000 for a, b in chunks)
  assert R.list_chunks(_Cfg(limit=0), 100, 9) == [(0, 100)]
  with pytest.raises(ValueError, match="SMEM"):
    R.list_chunks(_Cfg(limit=15), 100, 9)
  # dropout keys [B, N, 2] share the prefetch: 1000 - 2*2*50 words leave 800 for the lists
  drop = R.list_chunks(_Cfg(limit=1000, B=2, N=50, dropout_rate=0.1), n=100, width=9)
  assert all(R.list_entries(b - a, 9, 2) <= 800 for a, b in drop) and len(drop) > len(chunks)


def test_gpu_tile_chooser_fits_every_head_dim_on_sm80():
  budget = BG.budget("sm80")
  for H in (64, 96, 128, 256):
    for dtype in (BF16, jnp.float32):
      cfg = _KernelCfg(H)
      tiles = R.choose_gpu_tiles(cfg, budget, dtype)
      need = R.gpu_shared_need(cfg, dtype, tiles)
      assert max(need.values()) <= budget.shared_bytes, (H, dtype, tiles, need)


@dataclasses.dataclass
class _KernelCfg:
  H: int
  block_q: int = 128
  block_kv: int = 128

  @property
  def Hv(self):
    return self.H


def test_chunked_lists_match_one_call_in_tpu_interpret_mode(monkeypatch):
  """The chunked forward/backward equal the reference (lists cut into 2 calls each)."""
  fit = R.fit
  monkeypatch.setattr(R, "fit", lambda cfg, *a, **k: dataclasses.replace(
      fit(cfg, *a, **k), smem_list_entries=10))   # 2 rows per call
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (1, 64, 2, 16))
  k = jax.random.normal(keys[1], (1, 64, 1, 16))
  v = jax.random.normal(keys[2], (1, 64, 1, 16))
  layout = M.Causal().block_layout(64, 64, 16, 16, 1)   # 4 x 4 blocks, 5 words per list row
  run = lambda q, k, v: block_sparse_pallas(q, k, v, layout, backend="tpu", interpret=True)
  ref = lambda q, k, v: attnjax.attention(q, k, v, mask=M.Causal(), implementation="reference")
  np.testing.assert_allclose(run(q, k, v), ref(q, k, v), atol=2e-5, rtol=2e-5)
  got = _grad(run)(q, k, v)
  want = _grad(ref)(q, k, v)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5)


class _FakeGpu:
  platform = "gpu"

  def __init__(self, cc):
    self.compute_capability = cc


def test_gpu_targets_map_by_exact_compute_capability():
  assert BG.target_of_device(_FakeGpu("8.0")) == "sm80"
  assert BG.target_of_device(_FakeGpu("9.0")) == "sm90"
  for cc in ("8.6", "8.9", "7.5", "10.0"):     # ~100 KiB shared memory, or unknown
    assert BG.target_of_device(_FakeGpu(cc)) is None
