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
  np.testing.assert_allclose(loss(alpha), 0.5375, rtol=1e-6)
  # d/da_h = -(1 - a_h) * d_h^2 (mean over 2 elements, factor 2 cancels) + 0.05 / 2
  np.testing.assert_allclose(jax.grad(loss)(alpha), [-0.5 * 4 + 0.025, 0.0 + 0.025], rtol=1e-6)


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
  eye = jnp.eye(T, H) * np.sqrt(c2)
  k_head = eye  # key j = c * e_j
  q_local = eye
  q_far = jnp.where((jnp.arange(T) >= far)[:, None], eye[far][None, :], eye)
  q = jnp.stack([q_far, q_local, q_far, q_local], axis=1)[None]
  k = jnp.stack([k_head] * 4, axis=1)[None]
  v = jax.random.normal(jax.random.PRNGKey(seed), (1, T, 4, H))
  return q, k, v


def test_fit_duo_gates_keeps_long_range_heads_and_streams_local_ones():
  q, k, v = _planted_heads()
  sink, recent = 2, 4

  def forward(params, gates, batch):
    del params
    return D.duo_mixed_attention(*batch, gates, sink=sink, recent=recent,
                                 implementation="reference")

  fit = D.fit_duo_gates(forward, None, [(q, k, v)], gate_shape=(4,), steps=160)
  gates = np.asarray(fit.gates)
  assert gates[[0, 2]].min() > 0.9, gates
  assert gates[[1, 3]].max() < 0.1, gates
  np.testing.assert_array_equal(fit.retrieval_heads, [True, False, True, False])
  np.testing.assert_array_equal(D.select_retrieval_heads(fit.gates, streaming_fraction=0.5),
                                [True, False, True, False])
  assert fit.loss.shape == (160,) and np.all(np.isfinite(fit.loss))
  # The chosen heads reproduce full attention: duo_attention with them == the gated model at alpha=1.
  full = forward(None, jnp.ones(4), (q, k, v))
  duo = D.duo_attention(q, k, v, retrieval_heads=tuple(bool(x) for x in fit.retrieval_heads),
                        sink=sink, recent=recent, implementation="reference")
  np.testing.assert_allclose(duo, full, atol=1e-5)


def test_select_retrieval_heads_over_layers():
  a = jnp.array([[0.9, 0.1], [0.6, 0.3]])
  np.testing.assert_array_equal(D.select_retrieval_heads(a), [[True, False], [True, False]])
  np.testing.assert_array_equal(D.select_retrieval_heads(a, streaming_fraction=0.25),
                                [[True, False], [True, True]])
