"""Input validation shared by every attention op.

Every check raises ``ValueError`` (or ``TypeError`` for dtypes) naming the
argument, the shape it got and what was expected, so callers never see a
shape error from deep inside XLA.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np


class Dims(NamedTuple):
  """Sizes of a BTNH attention call: q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv]."""
  B: int
  T: int
  S: int
  N: int
  K: int
  H: int
  Hv: int


_FLOAT_KINDS = ("f",)


def _check_float(name: str, x) -> None:
  dt = jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype
  if not jnp.issubdtype(dt, jnp.floating):
    raise TypeError(f"{name} must have a floating dtype, got {dt}.")


def as_arrays(*xs):
  """Inputs as jax arrays: NumPy arrays, Python scalars and nested lists are converted
  once at an op's entry; jax arrays and tracers pass through unchanged (None too)."""
  convert = lambda x: isinstance(x, (np.ndarray, np.generic, int, float, complex, list, tuple))
  out = tuple(jnp.asarray(x) if convert(x) and not isinstance(x, bool) else x for x in xs)
  return out[0] if len(out) == 1 else out


def check_qkv(query, key, value) -> Dims:
  """Validates BTNH query/key/value and returns their sizes.

  Args:
    query: [B, T, N, H].
    key: [B, S, K, H] with N % K == 0.
    value: [B, S, K, Hv].
  """
  for name, x in (("query", query), ("key", key), ("value", value)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(
          f"{name} must have rank 4 [batch, length, heads, head_dim], got shape "
          f"{getattr(x, 'shape', None)}.")
    _check_float(name, x)
  B, T, N, H = query.shape
  Bk, S, K, Hk = key.shape
  Bv, Sv, Kv, Hv = value.shape
  if Bk != B or Bv != B:
    raise ValueError(
        f"batch sizes differ: query {query.shape}, key {key.shape}, value "
        f"{value.shape}; expected the same leading dimension B={B}.")
  if Sv != S:
    raise ValueError(
        f"key and value lengths differ: key {key.shape} (S={S}) vs value "
        f"{value.shape} (S={Sv}).")
  if Kv != K:
    raise ValueError(
        f"key and value head counts differ: key {key.shape} (K={K}) vs value "
        f"{value.shape} (K={Kv}).")
  if Hk != H:
    raise ValueError(
        f"query and key head_dim differ: query {query.shape} (H={H}) vs key "
        f"{key.shape} (H={Hk}).")
  if K < 1 or N % K != 0:
    raise ValueError(
        f"query heads N={N} must be a multiple of key/value heads K={K} "
        f"(MHA, GQA or MQA); got query {query.shape}, key {key.shape}.")
  if T < 1 or S < 1:
    raise ValueError(f"empty sequence: query {query.shape}, key {key.shape}.")
  if H < 1:
    raise ValueError(
        f"head_dim H must be >= 1, got query {query.shape} and key {key.shape} (H={H}).")
  return Dims(B, T, S, N, K, H, Hv)


def default_positions(T: int, S: int) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Bottom-right aligned positions: q_pos = arange(T) + S - T, k_pos = arange(S)."""
  return (jnp.arange(T, dtype=jnp.int32) + (S - T), jnp.arange(S, dtype=jnp.int32))


def check_positions(q_positions, k_positions, d: Dims):
  """Returns (q_pos, k_pos) as int32 arrays of shape [T] or [B, T] / [S] or [B, S]."""
  dq, dk = default_positions(d.T, d.S)
  q_pos = dq if q_positions is None else _check_pos("q_positions", q_positions, d.B, d.T, "T")
  k_pos = dk if k_positions is None else _check_pos("k_positions", k_positions, d.B, d.S, "S")
  return q_pos, k_pos


def _check_pos(name, x, B, L, letter):
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}.")
  if x.shape not in ((L,), (B, L)):
    raise ValueError(
        f"{name} must have shape [{letter}]=({L},) or [B, {letter}]=({B}, {L}), got "
        f"{x.shape}.")
  return x.astype(jnp.int32)


def check_segment_ids(segment_ids, d: Dims):
  """Normalises segment ids to (q_seg [B, T], kv_seg [B, S]) int32, or None.

  Accepts an int array [B, T] (self-attention, T == S) or a pair
  (q_segment_ids [B, T], kv_segment_ids [B, S]).
  """
  if segment_ids is None:
    return None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError(
          "segment_ids must be an array [B, T] or a pair (q_segment_ids [B, T], "
          f"kv_segment_ids [B, S]); got a sequence of length {len(segment_ids)}.")
    q_seg, kv_seg = (jnp.asarray(s) for s in segment_ids)
  else:
    q_seg = kv_seg = jnp.asarray(segment_ids)
    if d.T != d.S:
      raise ValueError(
          f"a single segment_ids array needs T == S (got T={d.T}, S={d.S}); pass "
          "a pair (q_segment_ids [B, T], kv_segment_ids [B, S]) for cross attention.")
  for name, s, L, letter in (("q_segment_ids", q_seg, d.T, "T"),
                             ("kv_segment_ids", kv_seg, d.S, "S")):
    if s.shape != (d.B, L):
      raise ValueError(
          f"{name} must have shape [B, {letter}]=({d.B}, {L}), got {s.shape}.")
    if not jnp.issubdtype(s.dtype, jnp.integer):
      raise TypeError(f"{name} must be an integer array, got dtype {s.dtype}.")
  return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


def check_broadcastable(name: str, x, target: Tuple[int, ...], letters: str = "[B, N, T, S]"):
  """Checks that array ``x`` broadcasts to ``target`` (e.g. a mask or bias)."""
  shape = tuple(np.shape(x))
  if len(shape) > len(target):
    raise ValueError(f"{name} has rank {len(shape)} {shape}; expected at most rank "
                     f"{len(target)}, broadcastable to {letters}={target}.")
  for a, b in zip(shape[::-1], target[::-1]):
    if a not in (1, b):
      raise ValueError(
          f"{name} of shape {shape} does not broadcast to {letters}={target}.")


def check_scale(scale, H: int):
  """Returns the logit scale: ``scale`` (unchanged) or 1/sqrt(H).

  ``scale`` must be a real number or a real array (a Python/NumPy scalar or a
  jax array; not a string or bool). A concrete scale must be finite and
  positive. A traced scale (one passed through ``jit``/``grad`` as an
  argument) has no value at trace time and is not checked: a negative or
  non-finite traced scale gives what the arithmetic gives.
  """
  if scale is None:
    return float(H) ** -0.5
  if isinstance(scale, (str, bytes, bool, np.bool_)):
    raise TypeError(
        f"scale must be a positive real number (or None for 1/sqrt(H)), got "
        f"{type(scale).__name__} {scale!r}.")
  if isinstance(scale, jax.core.Tracer):
    if not jnp.issubdtype(scale.dtype, jnp.integer) and not jnp.issubdtype(
        scale.dtype, jnp.floating):
      raise TypeError(f"scale must have a real dtype, got a traced {scale.dtype} value.")
    return scale
  try:
    value = np.asarray(scale)
  except Exception as e:  # pylint: disable=broad-except
    raise TypeError(f"scale must be a positive real number, got {scale!r}.") from e
  if value.dtype == bool or not (np.issubdtype(value.dtype, np.integer)
                                 or np.issubdtype(value.dtype, np.floating)):
    raise TypeError(
        f"scale must be a positive real number, got {type(scale).__name__} {scale!r} "
        f"(dtype {value.dtype}).")
  if not np.all(np.isfinite(value) & (value > 0)):
    raise ValueError(f"scale must be finite and positive, got {scale!r}.")
  return scale


def check_mask_argument(mask, mask_class):
  """Checks ``mask`` is None, a ``mask_class`` instance or a boolean array-like.

  ``mask_class`` is ``attnjax.masks.Mask`` (passed in: core does not import
  the mask package). Returns ``mask`` unchanged; raises TypeError naming the
  argument for a string, a Mask class instead of an instance, or an array of
  another dtype.
  """
  if mask is None or isinstance(mask, mask_class):
    return mask
  if isinstance(mask, type):
    hint = f" (did you mean {mask.__name__}(...)?)" if issubclass(mask, mask_class) else ""
    raise TypeError(
        f"mask must be a Mask instance or a boolean array broadcastable to "
        f"[B, N, T, S], got the class {mask.__name__}{hint}.")
  if isinstance(mask, (str, bytes)):
    raise TypeError(
        f"mask must be a Mask instance (e.g. attnjax.masks.Causal()) or a boolean "
        f"array broadcastable to [B, N, T, S], got the string {mask!r}.")
  if hasattr(mask, "dtype") and hasattr(mask, "shape"):
    dtype = mask.dtype
  else:
    try:
      dtype = np.asarray(mask).dtype
    except Exception as e:  # pylint: disable=broad-except  (ragged lists, objects)
      raise TypeError(
          f"mask must be a Mask instance or a boolean array broadcastable to "
          f"[B, N, T, S], got {type(mask).__name__}.") from e
  if dtype != bool:
    raise TypeError(
        f"mask array must be boolean (True = may attend), got dtype {dtype} "
        f"({type(mask).__name__} of shape {np.shape(mask)}).")
  return mask


def repeat_kv(x, num_heads: int):
  """[B, S, K, H] -> [B, S, N, H] by repeating each KV head N/K times (reference only)."""
  K = x.shape[2]
  if K == num_heads:
    return x
  return jnp.repeat(x, num_heads // K, axis=2)


def check_positive_int(name: str, value, *, minimum: int = 1) -> int:
  """Checks an integer hyper-parameter is >= minimum."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}.")
  return int(value)


def check_block_lists(kv_block_indices, kv_block_counts, d: Dims, block_q, block_kv):
  """Run-time block lists, validated.

  Args:
    kv_block_indices: int [B, N or K, T // block_q, k]: the k-blocks each
      q-block visits (per query head or per KV head).
    kv_block_counts: int [B, N or K, T // block_q] listed entries per row, or
      None (all k).
    d: the call's sizes; block_q, block_kv: must divide T and S.

  Returns:
    (indices int32 [B, Hl, nq, k] clipped to [0, nk), counts int32 [B, Hl, nq]
    clipped to [0, k]), without gradients. Clipping is the engines' documented
    convention for out-of-range entries.
  """
  for name, b, L, letter in (("block_q", block_q, d.T, "T"), ("block_kv", block_kv, d.S, "S")):
    check_positive_int(name, b)
    if L % b:
      raise ValueError(f"{name}={b} does not divide {letter}={L}.")
  nq, nk = d.T // block_q, d.S // block_kv
  idx = jnp.asarray(kv_block_indices)
  if (idx.ndim != 4 or idx.shape[0] != d.B or idx.shape[1] not in (d.N, d.K)
      or idx.shape[2] != nq or idx.shape[3] < 1):
    raise ValueError(
        f"kv_block_indices must have shape [B, N or K, T // block_q, k] = [{d.B}, {d.N} or "
        f"{d.K}, {nq}, k >= 1], got {idx.shape}.")
  if not jnp.issubdtype(idx.dtype, jnp.integer):
    raise ValueError(f"kv_block_indices must be an integer array, got dtype {idx.dtype}.")
  k = idx.shape[-1]
  if kv_block_counts is None:
    counts = jnp.full(idx.shape[:3], k, jnp.int32)
  else:
    counts = jnp.asarray(kv_block_counts)
    if counts.shape != idx.shape[:3]:
      raise ValueError(
          f"kv_block_counts must have shape [B, heads, T // block_q] = {idx.shape[:3]} "
          f"(as kv_block_indices), got {counts.shape}.")
    if not jnp.issubdtype(counts.dtype, jnp.integer):
      raise ValueError(f"kv_block_counts must be an integer array, got dtype {counts.dtype}.")
  # Same conventions as the XLA path: out-of-range block indices are clipped;
  # counts are taken in [0, k].
  idx = jax.lax.stop_gradient(jnp.clip(idx.astype(jnp.int32), 0, nk - 1))
  counts = jax.lax.stop_gradient(jnp.clip(counts.astype(jnp.int32), 0, k))
  return idx, counts
