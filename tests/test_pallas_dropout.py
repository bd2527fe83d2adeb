"""Attention dropout in the block-sparse Pallas kernels (TPU and GPU, interpret mode).

The kernels regenerate each tile's keep mask from per-(batch, head) Threefry
keys (``attnjax.core.dropout``), so with the same key they equal the dense
reference, which draws the mask over [B, N, T, S]: forward and gradients.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import masks as M
from attnjax.block_sparse import api as block_sparse_api
from pallas_kernels.block_sparse import block_sparse_pallas

RATE = 0.25
RNG = jax.random.key(3)


def _qkv(B=2, T=32, S=32, N=4, K=2, H=8):
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  return (jax.random.normal(ks[0], (B, T, N, H)), jax.random.normal(ks[1], (B, S, K, H)),
          jax.random.normal(ks[2], (B, S, K, H)))


def _value_and_grads(attend, q, k, v):
  def loss(q_, k_, v_):
    o = attend(q_, k_, v_)
    w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
    return (o * w).sum(), o
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)


def _reference(q, k, v):
  return attnjax.attention(q, k, v, mask=M.Causal(), implementation="reference",
                           dropout_rate=RATE, dropout_rng=RNG)


def _assert_matches_reference(attend, q, k, v):
  (_, out), grads = _value_and_grads(attend, q, k, v)
  (_, want), want_grads = _value_and_grads(_reference, q, k, v)
  np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)
  for name, g, w in zip("qkv", grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=5e-5, atol=5e-5, err_msg=f"d{name}")
  # dropout did something: the undropped output differs
  plain = attnjax.attention(q, k, v, mask=M.Causal(), implementation="reference")
  assert not np.allclose(out, plain, atol=1e-3)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_attention_pallas_dropout_equals_the_reference(backend, monkeypatch):
  """``attnjax.attention(implementation="pallas", dropout_rate=, dropout_rng=)``, causal GQA,
  on 16 x 16 blocks (GPU: 8-row tiles), so the keys of later tiles are regenerated too."""
  launches = []
  original = block_sparse_api.block_sparse_pallas

  @functools.wraps(original)
  def kernels(query, key, value, layout, **kwargs):
    launches.append(backend)
    layout = M.Causal().block_layout(layout.q_len, layout.kv_len, 16, 16, 1)
    tiles = ((8, 16), (8, 16), (16, 8)) if backend == "gpu" else None
    return original(query, key, value, layout, backend=backend, interpret=True, tiles=tiles,
                    **kwargs)

  monkeypatch.setattr(block_sparse_api, "block_sparse_pallas", kernels)
  q, k, v = _qkv()
  attend = lambda q_, k_, v_: attnjax.attention(q_, k_, v_, mask=M.Causal(),
                                                implementation="pallas", dropout_rate=RATE,
                                                dropout_rng=RNG)
  _assert_matches_reference(attend, q, k, v)
  assert launches


def test_kernels_without_the_key_refuse_dropout():
  q, k, v = _qkv(B=1)
  layout = M.Causal().block_layout(32, 32, 16, 16, 1)
  with pytest.raises(ValueError, match="dropout_rng"):
    block_sparse_pallas(q, k, v, layout, interpret=True, dropout_rate=0.1)


def test_run_time_block_lists_take_dropout_on_every_implementation():
  """block_sparse_attention_indices with dropout: XLA engine, Pallas kernel (interpret) and the
  reference on the lists' visibility draw one mask (forward)."""
  from attnjax.block_sparse import block_sparse_attention_indices
  q, k, v = _qkv(B=1, N=2, K=2)
  idx = jnp.asarray([[[[0, 0], [0, 1], [1, 2], [3, 0]]] * 2], jnp.int32)   # [1, 2, 4, 2]
  cnt = jnp.asarray([[[1, 2, 2, 1]] * 2], jnp.int32)
  run = lambda impl: block_sparse_attention_indices(
      q, k, v, idx, cnt, block_q=8, block_kv=8, mask=M.Causal(), implementation=impl,
      dropout_rate=RATE, dropout_rng=RNG)
  xla, pallas, ref = jax.jit(lambda: tuple(run(i) for i in ("xla", "pallas", "reference")))()
  np.testing.assert_allclose(xla, ref, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(pallas, ref, atol=2e-5, rtol=2e-5)
  plain = block_sparse_attention_indices(q, k, v, idx, cnt, block_q=8, block_kv=8,
                                         mask=M.Causal(), implementation="reference")
  assert np.abs(np.asarray(ref) - np.asarray(plain)).max() > 1e-3   # dropout did something
