"""The flash-attention core, written once (FlashAttention-2, arXiv:2307.08691).

Online softmax over key tiles, the merge of partial results, finalisation to
(out, lse), and the per-tile math of the recompute-based backward
(probabilities from the saved lse, delta = rowsum(dO * O), dS). The XLA
engines (block-sparse, neighborhood) and the neighborhood Pallas kernels call
these functions, so each uses only elementwise ops, reductions over the last
axis and ``lax.dot_general``: they run inside TPU (Mosaic) and GPU (Triton)
kernel bodies as well as under XLA.

Shapes: a tile of logits ``s`` is ``[..., rows, cols]`` (queries, keys; any
leading axes are batch axes); row statistics keep a trailing unit axis,
``m``, ``l`` ``[..., rows, 1]`` (2-D refs in kernels), and the accumulator
is ``acc [..., rows, Hv]``; all float32. Masked logits are -inf. A row that
saw no key has ``l == 0`` and finalises to zeros with lse = -inf; a NaN
logit makes its row's statistics NaN and propagates to that row's output.

Dropout (optional everywhere): ``keep`` is a float32 multiplier
broadcastable to the tile, 0 for dropped pairs and 1 / (1 - rate) for kept
ones (``attnjax.core.dropout``). It multiplies the normalised probabilities
that weight the values; the normaliser ``l`` and the lse are those of the
undropped softmax.

Normalisations other than softmax (``"sum"``: weights divided by their row
sum; ``"none"``: unnormalised) accumulate their non-negative weights with
``sum_update`` and finalise with ``finalize(..., normalization=)``; ``m`` is
then unused.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------
# matmuls (float32 results; leading axes are batch axes)
# ---------------------------------------------------------------------------
def _batch_dims(a):
  return tuple(range(a.ndim - 2))


def dot_nt(a, b):
  """a [..., m, h] @ b [..., n, h]^T -> [..., m, n] float32."""
  nb = _batch_dims(a)
  return jax.lax.dot_general(a, b, (((a.ndim - 1,), (b.ndim - 1,)), (nb, nb)),
                             preferred_element_type=jnp.float32)


def dot_nn(a, b):
  """a [..., m, n] @ b [..., n, h] -> [..., m, h] float32."""
  nb = _batch_dims(a)
  return jax.lax.dot_general(a, b, (((a.ndim - 1,), (b.ndim - 2,)), (nb, nb)),
                             preferred_element_type=jnp.float32)


def dot_tn(a, b):
  """a [..., m, n]^T @ b [..., m, h] -> [..., n, h] float32."""
  nb = _batch_dims(a)
  return jax.lax.dot_general(a, b, (((a.ndim - 2,), (b.ndim - 2,)), (nb, nb)),
                             preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------
def safe_shift(m):
  """A running max (or an lse) usable as a shift: 0 for rows that saw no key (-inf)."""
  return jnp.where(m == NEG_INF, 0.0, m)


_safe = safe_shift


def _dropped(p, keep):
  return p if keep is None else p * keep


def init_state(rows_shape, hv: int):
  """Empty state for ``rows_shape`` (..., rows).

  m = -inf and l = 0 [..., rows, 1], acc = 0 [..., rows, hv], all float32.
  """
  rows_shape = tuple(rows_shape)
  return (jnp.full(rows_shape + (1,), NEG_INF, jnp.float32),
          jnp.zeros(rows_shape + (1,), jnp.float32),
          jnp.zeros(rows_shape + (hv,), jnp.float32))


def tile_state(s, v, keep=None):
  """State (m, l, acc) of one tile alone: s [..., rows, cols] f32, v [..., cols, Hv].

  The same as ``online_update`` from ``init_state``, without the rescaling.
  """
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - _safe(m))
  return m, jnp.sum(p, axis=-1, keepdims=True), dot_nn(_dropped(p, keep).astype(v.dtype), v)


def online_update(m, l, acc, s, v, keep=None):
  """One online-softmax step over a key tile.

  Args:
    m, l: running max and sum [..., rows, 1]; acc: [..., rows, Hv] float32.
    s: logits [..., rows, cols] float32 (-inf where masked).
    v: values [..., cols, Hv] (the probabilities are cast to its dtype for the matmul).
    keep: dropout multiplier broadcastable to s, or None.

  Returns:
    The updated (m, l, acc).
  """
  m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
  m_safe = _safe(m_new)
  p = jnp.exp(s - m_safe)
  alpha = jnp.exp(m - m_safe)
  l = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
  acc = alpha * acc + dot_nn(_dropped(p, keep).astype(v.dtype), v)
  return m_new, l, acc


def sum_update(l, acc, w, v, keep=None):
  """One step of the ``"sum"``/``"none"`` normalisations: plain sums of the weights.

  w: weights [..., rows, cols] float32 (0 where masked); l [..., rows, 1],
  acc [..., rows, Hv]; returns the updated (l, acc).
  """
  return (l + jnp.sum(w, axis=-1, keepdims=True),
          acc + dot_nn(_dropped(w, keep).astype(v.dtype), v))


def merge(parts):
  """Merges partial states [(m, l, acc), ...] of the same rows over disjoint key sets.

  An unrolled sum over the parts (few; a reduction over a middle axis is slow
  on the CPU backend).
  """
  parts = list(parts)
  if len(parts) == 1:
    return parts[0]
  m = parts[0][0]
  for part in parts[1:]:
    m = jnp.maximum(m, part[0])
  shift = _safe(m)
  l = acc = None
  for pm, pl, pacc in parts:
    w = jnp.exp(pm - shift)
    l = w * pl if l is None else l + w * pl
    acc = w * pacc if acc is None else acc + w * pacc
  return m, l, acc


def finalize(m, l, acc, sink=None, normalization="softmax"):
  """(out [..., rows, Hv], lse [..., rows, 1]) float32 from a state.

  ``sink``: optional extra logits broadcastable to [..., rows, 1] (learned
  sinks: a key with no value that takes part in the normalisation). Rows with
  l == 0 (and no sink) give zeros and lse = -inf; a NaN sum propagates.
  ``normalization``: "softmax" (the online-softmax state), "sum" (out =
  acc / l, lse = log l; ``m`` unused) or "none" (out = acc, lse = log l).
  """
  ok = l != 0
  log_l = jnp.where(ok, jnp.log(jnp.where(ok, l, 1.0)), NEG_INF)
  if normalization != "softmax":
    out = acc if normalization == "none" else acc / jnp.where(ok, l, 1.0)
    return jnp.where(ok, out, 0.0), log_l
  lse = jnp.where(ok, m + log_l, NEG_INF)
  if sink is None:
    return jnp.where(ok, acc / jnp.where(ok, l, 1.0), 0.0), lse
  lse = jnp.logaddexp(lse, sink)
  fin = lse != NEG_INF
  scale = jnp.exp(_safe(m) - jnp.where(fin, lse, 0.0))
  return jnp.where(fin, acc * scale, 0.0), lse


# ---------------------------------------------------------------------------
# backward (recomputed probabilities)
# ---------------------------------------------------------------------------
def delta(out, dout, dlse=None):
  """rowsum(dO * O) [...] float32 from out, dout [..., Hv] (minus the lse cotangent, if any).

  d lse / d s = p, so an lse cotangent enters the logits' gradient as
  ``p * (dp - delta + dlse)``: it is folded into delta here.
  """
  d = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)
  return d if dlse is None else d - dlse.astype(jnp.float32)


def probs_from_lse(s, lse, visible=None):
  """Probabilities exp(s - lse) of a tile, recomputed in the backward.

  s [..., rows, cols] float32; lse broadcastable to it (e.g. [..., rows, 1]).
  ``visible`` (bool, broadcastable to s): pairs where it is False give
  exactly 0, whatever the lse. Without it, masked logits (-inf) give
  exp(-inf) = 0, except in a row whose lse is NaN (a NaN input), where
  every pair is NaN. Rows with lse = -inf (no key; all their logits -inf)
  give zeros; a NaN logit stays NaN on its pair.
  """
  p = jnp.exp(s - safe_shift(lse))
  return p if visible is None else jnp.where(visible, p, 0.0)


def inverse_sum(lse):
  """1 / the row sum, exp(-lse), of the ``"sum"`` normalisation: 0 for empty rows
  (lse = -inf); a NaN lse stays NaN."""
  fin = lse != NEG_INF
  return jnp.where(fin, jnp.exp(-jnp.where(fin, lse, 0.0)), 0.0)


def dropped_probs(p, keep=None):
  """The probabilities that weight the values (dv = dropped_probs^T dO): p * keep."""
  return _dropped(p, keep)


def logits_grad(p, dp, delta_rows, keep=None):
  """dS = P * (dP * keep - delta) of a tile: the gradient of the (scaled) logits.

  p, dp = dO V^T: [..., rows, cols] float32; delta_rows broadcastable to them
  (e.g. [..., rows, 1]); keep: the forward's dropout multiplier or None.
  """
  return p * (_dropped(dp, keep) - delta_rows)
