"""GridFormer segment softmax / point-to-grid attention and DCAL rollout, GLCA, PWCA."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import reference_attention
from attnjax.vision import (DCALAttention, PointGridAttention, attention_rollout, glca_attention,
                            pairwise_cross_attention, partner_permutation, point_to_grid_attention,
                            sample_grid_bilinear, segment_softmax)

from test_vision_lib import KEY, rnd as _rnd, unif as _unif  # noqa: E402

# NumPy arrays: slicing and indexing test data compiles nothing.
rnd = lambda *a, **kw: np.asarray(_rnd(*a, **kw))
unif = lambda *a, **kw: np.asarray(_unif(*a, **kw))


def test_segment_softmax_matches_per_segment_softmax_and_handles_empty_and_inf():
  logits = np.asarray(rnd((7, 2), 102))
  ids = np.array([2, 0, 2, 2, 0, 3, 2], np.int32)
  with_inf, dropped = logits.copy(), ids.copy()
  with_inf[5] = -np.inf
  dropped[1] = -1
  a, b, c = map(np.asarray, jax.jit(lambda logits, with_inf, ids, dropped: (
      segment_softmax(logits, ids, 5), segment_softmax(with_inf, ids, 5),
      segment_softmax(logits, dropped, 5)))(logits, with_inf, ids, dropped))
  for s in range(5):
    sel = ids == s
    if sel.any():
      e = np.exp(logits[sel] - logits[sel].max(0))
      np.testing.assert_allclose(a[sel], e / e.sum(0), rtol=1e-6)
  assert np.isfinite(b).all() and np.abs(b[5]).max() == 0.0
  for bad in (5, -2):
    bad_ids = ids.copy()
    bad_ids[0] = bad
    with pytest.raises(ValueError, match="segment_ids"):
      segment_softmax(logits, bad_ids, 5)
  assert np.abs(c[1]).max() == 0.0 and c[4, 0] == 1.0


def _fns():
  W = rnd((8, 2), 103) * 0.5
  Wp = rnd((2, 8), 104)
  return (lambda r: jnp.tanh(r @ W)), (lambda o: jnp.sin(o @ Wp))


def _dense_cell_attention(coords, k, v, q, R, s, weight_fn, pos_fn):
  """Independent statement: every cell attends over all points with mask cell(p) == g."""
  B, P, C = k.shape
  weight_fn = jax.jit(weight_fn)  # one compile for all cells
  cell = np.floor(np.asarray(coords) * R).astype(int)
  cid = cell[..., 0] + R * cell[..., 1]
  pos = np.asarray(jax.jit(pos_fn)(np.asarray(np.asarray(coords) * R - cell, np.float32)))
  out = np.zeros((B, R * R, C), np.float32)
  qf = np.asarray(q).reshape(B, R * R, C)
  for b in range(B):
    for g in range(R * R):
      rel = np.asarray(k[b]) - qf[b, g] + pos[b]  # [P, C]: the cell's query against every point
      w = np.asarray(weight_fn(rel))  # [P, C/s]
      w = np.where((cid[b] == g)[:, None], w, -np.inf)
      if np.isfinite(w).any():
        e = np.exp(w - w.max(0))
        a = np.repeat(e / e.sum(0), s, axis=-1)
        out[b, g] = (a * (np.asarray(v[b]) + pos[b])).sum(0)
  return out.reshape(B, R, R, C)


def test_point_to_grid_equals_dense_masked_vector_attention_and_is_order_invariant():
  B, P, C, R, s = 2, 12, 8, 3, 4
  coords = unif((B, P, 2), 111, 0.999)
  k, v = rnd((B, P, C), 105), rnd((B, P, C), 106)
  q = rnd((B, R, R, C), 107)
  wf, pf = _fns()
  f = jax.jit(lambda c, k, v: point_to_grid_attention(c, k, v, q, resolution=R, share_channels=s,
                                                       weight_fn=wf, pos_fn=pf))
  out = f(coords, k, v)
  np.testing.assert_allclose(out, _dense_cell_attention(coords, k, v, q, R, s, wf, pf), rtol=1e-5, atol=1e-5)
  perm = np.random.default_rng(114).permutation(P)
  np.testing.assert_allclose(f(coords[:, perm], k[:, perm], v[:, perm]), out, rtol=1e-5, atol=1e-6)


def test_single_point_cell_gets_weight_one_and_masked_points_drop_out():
  coords = np.array([[[0.1, 0.1], [0.6, 0.6], [0.7, 0.9]]], np.float32)
  k = rnd((1, 3, 4), 108)
  v = rnd((1, 3, 4), 109)
  q = np.zeros((1, 2, 2, 4), np.float32)
  _, pf = _fns()
  pos_fn = lambda o: pf(o)[..., :4]
  p2g = lambda c, m, pf: point_to_grid_attention(c, k, v, q, resolution=2, share_channels=2,
                                                  pos_fn=pf, point_mask=m)
  out, pos0, m = jax.jit(lambda c, m: (p2g(c, None, pos_fn), pos_fn(jnp.array([[0.2, 0.2]]))[0],
                                       p2g(c, m, None)))(coords, np.array([[True, True, False]]))
  np.testing.assert_allclose(out[0, 0, 0], v[0, 0] + pos0, rtol=1e-5)
  np.testing.assert_allclose(out[0, 0, 1], 0.0)  # empty cell (x=1, y=0)
  np.testing.assert_allclose(m[0, 1, 1], v[0, 1], rtol=1e-5)
  with pytest.raises(ValueError, match="coords2d"):
    bad = coords.copy()
    bad[0, 0, 0] = 1.0
    point_to_grid_attention(bad, k, v, q, resolution=2, share_channels=2)


def test_point_grid_layer_and_bilinear_sampling():
  R = 4
  coords = unif((2, 10, 2), 112, 0.99)
  layer = PointGridAttention(share_channels=4)
  grid = np.ones((2, R, R, 8), np.float32)
  feats = np.ones((2, 10, 5), np.float32)
  yy, xx = np.meshgrid(np.arange(R), np.arange(R), indexing="ij")
  lin = (2.0 * xx + 3.0 * yy)[None, :, :, None].astype(np.float32)  # linear field on cell centres
  pts = np.array([[[0.0, 0.0], [1.0, 1.0], [0.5, 0.25]]], np.float32)
  out, got = jax.jit(lambda coords, feats, grid, lin, pts: (
      layer.apply(layer.init(KEY, coords, feats, grid), coords, feats, grid),
      sample_grid_bilinear(lin, pts)[0, :, 0]))(coords, feats, grid, lin, pts)
  assert out.shape == (2, R, R, 8)
  np.testing.assert_allclose(got, [0.0, 5.0 * (R - 1), 2 * 1.5 + 3 * 0.75], rtol=1e-5)


def test_rollout_identity_and_product():
  eye = np.broadcast_to(np.eye(5, dtype=np.float32), (2, 3, 5, 5))
  s = lambda p: 0.5 * p.mean(1) + 0.5 * jnp.eye(4)

  def run(eye, l1, l2):
    p1, p2 = jax.nn.softmax(l1, -1), jax.nn.softmax(l2, -1)
    return attention_rollout([eye, eye]), attention_rollout([p1, p2]), s(p2) @ s(p1)
  r_eye, got, want = jax.jit(run)(eye, rnd((1, 2, 4, 4), 201), rnd((1, 2, 4, 4), 202))
  np.testing.assert_allclose(r_eye, np.broadcast_to(np.eye(5), (2, 5, 5)))
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_glca_equals_gathered_dense_rows_and_pwca_equals_concat():
  B, T, N, H = 2, 9, 2, 4
  q, k, v = (rnd((B, T, N, H), s) for s in range(101, 104))
  scores = unif((B, T), 113)

  def run(q, k, v, scores):
    k2, v2 = k[::-1, :5], v[::-1, :5]
    return (glca_attention(q, k, v, scores, top_ratio=0.25), reference_attention(q, k, v),
            pairwise_cross_attention(q, k, v, k2, v2),
            reference_attention(q, jnp.concatenate([k, k2], 1), jnp.concatenate([v, v2], 1)),
            pairwise_cross_attention(q, k, v, k[:, :0], v[:, :0]))
  (out, idx), full, pwca, ref, pwca_empty = map(
      lambda x: x if isinstance(x, tuple) else np.asarray(x), jax.jit(run)(q, k, v, scores))
  idx = np.asarray(idx)
  assert idx.shape == (B, 3) and (idx[:, 0] == 0).all()
  want_idx = np.argsort(-np.asarray(scores[:, 1:]), axis=1)[:, :2] + 1
  np.testing.assert_array_equal(idx[:, 1:], want_idx)
  np.testing.assert_allclose(out, np.take_along_axis(full, idx[:, :, None, None], 1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(pwca, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(pwca_empty, full, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="top_ratio"):
    glca_attention(q, k, v, scores, top_ratio=0.0)


def test_partner_permutation_and_dcal_layer():
  partner = np.asarray(jax.jit(partner_permutation, static_argnums=1)(KEY, 5))
  assert sorted(partner) == list(range(5)) and (partner != np.arange(5)).all()
  x = rnd((2, 6, 8), 110)
  layer = DCALAttention(num_heads=2, head_dim=4, top_ratio=0.4)

  def run(x, s, p):
    v = layer.init(KEY, x)
    return v, layer.apply(v, x, mode="glca", cls_scores=s), layer.apply(v, x, mode="pwca", partner=p)
  v, (y, idx), y_pwca = jax.jit(run)(x, np.arange(12.0, dtype=np.float32).reshape(2, 6),
                                     np.array([1, 0]))
  assert y.shape == (2, 3, 8) and idx.shape == (2, 3)
  np.testing.assert_array_equal(idx[:, 1:], [[5, 4], [5, 4]])
  assert y_pwca.shape == (2, 6, 8)
  with pytest.raises(ValueError, match="mode"):
    jax.jit(lambda v, x: layer.apply(v, x, mode="cross"))(v, x)


def test_point_to_grid_gradients_match_dense_masked_attention():
  B, P, C, R, s = 1, 8, 4, 2, 2
  coords = unif((B, P, 2), 301, 0.999)
  k, v, q = rnd((B, P, C), 302), rnd((B, P, C), 303), rnd((B, R, R, C), 304)
  wf, pf = _fns()
  wf2 = lambda r: wf(jnp.concatenate([r, r], -1))
  pf2 = lambda o: pf(o)[..., :C]
  cell = np.floor(np.asarray(coords) * R).astype(int)
  same = jnp.asarray((cell[..., 0] + R * cell[..., 1])[:, None, :] == np.arange(R * R)[None, :, None])

  def dense(k, v):  # every cell against every point, masked to its own points
    pos = pf2(coords * R - jnp.floor(coords * R))
    rel = k[:, None] - q.reshape(B, R * R, 1, C) + pos[:, None]  # [B, G, P, C]
    w = jnp.where(same[..., None], wf2(rel), -jnp.inf)
    a = jnp.nan_to_num(jax.nn.softmax(w, axis=2))
    return jnp.einsum("bgpc,bpc->bgc", jnp.repeat(a, s, -1), v + pos).reshape(B, R, R, C)

  fast = lambda k, v: point_to_grid_attention(coords, k, v, q, resolution=R, share_channels=s,
                                              weight_fn=wf2, pos_fn=pf2)
  t = rnd((B, R, R, C), 305)
  g1, g2 = jax.jit(lambda k, v: tuple(jax.grad(lambda k, v: jnp.sum(f(k, v) * t), (0, 1))(k, v)
                                      for f in (fast, dense)))(k, v)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
