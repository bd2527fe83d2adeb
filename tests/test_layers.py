"""Tests for attnjax.layers: MultiHeadAttention, RoPE, the family registry, make_attention_fn."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import masks
from attnjax.layers import MultiHeadAttention, apply_rope, registry

B, T, D = 2, 6, 16


def _x(seed=0, shape=(B, T, D), dtype=jnp.float32):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


def _by_hand(params, x, n, kh, h, *, causal, rope, kv=None):
  p = params["params"]
  kv = x if kv is None else kv
  proj = lambda name, inp: jnp.einsum("btd,dnh->btnh", inp, p[name]["kernel"]) + p[name]["bias"]
  q, k, v = proj("query", x), proj("key", kv), proj("value", kv)
  pos_q = jnp.arange(x.shape[1])
  pos_k = jnp.arange(kv.shape[1])
  if rope:
    q, k = apply_rope(q, pos_q), apply_rope(k, pos_k)
  o = attnjax.reference_attention(q, k, v, mask=masks.Causal() if causal else None,
                                  q_positions=pos_q, k_positions=pos_k)
  return jnp.einsum("btnh,nhd->btd", o, p["out"]["kernel"]) + p["out"]["bias"]


@pytest.mark.parametrize("kh,causal,rope", [(4, False, False), (2, True, True), (1, True, False)])
def test_layer_matches_projections_plus_reference(kh, causal, rope):
  m = MultiHeadAttention(num_heads=4, num_kv_heads=kh, qkv_features=16, causal=causal,
                         use_rope=rope, implementation="reference")
  x = _x()
  params = m.init(jax.random.PRNGKey(1), x)
  assert params["params"]["key"]["kernel"].shape == (D, kh, 4)
  got = m.apply(params, x)
  want = _by_hand(params, x, 4, kh, 4, causal=causal, rope=rope)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cross_attention_and_padding_mask():
  m = MultiHeadAttention(num_heads=2, qkv_features=8, out_features=5,
                         implementation="reference")
  x, kv = _x(0), _x(1, (B, 9, 7))
  params = m.init(jax.random.PRNGKey(0), x, kv)
  pad = jnp.arange(9)[None, None, None, :] < jnp.array([9, 4])[:, None, None, None]
  got = m.apply(params, x, kv, mask=pad)
  assert got.shape == (B, T, 5)
  # Keys beyond the padding length do not change the output.
  kv2 = kv.at[1, 4:].set(100.0)
  np.testing.assert_allclose(m.apply(params, x, kv2, mask=pad)[1], got[1], rtol=1e-5, atol=1e-5)


def test_bfloat16_layer():
  m = MultiHeadAttention(num_heads=2, qkv_features=8, causal=True, use_rope=True,
                         dtype=jnp.bfloat16)
  x = _x(dtype=jnp.bfloat16)
  params = m.init(jax.random.PRNGKey(0), x)
  out = m.apply(params, x)
  assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))


def test_layer_grad_and_jit():
  m = MultiHeadAttention(num_heads=2, qkv_features=8, causal=True, use_rope=True)
  x = _x()
  params = m.init(jax.random.PRNGKey(0), x)
  g = jax.jit(jax.grad(lambda p: jnp.sum(m.apply(p, x) ** 2)))(params)
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(g))


# -- RoPE -------------------------------------------------------------------------
def test_rope_scores_depend_only_on_relative_position():
  q, k = _x(0, (1, 5, 2, 8)), _x(1, (1, 5, 2, 8))
  # Same vectors at every position: the logit must be a function of i - j.
  q = jnp.broadcast_to(q[:, :1], q.shape)
  k = jnp.broadcast_to(k[:, :1], k.shape)
  def logits(offset):
    pos = jnp.arange(5) + offset
    return jnp.einsum("btnh,bsnh->bnts", apply_rope(q, pos), apply_rope(k, pos))
  base = logits(0)
  np.testing.assert_allclose(logits(37), base, rtol=1e-4, atol=1e-4)
  for d in range(-4, 5):
    diag = jnp.diagonal(base, offset=d, axis1=-2, axis2=-1)
    np.testing.assert_allclose(diag, jnp.broadcast_to(diag[..., :1], diag.shape),
                               rtol=1e-4, atol=1e-4)


def test_rope_properties_and_errors():
  x = _x(0, (2, 4, 3, 10))
  np.testing.assert_allclose(apply_rope(x, jnp.zeros(4, jnp.int32)), x)  # angle 0
  y = apply_rope(x, jnp.arange(4), fraction=0.5)  # rotates 4 of 10 dims
  np.testing.assert_allclose(y[..., 4:], x[..., 4:])
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1),
                             rtol=1e-5)
  per_batch = apply_rope(x, jnp.stack([jnp.arange(4), jnp.arange(4) + 3]))
  np.testing.assert_allclose(per_batch[1], apply_rope(x, jnp.arange(4) + 3)[1], rtol=1e-6)
  with pytest.raises(ValueError, match="positions"):
    apply_rope(x, jnp.arange(5))
  with pytest.raises(ValueError, match="fraction"):
    apply_rope(x, jnp.arange(4), fraction=0.0)
  with pytest.raises(ValueError, match="rank 4"):
    apply_rope(x[0], jnp.arange(4))


# -- KV cache ---------------------------------------------------------------------
def test_kv_cache_decoding_equals_full_causal_forward(chunks=(3, 1, 2)):
  """A 3-token prefill, then one token, then two: equals the full causal forward."""
  kw = dict(num_heads=4, num_kv_heads=2, qkv_features=16, causal=True, use_rope=True)
  x = _x(3)
  full = MultiHeadAttention(**kw)
  params = full.init(jax.random.PRNGKey(0), x)
  want = full.apply(params, x)
  dec = MultiHeadAttention(decode=True, **kw)
  cache = dec.init(jax.random.PRNGKey(0), x)["cache"]
  step = jax.jit(lambda c, xt: dec.apply({"params": params["params"], "cache": c}, xt,
                                         mutable=["cache"]))
  outs, start = [], 0
  for n in chunks:
    o, upd = step(cache, x[:, start:start + n])
    cache = upd["cache"]
    outs.append(o)
    start += n
  np.testing.assert_allclose(jnp.concatenate(outs, 1), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(cache["cache_index"], T)
  with pytest.raises(Exception, match="KV cache overflow"):  # past max_len: an error
    jax.block_until_ready(step(cache, x[:, :1]))
  with pytest.raises(ValueError, match="max_len"):     # concrete index: at the call
    dec.apply({"params": params["params"], "cache": cache}, x[:, :1], mutable=["cache"])


def test_decode_errors():
  x = _x()
  with pytest.raises(ValueError, match="causal"):
    MultiHeadAttention(num_heads=2, decode=True).init(jax.random.PRNGKey(0), x)


# -- registry ---------------------------------------------------------------------
def test_registry_dense_unknown_and_registered():
  assert registry.get_family("dense") is registry.dense_family
  with pytest.raises(ValueError, match="unknown attention family 'nope'"):
    registry.get_family("nope")

  def doubled(query, key, value, *, causal, q_positions=None, k_positions=None,
              segment_ids=None, factor=1.0):
    return factor * registry.dense_family(query, key, value, causal=causal,
                                          q_positions=q_positions, k_positions=k_positions)

  registry.register_family("test_doubled", doubled)
  x = _x()
  a = MultiHeadAttention(num_heads=2, causal=True, use_bias=False)
  b = MultiHeadAttention(num_heads=2, causal=True, use_bias=False, attention="test_doubled",
                         attention_options={"factor": 2.0})
  params = a.init(jax.random.PRNGKey(0), x)
  np.testing.assert_allclose(b.apply(params, x), 2 * a.apply(params, x), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="does not accept \\['window'\\]"):
    MultiHeadAttention(num_heads=2, attention="test_doubled",
                       attention_options={"window": 3}).init(jax.random.PRNGKey(0), x)
  with pytest.raises(NotImplementedError, match="supports_kv_cache"):
    MultiHeadAttention(num_heads=2, causal=True, decode=True, attention="test_doubled").init(
        jax.random.PRNGKey(0), x)


def test_dense_family_mask_objects_and_arrays():
  q, k, v = _x(0, (1, 4, 2, 4)), _x(1, (1, 7, 2, 4)), _x(2, (1, 7, 2, 4))
  win = masks.SlidingWindow(2)
  got = registry.dense_family(q, k, v, causal=True, mask=win, implementation="reference")
  want = attnjax.reference_attention(q, k, v, mask=masks.Causal() & win)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  arr = jnp.asarray(win.to_dense(4, 7))[None]
  np.testing.assert_allclose(registry.dense_family(q, k, v, causal=True, mask=arr,
                                                 implementation="reference"), want,
                             rtol=1e-5, atol=1e-5)


# -- make_attention_fn inside Flax's own modules -----------------------------------
VALID = (jnp.arange(T) < jnp.array([T, 3])[:, None])[..., None]  # query rows with keys


def _close_on_valid_rows(got, want):
  """Flax gives a query row that sees no key uniform weights; attnjax gives zeros."""
  np.testing.assert_allclose(jnp.where(VALID, got, 0), jnp.where(VALID, want, 0),
                             rtol=1e-5, atol=1e-5)


def _masks_for_flax():
  pad = (jnp.arange(T) < jnp.array([T, 3])[:, None])  # [B, T]
  padding = nn.make_attention_mask(pad, pad)  # [B, 1, T, T]
  causal = nn.combine_masks(padding, nn.make_causal_mask(jnp.ones((B, T))))
  return {"non_causal": padding, "causal": causal}


@pytest.mark.parametrize("kind", ["non_causal", "causal"])
def test_make_attention_fn_in_linen_mhdpa(kind):
  from attnjax.layers import make_attention_fn
  x = _x(4)
  mask = _masks_for_flax()[kind]
  base = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16)
  ours = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16,
                                         attention_fn=make_attention_fn())
  params = base.init(jax.random.PRNGKey(0), x, mask=mask)
  want = base.apply(params, x, mask=mask)
  _close_on_valid_rows(ours.apply(params, x, mask=mask), want)
  if kind == "causal":  # the same through an attnjax Mask object instead of the array
    obj = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16,
                                          attention_fn=make_attention_fn(masks.Causal()))
    pad_only = _masks_for_flax()["non_causal"]
    _close_on_valid_rows(obj.apply(params, x, mask=pad_only), want)
  # Sown attention weights have Flax's layout [B, N, T, S].
  _, inter = ours.apply(params, x, mask=mask, sow_weights=True, mutable=["intermediates"])
  w = jax.tree.leaves(inter)[0]
  assert w.shape == (B, 4, T, T)
  np.testing.assert_allclose(w.sum(-1)[0], 1.0, rtol=1e-5)


@pytest.mark.parametrize("kind", ["non_causal", "causal"])
def test_make_attention_fn_in_nnx_mha(kind):
  from flax import nnx
  from attnjax.layers import make_attention_fn
  x = _x(5)
  mask = _masks_for_flax()[kind]
  kw = dict(num_heads=4, in_features=D, qkv_features=16, decode=False)
  base = nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(0))
  ours = nnx.MultiHeadAttention(**kw, attention_fn=make_attention_fn(), rngs=nnx.Rngs(0))
  want = base(x, mask=mask)
  _close_on_valid_rows(ours(x, mask=mask), want)
  if kind == "causal":  # nnx's is_causal flag
    pad_only = _masks_for_flax()["non_causal"]
    _close_on_valid_rows(ours(x, mask=pad_only, is_causal=True), want)


def test_make_attention_fn_rejects_unsupported_arguments():
  from attnjax.layers import make_attention_fn
  fn = make_attention_fn()
  q = _x(0, (B, T, 2, 4))
  with pytest.raises(ValueError, match="dropout_rng"):
    fn(q, q, q, dropout_rate=0.1, deterministic=False)
  np.testing.assert_allclose(fn(q, q, q, dropout_rate=0.1, deterministic=True), fn(q, q, q))
  with pytest.raises(NotImplementedError, match="einsum"):
    fn(q, q, q, qk_attn_weights_einsum=jnp.einsum)
  with pytest.raises(TypeError, match="Mask"):
    make_attention_fn(jnp.ones((T, T), bool))
  # Extra batch dimensions and GQA.
  q5, k5 = _x(1, (2, 3, T, 4, 4)), _x(2, (2, 3, T, 2, 4))
  got = make_attention_fn(implementation="reference")(q5, k5, k5)
  want = attnjax.reference_attention(q5.reshape(6, T, 4, 4), k5.reshape(6, T, 2, 4),
                                     k5.reshape(6, T, 2, 4)).reshape(2, 3, T, 4, 4)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_make_attention_fn_in_nnx_kv_cache_decoding():
  """nnx decoding passes one query and the whole cache: causal Mask objects stay
  correct because attnjax positions are bottom-right aligned."""
  from flax import nnx
  from attnjax.layers import make_attention_fn
  x = _x(6)
  kw = dict(num_heads=4, in_features=D, qkv_features=16)
  m = nnx.MultiHeadAttention(**kw, decode=True, attention_fn=make_attention_fn(masks.Causal()),
                             rngs=nnx.Rngs(0))
  m.init_cache((B, T, D))
  got = jnp.concatenate([m(x[:, i:i + 1]) for i in range(T)], axis=1)
  full = nnx.MultiHeadAttention(**kw, decode=False, rngs=nnx.Rngs(0))
  want = full(x, mask=nnx.make_causal_mask(jnp.ones((B, T))))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
