"""One conformance suite for every backend of ``attnjax.attention``, subclassed per backend.

:class:`AttentionConformance` holds the oracle tests; ``tests/test_conformance.py``
subclasses it once per backend (reference, xla, the Pallas TPU kernels in TPU
interpret mode, the Pallas GPU kernels in GPU interpret mode). Each case calls
``attnjax.attention(..., implementation=<backend>)`` and compares the output
and the gradients (dq, dk, dv of a random cotangent) with
``reference_attention`` given the equivalent explicit dense boolean mask
[B, N, T, S], built here in NumPy from the case's definition (positions
bottom-right aligned: ``q_pos = arange(T) + S - T``), independently of the
library's Mask algebra.

Features. A subclass declares the features its backend must support in
``FEATURES`` (a frozenset of the names in :data:`FEATURES`). A case that uses
only declared features must match the oracle; a case that uses an undeclared
one must make the explicit request raise ``NotImplementedError`` whose
message names the missing feature (an undeclared feature is never skipped).
Extending a backend is adding names to its frozenset.

Covering set. A product over every factor (mask kinds x lengths x bias x mask
arrays x segment ids x 3 head layouts x 2 dtypes x 4 CAB patterns x NumPy
inputs) would compile hundreds of kernels per backend; :data:`CASES` is a
covering set of seven cases instead (a Pallas case compiles a forward and two
backward kernels in interpret mode, several seconds each):

- rows 1-6 are a pairwise design over the eight binary factors lengths, bias,
  mask array, segment ids, GQA (K < N), bfloat16, cross (T != S) and causal:
  every pair of factors occurs in all four on/off combinations (six rows is
  the fewest that can do this for 5 to 10 factors; ``uncovered_pairs``
  checks it);
- NumPy q/k/v: row 6 (they are converted once at the entry, so pairing them
  with every factor would buy nothing; every case passes its masks, bias,
  segment ids and lengths as NumPy arrays);
- the mask kinds are spread over the rows: ``Causal()``, a two-sided
  ``SlidingWindow`` & run-time ``Documents()`` (reading segment ids), a
  Longformer/BigBird-like composite ``(window | global tokens | block | random
  keys) & ~key``, boolean arrays (per batch [B, 1, T, S] and per head
  [1, N, T, S], with an empty query row), and in row 7 static
  ``Documents(ids) & composite & Causal()``;
- the CAB patterns: causal self (row 1), non-causal self (rows 3, 4),
  non-causal cross with T < S (row 2), causal cross with T > S (row 5: the
  first T - S queries see no key) and T < S (rows 6, 7); head layouts MHA,
  GQA N=4/K=2 and MQA N=4/K=1;
- lengths include a 0 on each side (an empty query sequence in rows 3 and 5,
  an empty key sequence in row 6).

Every case has T, S <= 80 in multiples of 16 and is one ``jit`` of forward +
VJP per backend (the NumPy case adds the forward on NumPy q/k/v to that same
``jit``, or only traces it where ``NUMPY_VALUES`` is False); the oracle of a
case is computed once and shared by all backends. A backend may skip cases
(``SKIP``, with the reason) as long as every feature it declares and every
CAB pattern stays in a case it runs (``test_declared_features_are_known``
checks this): the TPU interpret class runs rows 1, 2, 3, 6 and 7.
At these lengths the block-sparse backends use one block per sequence;
multi-block layouts are the engines' own tests' subject.

Tolerances. float32: ``1e-4 * max(1, max |oracle|)``. bfloat16 follows the
FlashAttention rule: at most twice the error of a naive bfloat16
implementation (``naive_low_precision``: every intermediate rounded to
bfloat16, same dense mask) against the float32 oracle, plus
``2e-3 * max(1, max |oracle|)``.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import masks as M
from attnjax.core.reference import reference_attention

#: Feature name -> regular expression a refusal's message must match for it.
FEATURES = {
    "masks": r"mask",                     # Mask objects (every kind in MASK_KINDS)
    "segment_ids": r"segment",            # segment_ids=, and Documents() reading them
    "lengths": r"length",                 # query_seq_lengths / key_value_seq_lengths
    "bias": r"bias",                      # additive bias
    "mask_array": r"mask array",          # boolean mask arrays
    "gqa": r"head|GQA|K=",                # K < N (N=4 with K=2 and K=1)
    "bfloat16": r"bfloat16|dtype",
    "cross": r"T=|S=|cross",              # T != S: CAB's cross patterns
    "numpy": r"NumPy|numpy",              # NumPy q/k/v
    "table_masks": r"table",              # masks whose predicate reads a constant table
}


@dataclasses.dataclass(frozen=True)
class Case:
  """One conformance case: shapes, mask kind and the optional features it uses."""
  name: str
  B: int
  T: int
  S: int
  N: int
  K: int
  mask: str                  # a key of MASK_KINDS or of ARRAY_KINDS
  dtype: str = "float32"
  q_len: Optional[Tuple[int, ...]] = None
  kv_len: Optional[Tuple[int, ...]] = None
  bias: Optional[str] = None                 # None, "full" [B, N, T, S] or "heads" [1, N, T, S]
  segments: bool = False
  numpy: bool = False
  H: int = 16

  @property
  def causal(self) -> bool:
    return "causal" in self.mask

  @property
  def features(self) -> frozenset:
    f = set()
    if self.mask in MASK_KINDS:
      f.add("masks")
    if self.mask.startswith("static_documents"):
      f.add("table_masks")
    if self.mask in ARRAY_KINDS:
      f.add("mask_array")
    if self.segments:
      f.add("segment_ids")
    if self.q_len is not None or self.kv_len is not None:
      f.add("lengths")
    if self.bias is not None:
      f.add("bias")
    if self.K < self.N:
      f.add("gqa")
    if self.dtype == "bfloat16":
      f.add("bfloat16")
    if self.T != self.S:
      f.add("cross")
    if self.numpy:
      f.add("numpy")
    return frozenset(f)


# -- the masks: (Mask object, NumPy visibility [T, S] on the positions) ---------------------
def _doc_ids(S):
  """Static document ids of positions [0, S): runs of 20, 7, 30, ... tokens."""
  runs = [20, 7, 30, 11] * (S // 68 + 1)
  return np.repeat(np.arange(len(runs)), runs)[:S]


_GLOBAL = (0, 37)
_RANDOM_KEYS = (7, 29, 51)


def _composite():
  """Longformer/BigBird-like: a window, global tokens, a block, random keys, minus a key."""
  return ((M.SlidingWindow(4, 4) | M.GlobalTokens(_GLOBAL) | M.SameBlock(16)
           | M.KeyIn(_RANDOM_KEYS)) & ~M.KeyIn((3,)))


def _composite_np(q, k):
  return ((np.abs(q - k) <= 4) | np.isin(q, _GLOBAL) | np.isin(k, _GLOBAL)
          | (q // 16 == k // 16) | np.isin(k, _RANDOM_KEYS)) & (k != 3)


#: kind -> (Mask builder(S), NumPy predicate(q_pos [T, 1], k_pos [1, S], S) -> bool [T, S]).
#: Segment ids (``Documents()`` reads them) and lengths are applied by ``dense_mask``.
MASK_KINDS = {
    "causal": (lambda S: M.Causal(), lambda q, k, S: k <= q),
    "window_documents": (lambda S: M.SlidingWindow(5, 3) & M.Documents(),
                         lambda q, k, S: (q - k <= 5) & (k - q <= 3)),
    "composite": (lambda S: _composite(), lambda q, k, S: _composite_np(q, k)),
    "static_documents_composite_causal": (
        lambda S: M.Documents(tuple(int(i) for i in _doc_ids(S))) & _composite() & M.Causal(),
        lambda q, k, S: (_doc_ids(S)[q] == _doc_ids(S)[k]) & _composite_np(q, k) & (k <= q)),
}

#: Boolean mask arrays (random, one empty query row): kind -> (shape, causal).
ARRAY_KINDS = {
    "array": (lambda c: (c.B, 1, c.T, c.S), False),
    "causal_array": (lambda c: (c.B, 1, c.T, c.S), True),
    "causal_head_array": (lambda c: (1, c.N, c.T, c.S), True),
}

#: The covering set (see the module docstring). Columns: name, B, T, S, N, K, mask kind,
#: then the optional features. Rows 1-6 are the pairwise design; row 7 adds static ids.
CASES = (
    Case("causal_self", 1, 64, 64, 2, 2, "causal"),
    Case("window_documents_bias_cross_bf16", 2, 32, 80, 2, 2, "window_documents",
         dtype="bfloat16", bias="full", segments=True),
    Case("composite_lengths_segments_gqa", 2, 64, 64, 4, 2, "composite",
         q_len=(23, 0), kv_len=(64, 17), segments=True),
    Case("array_bias_self_mqa_bf16", 2, 48, 48, 4, 1, "array",
         dtype="bfloat16", bias="heads"),
    Case("head_array_lengths_cross_long_q_gqa_bf16", 2, 64, 32, 4, 2, "causal_head_array",
         dtype="bfloat16", q_len=(0, 50)),
    Case("causal_array_lengths_bias_segments_cross_numpy", 2, 32, 80, 2, 2, "causal_array",
         q_len=(32, 20), kv_len=(0, 61), bias="full", segments=True, numpy=True),
    Case("static_documents_composite_causal_cross_gqa", 1, 48, 80, 4, 2,
         "static_documents_composite_causal"),
)
CASE_NAMES = tuple(c.name for c in CASES)

#: The binary factors rows 1-6 of CASES cover pairwise.
PAIRWISE_FACTORS = ("lengths", "bias", "mask_array", "segment_ids", "gqa", "bfloat16", "cross",
                    "causal")


def uncovered_pairs(cases=CASES[:6]):
  """[(factor, factor, (on/off, on/off))] combinations that no case in ``cases`` has."""
  rows = [[(f in c.features) if f != "causal" else c.causal for f in PAIRWISE_FACTORS]
          for c in cases]
  return [(PAIRWISE_FACTORS[i], PAIRWISE_FACTORS[j], (a, b))
          for i, j in itertools.combinations(range(len(PAIRWISE_FACTORS)), 2)
          for a, b in itertools.product((False, True), repeat=2)
          if not any(r[i] == a and r[j] == b for r in rows)]
_BY_NAME = {c.name: c for c in CASES}


# -- inputs and the dense visibility ---------------------------------------------------------
@functools.lru_cache(maxsize=None)
def case_data(name: str):
  """NumPy inputs of a case: q, k, v and the cotangent g (float32 holding values exact in
  the case's dtype), and the call's other arguments (mask, bias, segment ids, lengths)."""
  c = _BY_NAME[name]
  rng = np.random.default_rng(sum(map(ord, name)))
  dt = jnp.dtype(c.dtype)
  cast = lambda x: np.asarray(np.asarray(x, np.float32).astype(dt), np.float32)
  q = cast(rng.standard_normal((c.B, c.T, c.N, c.H)))
  k = cast(rng.standard_normal((c.B, c.S, c.K, c.H)))
  v = cast(rng.standard_normal((c.B, c.S, c.K, c.H)))
  g = cast(rng.standard_normal((c.B, c.T, c.N, c.H)))
  extra = {}
  if c.mask in ARRAY_KINDS:
    shape, causal = ARRAY_KINDS[c.mask]
    arr = rng.random(shape(c)) < 0.6
    if causal:
      arr &= _positions(c)[1] <= _positions(c)[0]          # bottom-right aligned
    arr[:, :, 5] = False                                   # a fully masked query row
    extra["mask"] = arr
  else:
    extra["mask"] = MASK_KINDS[c.mask][0](c.S)
  if c.bias is not None:
    shape = (c.B if c.bias == "full" else 1, c.N, c.T, c.S)
    extra["bias"] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
  if c.segments:
    ids = lambda L: np.sort(rng.integers(0, 3, (c.B, L)), axis=1).astype(np.int32)
    extra["segment_ids"] = ids(c.T) if c.T == c.S else (ids(c.T), ids(c.S))
  if c.q_len is not None:
    extra["query_seq_lengths"] = np.asarray(c.q_len, np.int32)
  if c.kv_len is not None:
    extra["key_value_seq_lengths"] = np.asarray(c.kv_len, np.int32)
  return q, k, v, g, extra


def _positions(c: Case):
  """Default (bottom-right aligned) positions: q_pos [T, 1], k_pos [1, S]."""
  return (np.arange(c.T) + c.S - c.T)[:, None], np.arange(c.S)[None, :]


@functools.lru_cache(maxsize=None)
def dense_mask(name: str) -> np.ndarray:
  """The call's visibility as an explicit boolean array [B, N, T, S] (NumPy)."""
  c = _BY_NAME[name]
  _, _, _, _, extra = case_data(name)
  vis = np.ones((c.B, c.N, c.T, c.S), bool)
  if c.mask in ARRAY_KINDS:
    vis &= extra["mask"]
  else:
    vis &= MASK_KINDS[c.mask][1](*_positions(c), c.S)[None, None]
  if c.segments:
    seg = extra["segment_ids"]
    q_seg, k_seg = seg if isinstance(seg, tuple) else (seg, seg)
    vis &= q_seg[:, None, :, None] == k_seg[:, None, None, :]
  if c.q_len is not None:
    vis &= (np.arange(c.T)[None, :] < np.asarray(c.q_len)[:, None])[:, None, :, None]
  if c.kv_len is not None:
    vis &= (np.arange(c.S)[None, :] < np.asarray(c.kv_len)[:, None])[:, None, None, :]
  return vis


def _vjp(fn, q, k, v, g):
  out, pull = jax.vjp(fn, q, k, v)
  return (out,) + tuple(pull(g))


def naive_low_precision(q, k, v, g, vis, bias, dtype):
  """(out, dq, dk, dv) of textbook attention rounding every intermediate to ``dtype``.

  NumPy, float32 arithmetic with each result rounded to ``dtype`` (what a naive
  bfloat16 implementation stores); the yardstick of the bfloat16 tolerance.
  """
  r = lambda x: np.asarray(np.asarray(x, np.float32).astype(dtype), np.float32)
  G = q.shape[2] // k.shape[2]
  kk, vv = np.repeat(k, G, 2), np.repeat(v, G, 2)
  scale = q.shape[-1] ** -0.5
  s = r(r(np.einsum("btnh,bsnh->bnts", q, kk)) * scale)
  if bias is not None:
    s = r(s + r(bias))
  s = np.where(vis, s, -np.inf)
  m = np.max(s, -1, keepdims=True)
  e = np.where(vis, r(np.exp(s - np.where(np.isfinite(m), m, 0))), 0)
  den = r(e.sum(-1, keepdims=True))
  p = r(e / np.where(den > 0, den, 1))
  gg = np.transpose(g, (0, 2, 1, 3))                                     # [B, N, T, Hv]
  out = r(np.einsum("bnts,bsnh->btnh", p, vv))
  dp = r(np.einsum("bnth,bsnh->bnts", gg, vv))
  ds = r(p * r(dp - r((dp * p).sum(-1, keepdims=True))))
  dq = r(r(np.einsum("bnts,bsnh->btnh", ds, kk)) * scale)
  fold = lambda x: r(x.reshape(x.shape[:2] + (k.shape[2], G) + x.shape[3:]).sum(3))
  dk = fold(r(np.einsum("bnts,btnh->bsnh", ds, q)) * scale)
  dv = fold(np.einsum("bnts,bnth->bsnh", p, gg))
  return out, dq, dk, dv


@functools.lru_cache(maxsize=None)
def oracle(name: str):
  """(out, dq, dk, dv) of ``reference_attention`` on the dense mask (float32) and the
  tolerance of each (see the module docstring)."""
  c = _BY_NAME[name]
  q, k, v, g, extra = case_data(name)
  vis = dense_mask(name)
  bias = extra.get("bias")
  want = jax.jit(lambda q, k, v, g: _vjp(
      lambda q, k, v: reference_attention(q, k, v, mask=vis, bias=bias), q, k, v, g))(q, k, v, g)
  want = tuple(np.asarray(w, np.float32) for w in want)
  naive = None
  if c.dtype != "float32":
    naive = naive_low_precision(q, k, v, g, vis, bias, jnp.dtype(c.dtype))
  tols = []
  for i, w in enumerate(want):
    scale = max(1.0, float(np.abs(w).max()))
    if naive is None:
      tols.append(1e-4 * scale)
    else:
      tols.append(2 * float(np.abs(naive[i] - w).max()) + 2e-3 * scale)
  return want, tuple(tols)


class AttentionConformance:
  """The oracle tests of ``attnjax.attention`` for one backend (subclass per backend).

  Subclasses set ``IMPLEMENTATION`` (the ``implementation=`` argument),
  ``FEATURES`` (a frozenset of :data:`FEATURES` names the backend must
  support), for known bugs ``XFAIL`` (case name -> reason: the case runs as
  ``pytest.xfail(strict=True)``), ``SKIP`` (case name -> reason) and
  ``NUMPY_VALUES``. ``kernel_calls``
  returns how many times the backend's kernel entry ran, for backends that
  must show they ran.
  """
  __test__ = False
  IMPLEMENTATION: str = "reference"
  FEATURES: frozenset = frozenset(FEATURES)
  XFAIL: dict = {}
  SKIP: dict = {}   # case name -> reason (a backend too slow to run every case)
  #: NumPy cases also compare the forward on NumPy q/k/v with the traced one (False: the
  #: NumPy call is only traced, sparing a second kernel compile in interpret mode).
  NUMPY_VALUES: bool = True

  def kernel_calls(self) -> Optional[int]:
    """Kernel launches seen so far in this test, or None when not tracked."""
    return None

  def call(self, name, q, k, v):
    """``attnjax.attention`` on the case's arguments with this backend."""
    _, _, _, _, extra = case_data(name)
    return attnjax.attention(q, k, v, implementation=self.IMPLEMENTATION, **extra)

  def test_declared_features_are_known(self):
    """Declared features are known names, each (and each CAB pattern) in a case run here."""
    assert self.FEATURES <= set(FEATURES), sorted(self.FEATURES - set(FEATURES))
    for table in (self.XFAIL, self.SKIP):
      assert set(table) <= set(CASE_NAMES), sorted(set(table) - set(CASE_NAMES))
    run = [c for c in CASES if c.name not in self.SKIP and c.name not in self.XFAIL]
    assert set().union(*(c.features for c in run)) >= self.FEATURES, (
        "a declared feature is in no case this backend runs")
    patterns = {(c.causal, c.T != c.S) for c in run}
    want = {(a, b) for a in (False, True) for b in (False, "cross" in self.FEATURES)}
    assert patterns >= want, f"CAB patterns (causal, cross) not run: {sorted(want - patterns)}"

  @pytest.mark.parametrize("name", CASE_NAMES)
  def test_case(self, name, request):
    """The case matches the oracle, or (an undeclared feature) is refused with a reason."""
    if name in self.SKIP:
      pytest.skip(self.SKIP[name])
    if name in self.XFAIL:
      request.applymarker(pytest.mark.xfail(strict=True, reason=self.XFAIL[name]))
    c = _BY_NAME[name]
    q, k, v, g, _ = case_data(name)
    dt = jnp.dtype(c.dtype)
    qj, kj, vj, gj = (jnp.asarray(x, dt) for x in (q, k, v, g))
    missing = c.features - self.FEATURES
    if missing:
      self._check_refused(name, missing, qj, kj, vj)
      return
    host = tuple(np.asarray(x) for x in (qj, kj, vj))        # NumPy arrays in the dtype

    numpy_values = c.numpy and self.NUMPY_VALUES

    def run(q, k, v, g):
      res = _vjp(lambda *a: self.call(name, *a), q, k, v, g)
      return res + ((self.call(name, *host),) if numpy_values else ())
    got = jax.jit(run)(qj, kj, vj, gj)
    if self.kernel_calls() is not None:
      assert self.kernel_calls() > 0, "the kernel under test never ran"
    want, tols = oracle(name)
    for label, a, b, tol in zip(("out", "dq", "dk", "dv"), got, want, tols):
      assert a.dtype == dt and a.shape == b.shape, (label, a.dtype, a.shape, b.shape)
      a = np.asarray(a, np.float32)
      assert np.isfinite(a).all(), f"{label}: non-finite values"
      err = float(np.abs(a - b).max())
      assert err <= tol, f"{label}: max error {err:.3g} > tolerance {tol:.3g}"
    empty = ~dense_mask(name).any(-1)                     # [B, N, T]: rows that see no key
    assert np.all(np.asarray(got[0], np.float32).transpose(0, 2, 1, 3)[empty] == 0)
    if numpy_values:                                     # NumPy q/k/v give the same output
      assert got[4].dtype == dt
      np.testing.assert_allclose(np.asarray(got[4], np.float32), np.asarray(got[0], np.float32),
                                 atol=tols[0] / 4, rtol=0)
    elif c.numpy:                                        # NumPy q/k/v are taken (traced only)
      out = jax.eval_shape(lambda: self.call(name, *host))
      assert (out.shape, out.dtype) == (got[0].shape, dt)

  def _check_refused(self, name, missing, q, k, v):
    """An explicit request must raise NotImplementedError naming a missing feature (the
    dispatcher decides while tracing, so nothing is compiled)."""
    with pytest.raises(NotImplementedError) as info:
      jax.eval_shape(lambda q, k, v: self.call(name, q, k, v), q, k, v)
    message = str(info.value)
    assert f"implementation={self.IMPLEMENTATION!r}" in message, message
    assert any(re.search(FEATURES[f], message) for f in missing), (
        f"the refusal names none of the undeclared features {sorted(missing)}: {message}")
