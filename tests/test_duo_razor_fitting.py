"""DuoAttention gate fitting and RazorAttention retrieval-head scoring."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import decoding as D


# --- DuoAttention -------------------------------------------------------------

def test_duo_gate_loss_value_and_gradient_by_hand():
  # Two heads (N = K = 2), one position, one feature.
  full = jnp.array([1.0, 2.0]).reshape(1, 1, 2, 1)
  stream = jnp.array([3.0, 5.0]).reshape(1, 1, 2, 1)
  alpha = jnp.array([0.5, 1.0])

  def loss(a):
    return D.duo_gate_loss(a, full, D.mix_heads(full, stream, a), reg=0.05)

  # full - mixed = (1 - a) * (full - stream) = [0.5 * -2, 0 * -3] = [-1, 0]
  # mean square = 0.5, L1 = 0.05 * mean(0.5, 1.0) = 0.0375
  value, grad = jax.jit(jax.value_and_grad(loss))(alpha)
  np.testing.assert_allclose(value, 0.5375, rtol=1e-6)
  # d/da_h = -(1 - a_h) * d_h^2 (mean over 2 elements, factor 2 cancels) + 0.05 / 2
  np.testing.assert_allclose(grad, [-0.5 * 4 + 0.025, 0.0 + 0.025], rtol=1e-6)


def test_duo_gate_loss_mask_supervises_answer_positions_only():
  ref = jnp.array([[[1.0, 1.0], [0.0, 0.0], [5.0, 5.0]]])  # [B=1, T=3, D=2]
  mixed = jnp.array([[[0.0, 1.0], [9.0, 9.0], [5.0, 3.0]]])
  mask = jnp.array([[1.0, 0.0, 1.0]])
  # per position mean over D: [0.5, 81, 2]; masked: (0.5 + 2) / 2
  np.testing.assert_allclose(D.duo_gate_loss(jnp.zeros(2), ref, mixed, loss_mask=mask), 1.25,
                             rtol=1e-6)
  np.testing.assert_allclose(D.duo_gate_loss(jnp.zeros(2), ref, mixed), (0.5 + 81 + 2) / 3,
                             rtol=1e-6)
  with pytest.raises(ValueError, match="loss_mask"):
    D.duo_gate_loss(jnp.zeros(2), ref, mixed, loss_mask=jnp.ones((1, 2)))


def _planted_heads(T=16, H=16, far=6, c2=80.0, seed=0):
  """q/k/v [1, T, 4, H]: heads 0 and 2 look up key ``far`` from every later query; 1 and 3 attend to themselves."""
  eye = np.eye(T, H, dtype=np.float32) * np.sqrt(c2)  # key j = c * e_j: logits c2 / sqrt(H) = 20
  q_far = np.where((np.arange(T) >= far)[:, None], eye[far][None, :], eye)
  q = np.stack([q_far, eye, q_far, eye], axis=1)[None]
  k = np.stack([eye] * 4, axis=1)[None]
  v = np.random.default_rng(seed).standard_normal((1, T, 4, H)).astype(np.float32)
  return q, k, v


def test_fit_duo_gates_keeps_long_range_heads_and_streams_local_ones():
  q, k, v = _planted_heads()
  q1 = q[:, :, [1, 0, 3, 2]]  # layer 1: heads 1 and 3 are the long-range ones
  sink, recent = 2, 4

  def forward(params, gates, batch):  # two "layers" on their own q/k/v; out [B, T, 2 * N * H]
    del params
    outs = [D.duo_mixed_attention(qq, kk, vv, gates[l], sink=sink, recent=recent,
                                  implementation="reference")
            for l, (qq, kk, vv) in enumerate(batch)]
    return jnp.concatenate([o.reshape(o.shape[:2] + (-1,)) for o in outs], axis=-1)

  batch = ((q, k, v), (q1, k, v))
  answer = lambda batch: (jnp.arange(16) >= 8)[None].astype(jnp.float32)  # supervised positions
  fit = D.fit_duo_gates(forward, None, [batch], gate_shape=(2, 4), steps=160, loss_mask_fn=answer)
  gates = np.asarray(fit.gates)
  expected = np.array([[True, False, True, False], [False, True, False, True]])
  assert gates[expected].min() > 0.9, gates
  assert gates[~expected].max() < 0.1, gates
  np.testing.assert_array_equal(fit.retrieval_heads, expected)
  np.testing.assert_array_equal(D.select_retrieval_heads(fit.gates, streaming_fraction=0.5), expected)
  assert fit.loss.shape == (160,) and np.all(np.isfinite(fit.loss))
  # The chosen heads reproduce full attention: duo_attention with them == the gated model at alpha=1.
  heads = tuple(bool(x) for x in fit.retrieval_heads[0])
  full, duo = jax.jit(lambda q, k, v: (
      forward(None, jnp.ones((2, 4)), ((q, k, v),)),
      D.duo_attention(q, k, v, retrieval_heads=heads, sink=sink, recent=recent,
                      implementation="reference")))(q, k, v)
  np.testing.assert_allclose(duo.reshape(full.shape), full, atol=1e-5)


def test_select_retrieval_heads_over_layers():
  a = jnp.array([[0.9, 0.1], [0.6, 0.3]])
  np.testing.assert_array_equal(D.select_retrieval_heads(a), [[True, False], [True, False]])
  np.testing.assert_array_equal(D.select_retrieval_heads(a, streaming_fraction=0.25),
                                [[True, False], [True, True]])


# --- RazorAttention -----------------------------------------------------------

def _hand_probs():
  """tokens a b c d a b c d; heads: pure echo, pure induction, local (previous token), half echo/half self."""
  T, P = 8, 4
  ids = jnp.array([0, 1, 2, 3, 0, 1, 2, 3], jnp.int32)
  probs = np.zeros((1, 4, T, T), np.float32)
  for i in range(T):
    probs[0, 2, i, max(i - 1, 0)] = 1.0
    if i < P:
      probs[0, 0, i, i] = probs[0, 1, i, i] = probs[0, 3, i, i] = 1.0
    else:
      probs[0, 0, i, i - P] = 1.0
      probs[0, 1, i, i - P + 1] = 1.0
      probs[0, 3, i, i - P] = probs[0, 3, i, i] = 0.5
  return jnp.asarray(probs), ids


def test_retrieval_head_scores_hand_built_heads():
  probs, ids = _hand_probs()
  s = D.retrieval_head_scores(probs, ids)
  np.testing.assert_allclose(s["echo"], [[1.0, 0.0, 0.0, 0.5]], atol=1e-7)
  np.testing.assert_allclose(s["induction"], [[0.0, 1.0, 0.0, 0.0]], atol=1e-7)
  # Per-example token ids [B, T] against probs [B, N, T, T].
  s2 = D.retrieval_head_scores(jnp.concatenate([probs, probs]), jnp.stack([ids, ids + 7]))
  np.testing.assert_allclose(s2["echo"], [[1.0, 0.0, 0.0, 0.5]] * 2, atol=1e-7)
  keep = D.select_protected_heads(s, echo_fraction=0.25, induction_fraction=0.25)
  np.testing.assert_array_equal(keep, [[True, True, False, False]])
  np.testing.assert_array_equal(
      D.select_protected_heads(s, echo_fraction=0.25, induction_fraction=0.25, num_kv_heads=2),
      [[True, False]])
  # Paper-style defaults on 4 heads: ceil(1%) = 1 echo head, ceil(14%) = 1 induction head.
  np.testing.assert_array_equal(D.select_protected_heads(s), [[True, True, False, False]])
  # Latest earlier occurrence; an adjacent repeat (j + 1 = i) is not an induction query.
  ids3 = jnp.array([5, 5, 3, 5], jnp.int32)
  p3 = jnp.tril(jnp.ones((4, 4))) / jnp.arange(1, 5)[:, None]  # uniform causal
  s3 = D.retrieval_head_scores(p3, ids3)
  np.testing.assert_allclose(s3["echo"], (1 / 2 + 1 / 4) / 2, rtol=1e-6)   # i=1 -> j=0, i=3 -> j=1
  np.testing.assert_allclose(s3["induction"], 1 / 4, rtol=1e-6)            # only i=3 -> key 2
  with pytest.raises(ValueError, match="token_ids"):
    D.retrieval_head_scores(probs, ids[:5])
  # From q/k (GQA: 4 query heads on 2 KV heads): the causal softmax is taken here.
  q = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (1, 8, 4, 4)))
  k = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (1, 8, 2, 4)))
  logits = np.einsum("btnh,bsnh->bnts", q, np.repeat(k, 2, axis=2)) / 2.0
  logits = np.where(np.tril(np.ones((8, 8), bool)), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  sq = D.retrieval_head_scores(token_ids=ids, query=q, key=k)
  np.testing.assert_allclose(sq["echo"], D.retrieval_head_scores(p, ids)["echo"], rtol=1e-5)


def test_retrieval_head_scores_of_a_tiny_model_through_the_probs_hook():
  from attnjax import masks
  from attnjax.analysis import hooked_attention
  from attnjax.layers import register_family
  from attnjax.models.llama import LlamaConfig, LlamaDecoder

  captured = []

  def probe(query, key, value, *, causal, q_positions=None, k_positions=None, segment_ids=None):
    del q_positions, k_positions, segment_ids
    def keep(p):
      captured.append(p)
      return p
    return hooked_attention(query, key, value, mask=masks.Causal() if causal else None,
                            probs_hook=keep)

  register_family("razor_probe_test", probe)
  cfg = LlamaConfig(vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, intermediate_size=32, attention="razor_probe_test",
                    scan_layers=False)
  model = LlamaDecoder(cfg)
  ids = D.repeated_random_tokens(jax.random.PRNGKey(1), 2, 6, cfg.vocab_size, low=1)
  assert ids.shape == (2, 12) and np.array_equal(ids[:, :6], ids[:, 6:])
  @jax.jit
  def layer_probs(rng, ids):  # random weights; the hook's weights returned from the same trace
    params = model.init(rng, ids)
    captured.clear()
    model.apply(params, ids)
    return jnp.stack(captured, axis=1)  # [B, L, N, T, T]

  probs = layer_probs(jax.random.PRNGKey(0), ids)
  assert len(captured) == 2
  s = D.retrieval_head_scores(probs, ids)
  assert s["echo"].shape == s["induction"].shape == (2, 2, 4)
  # Oracle: an explicit loop over the queries of the second copy.
  p, t = np.asarray(probs), np.asarray(ids)
  for b in range(2):
    prev = [max([j for j in range(i) if t[b, j] == t[b, i]], default=-1) for i in range(12)]
    e = [p[b, ..., i, prev[i]] for i in range(12) if prev[i] >= 0]
    n = [p[b, ..., i, prev[i] + 1] for i in range(12) if 0 <= prev[i] and prev[i] + 1 < i]
    np.testing.assert_allclose(s["echo"][b], np.mean(e, axis=0), rtol=1e-5)
    np.testing.assert_allclose(s["induction"][b], np.mean(n, axis=0), rtol=1e-5)
  mean = jax.tree.map(lambda x: x.mean(0), s)  # [L, N]
  keep_q = D.select_protected_heads(mean)  # 8 heads: ceil(8%) = 1 echo, ceil(112%) = 2 induction
  assert keep_q.shape == (2, 4) and 2 <= int(keep_q.sum()) <= 3
  assert keep_q.ravel()[int(jnp.argmax(mean["echo"]))]
  keep_kv = D.select_protected_heads(mean, num_kv_heads=2)
  np.testing.assert_array_equal(keep_kv, np.asarray(keep_q).reshape(2, 2, 2).any(-1))


def test_alibi_buffer_length_bounds_the_dropped_attention():
  T, K, H = 64, 4, 8
  rng = np.random.default_rng(0)
  q = rng.standard_normal((T, K, H)).astype(np.float32)
  k = rng.standard_normal((T, K, H)).astype(np.float32)
  a = np.einsum("tkh,skh->kts", q, k) / np.sqrt(H)
  bound = float(np.abs(a).max())
  slopes = 2.0 ** (-8.0 * np.arange(1, K + 1) / K) * 8  # steep slopes so the buffers are short
  d = np.arange(T)[:, None] - np.arange(T)[None, :]
  logits = np.where(d >= 0, a - slopes[:, None, None] * d, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  for total, eps in ((False, 1e-3), (True, 1e-3)):
    L = np.asarray(D.alibi_buffer_length(slopes, bound, eps=eps, total_mass=total))
    assert L.shape == (K,) and np.all(np.diff(L) >= 0)  # flatter slope, longer buffer
    dropped = d[None] >= L[:, None, None]
    if total:
      assert np.sum(p * dropped, axis=-1).max() <= eps
    else:
      assert np.max(p * dropped) <= eps
  keep = D.razor_keep_mask(T, jnp.zeros(K, bool), num_sink=1, recent=L)
  np.testing.assert_array_equal(np.asarray(keep).sum(-1), np.minimum(L, T - 1) + 1)
