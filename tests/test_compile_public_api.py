"""Public entry points compile to real kernels for the device they are placed on.

Each program is traced under ``jax.default_device(<target device>)`` of a
deviceless topology (``pallas_kernels.targets``) and compiled by the real
compiler; the kernels must follow that device (Mosaic custom calls on TPU,
Triton on GPU, no interpret-mode callback), without any private wrapper.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import requires_toolchain

import attnjax
from attnjax import masks
from attnjax.core import placement
from attnjax.layers import MultiHeadAttention
from pallas_kernels import targets as TG
from pallas_kernels.targets import support

S = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16
ONE_TPU_ONE_GPU = ("tpu_v5e", "sm90")


def _grad(fn, argnums=(0, 1, 2)):
  return jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums)


@pytest.mark.parametrize("target", ONE_TPU_ONE_GPU)
def test_attention_default_implementation_compiles_kernels(target):
  requires_toolchain(target)
  spec = S((1, 2048, 4, 128), BF16)
  fn = lambda q, k, v: attnjax.attention(q, k, v, mask=masks.Causal() & masks.SlidingWindow(1024))
  TG.require_kernels(TG.compile_on(target, fn, spec, spec, spec), 1)
  TG.require_kernels(TG.compile_on(target, _grad(fn), spec, spec, spec), 3)


@pytest.mark.parametrize("target", ONE_TPU_ONE_GPU)
def test_s2_attention_default_compiles_kernels(target):
  requires_toolchain(target)
  q = S((1, 4096, 8, 128), BF16)
  kv = S((1, 4096, 2, 128), BF16)
  fn = lambda q, k, v: attnjax.s2_attention(q, k, v, block_size=128, local_blocks=4,
                                            vert_stride=4)
  TG.require_kernels(TG.compile_on(target, fn, q, kv, kv), 1)


@pytest.mark.parametrize("target", ONE_TPU_ONE_GPU)
def test_na2d_and_linear_kernels_compile_when_asked(target):
  requires_toolchain(target)
  x = S((1, 32, 32, 4, 64), BF16)
  na = lambda q, k, v: attnjax.na2d(q, k, v, kernel_size=7, implementation="pallas")
  TG.require_kernels(TG.compile_on(target, na, x, x, x), 1)
  t = S((1, 1024, 4, 64), BF16)
  lin = lambda q, k, v: attnjax.linear_attention(q, k, v, decay="tnl", implementation="pallas")
  TG.require_kernels(TG.compile_on(target, lin, t, t, t), 1)


@pytest.mark.parametrize("target", ONE_TPU_ONE_GPU)
def test_multi_head_attention_layer_compiles_kernels(target):
  requires_toolchain(target)
  layer = MultiHeadAttention(num_heads=4, num_kv_heads=2, qkv_features=512, causal=True,
                             dtype=BF16)
  x = jnp.zeros((1, 1024, 64), BF16)
  params = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)
  fn = lambda p, x: layer.apply(p, x)
  TG.require_kernels(TG.compile_on(target, fn, params, S(x.shape, x.dtype)), 1)
  loss = lambda p, x: jnp.sum(layer.apply(p, x).astype(jnp.float32))
  TG.require_kernels(TG.compile_on(target, jax.grad(loss), params, S(x.shape, x.dtype)), 3)


def test_placement_follows_default_device_not_default_backend():
  requires_toolchain("tpu_v5e")
  tpu = TG.device("tpu_v5e")
  assert jax.default_backend() == "cpu"
  assert placement.target_platform() == "cpu"
  with jax.default_device(tpu):
    assert placement.target_platform() == "tpu"
    assert placement.pallas_backend() == "tpu"
    assert attnjax.default_implementation() == "pallas"
    # a committed CPU array says where the computation runs
    x = jax.device_put(np.ones((2,), np.float32), jax.devices("cpu")[0])
    assert placement.target_platform(x) == "cpu"
    assert attnjax.default_implementation(x) == "xla"
  with jax.default_device("cpu"):
    assert placement.target_platform() == "cpu"
    assert attnjax.default_implementation() == "xla"


def test_cpu_default_still_runs_the_xla_path_without_callbacks():
  spec = S((1, 512, 2, 64), jnp.float32)
  fn = lambda q, k, v: attnjax.attention(q, k, v, mask=masks.Causal())
  text = jax.jit(fn).lower(spec, spec, spec).compile().as_text()
  targets = re.findall(r'custom_call_target="([^"]+)"', text)
  assert not [t for t in targets if "callback" in t or "tpu" in t or "triton" in t], targets


def test_pallas_on_cpu_is_interpret_mode_and_matches_reference():
  key = jax.random.PRNGKey(0)
  q, k, v = (jax.random.normal(kk, (1, 128, 2, 32)) for kk in jax.random.split(key, 3))
  m = masks.Causal() & masks.SlidingWindow(48)
  got = attnjax.attention(q, k, v, mask=m, implementation="pallas")
  want = attnjax.attention(q, k, v, mask=m, implementation="reference")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_support_table_names_known_targets_and_engines():
  assert set(support.COMPILES) == set(support.ENGINES)
  for engine, listed in support.COMPILES.items():
    assert listed <= set(TG.TARGETS), engine
  assert not support.compiles_for("block_sparse", None)
  with pytest.raises(ValueError, match="engine"):
    support.compiles_for("flash", None)
