"""Every mask's to_dense against an independent NumPy statement of its definition,
and its block layout against the dense mask (exact for static masks)."""
import numpy as np
import pytest

from attnjax import masks as M
from test_masks_lib import check_layout

T = 16


def grid(T_, S_=None, q_off=None):
  S_ = T_ if S_ is None else S_
  q_off = S_ - T_ if q_off is None else q_off
  i = (q_off + np.arange(T_))[:, None]
  j = np.arange(S_)[None, :]
  return i, j


# -- independent definitions (loops or plain broadcasting) ----------------------------
def ref_global(G, T_):
  out = np.zeros((T_, T_), bool)
  for g in G:
    out[g, :] = True
    out[:, g] = True
  return out


def ref_documents(ids, causal=False):
  ids = np.asarray(ids)
  out = ids[:, None] == ids[None, :]
  return out & np.tri(len(ids), dtype=bool) if causal else out


def ref_anchor(doc):
  n = len(doc)
  out = np.zeros((n, n), bool)
  for i in range(n):
    for j in range(i + 1):
      out[i, j] = doc[i] == doc[j] or doc[j] == 0
  return out


def ref_sink_window(T_, sink, recent):
  i, j = grid(T_)
  return (j <= i) & ((j < sink) | (i - j < recent))


def ref_strided(T_, l, mode, c=1, causal=True):
  out = np.zeros((T_, T_), bool)
  for i in range(T_):
    for j in range(T_):
      if mode == "strided":
        ok = (abs(i - j) < l if not causal else 0 <= i - j < l) or (i - j) % l == 0
      else:
        ok = i // l == j // l or j % l >= l - c
      out[i, j] = ok and (j <= i or not causal)
  return out


def ref_modality(ids, text_id=0):
  n = len(ids)
  out = np.zeros((n, n), bool)
  for i in range(n):
    if ids[i] == text_id:
      out[i, :i + 1] = True
    else:
      out[i, i] = True
  return out


def ref_shifted(L, G, H, wrap="cyclic", sink=0):
  """By rolling, as LongLoRA does: shifted heads see groups of p(i) = (i - G//2) mod L."""
  s = G // 2
  out = np.zeros((H, L, L), bool)
  for h in range(H):
    shifted = h >= H // 2
    for i in range(L):
      for j in range(L):
        if shifted and wrap == "cyclic":
          pi, pj = (i - s) % L, (j - s) % L
          ok = pi // G == pj // G and pj <= pi
        elif shifted:
          ok = (i - s) // G == (j - s) // G and j <= i
        else:
          ok = i // G == j // G and j <= i
        out[h, i, j] = ok or (j < sink and j <= i)
  return out


CASES = [
    ("full", M.Full(), lambda: np.ones((T, T), bool)),
    ("causal", M.Causal(), lambda: np.tri(T, dtype=bool)),
    ("window", M.SlidingWindow(3, 2), lambda: (lambda i, j: (i - j <= 3) & (j - i <= 2))(*grid(T))),
    ("global", M.GlobalTokens((0, 5, 11)), lambda: ref_global((0, 5, 11), T)),
    ("docs", M.Documents((1,) * 5 + (2,) * 7 + (3,) * 4), lambda: ref_documents((1,) * 5 + (2,) * 7 + (3,) * 4)),
    ("docs_noncontig", M.Documents([1, 1, 2, 2, 2, 1, 1, 1, 3, 3, 1, 2, 2, 2, 2, 3]),
     lambda: ref_documents([1, 1, 2, 2, 2, 1, 1, 1, 3, 3, 1, 2, 2, 2, 2, 3])),
    ("anchor", M.AnchorDocuments((0,) + (1,) * 6 + (2,) * 3 + (3,) * 6),
     lambda: ref_anchor((0,) + (1,) * 6 + (2,) * 3 + (3,) * 6)),
    ("sinkwindow", M.SinkWindow(2, 3), lambda: ref_sink_window(T, 2, 3)),
    ("sinkonly", M.SinkWindow(3, 0), lambda: ref_sink_window(T, 3, 0)),
    ("strided", M.Strided(4, "strided"), lambda: ref_strided(T, 4, "strided")),
    ("strided_nc", M.Strided(3, "strided", causal=False), lambda: ref_strided(T, 3, "strided", causal=False)),
    ("fixed", M.Strided(4, "fixed", num_summary=2), lambda: ref_strided(T, 4, "fixed", 2)),
    ("fixed_nc", M.Strided(4, "fixed", causal=False), lambda: ref_strided(T, 4, "fixed", 1, False)),
    ("modality", M.Modality.vision_then_text(6, 10), lambda: ref_modality([1] * 6 + [0] * 10)),
    ("modality_mixed", M.Modality((0, 0, 1, 1, 1, 0, 0, 2, 2, 0, 0, 0, 1, 0, 0, 0)),
     lambda: ref_modality((0, 0, 1, 1, 1, 0, 0, 2, 2, 0, 0, 0, 1, 0, 0, 0))),
]


@pytest.mark.parametrize("name,mask,ref", CASES, ids=[c[0] for c in CASES])
def test_dense_and_layout(name, mask, ref):
  want = ref()
  np.testing.assert_array_equal(mask.to_dense(T, T)[0], want)
  for bq, bk in ((4, 4), (2, 8), (8, 2), (1, 16)):
    check_layout(mask, T, T, bq, bk)


@pytest.mark.parametrize("wrap,sink", [("cyclic", 0), ("none", 0), ("cyclic", 3), ("none", 2)])
def test_shifted_groups(wrap, sink):
  m = M.ShiftedGroups(4, 16, 4, wrap=wrap, num_sink=sink)
  np.testing.assert_array_equal(m.to_dense(16, 16), ref_shifted(16, 4, 4, wrap, sink))
  for b in (2, 4, 8):
    check_layout(m, 16, 16, b, b)
  check_layout(m, 8, 16, 4, 2)


def test_longlora_tiny_case():
  d = M.ShiftedGroups(2, 8, 2).to_dense(8, 8)
  shifted = d[1]
  assert set(np.nonzero(shifted[0])[0]) == {7, 0}
  groups = [{1, 2}, {3, 4}, {5, 6}, {7, 0}]
  for i in range(8):
    g = next(g for g in groups if i in g)
    assert set(np.nonzero(shifted[i])[0]) <= g
  np.testing.assert_array_equal(d[0], ref_shifted(8, 2, 2)[0])
  assert set(np.nonzero(d[0][0])[0]) == {0}  # unshifted head: no leak
  # group = L on an unshifted head -> dense causal; num_sink = L -> dense causal
  np.testing.assert_array_equal(M.ShiftedGroups(8, 8, 2).to_dense(8, 8)[0], np.tri(8, dtype=bool))
  np.testing.assert_array_equal(M.ShiftedGroups(2, 8, 2, wrap="none", num_sink=8).to_dense(8, 8),
                                np.broadcast_to(np.tri(8, dtype=bool), (2, 8, 8)))


def test_anchor_tiny_case():
  d = M.AnchorDocuments((0, 1, 1, 2, 2)).to_dense(5, 5)[0]
  assert set(np.nonzero(d[3])[0]) == {0, 3}
  assert set(np.nonzero(d[4])[0]) == {0, 3, 4}
  assert set(np.nonzero(d[2])[0]) == {0, 1, 2}
  # one document -> plain causal attention
  np.testing.assert_array_equal(M.AnchorDocuments((0,) + (1,) * 7).to_dense(8, 8)[0],
                                np.tri(8, dtype=bool))


def test_sink_window_covers_everything():
  np.testing.assert_array_equal(M.SinkWindow(3, 5).to_dense(8, 8)[0], np.tri(8, dtype=bool))


def test_modality_visual_rows_see_only_themselves():
  d = M.Modality.vision_then_text(3, 4).to_dense(7, 7)[0]
  np.testing.assert_array_equal(d[:3], np.eye(7, dtype=bool)[:3])
  np.testing.assert_array_equal(d[3:], np.tri(7, dtype=bool)[3:])


def test_per_head():
  ms = (M.Causal(), M.SlidingWindow(1, 1), M.Causal(), M.GlobalTokens((2,)))
  m = M.PerHead(ms)
  d = m.to_dense(12, 12)
  assert d.shape == (4, 12, 12)
  for h, mh in enumerate(ms):
    np.testing.assert_array_equal(d[h], mh.to_dense(12, 12)[0])
  check_layout(m, 12, 12, 4, 3)
  with pytest.raises(ValueError, match="num_heads"):
    m.to_dense(12, 12, 3)


def test_random_blocks_bigbird_properties():
  m = M.RandomBlocks(block_size=4, num_random=2, seq_len=48, seed=3, num_heads=3,
                     exclude_window=2, exclude_global=1)
  t = m.table()
  nb = 12
  assert t.shape == (3, nb, nb)
  assert (t.sum(-1) == 2).all()  # exactly r per row (enough candidates here)
  qb, kb = np.arange(nb)[:, None], np.arange(nb)[None, :]
  assert not (t & (np.abs(qb - kb) < 2)).any()
  assert not t[..., 0].any() and not t[..., -1].any()
  assert not (t[0] == t[1]).all()  # per head
  np.testing.assert_array_equal(t, M.RandomBlocks(4, 2, 48, seed=3, num_heads=3, exclude_window=2,
                                                  exclude_global=1).table())
  assert not (t == M.RandomBlocks(4, 2, 48, seed=4, num_heads=3, exclude_window=2,
                                  exclude_global=1).table()).all()
  d = m.to_dense(48, 48)
  np.testing.assert_array_equal(d, np.kron(t, np.ones((4, 4), bool)))
  for b in ((4, 4), (8, 8), (2, 6), (12, 16)):
    check_layout(m, 48, 48, *b)
  causal = M.RandomBlocks(4, 3, 32, seed=0, causal=True)
  tc = causal.table()[0]
  assert not np.triu(tc, 1).any()
  assert (tc.sum(-1) == np.minimum(np.arange(8) + 1, 3)).all()
  # BigBird-ITC composition: window blocks | global blocks | random blocks
  bb = (M.SlidingWindow(7, 7) | M.GlobalTokens(tuple(range(4)) + tuple(range(44, 48))) | m)
  check_layout(bb, 48, 48, 4, 4, 3)


def test_documents_runtime_segments():
  seg = np.array([[1, 1, 1, 2, 2, 2, 2, 3], [5, 5, 5, 5, 5, 6, 6, 6]])
  m = M.Documents() & M.Causal()
  d = m.to_dense(8, 8, 2, q_segment_ids=seg, kv_segment_ids=seg)
  assert d.shape == (2, 2, 8, 8)
  for b in range(2):
    np.testing.assert_array_equal(d[b, 0], ref_documents(seg[b], causal=True))
  check_layout(m, 8, 8, 2, 2, 2, exact=False, segments=(seg, seg))
  a = M.AnchorDocuments()
  doc = np.array([[0, 1, 1, 2, 2, 2, 3, 3]])
  np.testing.assert_array_equal(a.to_dense(8, 8, q_segment_ids=doc, kv_segment_ids=doc)[0, 0],
                                ref_anchor(doc[0]))
  check_layout(a, 8, 8, 4, 4, exact=False, segments=(doc, doc))
  assert (M.Documents().block_layout(8, 8, 4, 4).block_mask == 1).all()  # nothing known
  with pytest.raises(ValueError, match="segment ids"):
    M.Documents().to_dense(8, 8)


def test_cross_attention_and_offsets():
  """Bottom-right aligned cross shapes and offset layouts stay exact."""
  ms = [M.Causal() & M.SlidingWindow(5), M.SinkWindow(2, 4), M.Strided(4),
        M.Documents(tuple(np.repeat([1, 2, 3], [9, 8, 7]))), M.AnchorDocuments(
            tuple(np.r_[0, np.repeat([1, 2], [11, 12])])), M.GlobalTokens((1, 17))]
  for m in ms:
    check_layout(m, 8, 24, 4, 4)
    check_layout(m, 8, 16, 2, 4, q_offset=12, k_offset=8)


def test_static_tables_with_padded_lengths():
  """Layouts accept positions past a static table (kernels pad): they are masked."""
  from test_masks_lib import check_lists, expected_classes  # pylint: disable=g-import-not-at-top
  ms = [M.Documents((1,) * 5 + (2,) * 6), M.AnchorDocuments((0,) + (1,) * 4 + (2,) * 6),
        M.Modality.vision_then_text(4, 7), M.RandomBlocks(1, 2, 11, seed=2)]
  for m in ms:
    with pytest.raises(ValueError, match="positions"):
      m.to_dense(16, 16)
    lay = m.block_layout(16, 16, 4, 4)
    p = np.arange(16)
    dense = np.asarray(m.predicate(0, p[:, None], p[None, :]), bool)[None]
    np.testing.assert_array_equal(lay.block_mask, expected_classes(dense, 4, 4), err_msg=repr(m))
    check_lists(lay)
