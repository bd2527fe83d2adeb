"""Every registered family either takes a padded batch in MultiHeadAttention or says why not.

A padded batch's real positions must equal the example run alone, unpadded, with
the same params; where the family has a reference backend, the padded batch must
equal it too, and the example alone runs on it (the engines' own tests compare
their fast paths with the reference on unpadded input).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.layers import MultiHeadAttention, list_families
from attnjax.layers import padding as padding_lib

T, D, L = 16, 16, 8                       # example 0 is T long, example 1 L long
X = jax.random.normal(jax.random.PRNGKey(0), (2, T, D))
LENGTHS = jnp.array([T, L])
VALID = jnp.arange(T)[None] < LENGTHS[:, None]
DOCS = (jnp.arange(T)[None] >= 5).astype(jnp.int32).repeat(2, 0)    # "anchor": doc 0, doc 1

# family -> (options, causal, how the padding is given, reference backend to compare with)
CASES = {
    "dense": ({}, True, "lengths", "reference"),
    "sliding_window": ({"window": 4}, True, "lengths", "reference"),
    "longformer": ({"window": 4, "global_positions": (0,)}, False, "mask", "reference"),
    "bigbird": ({"block_size": 4, "window_blocks": 1, "num_random_blocks": 1}, False, "mask",
                "reference"),
    "s2": ({"block_size": 4, "local_blocks": 1, "vert_stride": 2}, True, "mask", "reference"),
    "streaming": ({"num_sink": 2, "window": 4}, True, "mask", "reference"),
    "anchor": ({}, True, "mask", "reference"),
    "composite": ({"num_visual": 4}, True, "mask", "reference"),
    "block_local": ({"block_size": 4}, True, "mask", "reference"),
    "na1d": ({"kernel_size": 5}, False, "mask", "reference"),
    "linear": ({"chunk_size": 4}, True, "mask", "reference"),
    "lightning": ({"chunk_size": 4}, True, "mask", "reference"),
    "based": ({"window": 3, "chunk_size": 4}, False, "lengths", "reference"),
    "flow": ({}, True, "lengths", "reference"),
    "combiner": ({"segment_len": 4}, True, "lengths", "reference"),
    "longheads": ({"chunk_size": 4, "attn_len": 12}, True, "lengths", None),
    "landmark": ({"block_size": 3}, True, "lengths", None),
}
# family -> (options, causal, what its error says)
CANNOT = {
    "shifted_group": ({}, True, "G/2 tokens into one group with the last G/2"),
    "longlora": ({}, True, "G/2 tokens into one group with the last G/2"),
    "sinklora": ({}, True, "takes no segment ids or mask"),
    "agent": ({"num_agents": 4}, False, "pools its agent tokens from the queries"),
    "hip": ({}, True, "padded keys compete for the budget"),
    "hyper": ({}, False, "LSH buckets"),
    "bi_level_routing": ({"num_regions": 4, "top_k": 2}, False, "region means"),
}
PARAMS = jax.jit(MultiHeadAttention(num_heads=2, num_kv_heads=1).init)(jax.random.PRNGKey(1),
                                                                      X[:1, :4])


def _layer(family, options, causal, implementation=None):
  return MultiHeadAttention(num_heads=2, num_kv_heads=1, causal=causal, attention=family,
                            attention_options=options, implementation=implementation)


def test_every_registered_family_has_a_case():
  # families registered by other tests in this process (register_family) are theirs
  ours = {name for name, fn in list_families().items()
          if getattr(fn, "__module__", "").startswith("attnjax.")}
  assert set(CASES) | set(CANNOT) == ours


@pytest.mark.parametrize("family", sorted(CASES))
def test_padded_batch_equals_examples_alone_and_the_reference(family):
  options, causal, given, ref = CASES[family]
  m = _layer(family, options, causal)
  pad = dict(input_lengths=LENGTHS) if given == "lengths" else dict(mask=VALID)
  docs = (lambda b, n: dict(segment_ids=DOCS[b:b + 1, :n])) if family == "anchor" else (
      lambda b, n: {})
  full = dict(pad, **({"segment_ids": DOCS} if family == "anchor" else {}))

  alt = _layer(family, options, causal, ref) if ref else m
  if getattr(list_families()[family], "key_padding", None) == "causal_prefix":
    m = alt                     # right padding leaves their computation as it is

  def run(p, x):
    # the examples alone run on the reference backend where the family has one (the fast
    # path equals it on unpadded input in the engines' own tests); the padded batch on both
    want = alt.apply(p, x, **full) if ref else None
    return m.apply(p, x, **full), alt.apply(p, x[1:, :L], **docs(1, L)), want

  got, alone1, want = jax.jit(run)(PARAMS, X)
  # non-causal na1d keeps the padded sequence's windows (neighborhood AND padding): the
  # last kernel_size // 2 real queries see fewer keys than unpadded; the oracle checks them
  real = L - options["kernel_size"] // 2 if family == "na1d" else L
  np.testing.assert_allclose(got[1, :real], alone1[0, :real], atol=2e-5, rtol=2e-5)
  if want is not None:        # example 0 is unpadded (on the prefix families it is the plain call)
    np.testing.assert_allclose(got[0], want[0], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(got[1, :L], want[1, :L], atol=2e-5, rtol=2e-5)
  if family == "na1d":
    assert np.abs(got[1, real:L] - alone1[0, real:]).max() > 1e-3   # the windows differ


@pytest.mark.parametrize("family", sorted(CANNOT))
def test_families_that_cannot_take_padding_say_why(family):
  options, causal, why = CANNOT[family]
  m = _layer(family, options, causal)
  for pad in (dict(mask=VALID), dict(input_lengths=LENGTHS)):
    with pytest.raises(ValueError, match=f"'{family}' cannot take a key-padding mask.*{why}"):
      jax.eval_shape(lambda x: m.apply(PARAMS, x, **pad), X)


def test_causal_prefix_families_take_right_padding_in_causal_self_attention_only():
  flow = _layer("flow", {}, True)
  with pytest.raises(ValueError, match="traced mask cannot be checked.*input_lengths"):
    jax.jit(lambda m: flow.apply(PARAMS, X, mask=m))(VALID)
  with pytest.raises(ValueError, match="padded key before a real one"):
    left = np.asarray(VALID)[:, ::-1]
    jax.eval_shape(lambda x: flow.apply(PARAMS, x, mask=left), X)
  with pytest.raises(ValueError, match="'flow' cannot take.*non-causal flow attention"):
    jax.eval_shape(lambda x: _layer("flow", {}, False).apply(PARAMS, x, input_lengths=LENGTHS),
                   X)
  with pytest.raises(ValueError, match="'landmark' cannot take.*causal self-attention only"):
    jax.eval_shape(lambda x: _layer("landmark", {}, True).apply(PARAMS, x, x, mask=VALID), X)


def test_padding_arguments_and_errors():
  np.testing.assert_array_equal(padding_lib.key_padding_mask("x", VALID[:, None, None], 2, T),
                                VALID)
  m = _layer("sliding_window", {"window": 4}, True)
  with pytest.raises(ValueError, match=r"key-padding mask of shape \[B, S\].*'dense'"):
    jax.eval_shape(lambda x: m.apply(PARAMS, x, mask=VALID[:, None, None, :] & jnp.tril(
        jnp.ones((T, T), bool))), X)
  too_long = jnp.array([T + 1, 3])
  with pytest.raises(ValueError, match=r"input_lengths must lie in \[0, 16\]"):
    jax.eval_shape(lambda x: m.apply(PARAMS, x, input_lengths=too_long), X)
  with pytest.raises(ValueError, match="for cross-attention pass the keys' padding"):
    jax.eval_shape(lambda x: m.apply(PARAMS, x, x, input_lengths=LENGTHS), X)
  # lengths reach the block-sparse functions as lengths (their XLA path skips padded
  # blocks); a mask as segment ids in which padded keys are in no query's segment
  fn = list_families()["sliding_window"]
  segs, extra = padding_lib.padding_arguments(
      "sliding_window", fn, key_mask=None, lengths=LENGTHS, segment_ids=None, causal=True,
      self_attn=True, batch=2, q_len=T, kv_len=T)
  assert segs is None and set(extra) == {"query_seq_lengths", "key_value_seq_lengths"}
  segs, extra = padding_lib.padding_arguments(
      "na1d", list_families()["na1d"], key_mask=VALID, lengths=None, segment_ids=None,
      causal=False, self_attn=True, batch=2, q_len=T, kv_len=T)
  np.testing.assert_array_equal(segs, np.where(VALID, 0, padding_lib.PAD_SEGMENT))
  assert extra == {}


def test_gradients_through_a_padded_fast_path_are_finite_and_skip_padding():
  m = _layer("block_local", {"block_size": 4}, True)
  loss = lambda p, x: jnp.sum(m.apply(p, x, mask=VALID)[1, :L] ** 2)
  g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(PARAMS, X)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(g_params))
  assert np.abs(g_x[1, L:]).max() == 0.0 and np.abs(g_x[1, :L]).max() > 0.0


def test_linear_key_mask_with_decay_keeps_left_and_right_padded_outputs():
  from attnjax.linear.api import linear_attention
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, T, 2, 4)) for i in range(3))
  n = 10                                  # example 0 left-padded, example 1 right-padded
  mask = jnp.stack([jnp.arange(T) >= T - n, jnp.arange(T) < n])
  kw = dict(decay="tnl", chunk_size=4)

  def run(q, k, v):
    alone = lambda x, s: linear_attention(*(y[x, s] for y in (q, k, v)), **kw,
                                          implementation="reference")
    return (linear_attention(q, k, v, key_mask=mask, **kw), alone(slice(0, 1), slice(T - n, T)),
            alone(slice(1, 2), slice(0, n)))

  out, left, right = jax.jit(run)(q, k, v)
  np.testing.assert_allclose(out[0, T - n:], left[0], atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(out[1, :n], right[0], atol=2e-5, rtol=2e-5)
  with pytest.raises(ValueError, match=r"key_mask must be a boolean array \[B, S\]"):
    jax.eval_shape(lambda q: linear_attention(q, k, v, key_mask=mask[:, :4]), q)
