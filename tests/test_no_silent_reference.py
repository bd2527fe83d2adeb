"""No public entry point reaches a dense oracle unasked.

The dense oracles (``attnjax.core.reference.reference_attention`` and the
linear engine's ``dense_linear_attention``) are replaced by a function that
raises, in their own modules and in every attnjax / pallas_kernels module that
imported them by name. Every public entry point is then traced (forward and
backward: ``jax.eval_shape`` of ``value_and_grad``, nothing is compiled)
under ``implementation=None`` for the combinations its fast backends claim
(the ``supports`` functions of ``ATTENTION_BACKENDS``, ``NEIGHBORHOOD_BACKENDS``
and ``LINEAR_BACKENDS``), with warnings as errors, so the dispatcher's loud
fallback (which runs the oracle with a warning) fails too.
"""
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import requires_toolchain

import attnjax
from attnjax import masks as M
from attnjax import scores as SC
from attnjax.block_sparse import FAMILIES, block_sparse_attention, block_sparse_attention_indices
from attnjax.core import reference as R
from attnjax.layers import MultiHeadAttention
from attnjax.layers.flax_adapter import make_attention_fn
from attnjax.linear import reference as LR
from pallas_kernels import targets as TG

B, T, S, N, K, H = 2, 64, 64, 4, 2, 16
TC = 32   # the query length of cross calls (T != S)


def _spec(*shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


QKV = (_spec(B, T, N, H), _spec(B, S, K, H), _spec(B, S, K, H))
CROSS = (_spec(B, TC, N, H), _spec(B, S, K, H), _spec(B, S, K, H))


class OracleReached(AssertionError):
  pass


@pytest.fixture
def no_oracle(monkeypatch):
  """Makes every module-level handle on the dense oracles raise OracleReached."""
  originals = {"reference_attention": R.reference_attention,
               "dense_linear_attention": LR.dense_linear_attention}

  def forbidden(name):
    def fn(*args, **kwargs):
      raise OracleReached(f"the dense oracle {name} ran without being asked")
    return fn

  patched = []
  for mod in list(sys.modules.values()):
    if not getattr(mod, "__name__", "").startswith(("attnjax", "pallas_kernels")):
      continue
    for name, original in originals.items():
      if getattr(mod, name, None) is original:
        monkeypatch.setattr(mod, name, forbidden(name))
        patched.append(f"{mod.__name__}.{name}")
  assert "attnjax.core.reference.reference_attention" in patched
  assert "attnjax.linear.reference.dense_linear_attention" in patched
  return patched


def _trace(fn, *specs):
  """Traces fn's forward and backward (value_and_grad of the sum of its first output)."""
  def loss(*args):
    out = fn(*args)
    out = out[0] if isinstance(out, tuple) else out
    return jnp.sum(out.astype(jnp.float32))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    return jax.eval_shape(jax.value_and_grad(loss, argnums=tuple(range(len(specs)))), *specs)


def test_the_patch_catches_the_oracle(no_oracle):
  with pytest.raises(OracleReached):
    _trace(lambda q, k, v: attnjax.attention(q, k, v, implementation="reference"), *QKV)
  with pytest.raises(OracleReached):
    _trace(lambda q, k, v: attnjax.linear_attention(q, k, v, implementation="reference"), *QKV)
  with pytest.warns(UserWarning, match="reference runs"), pytest.raises(OracleReached):
    jax.eval_shape(lambda q, k, v, s: attnjax.attention(q, k, v, scale=s), *QKV, _spec())


# -- attnjax.attention / dot_product_attention / fast_attention -----------------------------
_rng = np.random.default_rng(0)
SEG = np.sort(_rng.integers(0, 3, (B, T)), axis=1).astype(np.int32)
SEG_CROSS = (np.sort(_rng.integers(0, 3, (B, TC)), axis=1).astype(np.int32), SEG)
BIAS = _rng.standard_normal((B, N, T, S)).astype(np.float32)
ARRAY = _rng.random((B, 1, T, S)) < 0.5
Q_LEN, KV_LEN = np.array([T, 17], np.int32), np.array([0, 40], np.int32)
COMPOSITE = (M.SlidingWindow(4, 4) | M.GlobalTokens((0, 33)) | M.KeyIn((7, 51))) & ~M.KeyIn((3,))

ATTENTION = {
    "dense": dict(),
    "causal": dict(mask=M.Causal()),
    "window": dict(mask=M.SlidingWindow(8, 2)),
    "composite_causal": dict(mask=COMPOSITE & M.Causal()),
    "runtime_documents": dict(mask=M.Documents() & M.Causal(), segment_ids=SEG),
    "static_documents": dict(mask=M.Documents(tuple(np.repeat([0, 1, 2], [20, 30, 14])))),
    "segment_ids": dict(segment_ids=SEG),
    "bias": dict(bias=BIAS),
    "mask_array": dict(mask=ARRAY),
    "lengths": dict(mask=M.Causal(), query_seq_lengths=Q_LEN, key_value_seq_lengths=KV_LEN),
    "lengths_bias_array_segments": dict(mask=ARRAY, bias=BIAS, segment_ids=SEG,
                                        key_value_seq_lengths=KV_LEN),
    "positions": dict(mask=M.Causal(), q_positions=np.arange(T) + 5,
                      k_positions=np.arange(S)),
    "return_lse": dict(mask=M.Causal(), return_lse=True),
    "softcap": dict(mask=M.Causal(), score=SC.SoftCap(20.0)),
    "sink": dict(mask=M.Causal(), score=SC.Sink(jnp.zeros((N,)))),
    "selective": dict(mask=M.Causal(), score=SC.Selective(jnp.ones((N,)))),
    "softplus": dict(mask=M.Causal(), score=SC.Softplus()),
    "relu": dict(mask=M.Causal(), score=SC.ReLU()),
    "scale": dict(mask=M.Causal(), scale=0.3),
}


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_attention(name, no_oracle):
  _trace(lambda q, k, v: attnjax.attention(q, k, v, **ATTENTION[name]), *QKV)


def test_attention_cross_gqa_mqa(no_oracle):
  for mask in (M.Causal(), COMPOSITE, None):
    _trace(lambda q, k, v: attnjax.attention(q, k, v, mask=mask, segment_ids=SEG_CROSS,
                                             query_seq_lengths=np.array([TC, 0], np.int32)),
           *CROSS)
  mqa = (_spec(B, T, N, H), _spec(B, S, 1, H), _spec(B, S, 1, H))
  _trace(lambda q, k, v: attnjax.attention(q, k, v, mask=M.Causal(), bias=BIAS), *mqa)
  _trace(lambda q, k, v: attnjax.block_sparse.fast_attention(q, k, v, mask=M.Causal(),
                                                             implementation=None), *QKV)


def test_attention_on_numpy_inputs(no_oracle):
  q = _rng.standard_normal((1, 32, 2, 16)).astype(np.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jax.eval_shape(lambda: attnjax.attention(q, q, q, mask=M.Causal(),
                                             key_value_seq_lengths=np.array([20])))
    jax.eval_shape(lambda: attnjax.dot_product_attention(q, q, q, np.zeros((1, 1, 32, 32)),
                                                         is_causal=True))


DPA = {
    "plain": dict(),
    "is_causal": dict(is_causal=True),
    "window": dict(local_window_size=(8, 0)),
    "causal_window_mask": dict(is_causal=True, local_window_size=4, mask=ARRAY),
    "bias_mask": dict(bias=BIAS, mask=ARRAY),
    "lengths": dict(is_causal=True, query_seq_lengths=Q_LEN, key_value_seq_lengths=KV_LEN),
    "residual": dict(is_causal=True, return_residual=True),
}


@pytest.mark.parametrize("name", sorted(DPA))
def test_dot_product_attention(name, no_oracle):
  _trace(lambda q, k, v: attnjax.dot_product_attention(q, k, v, **DPA[name]), *QKV)


def test_dot_product_attention_cross_and_unbatched(no_oracle):
  _trace(lambda q, k, v: attnjax.dot_product_attention(q, k, v, is_causal=True), *CROSS)
  _trace(lambda q, k, v: attnjax.dot_product_attention(q, k, v, is_causal=True),
         _spec(T, N, H), _spec(S, K, H), _spec(S, K, H))


# -- block-sparse entry points and the registered families ----------------------------------
def test_block_sparse_attention(no_oracle):
  layout = M.Causal().block_layout(T, S, 16, 16, 1)
  for arg in (M.Causal(), COMPOSITE, layout):
    _trace(lambda q, k, v: block_sparse_attention(q, k, v, arg), *QKV)
  _trace(lambda q, k, v: block_sparse_attention(q, k, v, M.Documents(), segment_ids=SEG,
                                                return_lse=True), *QKV)
  idx = np.tile(np.arange(2, dtype=np.int32)[None, None, None], (B, K, T // 16, 1))
  _trace(lambda q, k, v: block_sparse_attention_indices(q, k, v, idx, block_q=16,
                                                        block_kv=16, mask=M.Causal()), *QKV)


#: family -> (options, causal values the family defines, takes segment ids / positions)
FAMILY_CALLS = {
    "sliding_window": (dict(window=16), (True, False), True),
    "longformer": (dict(window=16, global_positions=(0, 5)), (True, False), True),
    "bigbird": (dict(block_size=8, num_random_blocks=1), (True, False), True),
    "s2": (dict(block_size=16, local_blocks=1, vert_stride=2), (True, False), True),
    "shifted_group": (dict(group_size=16), (True,), False),
    "longlora": (dict(group_size=16), (True,), False),
    "sinklora": (dict(group_size=16), (True,), False),
    "streaming": (dict(num_sink=2, window=16), (True,), True),
    "anchor": (dict(doc_ids=tuple(np.repeat([0, 1, 2], [1, 40, 23]))), (True,), False),
    "composite": (dict(num_visual=16), (True,), True),
    "block_local": (dict(block_size=16), (True, False), True),
}


def test_every_family_is_listed():
  assert sorted(FAMILY_CALLS) == sorted(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILY_CALLS))
def test_block_sparse_family(family, no_oracle):
  options, causal_values, segments = FAMILY_CALLS[family]
  fn = FAMILIES[family]
  for causal in causal_values:
    _trace(lambda q, k, v: fn(q, k, v, causal=causal, **options), *QKV)
  if segments:
    _trace(lambda q, k, v: fn(q, k, v, causal=causal_values[0], segment_ids=SEG, **options),
           *QKV)
  if getattr(fn, "supports_kv_cache", False):     # a partly filled cache: explicit positions
    _trace(lambda q, k, v: fn(q, k, v, causal=True, q_positions=np.arange(TC) + 20,
                              k_positions=np.arange(S), **options), *CROSS)


def test_family_functions_at_the_top_level(no_oracle):
  _trace(lambda q, k, v: attnjax.longformer_attention(
      q, k, v, window=16, global_positions=(0,), global_qkv=(q, k, v)), *QKV)
  _trace(lambda q, k, v: attnjax.s2_attention(q, k, v, block_size=16, local_blocks=1,
                                              vert_stride=2, return_lse=True), *QKV)
  _trace(lambda q, k, v: attnjax.streaming_attention(q, k, v, num_sink=2, window=8), *CROSS)
  _trace(lambda q, k, v: attnjax.anchor_attention(q, k, v, doc_ids=SEG), *QKV)


# -- neighborhood and linear ----------------------------------------------------------------
NA = {
    "na1d": (lambda q, k, v: attnjax.na1d(q, k, v, kernel_size=5, dilation=2), (B, 48)),
    "na1d_causal_rpb_lse": (lambda q, k, v: attnjax.na1d(
        q, k, v, kernel_size=5, is_causal=True, rpb=jnp.zeros((N, 9)), return_lse=True),
                            (B, 48)),
    "na2d": (lambda q, k, v: attnjax.na2d(q, k, v, kernel_size=(3, 5), dilation=(1, 2),
                                          is_causal=(True, False)), (B, 8, 12)),
    "na2d_rpb": (lambda q, k, v: attnjax.na2d(q, k, v, kernel_size=3,
                                              rpb=jnp.zeros((N, 5, 5))), (B, 8, 8)),
    "na1d_additional_keys": (lambda q, k, v: attnjax.na1d(
        q, k, v, kernel_size=5, additional_keys=k[:, :4], additional_values=v[:, :4]),
                             (B, 48)),
}
@pytest.mark.parametrize("name", sorted(NA))
def test_neighborhood(name, no_oracle):
  fn, lead = NA[name]
  _trace(fn, _spec(*lead, N, H), _spec(*lead, K, H), _spec(*lead, K, H))


LINEAR = {
    "identity_causal": dict(),
    "elu_noncausal_normalize": dict(feature_map="elu+1", causal=False, normalize=True),
    "relu_decay_state": dict(feature_map="relu", decay="tnl", return_state=True,
                             chunk_size=24),
    "taylor": dict(feature_map="taylor"),
    "initial_state": dict(initial_state=jnp.zeros((B, N, H, H + 1)), normalize=True),
}


@pytest.mark.parametrize("name", sorted(LINEAR))
def test_linear_attention(name, no_oracle):
  _trace(lambda q, k, v: attnjax.linear_attention(q, k, v, **LINEAR[name]), *QKV)


def test_linear_attention_cross(no_oracle):
  for causal in (True, False):
    _trace(lambda q, k, v: attnjax.linear_attention(q, k, v, causal=causal), *CROSS)


# -- Flax -----------------------------------------------------------------------------------
def test_make_attention_fn(no_oracle):
  flax_mask = np.tril(np.ones((T, S), bool))[None, None]
  for fn_mask in (None, M.SlidingWindow(8, 8)):
    fn = make_attention_fn(fn_mask)
    _trace(lambda q, k, v: fn(q, k, v, mask=flax_mask, bias=BIAS, deterministic=True,
                              dropout_rate=0.1), *QKV)
    _trace(lambda q, k, v: fn(q, k, v, is_causal=True), *QKV)
  fn = make_attention_fn(M.Causal())
  _trace(lambda q, k, v: fn(q, k, v), _spec(2, B, T, N, H), _spec(2, B, S, K, H),
         _spec(2, B, S, K, H))
  layer = nn.MultiHeadDotProductAttention(num_heads=N, qkv_features=N * H,
                                          attention_fn=make_attention_fn(M.Causal()))
  x = _spec(B, T, 32)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    params = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)
    jax.eval_shape(jax.grad(lambda p, x: layer.apply(p, x).sum()), params, x)


@pytest.mark.parametrize("attention,options", [
    ("dense", {}), ("sliding_window", dict(window=16)), ("s2", dict(block_size=16,
                                                                  local_blocks=1, vert_stride=2))])
def test_multi_head_attention_layer(attention, options, no_oracle):
  layer = MultiHeadAttention(num_heads=N, num_kv_heads=K, qkv_features=N * H, causal=True,
                             attention=attention, attention_options=options)
  x = _spec(B, T, 32)
  padding = np.arange(S)[None] < np.array([[S], [40]])         # key-padding mask [B, S]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    params = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)
    jax.eval_shape(jax.grad(lambda p, x: layer.apply(p, x).sum()), params, x)
    jax.eval_shape(jax.grad(lambda p, x: layer.apply(p, x, mask=padding).sum()), params, x)


# -- a TPU target: the kernels are the default, lengths / bias / mask arrays included --------
def test_attention_on_a_tpu_target(no_oracle):
  requires_toolchain("tpu_v5e")
  L = 256
  q, kv = _spec(1, L, 4, 128, dtype=jnp.bfloat16), _spec(1, L, 2, 128, dtype=jnp.bfloat16)
  calls = {
      "causal": dict(mask=M.Causal()),
      "lengths_bias": dict(mask=M.Causal(), bias=np.zeros((1, 1, L, L), np.float32),
                           key_value_seq_lengths=np.array([100], np.int32)),
      "mask_array_segments": dict(mask=np.tril(np.ones((L, L), bool)),
                                  segment_ids=np.repeat([0, 1], L // 2)[None]),
  }
  with jax.default_device(TG.device("tpu_v5e")):
    for kwargs in calls.values():
      decisions = attnjax.explain(lambda q, k, v: attnjax.attention(q, k, v, **kwargs), q, kv, kv)
      assert [d.backend for d in decisions] == ["pallas"], [str(d) for d in decisions]
      _trace(lambda q, k, v: attnjax.attention(q, k, v, **kwargs), q, kv, kv)
