"""Linear attention with packed documents (segment_ids) on the chunked path.

Every check compares the chunked xla path with a dense computation whose mask
(causal & same document) is built here, independently of the library's
reference, forward and gradients; no call may warn (no dense fallback).
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
import attnjax.linear as L

B, N, K, H = 2, 4, 2, 4          # GQA: two query heads per key head
SLOPES = np.array([0.5, 0.25, 0.1, 0.0], np.float32)

# T = 21 with chunk 4: document 0 crosses the first chunk boundary, document 1
# lies inside one chunk, document 2 is a single token starting exactly at a
# chunk boundary (8), document 3 crosses two boundaries, document 4 starts at
# a boundary (16), and the padded tail has an id of its own.
IDS_21 = np.array([[0] * 5 + [1] * 3 + [2] + [3] * 7 + [4] * 2 + [99] * 3,
                   [5] * 21], np.int32)
# T = 24 with chunk 8 (divides T); an id that comes back later is a new document.
IDS_24 = np.array([[0] * 8 + [1] * 11 + [0] * 5,
                   [3] * 1 + [4] * 15 + [5] * 8], np.int32)


def _qkv(t, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  f = lambda *shape: rng.standard_normal(shape).astype(np.float32).astype(dtype)
  return f(B, t, N, H), f(B, t, K, H), f(B, t, K, H)


def _documents(ids):
  """Document number of each token: runs of equal ids, counted along T (NumPy)."""
  ids = np.asarray(ids)
  return np.concatenate([np.zeros((ids.shape[0], 1), np.int64),
                         np.cumsum(ids[:, 1:] != ids[:, :-1], axis=1)], axis=1)


def _mask(ids, causal, q_pos=None, k_pos=None):
  """[B, T, T] bool: key j visible to query i (same document, and k_pos[j] <= q_pos[i]
  if causal; positions default to arange(T))."""
  doc = _documents(ids)
  t = doc.shape[1]
  q_pos = np.arange(t) if q_pos is None else q_pos
  k_pos = np.arange(t) if k_pos is None else k_pos
  mask = doc[:, :, None] == doc[:, None, :]
  if causal:
    mask &= (k_pos[None, :] <= q_pos[:, None])[None]
  return mask


def _dense(q, k, v, mask, feature_map, slopes, normalize, eps=1e-6, positions=None):
  """Masked quadratic form in float32 on BTNH inputs (GQA by repeating K/V)."""
  phi = L.resolve_feature_map(feature_map)
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
  w = jnp.einsum("btnf,bsnf->bnts", phi(q), phi(k))
  t = q.shape[1]
  if slopes is not None:
    pos = np.arange(t) if positions is None else positions
    dist = pos[:, None] - pos[None, :]
    w = w * jnp.exp(-jnp.asarray(slopes)[:, None, None] * np.maximum(dist, 0))[None]
  w = jnp.where(jnp.asarray(mask)[:, None], w, 0.0)
  o = jnp.einsum("bnts,bsne->btne", w, v)
  if normalize:
    o = o / (jnp.sum(w, -1).transpose(0, 2, 1)[..., None] + eps)
  return o


def _loss(o):
  return jnp.sum(jnp.sin(o.astype(jnp.float32)))


def _chunked_and_dense(q, k, v, ids, *, causal, feature_map="identity", decay=None,
                       normalize=False, chunk_size=4, q_pos=None, k_pos=None):
  kw = dict(feature_map=feature_map, causal=causal, normalize=normalize,
            chunk_size=chunk_size, q_positions=q_pos, k_positions=k_pos)
  slopes = None if decay is None else SLOPES
  mask = _mask(ids, causal, q_pos, k_pos)

  def both(q, k, v):
    def chunked(q, k, v):
      o = L.linear_attention(q, k, v, decay=slopes, segment_ids=ids, implementation=None,
                             **kw)
      return _loss(o), o

    def dense(q, k, v):
      o = _dense(q, k, v, mask, feature_map, slopes, normalize, positions=q_pos)
      return _loss(o), o

    (_, o), g = jax.value_and_grad(chunked, (0, 1, 2), has_aux=True)(q, k, v)
    (_, o_ref), g_ref = jax.value_and_grad(dense, (0, 1, 2), has_aux=True)(q, k, v)
    return o, g, o_ref, g_ref

  with warnings.catch_warnings():
    warnings.simplefilter("error")
    return jax.jit(both)(q, k, v)


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def _check(o, g, o_ref, g_ref, tol=2e-5):
  assert _rel(o, o_ref) < tol
  for name, a, b in zip("qkv", g, g_ref):
    assert _rel(a, b) < tol, name


@pytest.mark.parametrize("feature_map,decay,normalize,ids,chunk", [
    ("identity", None, False, IDS_21, 4),
    ("elu+1", "slopes", False, IDS_21, 4),
    ("elu+1", "slopes", True, IDS_21, 4),
    ("relu", None, True, IDS_24, 8),
    ("taylor", "slopes", False, IDS_24, 8),
])
def test_causal_documents_match_dense(feature_map, decay, normalize, ids, chunk):
  q, k, v = _qkv(ids.shape[1])
  _check(*_chunked_and_dense(q, k, v, ids, causal=True, feature_map=feature_map,
                             decay=decay, normalize=normalize, chunk_size=chunk))


@pytest.mark.parametrize("feature_map,normalize,ids,chunk", [
    ("elu+1", False, IDS_21, 4),
    ("elu+1", True, IDS_21, 4),
    ("identity", False, IDS_24, 8),
])
def test_noncausal_documents_match_dense(feature_map, normalize, ids, chunk):
  q, k, v = _qkv(ids.shape[1], seed=1)
  _check(*_chunked_and_dense(q, k, v, ids, causal=False, feature_map=feature_map,
                             normalize=normalize, chunk_size=chunk))


def test_bfloat16_documents():
  q, k, v = _qkv(21, seed=2, dtype=jnp.bfloat16)
  o, g, o_ref, g_ref = _chunked_and_dense(q, k, v, IDS_21, causal=True, feature_map="elu+1",
                                          decay="slopes", normalize=True)
  assert o.dtype == jnp.bfloat16
  _check(o, g, o_ref, g_ref, tol=2e-2)


def test_vmap_over_documents():
  q, k, v = _qkv(21, seed=3)
  stack = lambda x: np.stack([x, x[::-1]])
  ids = stack(IDS_21)
  fn = lambda q, k, v, ids: L.linear_attention(q, k, v, decay=SLOPES, segment_ids=ids,
                                               chunk_size=4)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = jax.jit(jax.vmap(fn))(stack(q), stack(k), stack(v), ids)
  mask = _mask(ids.reshape(-1, 21), True).reshape(2, B, 21, 21)
  for i in range(2):
    ref = _dense(stack(q)[i], stack(k)[i], stack(v)[i], mask[i], "identity", SLOPES, False)
    assert _rel(out[i], ref) < 2e-5


@pytest.mark.parametrize("causal", [True, False])
def test_nan_stays_in_its_document(causal):
  q, k, v = _qkv(21, seed=4)
  k = k.copy()
  k[0, 11, 1] = np.nan                       # document 3 (tokens 9..15) of row 0
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    o = np.asarray(L.linear_attention(q, k, v, causal=causal, normalize=True,
                                      decay=SLOPES if causal else None,
                                      segment_ids=IDS_21, chunk_size=4))
  bad = np.zeros((B, 21), bool)
  bad[0, (11 if causal else 9):16] = True
  nan_rows = np.isnan(o).any(axis=(2, 3))
  np.testing.assert_array_equal(nan_rows, bad)


def test_states_belong_to_the_first_and_last_documents():
  """initial_state reaches the first document only; the returned state is the last one's."""
  q, k, v = _qkv(21, seed=5)
  rng = np.random.default_rng(6)
  s0 = np.abs(rng.standard_normal((B, N, H, H + 1))).astype(np.float32)
  kw = dict(feature_map="elu+1", decay=SLOPES, normalize=True, chunk_size=4)
  ids = IDS_21[:1].repeat(2, 0)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    o, state = L.linear_attention(q, k, v, segment_ids=ids, initial_state=s0,
                                  return_state=True, **kw)
  first, _ = L.linear_attention(q[:, :5], k[:, :5], v[:, :5], initial_state=s0,
                                return_state=True, **kw)
  _, last = L.linear_attention(q[:, 18:], k[:, 18:], v[:, 18:], return_state=True, **kw)
  assert _rel(o[:, :5], first) < 1e-5
  assert _rel(state, last) < 1e-5
  o_ref, state_ref = L.linear_attention(q, k, v, segment_ids=ids, initial_state=s0,
                                        return_state=True, implementation="reference", **kw)
  assert _rel(o, o_ref) < 1e-5 and _rel(state, state_ref) < 1e-5


def test_dispatch_with_documents():
  q, k, v = _qkv(21)
  call = lambda q, k, v: L.linear_attention(q, k, v, segment_ids=IDS_21, chunk_size=4)
  decision, = attnjax.explain(call, q, k, v)
  assert decision.backend == "xla"
  assert [name for name, _ in decision.passed_over] == ["pallas"]
  with pytest.raises(NotImplementedError, match="segment ids"):
    L.linear_attention(q, k, v, segment_ids=IDS_21, implementation="pallas")
  pair = (IDS_21, IDS_21)
  with pytest.warns(UserWarning, match="pair"):
    L.linear_attention(q, k, v, segment_ids=pair)


RESTART_21 = np.concatenate([np.arange(n) for n in (5, 3, 1, 7, 2, 3)])   # per IDS_21[0]


@pytest.mark.parametrize("name,ids,q_pos,k_pos,decay,causal", [
    ("offset", IDS_21, np.arange(21) + 7, np.arange(21) + 7, "slopes", True),
    ("restart", IDS_21[:1].repeat(2, 0), RESTART_21, RESTART_21, "slopes", True),
    ("spread", IDS_21, 3 * np.arange(21) + 1, 3 * np.arange(21), None, True),
    ("noncausal", IDS_21, np.arange(21)[::-1].copy(), np.arange(21), None, False),
])
def test_positions_in_order_take_the_chunked_path(name, ids, q_pos, k_pos, decay, causal):
  q, k, v = _qkv(21, seed=7)
  _check(*_chunked_and_dense(q, k, v, ids, causal=causal, feature_map="elu+1", decay=decay,
                             normalize=True, q_pos=q_pos, k_pos=k_pos))


@pytest.mark.parametrize("kw", [
    dict(q_positions=np.arange(21)[::-1].copy()),                       # order reversed
    dict(q_positions=RESTART_21, k_positions=RESTART_21, decay=SLOPES),  # no ids: not in order
    dict(q_positions=np.arange(21) + 2),                                 # sees later keys
])
def test_positions_out_of_order_run_on_the_reference_with_a_warning(kw):
  q, k, v = _qkv(21)
  with pytest.warns(UserWarning, match="positions whose causal order"):
    o = L.linear_attention(q, k, v, chunk_size=4, **kw)
  np.testing.assert_array_equal(o, L.linear_attention(q, k, v, implementation="reference",
                                                      chunk_size=4, **kw))


def test_traced_positions_run_on_the_reference_with_a_warning():
  q, k, v = _qkv(21)
  fn = jax.jit(lambda p: L.linear_attention(q, k, v, q_positions=p, k_positions=p,
                                            segment_ids=IDS_21))
  with pytest.warns(UserWarning, match="positions whose causal order"):
    fn(np.arange(21))


def test_gradient_of_learned_slopes_with_documents():
  q, k, v = _qkv(21, seed=8)
  mask = _mask(IDS_21, True)
  slopes = jnp.asarray([0.5, 0.25, 0.1, 0.05])
  chunked = lambda s: _loss(L.linear_attention(q, k, v, decay=s, segment_ids=IDS_21,
                                               chunk_size=4, feature_map="elu+1",
                                               normalize=True))
  dense = lambda s: _loss(_dense(q, k, v, mask, "elu+1", s, True))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    g, g_ref = jax.jit(lambda s: (jax.grad(chunked)(s), jax.grad(dense)(s)))(slopes)
  assert _rel(g, g_ref) < 2e-5
