"""MagicInfinite region masks (arXiv:2503.05978), the dual-stream visual token selection of
"Fixing Imbalanced Attention" (arXiv:2501.12206), CAB's causality checkers and
compositional index (arXiv:2210.07661) and Selective Attention's learned token
temperatures (arXiv:2411.12892)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax.core.reference import reference_attention
from attnjax.neighborhood import (region_cross_mask, region_ids_from_masks,
                                  region_masked_cross_attention)


def _qkv(seed, B, T, S, N, K, H):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(ks[0], (B, T, N, H)), jax.random.normal(ks[1], (B, S, K, H)),
          jax.random.normal(ks[2], (B, S, K, H)))


# -- MagicInfinite: region-masked cross-attention ---------------------------------------------
KEY_REGIONS = (-1,) * 3 + (0,) * 5 + (1,) * 4       # text (global), speaker 0, speaker 1


def test_region_masked_cross_attention_matches_dense_mask_forward_and_grads():
  B, T, S, N, K, H = 2, 16, len(KEY_REGIONS), 4, 2, 8
  q, k, v = _qkv(0, B, T, S, N, K, H)
  qr = np.random.RandomState(0).randint(-1, 2, (B, T)).astype(np.int32)
  dense = region_cross_mask(qr, KEY_REGIONS)
  # The rule: text keys for every query, a speaker's audio only for its own region.
  m = np.asarray(dense)[:, 0]
  np.testing.assert_array_equal(m[..., :3], True)
  np.testing.assert_array_equal(m[..., 3:8], np.broadcast_to((qr == 0)[..., None], (B, T, 5)))
  np.testing.assert_array_equal(m[..., 8:], np.broadcast_to((qr == 1)[..., None], (B, T, 4)))
  fast = lambda q, k, v: region_masked_cross_attention(q, k, v, qr, KEY_REGIONS,
                                                       return_lse=True)
  ref = lambda q, k, v: reference_attention(q, k, v, mask=dense, return_lse=True)

  def run(fn):   # (loss, (out, lse)), grads in one compiled call
    loss = lambda q, k, v: (jnp.sum(jnp.sin(fn(q, k, v)[0])), fn(q, k, v))
    return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
  ((_, (o, lse)), g), ((_, (o_ref, lse_ref)), g_ref) = run(fast), run(ref)
  np.testing.assert_allclose(o, o_ref, atol=2e-5)
  np.testing.assert_allclose(lse, lse_ref, atol=2e-5)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, atol=2e-5)
  (decision,) = attnjax.explain(fast, q, k, v)
  assert decision.backend != "reference", str(decision)


def test_region_masked_cross_attention_outside_rows_zero_and_bool_regions():
  B, T, S, N, H = 1, 8, 6, 2, 4
  q, k, v = _qkv(1, B, T, S, N, N, H)
  inside = np.array([[True, False, True, True, False, False, True, False]])
  out, lse, ref = jax.jit(lambda q, k, v: (
      *region_masked_cross_attention(q, k, v, inside, (0,) * S, return_lse=True),
      reference_attention(q, k, v, mask=region_cross_mask(inside, (0,) * S))))(q, k, v)
  np.testing.assert_allclose(out, ref, atol=2e-5)
  # Audio only (no global keys): a token outside the face gets no update.
  assert np.all(np.asarray(out)[~inside] == 0) and np.all(np.isneginf(np.asarray(lse)[~inside]))
  # All conditioning tokens global: ordinary (unmasked) cross-attention.
  (d,) = attnjax.explain(lambda q, k, v: region_masked_cross_attention(
      q, k, v, inside, (-1,) * S), q, k, v)
  assert d.backend != "reference"


def test_region_masked_cross_attention_validation_and_region_ids():
  q, k, v = _qkv(2, 1, 4, 3, 2, 2, 4)
  with pytest.raises(ValueError, match="key_regions"):
    region_masked_cross_attention(q, k, v, np.zeros((1, 4), np.int32), (0, 1))
  with pytest.raises(ValueError, match="query_regions"):
    region_masked_cross_attention(q, k, v, np.zeros((1, 3), np.int32), (0, 1, -1))
  with pytest.raises(TypeError, match="static"):
    jax.jit(lambda kr: region_masked_cross_attention(q, k, v, np.zeros((1, 4), np.int32), kr))(
        jnp.zeros(3, jnp.int32))
  masks = np.zeros((1, 2, 2, 3), bool)          # [B, R, X, Y]: two face masks
  masks[0, 0, 0, :2] = True
  masks[0, 1, 1, 1:] = True
  masks[0, 1, 0, 1] = True                      # overlaps region 0: the first region wins
  np.testing.assert_array_equal(region_ids_from_masks(masks), [[0, 0, -1, -1, 1, 1]])
