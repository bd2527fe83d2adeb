"""A NaN in the inputs reaches exactly the outputs that read it, on every fast path.

Fully masked rows still give zeros (lse = -inf); a row that sees a NaN key,
query or value entry gives NaN, as the dense reference and jax.nn do.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import attnjax
from attnjax import masks


def _qkv(T, S, N=2, K=1, H=16, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(ks[0], (1, T, N, H)), jax.random.normal(ks[1], (1, S, K, H)),
          jax.random.normal(ks[2], (1, S, K, H)))


def _nan_rows(out):
  return np.isnan(np.asarray(out, np.float32)).any(-1)


def test_one_nan_key_at_1024_makes_every_row_that_sees_it_nan():
  q, k, v = _qkv(1024, 1024, N=1, K=1)
  k = k.at[0, 3, 0, 0].set(jnp.nan)
  got = attnjax.attention(q, k, v, implementation="xla")
  want = attnjax.attention(q, k, v, implementation="reference")
  assert _nan_rows(want).all()
  np.testing.assert_array_equal(_nan_rows(got), _nan_rows(want))


MASKS = {
    "none": None,
    "causal": masks.Causal(),
    "window": masks.Causal() & masks.SlidingWindow(24),
    "sink_window": masks.SinkWindow(num_sink=4, window=16),
}


@functools.partial(jax.jit, static_argnames="name")
def _xla_and_reference(q, k, v, name):
  """(xla, reference) outputs under MASKS[name]: one program per (mask, shape), so the
  examples that only move the NaN reuse it."""
  return tuple(attnjax.attention(q, k, v, mask=MASKS[name], implementation=impl)
               for impl in ("xla", "reference"))


@given(name=st.sampled_from(sorted(MASKS)), where=st.sampled_from(["q", "k", "v"]),
       pos=st.integers(0, 95), seq=st.sampled_from([(96, 96), (32, 96)]))
def test_nan_pattern_equals_the_reference(name, where, pos, seq):
  T, S = seq
  q, k, v = _qkv(T, S)
  arrays = {"q": q, "k": k, "v": v}
  x = arrays[where]
  arrays[where] = x.at[0, pos % x.shape[1], 0, 1].set(jnp.nan)
  got, want = _xla_and_reference(arrays["q"], arrays["k"], arrays["v"], name)
  np.testing.assert_array_equal(_nan_rows(got), _nan_rows(want))
  fin = ~_nan_rows(want)
  np.testing.assert_allclose(np.asarray(got)[fin], np.asarray(want)[fin], atol=2e-5)


def test_fully_masked_rows_stay_zero_next_to_nan_rows():
  q, k, v = _qkv(64, 64, N=1, K=1)
  k = k.at[0, 40, 0, 0].set(jnp.nan)
  rows = np.arange(64)[:, None]
  vis = np.tril(np.ones((64, 64), bool)) & (rows != 5) & (rows != 0)   # rows 0 and 5 see nothing
  out, lse = attnjax.attention(q, k, v, mask=jnp.asarray(vis)[None, None], return_lse=True,
                               implementation="xla")
  assert np.all(np.asarray(out[0, 0]) == 0) and np.all(np.asarray(out[0, 5]) == 0)
  assert np.all(np.asarray(lse[0, 0]) == -np.inf)
  nan_rows = _nan_rows(out)[0, :, 0]
  np.testing.assert_array_equal(np.nonzero(nan_rows)[0], np.arange(40, 64))


@pytest.mark.parametrize("fn", ["s2", "sliding_window", "dot_product"])
def test_family_entry_points_propagate_nan(fn):
  q, k, v = _qkv(256, 256, N=2, K=2)
  k = k.at[0, 70, 1, 2].set(jnp.nan)
  if fn == "s2":
    out = attnjax.s2_attention(q, k, v, block_size=32, local_blocks=2, vert_stride=2,
                               implementation="xla")
  elif fn == "sliding_window":
    out = attnjax.sliding_window_attention(q, k, v, left=63, implementation="xla")
  else:
    out = attnjax.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  rows = _nan_rows(out)[0]            # [T, N]
  assert not rows[:70].any()          # no row before the NaN key sees it
  assert not rows[:, 0].any()         # head 0 reads KV head 0 only
  assert rows[70, 1]                  # the key's own row sees it


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_pallas_kernels_propagate_nan_and_keep_empty_rows_zero(backend):
  """Interpret mode runs the kernels' own online softmax (static and run-time lists)."""
  from pallas_kernels.block_sparse import block_sparse_pallas, block_sparse_pallas_indices  # pylint: disable=g-import-not-at-top
  q, k, v = _qkv(64, 64, N=2, K=1)
  k = k.at[0, 40, 0, 3].set(jnp.nan)
  mask = masks.Causal() & masks.SlidingWindow(15)
  layout = mask.block_layout(64, 64, 16, 16, 1)
  got = block_sparse_pallas(q, k, v, layout, backend=backend, interpret=True)
  want = attnjax.attention(q, k, v, mask=mask, implementation="reference")
  np.testing.assert_array_equal(_nan_rows(got), _nan_rows(want))
  assert _nan_rows(want)[0, 40:56].all() and not _nan_rows(want)[0, :40].any()
  idx = jnp.maximum(jnp.arange(4)[:, None] - jnp.arange(2)[None], 0).astype(jnp.int32)
  counts = jnp.minimum(jnp.arange(4) + 1, 2).astype(jnp.int32)
  got = block_sparse_pallas_indices(q, k, v, idx[None, None], counts[None, None], block_q=16,
                                    block_kv=16, mask=mask, backend=backend, interpret=True)
  np.testing.assert_array_equal(_nan_rows(got), _nan_rows(want))


@pytest.mark.parametrize("path", ["xla", "pallas_tpu", "pallas_gpu"])
def test_nan_reaches_the_gradients_of_the_rows_that_see_it(path):
  from pallas_kernels.block_sparse import block_sparse_pallas  # pylint: disable=g-import-not-at-top
  q, k, v = _qkv(64, 64, N=1, K=1)
  k = k.at[0, 40, 0, 3].set(jnp.nan)
  mask = masks.Causal()
  if path == "xla":
    fn = lambda q, k, v: attnjax.attention(q, k, v, mask=mask, implementation="xla")
  else:
    layout = mask.block_layout(64, 64, 16, 16, 1)
    fn = lambda q, k, v: block_sparse_pallas(q, k, v, layout, backend=path[7:], interpret=True)
  dq = jax.grad(lambda q: jnp.sum(fn(q, k, v)))(q)
  # every row that sees the NaN key has a NaN gradient (rows before it may too: a dense
  # matmul, the reference's and jax.nn's, multiplies the NaN key by their zero weights)
  assert _nan_rows(dq)[0, 40:].all()


def test_neighborhood_pallas_propagates_nan():
  q, k, v = _qkv(64, 64, N=2, K=2)
  k = k.at[0, 30, 1, 0].set(jnp.nan)
  got = attnjax.na1d(q, k, v, kernel_size=7, implementation="pallas")
  want = attnjax.na1d(q, k, v, kernel_size=7, implementation="reference")
  np.testing.assert_array_equal(_nan_rows(got), _nan_rows(want))
  assert _nan_rows(want)[0, 27:34, 1].all() and not _nan_rows(want)[0, :, 0].any()
