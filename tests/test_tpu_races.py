"""TPU (Mosaic) Pallas kernels under TPU interpret mode with the race detector on.

Every TPU kernel of the project (block-sparse forward/dq/dkv on static
layouts and on run-time block lists, neighborhood forward/dq/dkv, linear
forward/dq/dkv) runs once here at tiny shapes under
``pltpu.force_tpu_interpret_mode(InterpretParams(detect_races=True,
num_cores_or_threads=2))``: the "parallel" grid dimensions are split over two
simulated cores, every simulated load/store/DMA is checked by JAX's
happens-before race detector, and the forward output and the gradients are
compared with the dense oracle.

How races are reported (jax 0.10.2, jax._src.pallas.mosaic.interpret): each
interpreted pallas_call builds a fresh module-level
``interpret_pallas_call.races`` (a ``RaceDetectionState``) when its simulated
shared memory is initialised; a race prints "RACE DETECTED ..." and sets
``races_found``. Because the next kernel replaces that object, a fwd+bwd
program (3 kernels) would only leave the last kernel's state behind, so the
``detector`` fixture substitutes a recording subclass and the tests check
every kernel's state. The forced params override the kernels' own
``interpret=pltpu.InterpretParams()`` (pallas_call uses the context value
first); the recorder also checks that each state was built for 2 cores and
that both simulated cores processed grid points, so a kernel silently running
with its own single-core, race-detection-off params would fail the test.

``test_detector_catches_planted_race`` shows the detector works: a kernel
reading a VMEM buffer before waiting on the DMA that fills it is reported
(and the same kernel with the wait first is not).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc

import pallas_kernels.linear as linear_kernels
from attnjax import masks as M
from attnjax import reference_attention
from attnjax.block_sparse.sparse import block_sparse_attention_indices
from attnjax.linear.api import linear_attention
from attnjax.masks.neighborhood import check_neighborhood_args
from attnjax.neighborhood import neighborhood_attention
from pallas_kernels.block_sparse import block_sparse_pallas, block_sparse_pallas_indices
from pallas_kernels.neighborhood.ops import na_pallas

CORES = 2
TOL = 1e-5


class _Detector:
  """Collects the RaceDetectionState of every interpreted kernel and the cores used."""

  def __init__(self):
    self.states = []
    self.cores_seen = set()

  def _record(self, token, grid_point, core):
    # called by the interpreter for every grid point, threading its ordering token
    del grid_point
    self.cores_seen.add(int(core))
    return token

  def params(self, **kw):
    return pltpu.InterpretParams(detect_races=True, num_cores_or_threads=CORES,
                                 grid_point_recorder=self._record, **kw)

  def mode(self, **kw):
    return pltpu.force_tpu_interpret_mode(self.params(**kw))

  @property
  def races_found(self):
    return any(s.races_found for s in self.states)

  def assert_clean(self, num_kernels):
    assert len(self.states) == num_kernels, (
        f"expected {num_kernels} interpreted kernels, the detector saw {len(self.states)}")
    assert all(s.num_cores == CORES for s in self.states), \
        [s.num_cores for s in self.states]
    assert self.cores_seen == set(range(CORES)), self.cores_seen
    # the detector saw the kernels' memory traffic (loads/stores/DMAs were checked)
    assert all(s.reads and s.writes for s in self.states)
    assert not self.races_found, "race detected (see the RACE DETECTED lines on stdout)"


@pytest.fixture
def detector(monkeypatch):
  det = _Detector()

  class Recording(ipc.RaceDetectionState):
    def __init__(self, *a, **kw):
      super().__init__(*a, **kw)
      det.states.append(self)

  ipc.reset_tpu_interpret_mode_state()
  monkeypatch.setattr(ipc, "RaceDetectionState", Recording)
  yield det
  ipc.reset_tpu_interpret_mode_state()


def _normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _close(name, got, want, tol=TOL):
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=tol, rtol=tol, err_msg=name)


def _out_and_grads(fn, args, cot):
  """fn(*args) (a tuple of outputs) and the vjp of cot, in one jitted program."""
  def go(*a):
    res, pull = jax.vjp(fn, *a)
    return res, pull(cot)
  return jax.block_until_ready(jax.jit(go)(*args))


def _compare(names, got, want, tol=TOL):
  (res, grads), (r_res, r_grads) = got, want
  for name, a, b in zip(names, tuple(res) + tuple(grads), tuple(r_res) + tuple(r_grads)):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    assert np.isfinite(np.asarray(a)).all(), name
    _close(name, a, b, tol)


# -- the detector itself -----------------------------------------------------------
def _dma_then_read(read_before_wait):
  def kernel(x_hbm, o_ref, buf, sem):
    copy = pltpu.make_async_copy(x_hbm, buf, sem)
    copy.start()
    if read_before_wait:
      o_ref[...] = buf[...] * 2.0          # the DMA may not have landed yet: a race
      copy.wait()
    else:
      copy.wait()
      o_ref[...] = buf[...] * 2.0
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
      in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec(memory_space=pltpu.VMEM),
      scratch_shapes=[pltpu.VMEM((8, 128), jnp.float32), pltpu.SemaphoreType.DMA(())])


@pytest.mark.parametrize("dma_mode", ["on_wait", "eager"])
def test_detector_catches_planted_race(detector, capsys, dma_mode):
  x = _normal((8, 128), 0)
  with detector.mode(dma_execution_mode=dma_mode):
    ok = jax.block_until_ready(_dma_then_read(False)(x))
  assert len(detector.states) == 1 and not detector.races_found
  _close("ordered copy", ok, 2.0 * x, 0.0)
  assert "RACE DETECTED" not in capsys.readouterr().out
  with detector.mode(dma_execution_mode=dma_mode):
    jax.block_until_ready(_dma_then_read(True)(x))
  assert len(detector.states) == 2
  assert detector.states[1].races_found, "the planted read-before-wait race was not reported"
  assert "RACE DETECTED" in capsys.readouterr().out


# -- block-sparse: static layouts ----------------------------------------------------
def test_block_sparse_static_layout_race_free(detector):
  # Causal GQA (N=4 over K=2 KV heads) with return_lse: full, partial and skipped
  # blocks; 2 x 4 x 4 "parallel" grid points per kernel over the 2 cores.
  B, T, N, K, H, blk = 1, 64, 4, 2, 16, 16
  q, k, v = _normal((B, T, N, H), 1), _normal((B, T, K, H), 2), _normal((B, T, K, H), 3)
  cot = (_normal((B, T, N, H), 4), _normal((B, T, N), 5))
  mask = M.Causal()
  layout = mask.block_layout(T, T, blk, blk, N)
  assert layout.num_full and layout.num_visited < layout.block_mask.size
  kern = lambda q, k, v: block_sparse_pallas(q, k, v, layout, mask=mask, backend="tpu",
                                             return_lse=True)
  ref = lambda q, k, v: reference_attention(q, k, v, mask=mask, return_lse=True)
  want = _out_and_grads(ref, (q, k, v), cot)
  with detector.mode():
    got = _out_and_grads(kern, (q, k, v), cot)
  detector.assert_clean(3)   # forward, dq, dkv
  _compare(("out", "lse", "dq", "dk", "dv"), got, want)


def test_block_sparse_segments_window_race_free(detector):
  # Sliding window with segment ids and explicit positions, B=2 (partial blocks
  # evaluate the mask element-wise from the position/segment side inputs).
  B, T, N, H, blk = 2, 48, 1, 16, 16
  q, k, v = _normal((B, T, N, H), 6), _normal((B, T, N, H), 7), _normal((B, T, N, H), 8)
  cot = (_normal((B, T, N, H), 9),)
  mask = M.SlidingWindow(40, 16)
  layout = mask.block_layout(T, T, blk, blk)
  seg = jnp.asarray(np.stack([np.repeat([0, 1], [20, 28]), np.repeat([0, 1, 2], [30, 14, 4])]),
                    jnp.int32)
  pos = jnp.tile(jnp.arange(T, dtype=jnp.int32)[None], (B, 1))
  kw = dict(mask=mask, segment_ids=seg, q_positions=pos, k_positions=pos)
  kern = lambda q, k, v: (block_sparse_pallas(q, k, v, layout, backend="tpu", **kw),)
  ref = lambda q, k, v: (reference_attention(q, k, v, **kw),)
  want = _out_and_grads(ref, (q, k, v), cot)
  with detector.mode():
    got = _out_and_grads(kern, (q, k, v), cot)
  detector.assert_clean(3)
  _compare(("out", "dq", "dk", "dv"), got, want)


# -- block-sparse: run-time block lists ---------------------------------------------
def test_block_sparse_runtime_lists_race_free(detector):
  # Per-batch, per-KV-head random lists with counts below k (some rows empty),
  # Causal inside the visited blocks on shifted per-batch query positions.
  B, T, N, K, H, blk, nb, kmax = 2, 64, 4, 2, 16, 16, 4, 3
  rng = np.random.default_rng(11)
  idx = np.stack([rng.permutation(nb)[:kmax] for _ in range(B * K * nb)])
  idx = idx.reshape(B, K, nb, kmax).astype(np.int32)
  counts = rng.integers(0, kmax + 1, (B, K, nb)).astype(np.int32)
  counts[0, 0, 0] = 0
  idx = jnp.asarray(np.where(np.arange(kmax) < counts[..., None], idx, 10 * nb + 3))
  counts = jnp.asarray(counts)
  q, k, v = _normal((B, T, N, H), 12), _normal((B, T, K, H), 13), _normal((B, T, K, H), 14)
  cot = (_normal((B, T, N, H), 15), _normal((B, T, N), 16))
  q_pos = jnp.arange(T, dtype=jnp.int32)[None] + jnp.asarray([[0], [7]], jnp.int32)
  kw = dict(block_q=blk, block_kv=blk, return_lse=True, mask=M.Causal(), q_positions=q_pos)
  kern = lambda q, k, v: block_sparse_pallas_indices(q, k, v, idx, counts, backend="tpu", **kw)
  ref = lambda q, k, v: block_sparse_attention_indices(q, k, v, idx, counts,
                                                       implementation="reference", **kw)
  want = _out_and_grads(ref, (q, k, v), cot)
  with detector.mode():
    got = _out_and_grads(kern, (q, k, v), cot)
  detector.assert_clean(3)
  # Rows with no visible key give zeros / lse = -inf in both; compare lse where finite.
  (out, lse), grads = got
  (r_out, r_lse), r_grads = want
  assert np.array_equal(np.isneginf(np.asarray(lse)), np.isneginf(np.asarray(r_lse)))
  assert np.isneginf(np.asarray(lse)).any()
  fin = np.isfinite(np.asarray(r_lse))
  _close("lse", np.asarray(lse)[fin], np.asarray(r_lse)[fin])
  _compare(("out", "dq", "dk", "dv"), ((out,), grads), ((r_out,), r_grads))


# -- neighborhood ------------------------------------------------------------------
@pytest.mark.parametrize("rpb", [False, True], ids=["plain", "rpb"])
def test_neighborhood_race_free(detector, rpb):
  # 2D 8x8, kernel 3x3 (dilation (1, 2)), tiles 4x4 (tq=16), GQA N=2 over K=1;
  # with a relative position bias the backward also writes the per-pair logits
  # gradient that feeds the table's gradient.
  shape, N, K, H = (8, 8), 2, 1, 8
  spatial, ks, ds, cs = check_neighborhood_args(shape, (3, 3), (1, 2), (False, False))
  args = (_normal((1,) + shape + (N, H), 20), _normal((1,) + shape + (K, H), 21),
          _normal((1,) + shape + (K, H), 22))
  if rpb:
    args += (_normal((N,) + tuple(2 * a - 1 for a in ks), 23),)
  cot = (_normal((1,) + shape + (N, H), 24), _normal((1,) + shape + (N,), 25))
  ref = lambda q, k, v, *r: neighborhood_attention(
      q, k, v, kernel_size=ks, dilation=ds, is_causal=cs, rpb=r[0] if r else None,
      implementation="reference", return_lse=True)
  kern = lambda q, k, v, *r: na_pallas(
      q, k, v, kernel_size=ks, dilation=ds, is_causal=cs, scale=H ** -0.5, tile_shape=(4, 4),
      rpb=r[0] if r else None, backend="tpu")
  want = _out_and_grads(ref, args, cot)
  with detector.mode():
    got = _out_and_grads(kern, args, cot)
  detector.assert_clean(3)
  names = ("out", "lse", "dq", "dk", "dv") + (("drpb",) if rpb else ())
  _compare(names, got, want)


# -- linear ------------------------------------------------------------------------
def test_linear_race_free(detector):
  # TNL decay, GQA (N=4 over K=2), an initial state and the final state returned:
  # fwd, dq and dkv (with d initial_state) kernels; T=32 in chunks of 8.
  B, T, N, K, H, chunk = 1, 32, 4, 2, 8, 8
  q, k, v = _normal((B, T, N, H), 30), _normal((B, T, K, H), 31), _normal((B, T, K, H), 32)
  s0 = 0.1 * _normal((B, N, H, H), 33)
  slopes = jnp.linspace(0.05, 0.5, N)
  cot = (_normal((B, T, N, H), 34), _normal((B, N, H, H), 35))

  def fn(impl):
    return lambda q, k, v, s0, slopes: linear_attention(
        q, k, v, decay=slopes, chunk_size=chunk, initial_state=s0, return_state=True,
        implementation=impl)

  args = (q, k, v, s0, slopes)
  want = _out_and_grads(fn("reference"), args, cot)
  previous = linear_kernels._CHOICE["variant"]
  linear_kernels.set_variant("tpu")
  try:
    with detector.mode():
      got = _out_and_grads(fn("pallas"), args, cot)
  finally:
    linear_kernels.set_variant(previous)
  detector.assert_clean(3)
  _compare(("out", "state", "dq", "dk", "dv", "ds0", "dslopes"), got, want, tol=2e-5)
