"""The fused neighborhood kernels compile for real on every target, within the resource model.

Programs go through the public API (``attnjax.neighborhood_attention`` /
``na1d`` / ``na2d`` / ``na3d`` with ``implementation="pallas"``), traced under
``jax.default_device(<target device>)`` of a deviceless topology and compiled
by the real compiler (Mosaic on TPU, Triton + ptxas on GPU). The backward
programs are ``jax.grad`` of a sum over q, k, v and rpb, so every pallas_call
of the custom VJP (forward, dq, dk/dv) is compiled.

Every target compiles one representative 2D case with rpb, forward and
backward; the sweep over spatial rank, dtype, head dim, dilation, causal
dimensions and GQA runs on TPU v4 (the least VMEM, and the largest measured
needs of the TPU generations) and on sm_80 (the GPU with the least shared
memory). The resource-model tests check that a configuration
that cannot fit is refused with a ValueError before compiling, and that the
model never prices a kernel below what the compiler allocates: TPU kernels
are compiled with ``vmem_limit_bytes`` set to the model's need (so every TPU
compile here checks it), GPU kernels' shared memory is read back from the
compiled program's thunk listing.
"""
import glob
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import pytest
from conftest import requires_toolchain

import attnjax
from attnjax.plan.neighborhood import pallas_tile_shape
from pallas_kernels import targets as TG
from pallas_kernels.neighborhood import resources as R
from pallas_kernels.neighborhood.ops import na_pallas
from pallas_kernels.targets import budgets

S = jax.ShapeDtypeStruct
BF16, F32 = jnp.bfloat16, jnp.float32
SWEEP_TARGETS = ("tpu_v4", "sm80")
FNS = {1: attnjax.na1d, 2: attnjax.na2d, 3: attnjax.na3d}


def _specs(spatial, N, K, H, dtype, kernel_size, rpb):
  """(q, k, v, rpb-or-None) ShapeDtypeStructs of a [1, *spatial, heads, H] problem."""
  ks = kernel_size if isinstance(kernel_size, tuple) else (kernel_size,) * len(spatial)
  q = S((1,) + spatial + (N, H), dtype)
  kv = S((1,) + spatial + (K, H), dtype)
  bias = S((N,) + tuple(2 * k - 1 for k in ks), dtype) if rpb else None
  return q, kv, kv, bias


def _attend(D, **kw):
  fn = FNS[D]
  return lambda q, k, v, rpb: fn(q, k, v, rpb=rpb, implementation="pallas", **kw)


def _fwd_bwd(attend, rpb):
  """jax.grad of sum(out) over q, k, v (and rpb): forward, dq and dk/dv kernels."""
  argnums = (0, 1, 2, 3) if rpb else (0, 1, 2)
  return jax.grad(lambda *a: jnp.sum(attend(*a).astype(jnp.float32)), argnums)


def _compile_gpu(target, fn, *specs):
  """``TG.compile_on`` for a GPU target, keeping the thunk listing: (result, {kind: bytes}).

  The shared memory of every Triton kernel is read from the compiled
  program's thunk sequence (XLA dump), which the memory analysis lacks.
  """
  dev = TG.device(target)
  sharding = jax.sharding.SingleDeviceSharding(dev)
  placed = [None if s is None else S(s.shape, s.dtype, sharding=sharding) for s in specs]
  with tempfile.TemporaryDirectory() as d:
    start = time.perf_counter()
    with jax.default_device(dev):
      compiled = jax.jit(fn).trace(*placed).lower().compile(compiler_options={"xla_dump_to": d})
    seconds = time.perf_counter() - start
    shared = {}
    for path in glob.glob(f"{d}/*thunk_sequence.txt"):
      with open(path, encoding="utf-8") as f:
        for m in re.finditer(r"na_(fwd|dq|dkv)_gpu\w* .*shared_memory: (\d+) bytes", f.read()):
          shared[m.group(1)] = int(m.group(2))
  text = compiled.as_text()
  result = TG.CompileResult(compiled, seconds, 0, 0,
                            text.count('custom_call_target="__gpu$xla.gpu.triton"'),
                            len(re.findall(r'custom_call_target="[^"]*callback', text)))
  return result, shared


def _tpu_limits(result):
  """{kernel: scoped VMEM limit} the compiled TPU program's Mosaic calls were given."""
  found = {}
  for line in result.compiled.as_text().splitlines():
    # names carry autodiff prefixes: %jvp_na_fwd_tpu_.1, %transpose_jvp_na_dq_tpu__.1
    m = re.search(r'%\S*na_(fwd|dq|dkv)_tpu\S* = .*"scoped_memory_configs":\[\{[^}]*'
                  r'"size":"(\d+)"', line)
    if m:
      found[m.group(1)] = int(m.group(2))
  return found


def _compile(target, D, spatial, N=4, K=2, H=128, dtype=BF16, rpb=True, tile_shape=None, **kw):
  """Compiles fwd + bwd for a target and checks the kernels against the resource model.

  TPU: each kernel was compiled under a scoped VMEM limit equal to the model's
  need (so the compiler needed no more). GPU: each kernel's shared memory is
  at most the model's need, which is within the target's budget.
  """
  specs = _specs(spatial, N, K, H, dtype, kw["kernel_size"], rpb)
  attend = _attend(D, tile_shape=tile_shape, **kw)
  fn = _fwd_bwd(attend, rpb)
  tile = tile_shape or pallas_tile_shape(spatial, _per_dim(kw["kernel_size"], D),
                                         _per_dim(kw.get("dilation", 1), D))
  cfg = R.configure(TG.platform_of(target), target, tile, H, H, dtype, rpb)
  if TG.platform_of(target) == "tpu":
    result = TG.compile_on(target, fn, *specs)
    assert _tpu_limits(result) == dict(zip(R.KINDS, cfg.need))
  else:
    result, shared = _compile_gpu(target, fn, *specs)
    assert set(shared) == set(R.KINDS), shared
    for kind, need in zip(R.KINDS, cfg.need):
      assert shared[kind] <= need <= cfg.budget, (kind, shared, cfg)
  return TG.require_kernels(result, 3)


def _per_dim(x, D):
  return x if isinstance(x, tuple) else (x,) * D


@pytest.mark.parametrize("target", TG.TARGETS)
def test_every_target_compiles_2d_rpb_forward_and_backward(target):
  requires_toolchain(target)
  _compile(target, 2, (32, 32), kernel_size=7)


SWEEP = {  # name -> (D, spatial, H, dtype, rpb, keyword arguments of the API)
    "1d_causal_rpb_f32_h64": (1, (512,), 64, F32, True, dict(kernel_size=9, is_causal=True)),
    "2d_dilation_bf16_h256": (2, (32, 32), 256, BF16, False, dict(kernel_size=5, dilation=2)),
    "3d_causal_time_rpb_bf16_h128": (3, (8, 16, 16), 128, BF16, True,
                                     dict(kernel_size=3, is_causal=(True, False, False))),
    "2d_h96_f32": (2, (16, 32), 96, F32, False, dict(kernel_size=(3, 5))),
}


@pytest.mark.parametrize("name", sorted(SWEEP))
@pytest.mark.parametrize("target", SWEEP_TARGETS)
def test_sweep_compiles_forward_and_backward(target, name):
  requires_toolchain(target)
  D, spatial, H, dtype, rpb, kw = SWEEP[name]
  _compile(target, D, spatial, H=H, dtype=dtype, rpb=rpb, **kw)


# -- the resource model ------------------------------------------------------------
def test_forced_tpu_tile_that_cannot_fit_is_refused_before_compiling():
  # a 32 x 32 tile (1024 queries) with rpb: the dq kernel's [tq, tq] bias and dS
  # blocks alone are 4 MiB each, double-buffered; a v4 has 16 MiB of VMEM
  requires_toolchain("tpu_v4")
  budget, _ = R.budget_bytes("tpu", "tpu_v4")
  need = R.tpu_vmem_bytes("fwd", R.Problem((32, 32), 128, 128, 2, True))
  assert need > budget
  attend = _attend(2, kernel_size=7, tile_shape=(32, 32))
  with pytest.raises(ValueError) as err:
    TG.compile_on("tpu_v4", _fwd_bwd(attend, True), *_specs((64, 64), 4, 2, 128, BF16, 7, True))
  text = str(err.value).replace(",", "")
  assert "fwd kernel with tile_shape (32 32) (1024 queries per tile)" in text
  assert f"needs {need} bytes of VMEM" in text and f"{budget}-byte budget of tpu_v4" in text


def test_block_lists_beyond_tpu_smem_are_refused():
  # 20,000 tiles of a 3D grid visiting 27 key tiles each: three prefetched lists
  # of 540,000 words in the dq kernel; SMEM holds 261,632. (Bisected on v5e: a
  # 3D forward whose two lists total 259,968 words compiles, 261,632 do not.)
  with pytest.raises(ValueError, match=r"block lists of 20,000 tiles .* bytes of SMEM"):
    R.configure("tpu", "tpu_v5e", (2, 8, 8), 128, 128, BF16, True, lists=(20_000, 27, 27))
  smem = budgets.budget("tpu_v5e").smem_bytes
  assert R.tpu_smem_bytes("fwd", (9_088, 27, 27), False) <= smem  # compiles
  assert R.tpu_smem_bytes("fwd", (9_344, 27, 27), False) > smem   # SMEM OOM
  cfg = R.configure("tpu", "tpu_v5e", (2, 8, 8), 128, 128, BF16, True, lists=(2_000, 27, 27))
  assert cfg.target == "tpu_v5e"


def test_forced_gpu_blocks_that_cannot_fit_are_refused_and_the_chooser_fits():
  # H=256 with rpb: 128 x 128 blocks need ~300 KiB of shared memory in dq; an A100
  # block gets 166,912 bytes, so the chooser takes smaller blocks
  requires_toolchain("sm80")
  budget = budgets.budget("sm80").shared_bytes
  big = R.GpuBlocks(128, 128)

  def attend(q, k, v, rpb):
    return na_pallas(q, k, v, kernel_size=(7, 7), dilation=(1, 1), is_causal=(False, False),
                     scale=0.1, tile_shape=(8, 16), rpb=rpb, gpu_blocks=big)[0]

  with pytest.raises(ValueError) as err:
    TG.compile_on("sm80", attend, *_specs((32, 32), 4, 2, 256, BF16, 7, True))
  text = str(err.value).replace(",", "")
  assert "tile_shape (8 16)" in text and "bq=128 bk=128" in text
  assert re.search(r"needs \d+ bytes of shared memory", text) and f"{budget}-byte" in text
  cfg = R.configure("gpu", "sm80", (8, 16), 256, 256, BF16, True)
  assert all(n <= budget for n in cfg.need)
  assert all(b.block_q * b.block_k < 128 * 128 for b in cfg.gpu)
