"""Content-based sparse families of attnjax.dynamic against the dense reference."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import dynamic as D
from attnjax.dynamic import routing as R
from attnjax.dynamic import select as S
from attnjax.layers.rope import apply_rope
from test_dynamic_select import _qkv, _vg, assert_same

CAUSAL = attnjax.masks.Causal()
ref_causal = lambda q, k, v: attnjax.reference_attention(q, k, v, mask=CAUSAL)
ref_full = lambda q, k, v: attnjax.reference_attention(q, k, v)
ref_mask = jax.jit(lambda q, k, v, m: attnjax.reference_attention(q, k, v, mask=m))
ref_full_j = jax.jit(ref_full)


def J(fn, *args, **static):
  """fn(*args, **static) compiled once (eager op-by-op dispatch is slow on a busy CPU)."""
  return jax.jit(functools.partial(fn, **static))(*args)


# -- SeerAttention --------------------------------------------------------------
def _gate_params(N=4, K=2, H=8, D_=16, seed=0):
  rng = np.random.default_rng(seed)
  return {"wq": jnp.asarray(rng.standard_normal((N, H, D_)), jnp.float32),
          "wk": jnp.asarray(rng.standard_normal((K, 2 * H, D_)), jnp.float32)}


def test_seer_all_blocks_dense_and_threshold_restricted():
  q, k, v = _qkv()
  p = _gate_params()
  def restricted(a, b, c):
    out, (idx, cnt) = D.seer_attention(a, b, c, p, block=8, threshold=0.3, return_layout=True)
    mask = S.block_layout_to_mask(idx, cnt, 32, 32, 8, 8, 4) & CAUSAL.to_dense(32, 32)[None]
    return out, cnt, attnjax.reference_attention(a, b, c, mask=mask)
  *_, (out, cnt, ref) = assert_same(lambda a, b, c: D.seer_attention(a, b, c, p, block=8, k=4),
                                    ref_causal, q, k, v, extra=restricted)
  cnt = np.asarray(cnt)
  assert cnt.min() >= 1 and cnt[:, :, -1].min() == 4  # last row dense
  np.testing.assert_allclose(out, ref, atol=2e-5)


def test_seer_gate_causal_truth_and_distillation_grads():
  q, k, _ = _qkv()
  gate = D.SeerAttnGate(hidden=16, block=8)
  def run(a, b):
    params = gate.init(jax.random.PRNGKey(0), a, b)
    gt = D.seer_ground_truth(a, b, block=8)
    _, _, probs = attnjax.reference_attention(a, b, b, mask=CAUSAL, return_lse=True,
                                              return_probs=True)
    loss = lambda prm: D.seer_distillation_loss(gate.apply(prm, a, b), gt)
    return gate.apply(params, a, b), gt, probs, jax.grad(loss)(params)
  logits, gt, probs, grads = jax.tree_util.tree_map(np.asarray, jax.jit(run)(q, k))
  assert logits.shape == (1, 4, 4, 4)
  assert np.all(np.isneginf(logits[..., np.triu_indices(4, 1)[0], np.triu_indices(4, 1)[1]]))
  np.testing.assert_allclose(gt.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(gt[0, 0, 1, 0] * probs[0, 0, 8:16, :16].reshape(8, 2, 8).max((0, 2)).sum(),
                             probs[0, 0, 8:16, 0:8].max(), rtol=1e-5)
  assert all(np.abs(g).max() > 0 for g in jax.tree_util.tree_leaves(grads))
  with pytest.raises(ValueError, match="last_block_dense"):
    D.gate_to_layout(logits, k=2, last_block_dense=True)
  with pytest.raises(ValueError, match="exactly one"):
    D.gate_to_layout(logits)


# -- HiP --------------------------------------------------------------------------
def test_hip_dense_limit_and_restricted():
  q, k, v = _qkv()
  def restricted(a, b, c):
    out, (idx, cnt) = D.hip_attention(a, b, c, top_k=8, block_size_q=8, return_indices=True)
    mask = S.block_layout_to_mask(idx, cnt, 32, 32, 8, 2, 4) & CAUSAL.to_dense(32, 32)[None]
    return out, idx, attnjax.reference_attention(a, b, c, mask=mask)
  *_, (out, idx, ref) = assert_same(
      lambda a, b, c: D.hip_attention(a, b, c, top_k=32, block_size_q=8), ref_causal, q, k, v,
      extra=restricted)
  assert idx.shape == (1, 4, 4, 4)
  np.testing.assert_allclose(out, ref, atol=2e-5)
  with pytest.raises(ValueError, match="top_k=64"):
    D.hip_mask(q, k, top_k=64, block_size_q=8)


def test_hip_finds_planted_keys_without_retrace():
  q, k, _ = _qkv(T=64, N=2, K=2)
  k = k.at[:, 6:8].set(q[:, 40:41] * 6)  # one key block every late query block loves
  traces = []

  @jax.jit
  def sel(a, b):
    traces.append(1)
    return D.hip_mask(a, b, top_k=8, block_size_q=8, block_size_k=2)

  idx, cnt = sel(q, k)
  sel(q * 0.5, k)
  assert len(traces) == 1
  i, c = np.asarray(idx), np.asarray(cnt)
  assert all(3 in i[0, h, 5, :c[0, h, 5]] for h in range(2))


# -- BiFormer ---------------------------------------------------------------------
def test_bi_level_routing_all_regions_is_global_and_tiny_case():
  q, k, v = (np.asarray(x).reshape(1, 4, 8, x.shape[2], 8) for x in _qkv(N=2, K=2))
  flat = lambda x: x.reshape(1, 32, 2, 8)
  fn = lambda a, b, c: flat(D.bi_level_routing_attention(a, b, c, num_regions=(2, 2), topk=4,
                                                         scale=8 ** -0.5))
  np.testing.assert_allclose(J(fn, q, k, v), ref_full_j(flat(q), flat(k), flat(v)), atol=2e-5)
  x = np.asarray(_qkv(T=16, N=1, K=1)[0]).reshape(1, 4, 4, 1, 8)
  out, regions = J(D.bi_level_routing_attention, x, x, x, num_regions=2, topk=1,
                   return_regions=True)
  rid = (np.arange(4)[:, None] // 2) * 2 + (np.arange(4)[None, :] // 2)  # region of each pixel
  routed = np.asarray(regions)[0, rid.reshape(-1), 0]
  mask = routed[:, None] == rid.reshape(-1)[None, :]  # exactly 4 keys per query
  assert mask.sum(-1).min() == mask.sum(-1).max() == 4
  xf = x.reshape(1, 16, 1, 8)
  ref = J(lambda a, m: attnjax.reference_attention(a, a, a, mask=m, scale=8 ** -0.5), xf, mask)
  np.testing.assert_allclose(out.reshape(1, 16, 1, 8), ref, atol=2e-5)
  with pytest.raises(ValueError, match="topk"):
    D.bi_level_routing_attention(x, x, x, num_regions=2, topk=5)
  with pytest.raises(ValueError, match="divide"):
    D.bi_level_routing_attention(x, x[:, :3], x[:, :3], num_regions=2, topk=1)


def test_bi_level_routing_cross_attention_follows_the_routed_regions():
  # Queries on a 4x4 grid, keys on 6x2: 2x2 regions each (query regions of 2x2 tokens,
  # key regions of 3x1); the output equals dense attention restricted to the routed regions.
  q = np.asarray(_qkv(T=16, N=2, K=1)[0]).reshape(1, 4, 4, 2, 8)
  _, k, v = map(np.asarray, _qkv(T=12, N=2, K=1, seed=1))
  k, v = k.reshape(1, 6, 2, 1, 8), v.reshape(1, 6, 2, 1, 8)
  out, regions = J(D.bi_level_routing_attention, q, k, v, num_regions=2, topk=2,
                   return_regions=True)
  q_rid = ((np.arange(4)[:, None] // 2) * 2 + (np.arange(4)[None, :] // 2)).reshape(-1)
  k_rid = ((np.arange(6)[:, None] // 3) * 2 + (np.arange(2)[None, :] // 1)).reshape(-1)
  routed = np.asarray(regions)[0][q_rid]  # [16, topk]
  mask = (routed[:, :, None] == k_rid[None, None, :]).any(1)
  ref = J(lambda a, b, c, m: attnjax.reference_attention(a, b, c, mask=m, scale=16 ** -0.5),
          q.reshape(1, 16, 2, 8), k.reshape(1, 12, 1, 8), v.reshape(1, 12, 1, 8), mask)
  np.testing.assert_allclose(out.reshape(1, 16, 2, 8), ref, atol=2e-5)
  assert mask.sum(-1).min() == 6  # 2 routed regions of 3 keys


def test_lce_is_a_same_padded_depthwise_convolution():
  rng = np.random.default_rng(2)
  v = rng.standard_normal((1, 5, 6, 2, 3)).astype(np.float32)  # [B, H, W, K, Hv]
  kern = rng.standard_normal((3, 3, 6)).astype(np.float32)
  bias = rng.standard_normal(6).astype(np.float32)
  got = np.asarray(jax.jit(D.lce)(v, kern, bias))
  x = np.pad(v.reshape(1, 5, 6, 6), ((0, 0), (1, 1), (1, 1), (0, 0)))
  want = np.zeros((1, 5, 6, 6), np.float32) + bias
  for i in range(5):
    for j in range(6):
      want[0, i, j] += np.einsum("abc,abc->c", x[0, i:i + 3, j:j + 3], kern)
  np.testing.assert_allclose(got, want.reshape(v.shape), atol=1e-5)
  with pytest.raises(ValueError, match="kernel"):
    D.lce(jnp.asarray(v), jnp.ones((3, 3, 5)))


def test_bi_level_routing_layer_shape():
  layer = D.BiLevelRoutingAttention(dim=16, num_heads=2, num_regions=2, topk=2, side_dwconv=3)
  y = jnp.ones((1, 4, 4, 16))
  assert jax.jit(lambda x: layer.apply(layer.init(jax.random.PRNGKey(0), x), x))(y).shape == y.shape


# -- Routing Transformer -------------------------------------------------------------
def _centroids(N=4, C=3, H=8):
  return R._unit(jnp.asarray(np.random.default_rng(5).standard_normal((N, C, H)), jnp.float32))


def test_routing_full_window_dense_and_cluster_oracle():
  q, k, v = _qkv()
  mu = _centroids()
  *_, (out, aux) = assert_same(
      lambda a, b, c: R.routing_attention(a, b, c, mu, window=32)[0], ref_causal, q, k, v,
      extra=lambda a, b, c: R.routing_attention(a, b, c, mu, window=8))
  qm, km = np.asarray(aux["q_members"]), np.asarray(aux["k_members"])
  total, count = np.zeros((1, 32, 4, 8)), np.zeros((1, 32, 4, 1))
  for c in range(3):
    m = np.zeros((1, 4, 32, 32), bool)
    for h in range(4):
      m[0, h][np.ix_(qm[0, h, c], km[0, h, c])] = True
    m &= np.asarray(CAUSAL.to_dense(32, 32))[None]
    o = np.asarray(ref_mask(q, k, v, jnp.asarray(m)))
    for h in range(4):
      rows = qm[0, h, c][m[0, h, qm[0, h, c]].any(-1)]
      total[0, rows, h] += o[0, rows, h]
      count[0, rows, h] += 1
  np.testing.assert_allclose(out, total / np.maximum(count, 1), atol=2e-5)
  with pytest.raises(ValueError, match="window=40"):
    R.routing_attention(q, k, v, mu, window=40)


def test_routing_ema_state_fixed_point_and_commitment_grad():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 2, 1, 8)), jnp.float32)
  def fixed_point(x):
    mu = R.routing_normalize(x)[0, :, 0][None]  # centroids = the normalised points themselves
    return R.kmeans_ema_update(mu, x[:, jnp.array([0, 1, 0, 1])], None, decay=0.5), mu
  new_mu, mu = jax.jit(fixed_point)(x)
  np.testing.assert_allclose(new_mu, mu, atol=1e-5)
  q, k, v = _qkv()
  layer = D.RoutingAttention(num_clusters=3, window=8)
  def run(a, b, c):
    variables = layer.init(jax.random.PRNGKey(0), a, b, c)
    _, state = layer.apply(variables, a, b, c, update=True, mutable=["batch_stats"])
    g = jax.grad(lambda x: layer.apply(variables, x, b, c)[1]["commitment_loss"])(a)
    return state["batch_stats"]["centroids"] - variables["batch_stats"]["centroids"], g
  moved, g = jax.jit(run)(q, k, v)
  assert np.abs(moved).max() > 0 and np.abs(g).max() > 0


# -- HyperAttention -------------------------------------------------------------------
def test_hyper_exact_limits():
  q, k, v = _qkv()  # T = 32: one causal split into halves of min_seq_len
  outs = jax.jit(lambda a, b, c: (
      D.hyper_attention(a, b, c),
      D.hyper_attention(a, b, c, min_seq_len=8, block_size=32, sample_size=0),
      ref_full(a, b, c)))(q, k, v)
  for out in outs[:2]:
    np.testing.assert_allclose(out, outs[2], atol=2e-5)
  fn = lambda a, b, c: D.hyper_attention(a, b, c, causal=True, min_seq_len=16, block_size=32,
                                         sample_size=0)
  assert_same(fn, ref_causal, q, k, v)
  qc, kc, vc = _qkv(T=16, S_=32)  # causal cross: prefix keys seen by all queries
  out, ref = jax.jit(lambda a, b, c: (D.hyper_attention(
      a, b, c, causal=True, min_seq_len=8, block_size=32, sample_size=0), ref_causal(a, b, c)))(
          qc, kc, vc)
  np.testing.assert_allclose(out, ref, atol=2e-5)


def test_hyper_lsh_buckets_gray_code_and_sampling_runs():
  perm = np.asarray(D.hyper.gray_code_permutation(3))
  code_of_rank = np.argsort(perm)
  assert all(bin(a ^ b).count("1") == 1 for a, b in zip(code_of_rank, code_of_rank[1:]))
  q, k, v = _qkv(T=64)
  out, lse = jax.jit(lambda a, b, c: D.hyper_attention(
      a, b, c, jax.random.PRNGKey(1), min_seq_len=8, block_size=16, sample_size=16,
      return_lse=True))(q, k, v)
  assert out.shape == q.shape and np.isfinite(np.asarray(lse)).all()
  with pytest.raises(ValueError, match="block_size=24"):
    D.hyper_attention(q, k, v, min_seq_len=8, block_size=24)


# -- Landmark ------------------------------------------------------------------------
def test_landmark_tiny_formula_and_retrieval():
  q, k, v = _qkv(T=7, N=1, K=1)
  out = J(D.landmark_grouped_attention, q, k, v, block_size=2)  # [a b L1 c d L2 e]
  q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
  lg = np.einsum("h,sh->s", q[0, 6, 0], k[0, :, 0]) * 8 ** -0.5
  star = np.exp(lg[[6, 2, 5]]) / np.exp(lg[[6, 2, 5]]).sum()
  b1 = np.exp(lg[[0, 1]]) / np.exp(lg[[0, 1]]).sum()
  b2 = np.exp(lg[[3, 4]]) / np.exp(lg[[3, 4]]).sum()
  vv = np.asarray(v[0, :, 0])
  want = star[0] * vv[6] + star[1] * (b1 @ vv[[0, 1]]) + star[2] * (b2 @ vv[[3, 4]])
  np.testing.assert_allclose(out[0, 6, 0], want, atol=1e-5)
  e1 = np.exp(np.einsum("h,sh->s", q[0, 1, 0], k[0, :2, 0]) * 8 ** -0.5)
  np.testing.assert_allclose(out[0, 1, 0], e1 / e1.sum() @ vv[:2], atol=1e-5)
  q, k, v = _qkv(T=30)

  def run(a, b, c):
    full = lambda kk: D.landmark_grouped_attention(a, kk, c, block_size=4)
    return (full(b), D.landmark_retrieval_attention(a, b, c, block_size=4, top_k=6),
            jax.grad(lambda kk: full(kk).sum())(b))
  full, retrieved, g = jax.jit(run)(q, k, v)
  np.testing.assert_allclose(retrieved, full, atol=2e-5)
  assert np.abs(np.asarray(g)[:, 4::5]).max() > 0  # landmarks learn
  with pytest.raises(ValueError, match="top_k=7"):
    D.landmark_retrieval_attention(q, k, v, block_size=4, top_k=7)
  ids = jax.jit(lambda x: D.insert_landmarks(x, 2, -1))(np.arange(5)[None])
  np.testing.assert_array_equal(ids[0], [0, 1, -1, 2, 3, -1, 4])


# -- LongHeads ------------------------------------------------------------------------
def test_longheads_limits_and_forced_chunks():
  q, k, v = _qkv()
  pos = jnp.arange(32)
  ref = lambda a, b, c: attnjax.reference_attention(apply_rope(a, pos), apply_rope(b, pos), c,
                                                    mask=CAUSAL)
  *_, (out, want, (idx, cnt)) = assert_same(
      lambda a, b, c: D.longheads_attention(a, b, c, chunk_size=4, attn_len=32,
                                            begin_selective_length=0), ref, q, k, v,
      extra=lambda a, b, c: (
          D.longheads_attention(a, b, c, chunk_size=4, attn_len=32), ref(a, b, c),
          D.longheads_attention(a, b, c, chunk_size=4, attn_len=16, return_chunks=True)[1]))
  np.testing.assert_allclose(out, want, atol=2e-5)
  i, c = np.asarray(idx), np.asarray(cnt)
  for h, r in np.ndindex(4, 8):
    sel = set(i[0, h, r, :c[0, h, r]])
    assert {0, r, max(r - 1, 0)} <= sel and max(sel) == r and len(sel) == min(4, r + 1)
  with pytest.raises(ValueError, match="attn_len"):
    D.longheads_attention(q, k, v, chunk_size=4, attn_len=8)


# -- Sparsifiner ------------------------------------------------------------------------
def test_sparsifiner_limits_oracle_and_predictor_grads():
  q, k, v = _qkv()
  eye = {"w_down": np.broadcast_to(np.eye(32, dtype=np.float32), (4, 32, 32)),
         "w_up": np.broadcast_to(np.eye(32, dtype=np.float32), (4, 32, 32))}

  def restricted(a, b, c):
    out, (idx, valid) = D.sparsifiner_attention(a, b, c, eye, topk=4, return_mask=True)
    _, _, probs = attnjax.reference_attention(a, b, b, return_lse=True, return_probs=True)
    mask = S.token_indices_to_mask(idx, 32, valid)
    return (out, idx, jnp.transpose(jax.lax.top_k(probs, 4)[1], (0, 2, 1, 3)), mask,
            attnjax.reference_attention(a, b, c, mask=mask))
  *_, (out, idx, true_top, mask, ref) = assert_same(
      lambda a, b, c: D.sparsifiner_attention(a, b, c, eye, topk=32), ref_full, q, k, v,
      extra=restricted)
  np.testing.assert_array_equal(np.sort(idx, -1), np.sort(true_top, -1))
  mask = np.asarray(mask)
  assert mask.sum(-1).min() == mask.sum(-1).max() == 4
  np.testing.assert_allclose(out, ref, atol=2e-5)
  layer = D.SparsifinerAttention(n_down=8, topk=4, up_topk=6)
  grads = jax.jit(lambda a, b, c: jax.grad(lambda p: layer.apply(p, a, b, c, return_loss=True)[1])(
      layer.init(jax.random.PRNGKey(0), a, b, c)))(q, k, v)
  assert all(np.abs(g).max() > 0 for g in jax.tree_util.tree_leaves(grads))
  with pytest.raises(ValueError, match="topk"):
    D.sparsifiner_attention(q, k, v, eye, topk=33)


# -- Combiner -------------------------------------------------------------------------
def _combiner_checks(pattern, pool, other=None, limits=True):
  """Limits s = 1 and s = T, the effective matrix (s = 4) against causal support and its
  own output, forward and gradients; and the output of pattern ``other`` differs.
  Everything in one compiled call."""
  q, k, v = _qkv(T=16)  # 4 x 4 grid, N = 4, K = 2
  kw = dict(pattern=pattern, pool=pool)
  via_peff = lambda a, b, c: jnp.einsum(
      "bnts,bsnh->btnh", D.combiner_effective_matrix(a, b, c, segment_len=4, **kw),
      jnp.repeat(c, 2, axis=2))
  combiner = lambda a, b, c: D.combiner_attention(a, b, c, segment_len=4, **kw)

  @jax.jit
  def run(a, b, c):  # one column or one row: the direct part is the whole causal prefix
    return (limits and [D.combiner_attention(a, b, c, segment_len=s, **kw) for s in (1, 16)],
            ref_causal(a, b, c), D.combiner_effective_matrix(a, b, c, segment_len=4, **kw),
            other and D.combiner_attention(a, b, c, segment_len=4, pattern=other, pool=pool),
            _vg(combiner)(a, b, c), _vg(via_peff)(a, b, c))

  outs, ref, peff, out_other, (out, grads), (want, want_grads) = run(q, k, v)
  for o in outs or ():
    np.testing.assert_allclose(o, ref, atol=2e-5)
  np.testing.assert_allclose(peff.sum(-1), 1.0, atol=1e-5)
  assert bool(((peff > 0) == np.tril(np.ones((16, 16), bool))).all())  # full causal support
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-4)
  for g, g_want in zip(grads, want_grads):
    np.testing.assert_allclose(g, g_want, atol=1e-4, rtol=1e-3)
  if other:
    assert float(jnp.abs(out - out_other).max()) > 1e-3  # other direct sets and regions


def test_combiner_limits_and_effective_matrix():
  _combiner_checks("fixed", "max")
  with pytest.raises(ValueError, match="segment_len=5"):
    D.combiner_attention(*_qkv(), segment_len=5)


@pytest.mark.parametrize("pattern,pool", [("axial", "max"), ("axial", "mean"),
                                          ("mixture", "max"), ("mixture", "mean")])
def test_combiner_axial_mixture_limits_effective_matrix_and_gradients(pattern, pool):
  # The three patterns differ (for each pool): axial from fixed, mixture from axial. At s = 1
  # and s = T there are no regions, so the pool plays no part: the limits run with "max".
  _combiner_checks(pattern, pool, other="fixed" if pattern == "axial" else "axial",
                   limits=pool == "max")


def test_combiner_axial_tiny_case_weights():
  # T = 4 as 2 rows of 2: query 3 = (row 1, col 1) sees (1, 0) and itself in its row, (0, 1)
  # above it, and column 0 above it as one region {(0, 0)}: the region weight goes to key 0.
  q, k, v = _qkv(T=4, N=1, K=1)
  peff = np.asarray(J(D.combiner_effective_matrix, q, k, v, segment_len=2, pattern="axial"))
  assert (peff[0, 0, 3] > 0).all()
  logits = np.einsum("h,sh->s", np.asarray(q)[0, 3, 0], np.asarray(k)[0, :, 0]) / np.sqrt(8)
  # the region {(0, 0)} has one member: its pooled key is k_0, its summary v_0
  np.testing.assert_allclose(peff[0, 0, 3], np.exp(logits) / np.exp(logits).sum(), rtol=1e-5)


def test_combiner_mixture_tiny_case_two_paths():
  # 2 rows of 2: key 0 = (0, 0) reaches query 3 = (1, 1) through two single-member regions
  # (column 0 above row 1, and row 0 left of column 1): twice its softmax weight.
  q, k, v = _qkv(T=4, N=1, K=1)
  peff = np.asarray(J(D.combiner_effective_matrix, q, k, v, segment_len=2, pattern="mixture"))
  e = np.exp(np.einsum("h,sh->s", np.asarray(q)[0, 3, 0], np.asarray(k)[0, :, 0]) / np.sqrt(8))
  e[0] *= 2
  np.testing.assert_allclose(peff[0, 0, 3], e / e.sum(), rtol=1e-5)


def test_combiner_pattern_errors():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="pattern"):
    D.combiner_attention(q, k, v, segment_len=8, pattern="strided")
  with pytest.raises(NotImplementedError, match="causal"):
    D.combiner_attention(q, k, v, segment_len=8, pattern="axial", causal=False)
  with pytest.raises(NotImplementedError, match="causal"):
    D.combiner_attention(q, k, v, segment_len=8, pattern="mixture", causal=False)
  with pytest.raises(ValueError, match="segment_len=5"):
    D.combiner_attention(q, k, v, segment_len=5, pattern="axial")


# -- Registry --------------------------------------------------------------------------
def test_families_registry_signature_and_refusals():
  q, k, v = _qkv()
  opts = {"hip": dict(top_k=32, block_size_q=8), "hyper": {}, "combiner": dict(segment_len=8),
          "longheads": dict(chunk_size=4, attn_len=32), "landmark": dict(block_size=4),
          "bi_level_routing": dict(num_regions=4, top_k=4, scale=8 ** -0.5)}
  outs, ref, cross, cross_ref = jax.jit(lambda a, b, c: (
      {name: fn(a, b, c, causal=name != "bi_level_routing", **opts[name])
       for name, fn in D.FAMILIES.items()}, ref_causal(a, b, c),
      D.FAMILIES["bi_level_routing"](a, b[:, :16], c[:, :16], causal=False, num_regions=4,
                                     top_k=4, scale=8 ** -0.5),  # cross-attention, all regions
      ref_full(a, b[:, :16], c[:, :16])))(q, k, v)
  for out in outs.values():
    assert out.shape == q.shape and np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(outs["hip"], ref, atol=2e-5)
  np.testing.assert_allclose(cross, cross_ref, atol=2e-5)  # all regions: global
  with pytest.raises(NotImplementedError, match="segment_ids"):
    D.FAMILIES["hip"](q, k, v, causal=True, segment_ids=jnp.zeros((1, 32), jnp.int32))
  with pytest.raises(NotImplementedError, match="causal"):
    D.FAMILIES["longheads"](q, k, v, causal=False)



def test_hip_pads_a_query_length_its_block_does_not_divide():
  """A 27-token prompt with 8-query blocks: with every key chosen HiP is dense causal
  attention; the last block's copies of the last query are dropped; lse too."""
  q, k, v = _qkv()
  q = q[:, 5:]   # T = 27 queries over S = 32 keys (bottom-right aligned)
  out, lse = J(lambda a, b, c: D.hip_attention(a, b, c, top_k=32, block_size_q=8,
                                               return_lse=True), q, k, v)
  ref, rlse = attnjax.reference_attention(q, k, v, mask=attnjax.masks.Causal(), return_lse=True)
  assert out.shape == q.shape and lse.shape == q.shape[:3]
  np.testing.assert_allclose(out, ref, atol=2e-5)
  np.testing.assert_allclose(lse, rlse, atol=2e-5)
