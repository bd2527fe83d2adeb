"""The linear-attention Pallas kernels compile for every listed target through the public API.

Each program is `attnjax.linear_attention(..., implementation="pallas")` (or
`jax.value_and_grad` of its sum, which compiles the forward kernel and every
backward kernel of the custom VJP in one program) traced under a deviceless
target device (`pallas_kernels.targets.compile_on`) and compiled by the real
Mosaic or Triton compiler. Kernel counts: forward 1; forward + backward 3 on
TPU (forward, dq, dk/dv) and 4 on GPU (forward, dq, dk, dv).

Every listed target gets the main case (TNL decay, bfloat16, head dim 64,
GQA with N=4, K=2); the dtype / head-dim / normalisation / decay sweep runs
on one TPU and one GPU generation, the 128K-token forward once per platform.
Configurations too big for a target are refused with a ValueError before
any compile.
"""
import inspect
import re

import jax
import jax.numpy as jnp
import pytest
from conftest import requires_toolchain

import attnjax
from pallas_kernels import targets as TG
from pallas_kernels.targets import budgets, support

S = jax.ShapeDtypeStruct
LINEAR_TARGETS = tuple(t for t in TG.TARGETS if t in support.COMPILES["linear"])
SWEEP_TARGETS = ("tpu_v5e", "sm90")
BOTH = {"tpu": 3, "gpu": 4}  # kernels in a forward + backward program


def _specs(t=8192, n=4, kh=2, h=64, dtype=jnp.bfloat16):
  return S((1, t, n, h), dtype), S((1, t, kh, h), dtype), S((1, t, kh, h), dtype)


def _linear(**kw):
  return lambda q, k, v: attnjax.linear_attention(q, k, v, implementation="pallas", **kw)


def _fwd_and_bwd(fn):
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32))
  return jax.value_and_grad(loss, (0, 1, 2))


def _compile_both(target, fn, specs):
  platform = TG.platform_of(target)
  result = TG.require_kernels(TG.compile_on(target, _fwd_and_bwd(fn), *specs), BOTH[platform])
  if platform == "gpu":  # Triton kernels, not the Mosaic GPU lowering
    assert result.compiled.as_text().count("__gpu$xla.gpu.triton") == BOTH["gpu"]
  return result


@pytest.mark.parametrize("target", LINEAR_TARGETS)
def test_decay_gqa_forward_and_backward_compile(target):
  requires_toolchain(target)
  _compile_both(target, _linear(decay="tnl"), _specs())


# With the main case: both dtypes, decay off / TNL / per-head slopes, identity
# and elu+1 with normalisation, head dims 64, 96 (padded to the 128-wide
# kernels), 256 (and 97 = 96 + the normaliser column), T = 512 and 8192.
SWEEP = {
    "f32_elu_normalised_per_head_decay_h96_t512": (
        dict(feature_map="elu+1", normalize=True, decay=jnp.linspace(0.01, 0.5, 4)),
        dict(h=96, dtype=jnp.float32, t=512)),
    "bf16_no_decay_h256": (dict(), dict(h=256)),
}


@pytest.mark.parametrize("case", sorted(SWEEP))
@pytest.mark.parametrize("target", SWEEP_TARGETS)
def test_sweep_compiles(target, case):
  requires_toolchain(target)
  kw, shape = SWEEP[case]
  _compile_both(target, _linear(**kw), _specs(**shape))


@pytest.mark.parametrize("target", ("tpu_v6e", "sm90"))
def test_128k_tokens_forward_compiles(target):
  requires_toolchain(target)
  result = TG.compile_on(target, _linear(decay="tnl"), *_specs(t=131072))
  TG.require_kernels(result, 1)


def _trace_on(target, fn, specs):
  with jax.default_device(TG.device(target)):
    jax.eval_shape(fn, *specs)


@pytest.mark.parametrize("target,chunk,h,needs", [
    ("sm90", 256, 128, "registers"),      # [256, 256] scores + [256, 128] tiles per program
    ("sm80", 128, 512, "shared memory"),  # [128, 512] float32 chunk tiles
    ("tpu_v5e", 4096, 128, "VMEM"),
])
def test_too_big_for_the_target_is_a_value_error_with_the_numbers(target, chunk, h, needs):
  requires_toolchain(target)
  fn = _linear(decay="tnl", chunk_size=chunk)
  with pytest.raises(ValueError) as info:
    _trace_on(target, fn, _specs(t=chunk * 2, h=h))
  msg = str(info.value)
  found = re.search(r"chunk_size C=(\d+), features F=(\d+), .* needs about (\d+) bytes of "
                    r"(.+?)[ ,].* more than the (\d+) bytes", msg)
  assert found, msg
  c, f, need, what, limit = found.groups()
  budget = budgets.BUDGETS[target]
  expected = {"registers": 2 * 4 * budget.registers, "shared memory": budget.shared_bytes,
              "VMEM": budget.vmem_bytes}[needs]
  assert (int(c), int(f), int(limit)) == (chunk, h, expected), msg
  assert needs.startswith(what) and int(need) > int(limit), msg


@pytest.mark.parametrize("target", TG.TARGETS)
def test_default_chunk_fits_every_target_up_to_head_dim_256_normalised(target):
  requires_toolchain(target)
  default = inspect.signature(attnjax.linear_attention).parameters["chunk_size"].default
  for h in (64, 128, 256):
    fn = _fwd_and_bwd(_linear(decay="tnl", normalize=True))
    _trace_on(target, fn, _specs(t=2 * default, h=h))   # raises if a kernel cannot fit
