"""Combiner-Logsparse, TNL (SGLU, LRPE, token mixer) and Titans (MAC, MAG, MAL) oracles."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import dynamic as D
from attnjax.dynamic import combiner_logsparse as LS
from test_dynamic_select import _qkv, assert_same

CAUSAL = attnjax.masks.Causal()
ref_causal = lambda q, k, v: attnjax.reference_attention(q, k, v, mask=CAUSAL)


def J(fn, *args, **static):
  """fn(*args, **static) compiled once."""
  return jax.jit(functools.partial(fn, **static))(*args)


# -- Combiner-Logsparse ----------------------------------------------------------------
def test_logsparse_spans_partition_the_past():
  assert LS.logsparse_spans(0) == []
  assert LS.logsparse_spans(1) == [(0, 1)]
  assert LS.logsparse_spans(4) == [(0, 4)]
  assert LS.logsparse_spans(7) == [(0, 4), (4, 6), (6, 7)]
  assert LS.logsparse_spans(6) == [(0, 4), (4, 6)]
  for g in range(40):
    spans = LS.logsparse_spans(g)
    covered = [j for a, b in spans for j in range(a, b)]
    assert covered == list(range(g))  # a partition of [0, g), far to near
    sizes = [b - a for a, b in spans]
    assert len(set(sizes)) == len(sizes) and all(x & (x - 1) == 0 for x in sizes)
    assert all(a % (b - a) == 0 for a, b in spans)  # aligned: shared by many queries
  assert [LS.num_levels(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [0, 1, 2, 2, 3, 3, 4]


def test_combiner_logsparse_effective_matrix_limits_and_gradients():
  q, k, v = _qkv()  # T = 32, N = 4, K = 2
  call = lambda s, pool="max": functools.partial(D.combiner_attention, segment_len=s,
                                                 pattern="logsparse", pool=pool)
  peff_of = lambda s, pool="max": functools.partial(D.combiner_effective_matrix, segment_len=s,
                                                    pattern="logsparse", pool=pool)

  @jax.jit
  def forward(a, b, c):
    return dict(one_segment=call(32)(a, b, c), dense=ref_causal(a, b, c),
                fixed=D.combiner_attention(a, b, c, segment_len=4), log=call(4)(a, b, c),
                peff1=peff_of(1)(a, b, c), peff4_mean=peff_of(4, "mean")(a, b, c),
                log4_mean=call(4, "mean")(a, b, c))

  r = forward(q, k, v)
  # s = T: one segment, the direct part is the whole causal prefix.
  np.testing.assert_allclose(r["one_segment"], r["dense"], atol=2e-5)
  for peff in (r["peff1"], r["peff4_mean"]):  # s = 1 is the paper's form
    np.testing.assert_allclose(peff.sum(-1), 1.0, atol=1e-5)
    assert bool(((peff > 0) == np.tril(np.ones((32, 32), bool))).all())  # full causal support
  np.testing.assert_allclose(jnp.einsum("bnts,bsnh->btnh", r["peff4_mean"], jnp.repeat(v, 2, 2)),
                             r["log4_mean"], atol=2e-5)
  # Segments 0 and 1 have the same regions as in Combiner-Fixed (none, then segment 0);
  # Logsparse differs once a query has a multi-segment span (segment >= 2).
  np.testing.assert_allclose(r["log"][:, :8], r["fixed"][:, :8], atol=2e-5)
  assert float(jnp.abs(r["log"][:, 8:] - r["fixed"][:, 8:]).max()) > 1e-3
  q, k, v = _qkv(T=16)  # out = P_eff V, forward and gradients (4 segments, 2 levels)
  via_peff = lambda a, b, c: jnp.einsum("bnts,bsnh->btnh", peff_of(4)(a, b, c),
                                        jnp.repeat(c, 2, axis=2))
  assert_same(call(4), via_peff, q, k, v)


def test_combiner_logsparse_tiny_case_weights():
  # s = 1, T = 4, max pool: query 3 sees itself directly, region {2} (one token: its own key
  # and value) and region {0, 1} (key max(k0, k1), summary softmax(max(q0, q1) . k_j) v_j).
  q, k, v = _qkv(T=4, N=1, K=1)
  peff = np.asarray(J(D.combiner_effective_matrix, q, k, v, segment_len=1, pattern="logsparse"))
  qn, kn = np.asarray(q)[0, :, 0], np.asarray(k)[0, :, 0]
  sc = 1 / np.sqrt(8)
  logits = np.array([qn[3] @ kn[3], qn[3] @ kn[2], qn[3] @ np.maximum(kn[0], kn[1])]) * sc
  p = np.exp(logits) / np.exp(logits).sum()
  inner = np.exp(np.array([np.maximum(qn[0], qn[1]) @ kn[j] for j in (0, 1)]) * sc)
  inner /= inner.sum()
  np.testing.assert_allclose(peff[0, 0, 3], [p[2] * inner[0], p[2] * inner[1], p[1], p[0]],
                             rtol=1e-5)
  # query 1: itself and the single-token region {0}, i.e. dense causal attention
  e = np.exp(np.array([qn[1] @ kn[0], qn[1] @ kn[1]]) * sc)
  np.testing.assert_allclose(peff[0, 0, 1, :2], e / e.sum(), rtol=1e-5)


def test_combiner_logsparse_errors():
  q, k, v = _qkv()
  with pytest.raises(NotImplementedError, match="causal"):
    D.combiner_attention(q, k, v, segment_len=4, pattern="logsparse", causal=False)
  with pytest.raises(ValueError, match="segment_len=5"):
    D.combiner_attention(q, k, v, segment_len=5, pattern="logsparse")
  with pytest.raises(ValueError, match="pattern"):
    D.combiner_attention(q, k, v, segment_len=4, pattern="log")
