"""S2-Attention (spec P2-10): tiny case verbatim, closed form vs a loop oracle, properties."""
import numpy as np
import pytest

from attnjax import masks as M
from test_masks_lib import check_layout


def oracle_blocks(H, nqb, nkb, *, local=2, V=4, causal=True, homo=False, ndense=0, nkv=None,
                  step=None, off=0, vtype=None, q0=0, k0=0):
  """Block mask by loops, following DKernel's get_sparse_attn_mask statement."""
  nkv = nkv or H
  rep = H // nkv
  if step is None:
    step = max(1, V // (1 if homo else H))
  vtype = vtype or ("absolute" if causal else "relative")
  left, right = (local, 1) if causal else ((local, local) if isinstance(local, int) else local)
  out = np.zeros((H, nqb, nkb), bool)
  for h in range(H):
    g = 0 if homo else h // rep
    dense = g >= nkv - ndense
    for a in range(nqb):
      for b in range(nkb):
        qb, kb = q0 + a, k0 + b
        if dense:
          ok = True
        elif vtype == "absolute":
          ok = (qb - kb < left and kb - qb < right) or (kb + g * step + off) % V == 0
        else:
          e = max(qb - kb - left + 1, 0) + max(kb - qb - right + 1, 0)
          ok = e % V == 0
        out[h, a, b] = ok and (qb >= kb or not causal)
  return out


def test_tiny_case_verbatim():
  bm = M.s2_block_mask(4, 8, block_size=1, local_blocks=2, vert_stride=4)
  cols = {0: {0, 4}, 1: {3, 7}, 2: {2, 6}, 3: {1, 5}}
  for h in range(4):
    assert {j for j in range(8) if (j + h) % 4 == 0} == cols[h]
    vertical = {j for j in range(8) if bm[h, 7, j] and 7 - j >= 2}
    assert vertical == {j for j in cols[h] if j <= 5}
  np.testing.assert_array_equal(bm[0, 7].astype(int), [1, 0, 0, 0, 1, 0, 1, 1])
  np.testing.assert_array_equal(bm.any(0), np.tri(8, dtype=bool))
  # density over the causal block triangle (36 blocks for 8 blocks)
  density = bm.sum((1, 2)) / (8 * 9 / 2)
  np.testing.assert_allclose(np.round(density, 2), [0.64, 0.50, 0.53, 0.58])
  # the same at token level with 16-token blocks
  m = M.S2(4, block_size=16, local_blocks=2, vert_stride=4)
  np.testing.assert_array_equal(m.block_layout(128, 128, 16, 16).block_mask != 0, bm)


CONFIGS = [
    dict(H=4, local=2, V=4),
    dict(H=2, local=1, V=8),                       # step = 4 (fewer heads than stride)
    dict(H=8, local=3, V=4, nkv=2),                 # GQA: pattern per KV head
    dict(H=4, local=2, V=3, ndense=1),              # last head dense
    dict(H=4, local=2, V=4, nkv=2, ndense=1),
    dict(H=3, local=2, V=4, homo=True, off=1),
    dict(H=4, local=2, V=4, step=2, off=3),
    dict(H=2, local=(2, 1), V=3, causal=False),     # bidirectional, relative
    dict(H=2, local=2, V=3, causal=False, vtype="absolute"),
    dict(H=2, local=2, V=3, causal=True, vtype="relative"),
    dict(H=4, local=2, V=4, q0=3, k0=0),
]


def _mask(c, B):
  return M.S2(c["H"], block_size=B, local_blocks=c.get("local", 2), vert_stride=c.get("V", 4),
              causal=c.get("causal", True), homo_head=c.get("homo", False),
              num_dense_heads=c.get("ndense", 0), num_kv_heads=c.get("nkv"),
              head_sliding_step=c.get("step"), head_sliding_offset=c.get("off", 0),
              vert_position_type=c.get("vtype"))


@pytest.mark.parametrize("c", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_closed_form_against_oracle(c):
  B, nb = 4, 7
  q0, k0 = c.get("q0", 0), c.get("k0", 0)
  kw = {k: v for k, v in c.items() if k not in ("H",)}
  want = oracle_blocks(c["H"], nb, nb + q0 - k0, **kw)
  got = M.s2_block_mask(c["H"], nb * B, (nb + q0 - k0) * B, block_size=B,
                        local_blocks=c.get("local", 2), vert_stride=c.get("V", 4),
                        causal=c.get("causal", True), homo_head=c.get("homo", False),
                        num_dense_heads=c.get("ndense", 0), num_kv_heads=c.get("nkv"),
                        head_sliding_step=c.get("step"), head_sliding_offset=c.get("off", 0),
                        vert_position_type=c.get("vtype"), q_start=q0 * B, kv_start=k0 * B)
  np.testing.assert_array_equal(got, want)
  m = _mask(c, B)
  T, S = nb * B, (nb + q0 - k0) * B
  dense = m.to_dense(T, S, c["H"], q_positions=q0 * B + np.arange(T),
                     k_positions=k0 * B + np.arange(S))
  tok = np.kron(want, np.ones((B, B), bool))
  if c.get("causal", True):
    tok &= (q0 * B + np.arange(T))[:, None] >= (k0 * B + np.arange(S))[None, :]
  np.testing.assert_array_equal(dense, tok)
  # exact layouts for aligned, merged (Merge-Q style), split and unaligned blocks
  for bq, bk, qo in ((B, B, 0), (2 * B, B, 0), (B // 2, B, 0), (2, 7, 0), (B, B, 3)):
    if T % bq or S % bk:
      continue
    check_layout(m, T, S, bq, bk, q_offset=q0 * B + qo, k_offset=k0 * B)


@pytest.mark.parametrize("H,V", [(4, 4), (8, 4), (4, 2), (6, 5)])
def test_coverage_when_heads_cover_stride(H, V):
  bm = M.s2_block_mask(H, 20, block_size=1, local_blocks=2, vert_stride=V)
  np.testing.assert_array_equal(bm.any(0), np.tri(20, dtype=bool))


def test_coverage_fails_with_too_few_heads():
  bm = M.s2_block_mask(2, 20, block_size=1, local_blocks=1, vert_stride=8)
  assert (bm.any(0) != np.tri(20, dtype=bool)).any()


@pytest.mark.parametrize("H,local,V,nkv,off", [(4, 2, 4, None, 0), (2, 3, 8, None, 1),
                                                (8, 1, 4, 2, 2), (4, 5, 3, None, 0)])
def test_kv_cache_efficient(H, local, V, nkv, off):
  bm = M.s2_block_mask(H, 24, block_size=1, local_blocks=local, vert_stride=V,
                       num_kv_heads=nkv, head_sliding_offset=off)
  assert M.is_kv_cache_efficient(bm)
  rel = M.s2_block_mask(H, 24, block_size=1, local_blocks=local, vert_stride=V,
                        vert_position_type="relative")
  assert not M.is_kv_cache_efficient(rel) or V == 1 or local >= 24


def test_degenerate_configs_are_dense_causal():
  for kw in (dict(local_blocks=2, vert_stride=1), dict(local_blocks=8, vert_stride=4),
             dict(local_blocks=9, vert_stride=3)):
    bm = M.s2_block_mask(4, 32, block_size=4, **kw)
    np.testing.assert_array_equal(bm, np.broadcast_to(np.tri(8, dtype=bool), bm.shape))
    m = M.S2(4, block_size=4, **kw)
    np.testing.assert_array_equal(m.to_dense(32, 32), np.broadcast_to(np.tri(32, dtype=bool),
                                                                       (4, 32, 32)))


def test_nnz_per_head_closed_form():
  """Per-head visited blocks = local band + vertical columns outside it (causal)."""
  nb, local, V = 16, 3, 4
  bm = M.s2_block_mask(4, nb, block_size=1, local_blocks=local, vert_stride=V)
  for h in range(4):
    want = 0
    for qb in range(nb):
      band = min(qb + 1, local)
      far = [kb for kb in range(0, qb - local + 1) if (kb + h) % V == 0]
      want += band + len(far)
    assert bm[h].sum() == want


def test_s2_bad_input():
  with pytest.raises(ValueError, match="vert_stride"):
    M.S2(4, vert_stride=0)
  with pytest.raises(ValueError, match="local_blocks"):
    M.S2(4, local_blocks=0)
  with pytest.raises(ValueError, match="local_blocks"):
    M.S2(4, local_blocks=(2, 0), causal=False)
  with pytest.raises(ValueError, match="local_blocks"):
    M.S2(4, local_blocks=(2, 2), causal=True)
  with pytest.raises(ValueError, match="num_kv_heads"):
    M.S2(4, num_kv_heads=3)
  with pytest.raises(ValueError, match="homo_head"):
    M.S2(4, homo_head=True, num_dense_heads=1)
  with pytest.raises(ValueError, match="num_heads"):
    M.S2(4, block_size=4).to_dense(8, 8, 2)
  with pytest.raises(ValueError, match="q_start"):
    M.s2_block_mask(4, 64, q_start=3)
