"""Mask objects as values: hashing, combinators, bad input, the reference oracle."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import masks as M
from test_masks_lib import check_layout


def _make_all():
  return [
      M.Full(), M.Causal(), M.SlidingWindow(3, 1), M.GlobalTokens((0, 3)),
      M.Documents((1, 1, 2, 2, 2, 3, 3, 3)), M.Documents(), M.AnchorDocuments((0, 1, 1, 2, 2, 2, 2, 2)),
      M.AnchorDocuments(), M.Strided(2), M.Strided(4, "strided"),
      M.RandomBlocks(2, 1, 8, seed=1, num_heads=2), M.S2(2, block_size=2, local_blocks=1, vert_stride=2),
      M.ShiftedGroups(4, 8, 2), M.SinkWindow(1, 2), M.Modality.vision_then_text(3, 5),
      M.PerHead((M.Causal(), M.SlidingWindow(1))), M.Causal() & ~M.SlidingWindow(1),
  ]


def test_hash_and_equality():
  a, b = _make_all(), _make_all()
  for x, y in zip(a, b):
    assert x == y and hash(x) == hash(y), x
  assert len(set(a)) == len(a)
  assert M.Documents([1, 1, 2]) == M.Documents((1, 1, 2)) == M.Documents(np.array([1, 1, 2]))
  assert M.GlobalTokens([3, 0, 3]) == M.GlobalTokens((0, 3))
  assert M.QueryIn((1,)) != M.KeyIn((1,))
  assert M.Causal() & M.SlidingWindow(2) == M.Causal() & M.SlidingWindow(2)
  assert M.S2(4) != M.S2(4, vert_stride=4)


def test_lru_cache_and_jit_static_arg():
  calls = []

  @functools.lru_cache(maxsize=None)
  def build(mask):
    calls.append(mask)
    return mask.to_dense(8, 8, 2)

  build(M.SinkWindow(1, 2))
  build(M.SinkWindow(1, 2))
  assert len(calls) == 1
  assert M.Causal().block_layout(8, 8, 2, 2) is M.Causal().block_layout(8, 8, 2, 2)

  traces = []

  @functools.partial(jax.jit, static_argnums=1)
  def masked_sum(x, mask):
    traces.append(1)
    return jnp.where(jnp.asarray(mask.to_dense(8, 8, 2)), x, 0.0).sum()

  x = jnp.ones((2, 8, 8))
  assert float(masked_sum(x, M.Causal() & M.SlidingWindow(1))) == 2 * (8 + 7)
  masked_sum(x, M.Causal() & M.SlidingWindow(1))
  assert len(traces) == 1


def test_predicate_runs_on_jax_arrays_and_under_jit():
  ms = [M.S2(2, block_size=2, local_blocks=1, vert_stride=2), M.RandomBlocks(2, 1, 8, num_heads=2),
        M.Documents((1, 1, 2, 2, 2, 3, 3, 3)), M.ShiftedGroups(4, 8, 2),
        M.GlobalTokens(tuple(range(0, 40, 2))), M.Modality.vision_then_text(3, 5),
        M.Strided(2), M.PerHead((M.Causal(), M.SinkWindow(1, 2)))]
  jitted = (M.S2, M.RandomBlocks, M.Documents)
  for m in ms:
    H = m.num_heads or 2

    def f(qp, kp):
      return m.predicate(jnp.arange(H)[:, None, None], qp[:, None], kp[None, :])  # pylint: disable=cell-var-from-loop

    if isinstance(m, jitted):
      f = jax.jit(f)
    got = np.broadcast_to(np.asarray(f(jnp.arange(8), jnp.arange(8))), (H, 8, 8))
    np.testing.assert_array_equal(got, m.to_dense(8, 8, H), err_msg=repr(m))


def test_combinators():
  c, w = M.Causal(), M.SlidingWindow(2, 2)
  dc, dw = c.to_dense(8, 8), w.to_dense(8, 8)
  np.testing.assert_array_equal((c & w).to_dense(8, 8), dc & dw)
  np.testing.assert_array_equal((c | w).to_dense(8, 8), dc | dw)
  np.testing.assert_array_equal((~c).to_dense(8, 8), ~dc)
  np.testing.assert_array_equal((~(c & w) | w).to_dense(8, 8), ~(dc & dw) | dw)
  assert isinstance(c & w, M.And) and isinstance(c | w, M.Or) and isinstance(~c, M.Not)
  with pytest.raises(TypeError, match="Mask"):
    c & np.ones((8, 8), bool)  # pylint: disable=expression-not-assigned
  # a union that is full although neither side is, and an intersection that is
  # empty although both sides are partial: the builder's refinement is exact
  lay = check_layout(M.Causal() | ~M.Causal(), 8, 8, 4, 4)
  assert (lay.block_mask == 2).all()
  lay = check_layout(M.SlidingWindow(3, 0) | M.SlidingWindow(0, 3), 8, 8, 2, 2)
  assert lay.num_full == 4 + 3 + 3
  lay = check_layout(M.Causal() & ~M.Causal(), 8, 8, 4, 4)
  assert lay.num_visited == 0


def test_layout_counts_and_density():
  lay = M.Causal().block_layout(16, 16, 4, 4, 2)
  assert lay.num_visited == 2 * 10 and lay.num_full == 2 * 6
  assert lay.density == pytest.approx(20 / 32)
  assert (lay.fwd_counts == np.arange(1, 5)).all()
  assert (lay.bwd_counts == np.arange(4, 0, -1)).all()


@pytest.mark.parametrize("make,match", [
    (lambda: M.SlidingWindow(-1), "left"),
    (lambda: M.SlidingWindow(2, -3), "right"),
    (lambda: M.SinkWindow(2, -1), "window"),
    (lambda: M.Strided(0), "stride"),
    (lambda: M.ShiftedGroups(3, 8, 2), "group_size"),
    (lambda: M.ShiftedGroups(2, 8, 2, wrap="roll"), "wrap"),
    (lambda: M.RandomBlocks(3, 1, 8), "block_size"),
    (lambda: M.Documents(np.zeros((2, 4), int)), "segment_ids"),
    (lambda: M.Documents((0.5, 1.0)), "segment_ids"),
    (lambda: M.AnchorDocuments([[0, 1]]), "doc_ids"),
    (lambda: M.Modality(()), "modality_ids"),
    (lambda: M.GlobalTokens((-1,)), "positions"),
    (lambda: M.PerHead(()), "masks"),
    (lambda: M.Causal().block_layout(8, 8, 3, 4), "block_q"),
    (lambda: M.Causal().block_layout(8, 8, 4, 3), "block_kv"),
    (lambda: M.Causal().block_layout(8, 8, 4, 4, 0), "num_heads"),
    (lambda: M.Documents((1, 1, 2)).to_dense(4, 4), "positions"),
    (lambda: M.ShiftedGroups(2, 8, 2).to_dense(16, 16), "positions"),
    (lambda: M.Documents().to_dense(4, 4, q_segment_ids=np.zeros((2, 3), int),
                                    kv_segment_ids=np.zeros((2, 4), int)), "q_segment_ids"),
    (lambda: M.Documents().to_dense(4, 4, q_segment_ids=np.zeros((2, 4), int),
                                    kv_segment_ids=np.zeros((4,), int)), "kv_segment_ids"),
])
def test_bad_input(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def _qkv(B=2, T=8, S=8, N=2, K=2, H=4, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(ks[0], (B, T, N, H)), jax.random.normal(ks[1], (B, S, K, H)),
          jax.random.normal(ks[2], (B, S, K, H)))


@pytest.mark.parametrize("mask", [
    M.Causal() & M.SlidingWindow(2), M.S2(2, block_size=2, local_blocks=1, vert_stride=2),
    M.AnchorDocuments((0, 1, 1, 1, 2, 2, 3, 3)), M.ShiftedGroups(4, 8, 2), M.SinkWindow(1, 2),
    M.GlobalTokens((2,)) | M.SlidingWindow(1, 1), M.Modality.vision_then_text(3, 5),
], ids=lambda m: type(m).__name__)
def test_reference_attention_mask_object_equals_dense(mask):
  q, k, v = _qkv()
  want = attnjax.reference_attention(q, k, v, mask=jnp.asarray(mask.to_dense(8, 8, 2))[None])
  got = attnjax.reference_attention(q, k, v, mask=mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mask", [M.Documents() & M.Causal(), M.AnchorDocuments(), M.Documents()],
                         ids=["docs_causal", "anchor", "docs"])
def test_reference_attention_segment_masks(mask):
  q, k, v = _qkv(seed=1)
  seg = np.array([[0, 1, 1, 1, 2, 2, 2, 2], [0, 1, 1, 2, 2, 2, 3, 3]], np.int32)
  dense = mask.to_dense(8, 8, 2, q_segment_ids=seg, kv_segment_ids=seg)
  want = attnjax.reference_attention(q, k, v, mask=jnp.asarray(dense))
  got = attnjax.reference_attention(q, k, v, mask=mask, segment_ids=jnp.asarray(seg))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
