"""Shared checks for the mask tests (no tests here): dense-vs-layout agreement and lists."""
import numpy as np

from attnjax.masks.layout import EMPTY, FULL


def expected_classes(dense, bq, bk):
  """int8 [H, nq, nk] classes of a dense [H, T, S] mask."""
  H, T, S = dense.shape
  blocks = dense.reshape(H, T // bq, bq, S // bk, bk)
  any_, all_ = blocks.any((2, 4)), blocks.all((2, 4))
  return np.where(all_, 2, np.where(any_, 1, 0)).astype(np.int8)


def check_lists(lay):
  """CSR (forward) and CSC (backward) lists agree with block_mask, padding as documented."""
  bm = lay.block_mask
  for indices, full, counts, m in ((lay.fwd_indices, lay.fwd_full, lay.fwd_counts, bm),
                                   (lay.bwd_indices, lay.bwd_full, lay.bwd_counts,
                                    np.swapaxes(bm, 1, 2))):
    H, R, _ = m.shape
    assert counts.shape == (H, R)
    for h in range(H):
      for r in range(R):
        cols = np.nonzero(m[h, r] != EMPTY)[0]
        c = int(counts[h, r])
        assert c == len(cols)
        np.testing.assert_array_equal(indices[h, r, :c], cols)
        np.testing.assert_array_equal(full[h, r, :c], m[h, r, cols] == FULL)
        pad = cols[-1] if c else 0
        assert (indices[h, r, c:] == pad).all()
        assert not full[h, r, c:].any()


def check_layout(mask, T, S, bq, bk, num_heads=None, *, q_offset=None, k_offset=0,
                 exact=True, segments=None):
  """Builds the layout and compares it with the dense mask; returns the layout."""
  lay = mask.block_layout(T, S, bq, bk, num_heads, q_offset=q_offset, k_offset=k_offset)
  H = lay.num_heads
  q_off = S - T if q_offset is None else q_offset
  qp, kp = q_off + np.arange(T), k_offset + np.arange(S)
  if segments is None:
    denses = [mask.to_dense(T, S, H, q_positions=qp, k_positions=kp)]
  else:
    d = mask.to_dense(T, S, H, q_positions=qp, k_positions=kp,
                      q_segment_ids=segments[0], kv_segment_ids=segments[1])
    denses = list(d)
  for dense in denses:
    want = expected_classes(dense, bq, bk)
    if exact:
      np.testing.assert_array_equal(lay.block_mask, want, err_msg=repr(mask))
    else:  # conservative: never claims empty/full wrongly
      assert not ((lay.block_mask == EMPTY) & (want != EMPTY)).any(), repr(mask)
      assert not ((lay.block_mask == FULL) & (want != FULL)).any(), repr(mask)
  check_lists(lay)
  return lay
