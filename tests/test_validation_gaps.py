"""Bad input gets a clear ValueError/TypeError naming the argument (the contract's last rule).

Each test was a crash deep inside JAX/NumPy, a silent truncation or a wrong
result before the fix it guards. Shapes are tiny.
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import masks as M
from attnjax.core.precision import Float32AccumulationWarning

IMPLS = ("reference", "xla")
# Every float32 call here also checks that float32 inputs never warn about float64.
pytestmark = pytest.mark.filterwarnings(
    "error::attnjax.core.precision.Float32AccumulationWarning")


def _qkv(T=8, H=4, dtype=jnp.float32):
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  return tuple(jax.random.normal(kk, (1, T, 2, H), dtype) for kk in k)


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_head_dim_is_a_value_error(impl):
  q = jnp.ones((1, 8, 2, 0))
  with pytest.raises(ValueError, match=r"head_dim H must be >= 1.*H=0"):
    attnjax.attention(q, q, q, implementation=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask, what", [("causal", "string 'causal'"),
                                        (M.Causal, r"class Causal \(did you mean Causal"),
                                        (np.ones((8, 8), np.int32), "dtype int32")])
def test_mask_of_the_wrong_kind_names_the_argument(impl, mask, what):
  q, k, v = _qkv()
  with pytest.raises(TypeError, match="mask.*" + what):
    attnjax.attention(q, k, v, mask=mask, implementation=impl)


def test_mask_as_nested_list_of_bools_is_accepted():
  q, k, v = _qkv()
  causal = np.tril(np.ones((8, 8), bool))
  got = attnjax.attention(q, k, v, mask=causal.tolist(), implementation="reference")
  want = attnjax.attention(q, k, v, mask=M.Causal(), implementation="reference")
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale, err, msg", [
    ("0.5", TypeError, "scale must be a positive real number.*str '0.5'"),
    (True, TypeError, "scale must be a positive real number.*bool"),
    (jnp.float32(-1), ValueError, "scale must be finite and positive"),
    (np.float32(-1), ValueError, "scale must be finite and positive"),
    (-1, ValueError, "scale must be finite and positive, got -1"),
    (0.0, ValueError, "scale must be finite and positive"),
    (float("inf"), ValueError, "scale must be finite and positive, got inf"),
    (float("nan"), ValueError, "scale must be finite and positive, got nan"),
])
def test_bad_concrete_scale(impl, scale, err, msg):
  q, k, v = _qkv()
  with pytest.raises(err, match=msg):
    attnjax.attention(q, k, v, scale=scale, implementation=impl)


def test_traced_scale_is_not_checked_but_used():
  """A traced scale has no value at trace time: it is passed through (documented)."""
  q, k, v = _qkv()
  f = jax.jit(lambda s: attnjax.attention(q, k, v, scale=s, implementation="reference"))
  np.testing.assert_allclose(f(jnp.float32(0.3)),
                             attnjax.attention(q, k, v, scale=0.3, implementation="reference"),
                             atol=1e-6)
  assert f(jnp.float32(-1.0)).shape == q.shape


@pytest.mark.parametrize("make, what", [
    (lambda: M.SlidingWindow(2 ** 40), "SlidingWindow left=1099511627776"),
    (lambda: M.SlidingWindow(left=2 ** 62), "SlidingWindow left=4611686018427387904"),
    (lambda: M.SlidingWindow(0, 2 ** 31), "SlidingWindow right=2147483648"),
    (lambda: M.SinkWindow(2, 2 ** 40), "SinkWindow window=1099511627776"),
    (lambda: M.KeyRange(0, 2 ** 40), "KeyRange lo=0, hi=1099511627776"),
])
def test_window_beyond_int32_is_a_clear_value_error(make, what):
  with pytest.raises(ValueError, match=what + ".*int32"):
    make()


@pytest.mark.parametrize("impl", IMPLS)
def test_window_wider_than_the_sequence_is_no_limit(impl):
  """Moderately large windows were already exact (no clipping); the int32 maximum is too."""
  q, k, v = _qkv()
  want = attnjax.attention(q, k, v, implementation="reference")
  for w in (100, 2 ** 31 - 1):
    got = attnjax.attention(q, k, v, mask=M.SlidingWindow(w, w), implementation=impl)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("lws, err, msg", [
    (2.5, TypeError, "local_window_size must be an int or a pair.*float 2.5"),
    ((2.5, 1), TypeError, r"local_window_size must be an int or a pair.*\(2.5, 1\)"),
    ((1, 2, 3), ValueError, r"local_window_size must be an int >= 0.*\(1, 2, 3\)"),
    (-1, ValueError, "local_window_size must be an int >= 0.*-1"),
])
def test_dot_product_attention_bad_window(lws, err, msg):
  q, k, v = _qkv()
  with pytest.raises(err, match=msg):
    attnjax.dot_product_attention(q, k, v, local_window_size=lws)


@pytest.mark.parametrize("arg", ["query_seq_lengths", "key_value_seq_lengths"])
def test_dot_product_attention_float_lengths_are_rejected_as_jax_does(arg):
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=arg + ".*integer.*float32"):
    attnjax.dot_product_attention(q, k, v, **{arg: jnp.array([3.5])})
  with pytest.raises(ValueError):  # the behaviour being matched
    jax.nn.dot_product_attention(q, k, v, **{arg: jnp.array([3.5])})


def test_linear_attention_step_none_state_is_the_zero_state():
  q, k, v = (x[:, 0] for x in _qkv())
  o, s = attnjax.linear_attention_step(None, q, k, v, normalize=True)
  o0, s0 = attnjax.linear_attention_step(jnp.zeros(s.shape), q, k, v, normalize=True)
  np.testing.assert_array_equal(o, o0)
  np.testing.assert_array_equal(s, s0)
  with pytest.raises(ValueError, match=r"state must have shape \[B, N, F, E\]=\(1, 2, 4, 5\)"):
    attnjax.linear_attention_step(jnp.zeros((1, 2, 4, 4)), q, k, v, normalize=True)


def test_merge_attention_accepts_array_likes():
  o, lse = attnjax.merge_attention([[[[1.0]]]], [[[0.0]]], np.array([[[[3.0]]]]), [[[0.0]]])
  np.testing.assert_allclose(o, [[[[2.0]]]])
  np.testing.assert_allclose(lse, [[[np.log(2.0)]]], rtol=1e-6)


def test_merge_attention_plus_inf_lse_is_a_value_error():
  o = jnp.ones((1, 2, 1, 2))
  bad = jnp.array([[[0.0], [jnp.inf]]])
  with pytest.raises(ValueError, match=r"lse2 holds \+inf at \[0, 1, 0\]"):
    attnjax.merge_attention(o, jnp.zeros((1, 2, 1)), o, bad)


def test_merge_attention_nan_lse_propagates():
  o = jnp.ones((1, 2, 1, 2))
  lse1 = jnp.array([[[jnp.nan], [0.0]]])
  for args in ((o, lse1, o, jnp.zeros((1, 2, 1))), (o, jnp.zeros((1, 2, 1)), o, lse1)):
    out, lse = attnjax.merge_attention(*args)
    assert np.isnan(lse[0, 0, 0]) and np.isnan(out[0, 0, 0]).all()
    np.testing.assert_allclose(out[0, 1], 1.0)
    np.testing.assert_allclose(lse[0, 1], np.log(2.0), rtol=1e-6)
  empty = jnp.full((1, 2, 1), -jnp.inf)  # rows that saw no key stay zeros, lse -inf
  out, lse = attnjax.merge_attention(jnp.zeros_like(o), empty, jnp.zeros_like(o), empty)
  assert (out == 0).all() and (lse == -jnp.inf).all()


@pytest.mark.parametrize("arg", ["valid", "force"])
def test_topk_blocks_flags_must_be_boolean(arg):
  scores = jnp.zeros((1, 1, 1, 4))
  with pytest.raises(TypeError, match=arg + " must be a boolean array.*int32"):
    attnjax.topk_blocks(scores, 2, **{arg: jnp.array([[[[2, 0, 0, 1]]]], jnp.int32)})
  with pytest.raises(ValueError, match=arg + r" of shape \(3,\) does not broadcast"):
    attnjax.topk_blocks(scores, 2, **{arg: jnp.ones((3,), bool)})


def test_topk_blocks_counts_never_exceed_k():
  valid = jnp.array([[[[2, 0, 0, 1]]]]) != 0
  idx, cnt = attnjax.topk_blocks(jnp.zeros((1, 1, 1, 4)), 2, valid=valid)
  assert int(cnt[0, 0, 0]) == 2
  assert sorted(np.asarray(idx[0, 0, 0]).tolist()) == [0, 3]


@pytest.mark.parametrize("call", [
    lambda q: attnjax.attention(q, q, q, mask=M.Causal()),
    lambda q: attnjax.attention(q, q, q),
    lambda q: attnjax.dot_product_attention(q, q, q, is_causal=True),
])
def test_shape_too_large_to_plan_is_a_value_error_before_allocating(call):
  """T = S = 2**31 used to build O(T) and O(nq * nk) host arrays (killed at 24 GB)."""
  q = jax.ShapeDtypeStruct((1, 2 ** 31, 1, 8), jnp.float32)
  with pytest.raises(ValueError,
                     match=r"4194304 q-blocks x 4194304 k-blocks.*MAX_BLOCK_ENTRIES = 2\*\*28"):
    jax.eval_shape(call, q)


def test_block_layout_too_large_is_a_value_error():
  with pytest.raises(ValueError, match=r"2 head\(s\) x 65536 q-blocks x 65536 k-blocks"):
    M.S2(num_heads=2, block_size=64, vert_stride=2, local_blocks=1).block_layout(
        2 ** 22, 2 ** 22, 64, 64, 2)


# -- float64: the linear xla path computes in float64; the others warn ------------------
def _naive_linear(q, k, v, slopes, causal=True):
  """NumPy float64 sum_j exp(-s (i - j)) (q_i . k_j) v_j over visible j (T == S, N == K)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  T = q.shape[1]
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  w = np.exp(-np.asarray(slopes, np.float64)[:, None, None] * (i - j)) * (j <= i)
  if not causal:
    w = np.ones((1, T, T))
  return np.einsum("nij,bijn,bjne->bine", w, np.einsum("bind,bjnd->bijn", q, k), v)


def test_linear_xla_computes_float64_inputs_in_float64():
  with jax.enable_x64(True):
    q, k, v = (0.5 * x for x in _qkv(dtype=jnp.float64))
    slopes = np.array([0.125, 0.75])  # exact in float32, as decay slopes are stored
    runs = (("xla", True, slopes), ("xla", False, None), ("reference", True, slopes))
    for impl, causal, decay in runs:
      out, state = attnjax.linear_attention(q, k, v, causal=causal, decay=decay, chunk_size=4,
                                            implementation=impl, return_state=True)
      assert out.dtype == jnp.float64 and state.dtype == jnp.float64
      np.testing.assert_allclose(out, _naive_linear(q, k, v, slopes, causal), rtol=0,
                                 atol=1e-12, err_msg=f"{impl} causal={causal}")
    loss = lambda impl: (lambda q, k, v: attnjax.linear_attention(
        q, k, v, chunk_size=4, implementation=impl).sum())
    g_ref = jax.grad(loss("reference"), argnums=(0, 1, 2))(q, k, v)
    g_xla = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_xla, g_ref):
      assert a.dtype == jnp.float64
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    o, s = attnjax.linear_attention_step(None, q[:, 0], k[:, 0], v[:, 0])
    assert o.dtype == s.dtype == jnp.float64


def test_linear_low_precision_inputs_keep_float32_accumulation():
  q, k, v = _qkv(dtype=jnp.bfloat16)
  out, state = attnjax.linear_attention(q, k, v, chunk_size=4, return_state=True)
  assert out.dtype == jnp.bfloat16 and state.dtype == jnp.float32


def test_float64_on_float32_engines_warns_and_reference_is_float64():
  with jax.enable_x64(True):
    q, k, v = _qkv(dtype=jnp.float64)
    s = np.einsum("btnh,bsnh->bnts", np.asarray(q), np.asarray(k)) * 0.5
    s = np.where(np.tril(np.ones((8, 8), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), np.asarray(v))
    with warnings.catch_warnings():
      warnings.simplefilter("error", Float32AccumulationWarning)
      ref = attnjax.attention(q, k, v, mask=M.Causal(), implementation="reference")
    np.testing.assert_allclose(ref, want, rtol=0, atol=1e-13)
    # The warnings come at trace time: eval_shape shows them without compiling.
    with pytest.warns(Float32AccumulationWarning, match="block-sparse engine.*float32"):
      out = jax.eval_shape(lambda q: attnjax.attention(q, k, v, mask=M.Causal(),
                                                       implementation="xla"), q)
    assert out.dtype == jnp.float64
    with pytest.warns(Float32AccumulationWarning, match="neighborhood attention"):
      jax.eval_shape(lambda q: attnjax.na1d(q, k, v, kernel_size=3, implementation="xla"), q)
