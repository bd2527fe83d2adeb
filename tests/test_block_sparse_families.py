"""Static sparse families on the block-sparse engine vs the dense reference with explicit masks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks as M
from attnjax.block_sparse import (FAMILIES, anchor_attention, bigbird_attention, bigbird_mask,
                                  block_local_attention, composite_attention,
                                  longformer_attention, masformer_layer_specs, s2_attention,
                                  s2_block_layout, shifted_group_attention,
                                  sliding_window_attention, streaming_attention)
from attnjax.core.reference import reference_attention


def qkv(B, T, N, K, H=8, seed=0, S=None):
  S = T if S is None else S
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(ks[0], (B, T, N, H)), jax.random.normal(ks[1], (B, S, K, H)),
          jax.random.normal(ks[2], (B, S, K, H)))


def with_grads(fn, q, k, v):
  def f(a, b, c):
    o, vjp = jax.vjp(fn, a, b, c)
    w = jnp.sin(jnp.arange(o.size, dtype=jnp.float32)).reshape(o.shape)
    return o, vjp(w)
  return jax.jit(f)(q, k, v)


def assert_matches_dense(fn, dense, q, k, v, grads=True, atol=2e-5):
  """fn(q, k, v) == reference with the explicit dense mask [N|1, T, S] (fwd and grads)."""
  dense = jnp.asarray(dense)[None] if np.ndim(dense) == 3 else jnp.asarray(dense)
  ref = lambda a, b, c: reference_attention(a, b, c, mask=dense)
  if not grads:
    np.testing.assert_allclose(jax.jit(fn)(q, k, v), ref(q, k, v), atol=atol)
    return
  o1, g1 = with_grads(fn, q, k, v)
  o2, g2 = with_grads(ref, q, k, v)
  np.testing.assert_allclose(o1, o2, atol=atol)
  for a, b, name in zip(g1, g2, "qkv"):
    np.testing.assert_allclose(a, b, atol=10 * atol, err_msg=f"d{name}")


def tril(T, S=None):
  S = T if S is None else S
  return np.arange(S)[None, :] <= np.arange(T)[:, None] + (S - T)


# -- sliding window / streaming / block-local ------------------------------------------
def test_sliding_window_cross_and_self():
  q, k, v = qkv(1, 24, 4, 2, S=40)
  d = np.arange(24)[:, None] + 16 - np.arange(40)[None, :]
  assert_matches_dense(lambda a, b, c: sliding_window_attention(a, b, c, left=5, right=2),
                       ((d <= 5) & (d >= -2))[None], q, k, v)
  assert_matches_dense(
      lambda a, b, c: sliding_window_attention(a, b, c, left=5, right=2, causal=True),
      ((d <= 5) & (d >= 0))[None], q, k, v, grads=False)


def test_streaming_sinks_and_recent():
  T, sink, recent = 32, 3, 6
  q, k, v = qkv(2, T, 2, 1)
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  dense = (j <= i) & ((j < sink) | (i - j < recent))
  assert_matches_dense(lambda a, b, c: streaming_attention(a, b, c, num_sink=sink,
                                                           window=recent), dense[None], q, k, v)
  full = jax.jit(lambda a, b, c: streaming_attention(a, b, c, num_sink=20, window=12))(q, k, v)
  np.testing.assert_allclose(full, reference_attention(q, k, v, mask=M.Causal()), atol=2e-5)


def test_block_local_and_masformer():
  T, b = 32, 8
  q, k, v = qkv(1, T, 2, 2)
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  assert_matches_dense(lambda a, b_, c: block_local_attention(a, b_, c, block_size=b),
                       ((i // b == j // b) & (j <= i))[None], q, k, v)
  prev = ((i // b - j // b) <= 1) & (j <= i)
  assert_matches_dense(lambda a, b_, c: block_local_attention(a, b_, c, block_size=b,
                                                              include_prev_block=True),
                       prev[None], q, k, v, grads=False)
  big = jax.jit(lambda a, b_, c: block_local_attention(a, b_, c, block_size=64))(q, k, v)
  np.testing.assert_allclose(big, reference_attention(q, k, v, mask=M.Causal()), atol=2e-5)
  specs = masformer_layer_specs(6, num_full=2, block_size=b)
  assert [s.family for s in specs].count("dense") == 2 and specs[-1].family == "dense"
  assert specs[0] == ("block_local", {"block_size": b, "include_prev_block": False})
  assert masformer_layer_specs(4, [0], kind="window", block_size=16)[1].options == {"window": 16}
  with pytest.raises(ValueError, match="full_layers"):
    masformer_layer_specs(4, [4])


# -- Longformer / BigBird ------------------------------------------------------------------
def test_longformer_window_and_global():
  T, w, glob = 32, 8, (0, 17)
  q, k, v = qkv(1, T, 2, 1)
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  dense = (np.abs(i - j) <= w // 2) | np.isin(i, glob) | np.isin(j, glob)
  fn = lambda a, b, c: longformer_attention(a, b, c, window=w, global_positions=glob)
  assert_matches_dense(fn, dense[None], q, k, v)
  full = jax.jit(lambda a, b, c: longformer_attention(a, b, c, window=2 * T))(q, k, v)
  np.testing.assert_allclose(full, reference_attention(q, k, v), atol=2e-5)
  # separate global projections: global rows are full attention of q_g over k_g / v_g.
  qg, kg, vg = qkv(1, T, 2, 1, seed=5)
  out = longformer_attention(q, k, v, window=w, global_positions=glob, global_qkv=(qg, kg, vg))
  np.testing.assert_allclose(out[:, 17], reference_attention(qg, kg, vg)[:, 17], atol=2e-5)
  np.testing.assert_allclose(out[:, 3], fn(q, k, v)[:, 3], atol=2e-5)


def test_bigbird_matches_its_mask_and_is_deterministic():
  T, b, N = 64, 8, 2
  q, k, v = qkv(1, T, N, N)
  mask = bigbird_mask(T, block_size=b, num_random_blocks=2, seed=3, num_heads=N)
  dense = mask.to_dense(T, T, N)
  assert (dense == bigbird_mask(T, block_size=b, num_random_blocks=2, seed=3,
                                num_heads=N).to_dense(T, T, N)).all()
  blocks = dense.reshape(N, T // b, b, T // b, b)[:, :, 0, :, 0]
  # window (3 blocks) + 2 global + 2 random per middle row
  assert (blocks[:, 3].sum(-1) == 3 + 2 + 2).all()
  assert blocks[:, 0].all() and blocks[:, :, 0].all()
  fn = lambda a, b_, c: bigbird_attention(a, b_, c, block_size=b, num_random_blocks=2, seed=3)
  assert_matches_dense(fn, dense, q, k, v)


# -- S2-Attention --------------------------------------------------------------------------
def test_s2_tiny_case_and_coverage():
  lay = s2_block_layout(4, 8 * 16, block_size=16, local_blocks=2, vert_stride=4)
  bm = lay.block_mask != 0
  np.testing.assert_array_equal(bm[0, 7], [1, 0, 0, 0, 1, 0, 1, 1])
  for h, cols in enumerate([{0, 4}, {3, 7}, {2, 6}, {1, 5}]):
    vertical = {c for c in range(6) if bm[h, 7, c]}
    assert vertical == {c for c in cols if c < 6}
  np.testing.assert_array_equal(bm.any(0), np.tril(np.ones((8, 8), bool)))


@pytest.mark.parametrize("N,K,causal", [(4, 4, True), (4, 2, True), (4, 4, False)])
def test_s2_attention_matches_dense(N, K, causal):
  T, bs = 64, 8
  q, k, v = qkv(1, T, N, K)
  kw = dict(block_size=bs, local_blocks=2, vert_stride=3, causal=causal)
  if not causal:
    kw["local_blocks"] = (2, 1)
  fn = lambda a, b, c: s2_attention(a, b, c, **kw)
  dense = M.S2(N, num_kv_heads=K if K != N else None, **kw).to_dense(T, T, N)
  assert_matches_dense(fn, dense, q, k, v, grads=(K == N))


def test_s2_dense_heads_and_limits():
  T, bs = 64, 8
  q, k, v = qkv(1, T, 4, 4)
  ref_causal = reference_attention(q, k, v, mask=M.Causal())
  out = s2_attention(q, k, v, block_size=bs, local_blocks=8, vert_stride=3)
  np.testing.assert_allclose(out, ref_causal, atol=2e-5)   # local_blocks >= nb: dense causal
  out = s2_attention(q, k, v, block_size=bs, local_blocks=1, vert_stride=1)
  np.testing.assert_allclose(out, ref_causal, atol=2e-5)   # vert_stride=1: dense causal
  out = s2_attention(q, k, v, block_size=bs, local_blocks=1, vert_stride=4, num_dense_heads=1)
  np.testing.assert_allclose(out[:, :, 3], ref_causal[:, :, 3], atol=2e-5)


def test_s2_bad_input():
  q, k, v = qkv(1, 64, 4, 4)
  with pytest.raises(ValueError, match="vert_stride"):
    s2_attention(q, k, v, block_size=8, vert_stride=0)
  with pytest.raises(ValueError, match="local_blocks"):
    s2_attention(q, k, v, block_size=8, local_blocks=0)
  with pytest.raises(ValueError, match="block_size=24 does not divide"):
    s2_attention(q, k, v, block_size=24)


# -- LongLoRA / SinkLoRA --------------------------------------------------------------------
def test_shifted_groups_match_dense_and_leak():
  T, N = 32, 4
  q, k, v = qkv(1, T, N, N)
  for wrap, sink in (("cyclic", 0), ("none", 2)):
    fn = lambda a, b, c, wrap=wrap, sink=sink: shifted_group_attention(
        a, b, c, group_size=8, wrap=wrap, num_sink=sink)
    dense = M.ShiftedGroups(8, T, N, wrap=wrap, num_sink=sink).to_dense(T, T, N)
    assert_matches_dense(fn, dense, q, k, v, grads=(wrap == "cyclic"))
    # causal leak: output 0 of a shifted head depends on the last key only with wrap="cyclic".
    g = jax.grad(lambda kk: fn(q, kk, v)[0, 0, N - 1].sum())(k)
    assert bool(jnp.abs(g[0, T - 1]).sum() > 0) == (wrap == "cyclic")


def test_shifted_groups_tiny_spec_case():
  m = M.ShiftedGroups(2, 8, 2)
  dense = m.to_dense(8, 8, 2)
  assert set(np.nonzero(dense[1, 0])[0]) == {7, 0}
  assert set(np.nonzero(dense[0, 0])[0]) == {0}
  with pytest.raises(ValueError, match="group_ratio"):
    shifted_group_attention(*qkv(1, 10, 2, 2), group_ratio=0.25)


# -- AnchorAttention / EE-MLLM ----------------------------------------------------------------
def test_anchor_attention_tiny_and_packed():
  ids = (0, 1, 1, 2, 2)
  dense = M.AnchorDocuments(ids).to_dense(5, 5)[0]
  assert set(np.nonzero(dense[3])[0]) == {0, 3}
  assert set(np.nonzero(dense[4])[0]) == {0, 3, 4}
  assert set(np.nonzero(dense[2])[0]) == {0, 1, 2}
  T = 32
  doc = np.array([0] + [1] * 10 + [2] * 12 + [3] * 9)
  q, k, v = qkv(2, T, 2, 1)
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  want = (j <= i) & ((doc[:, None] == doc[None, :]) | (doc[None, :] == 0))
  assert_matches_dense(lambda a, b, c: anchor_attention(a, b, c, doc_ids=doc), want[None],
                       q, k, v)
  per_batch = jnp.asarray(np.stack([doc, doc]))
  out = jax.jit(lambda a, b, c, d: anchor_attention(a, b, c, doc_ids=d))(q, k, v, per_batch)
  np.testing.assert_allclose(out, reference_attention(q, k, v, mask=jnp.asarray(want)),
                             atol=2e-5)


def test_composite_attention_visual_rows_are_values():
  T, nv = 32, 12
  q, k, v = qkv(1, T, 4, 2)
  out = jax.jit(lambda a, b, c: composite_attention(a, b, c, num_visual=nv))(q, k, v)
  np.testing.assert_allclose(out[:, :nv], jnp.repeat(v, 2, 2)[:, :nv], atol=1e-6)
  np.testing.assert_allclose(out[:, nv:],
                             reference_attention(q, k, v, mask=M.Causal())[:, nv:], atol=2e-5)


# -- registry --------------------------------------------------------------------------------
@pytest.mark.parametrize("name,opts,causal,mask", [
    ("sliding_window", {"window": 6}, True, M.SlidingWindow(5, 0)),
    ("s2", {"block_size": 8, "local_blocks": 1, "vert_stride": 2}, True,
     M.S2(2, block_size=8, local_blocks=1, vert_stride=2)),
    ("streaming", {"num_sink": 2, "window": 5}, True, M.SinkWindow(2, 5)),
    ("sinklora", {"group_size": 8}, True, M.ShiftedGroups(8, 32, 2, wrap="none", num_sink=4)),
])
def test_families_registry(name, opts, causal, mask):
  q, k, v = qkv(1, 32, 2, 2)
  out = jax.jit(lambda a, b, c: FAMILIES[name](a, b, c, causal=causal, **opts))(q, k, v)
  np.testing.assert_allclose(out, reference_attention(q, k, v, mask=mask), atol=2e-5)


def test_registry_causal_only_families_raise():
  q, k, v = qkv(1, 16, 2, 2)
  for name in ("streaming", "shifted_group", "anchor", "composite"):
    with pytest.raises(NotImplementedError, match="causal"):
      FAMILIES[name](q, k, v, causal=False)
