"""CAB's causality checks ("CAB: Comprehensive Attention Benchmarking on Long Sequence
Modeling", arXiv:2210.07661) as generic checkers of any attention function.

``fn(query, key, value) -> out`` is an attention with its causal flag (and
options) bound, on BTNH arrays: query [B, T, N, H], key [B, S, K, H], value
[B, S, K, Hv] -> out [B, T, N, Hv]. Causality is by positions, bottom-right
aligned as everywhere in attnjax: query i sits at position ``i + S - T`` and
may depend on keys ``j <= i + S - T`` only.

CAB checks causal self-attention by recomputing every prefix
(``output_i(x) == output_i(x[:i+1])``). Here the main checks perturb instead
(one shape, so one compilation): the "future" part of the inputs is replaced
by other random values, and the outputs that must not see it are compared.

- :func:`check_causal_self`: queries after a split and the keys/values they
  alone may see are perturbed; earlier outputs must not move (CAB's CS;
  with T < S it is causal attention over a KV cache).
- :func:`check_causal_cross`: CAB's CC: target queries after a split are
  perturbed, the source (keys/values) is fixed; earlier outputs must not move
  (catches methods that pool or mix across queries).
- :func:`check_causal_prefix`: CAB's literal check on given prefix lengths.
- :func:`check_causal_decode`: one query at a time, at its position, over a
  cache whose future entries are garbage, equals the full pass (CAB's
  incremental check), for functions that take ``q_positions``.

Each returns a :class:`CausalityResult`; ``ok`` is ``max_diff <= tol``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CausalityResult", "check_causal_self", "check_causal_cross", "check_causal_prefix",
           "check_causal_decode"]


class CausalityResult(NamedTuple):
  """``ok``: the protected outputs stayed within ``tol``; ``max_diff``: their largest
  absolute change; ``where``: (split or prefix, query index) of that change."""
  ok: bool
  max_diff: float
  where: tuple


def _check(query, key, value, *, same_length: bool):
  if any(getattr(x, "ndim", None) != 4 for x in (query, key, value)):
    raise ValueError(f"query, key, value must be [B, L, heads, head_dim], got "
                     f"{[getattr(x, 'shape', None) for x in (query, key, value)]}.")
  T, S = query.shape[1], key.shape[1]
  if same_length and T > S:
    raise ValueError(f"causal self-attention needs T <= S (queries are the last T of the S "
                     f"tokens), got T={T}, S={S}.")
  if T < 2:
    raise ValueError(f"need at least 2 queries to split, got T={T}.")
  return T, S


def _splits(splits, T):
  splits = (T // 2 - 1, (3 * T) // 4 - 1) if splits is None else tuple(int(p) for p in splits)
  for p in splits:
    if not 0 <= p < T - 1:
      raise ValueError(f"splits must be in [0, T-1={T - 1}), got {p}.")
  return splits


def _replace_after(x, start, seed):
  """x with positions >= start (axis 1) replaced by other random values (4x the scale)."""
  noise = 4.0 * jax.random.normal(jax.random.PRNGKey(seed), x.shape, jnp.float32)
  keep = (jnp.arange(x.shape[1]) < start)[None, :, None, None]
  return jnp.where(keep, x, noise.astype(x.dtype))


def _result(diffs, tol):
  """diffs: (label, |change| [B, T', ...] of the protected outputs); a NaN counts as inf."""
  worst, where = 0.0, ()
  for label, d in diffs:
    d = np.asarray(d, np.float64)
    per_row = np.max(np.nan_to_num(d.reshape(d.shape[0], d.shape[1], -1), nan=np.inf),
                     axis=(0, 2))
    i = int(np.argmax(per_row))
    if not where or per_row[i] > worst:
      worst, where = float(per_row[i]), (label, i)
  return CausalityResult(bool(worst <= tol), worst, where)


def check_causal_self(fn: Callable, query, key, value, *, splits: Optional[Sequence[int]] = None,
                      tol: float = 1e-5, seed: int = 0) -> CausalityResult:
  """Perturbs the future; outputs of queries at or before each split must not change.

  For a split p, queries ``> p`` and keys/values at positions ``> p + S - T``
  (those no query ``<= p`` may see) get other random values; outputs
  ``[:, :p+1]`` are compared with the unperturbed run. Default splits:
  ``T/2 - 1`` and ``3T/4 - 1``. fn is jit-compiled once.
  """
  T, S = _check(query, key, value, same_length=True)
  f = jax.jit(fn)
  base = f(query, key, value)
  diffs = []
  for n, p in enumerate(_splits(splits, T)):
    q2 = _replace_after(query, p + 1, seed + 3 * n)
    k2 = _replace_after(key, p + 1 + S - T, seed + 3 * n + 1)
    v2 = _replace_after(value, p + 1 + S - T, seed + 3 * n + 2)
    out = f(q2, k2, v2)
    diffs.append((p, jnp.abs(out[:, :p + 1].astype(jnp.float32)
                             - base[:, :p + 1].astype(jnp.float32))))
  return _result(diffs, tol)


def check_causal_cross(fn: Callable, query, key, value, *,
                       splits: Optional[Sequence[int]] = None, tol: float = 1e-5,
                       seed: int = 0) -> CausalityResult:
  """CAB's causal cross check: perturb target queries after a split, keep the source.

  Output i may depend on the target only through positions ``<= i``; the
  keys/values (source) are unchanged. Any T, S.
  """
  T, _ = _check(query, key, value, same_length=False)
  f = jax.jit(fn)
  base = f(query, key, value)
  diffs = []
  for n, p in enumerate(_splits(splits, T)):
    out = f(_replace_after(query, p + 1, seed + n), key, value)
    diffs.append((p, jnp.abs(out[:, :p + 1].astype(jnp.float32)
                             - base[:, :p + 1].astype(jnp.float32))))
  return _result(diffs, tol)


def check_causal_prefix(fn: Callable, query, key, value, *, lengths: Sequence[int],
                        tol: float = 1e-5) -> CausalityResult:
  """CAB's literal check: ``out(x)[:, i] == out(x[:i+1])[:, i]`` for ``i + 1`` in ``lengths``.

  Self-attention with T == S (one compilation per length).
  """
  T, S = _check(query, key, value, same_length=True)
  if T != S:
    raise ValueError(f"check_causal_prefix needs T == S, got T={T}, S={S}.")
  base = jax.jit(fn)(query, key, value)
  diffs = []
  for L in lengths:
    if not 1 <= L <= T:
      raise ValueError(f"lengths must be in [1, T={T}], got {L}.")
    out = jax.jit(fn)(query[:, :L], key[:, :L], value[:, :L])
    diffs.append((L, jnp.abs(out[:, L - 1:L].astype(jnp.float32)
                             - base[:, L - 1:L].astype(jnp.float32))))
  return _result(diffs, tol)


def check_causal_decode(fn: Callable, query, key, value, *, steps: Sequence[int],
                        tol: float = 1e-5, seed: int = 0) -> CausalityResult:
  """Decoding one query at a time equals the full pass (CAB's incremental check).

  ``fn(query, key, value, q_positions=...)`` must honour query positions (as
  the registry's families with ``supports_kv_cache``). For each step i the
  query ``[:, i:i+1]`` at position i attends over the whole cache, whose
  entries after i hold other random values; its output must equal the full
  causal pass at i. T == S; one compilation (positions are traced).
  """
  T, S = _check(query, key, value, same_length=True)
  if T != S:
    raise ValueError(f"check_causal_decode needs T == S, got T={T}, S={S}.")
  base = jax.jit(fn)(query, key, value)
  step = jax.jit(lambda q, k, v, pos: fn(q, k, v, q_positions=pos,
                                         k_positions=jnp.arange(S, dtype=jnp.int32)))
  diffs = []
  for n, i in enumerate(steps):
    if not 0 <= i < T:
      raise ValueError(f"steps must be in [0, T={T}), got {i}.")
    k2 = _replace_after(key, i + 1, seed + 2 * n)
    v2 = _replace_after(value, i + 1, seed + 2 * n + 1)
    out = step(query[:, i:i + 1], k2, v2, jnp.full((1,), i, jnp.int32))
    diffs.append((i, jnp.abs(out.astype(jnp.float32) - base[:, i:i + 1].astype(jnp.float32))))
  return _result(diffs, tol)
