"""Hypothesis sweeps: random mask combinations and shapes; layouts exact vs dense."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from attnjax import masks as M
from test_masks_lib import check_layout

MAX_POS = 40  # tables of static masks cover positions [0, MAX_POS)


@st.composite
def leaf(draw, H):
  kind = draw(st.sampled_from(["causal", "window", "global", "docs", "anchor", "strided", "sink",
                               "s2", "shifted", "modality", "keystride", "sameblock", "random"]))
  small = st.integers(0, 5)
  if kind == "causal":
    return M.Causal()
  if kind == "window":
    return M.SlidingWindow(draw(small), draw(small))
  if kind == "global":
    return M.GlobalTokens(tuple(draw(st.lists(st.integers(0, MAX_POS - 1), max_size=3))))
  if kind in ("docs", "anchor", "modality"):
    ids = draw(st.lists(st.integers(0, 3), min_size=MAX_POS, max_size=MAX_POS))
    if kind == "docs":
      return M.Documents(tuple(sorted(ids)) if draw(st.booleans()) else tuple(ids))
    if kind == "anchor":
      return M.AnchorDocuments(tuple(ids))
    return M.Modality(tuple(ids))
  if kind == "strided":
    return M.Strided(draw(st.integers(1, 5)), draw(st.sampled_from(["fixed", "strided"])),
                     causal=draw(st.booleans()))
  if kind == "sink":
    return M.SinkWindow(draw(small), draw(small))
  if kind == "s2":
    causal = draw(st.booleans())
    return M.S2(H, block_size=draw(st.integers(1, 4)), local_blocks=draw(st.integers(1, 3)),
                vert_stride=draw(st.integers(1, 4)), causal=causal,
                vert_position_type=draw(st.sampled_from([None, "absolute", "relative"])))
  if kind == "shifted":
    return M.ShiftedGroups(draw(st.sampled_from([1, 2, 4, 8])), MAX_POS, H,
                           wrap=draw(st.sampled_from(["cyclic", "none"])), num_sink=draw(small))
  if kind == "keystride":
    p = draw(st.integers(1, 5))
    lo = draw(st.integers(0, p))
    return M.KeyStride(p, lo, draw(st.integers(lo, p)))
  if kind == "sameblock":
    return M.SameBlock(draw(st.integers(1, 6)), draw(st.integers(-3, 3)))
  return M.RandomBlocks(4, draw(st.integers(0, 3)), MAX_POS, seed=draw(st.integers(0, 9)),
                        num_heads=H, causal=draw(st.booleans()))


@st.composite
def combo(draw, H, depth=2):
  if depth == 0 or draw(st.booleans()):
    return draw(leaf(H))
  op = draw(st.sampled_from(["and", "or", "not"]))
  a = draw(combo(H, depth - 1))
  if op == "not":
    return ~a
  b = draw(combo(H, depth - 1))
  return a & b if op == "and" else a | b


@st.composite
def case(draw):
  H = draw(st.integers(1, 3))
  mask = draw(combo(H))
  bq, bk = draw(st.sampled_from([1, 2, 3, 4])), draw(st.sampled_from([1, 2, 4, 5]))
  nq, nk = draw(st.integers(1, 4)), draw(st.integers(1, 4))
  T, S = bq * nq, bk * nk
  q_off = draw(st.integers(0, MAX_POS - T))
  k_off = draw(st.integers(0, MAX_POS - S))
  return mask, H, T, S, bq, bk, q_off, k_off


@settings(max_examples=40, deadline=None)
@given(case())
def test_random_combinations_layout_exact(c):
  mask, H, T, S, bq, bk, q_off, k_off = c
  check_layout(mask, T, S, bq, bk, H, q_offset=q_off, k_offset=k_off)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(1, 6), st.integers(1, 12),
       st.sampled_from([1, 2, 4]))
def test_s2_coverage_and_kv_efficiency(H, local, V, nb, B):
  bm = M.s2_block_mask(H, nb * B, block_size=B, local_blocks=local, vert_stride=V)
  assert M.is_kv_cache_efficient(bm)
  if H >= V:
    np.testing.assert_array_equal(bm.any(0), np.tri(nb, dtype=bool))
  if V == 1 or local >= nb:
    np.testing.assert_array_equal(bm, np.broadcast_to(np.tri(nb, dtype=bool), bm.shape))
