"""Attention dropout masks that any tiling regenerates exactly, from the seed alone.

The keep decision of the pair (batch b, query head n, query index i, key
index j) is a counter-based random number: Threefry-2x32 (Salmon et al.,
"Parallel random numbers: as easy as 1, 2, 3", SC 2011; JAX's own PRNG) keyed
by a per-(b, n) key and applied to the counter (i, j // 2), one of its two
output words chosen by the parity of j. So a flash engine evaluates the mask
tile by tile, in the forward and again in the backward, without ever holding
the [B, N, T, S] array, and the dense reference evaluates it over the whole
array with the same result, bit for bit. Indices are those of the call's
query and key arrays (0 .. T-1, 0 .. S-1), not positions.

Convention (Flax's): a pair is kept with probability 1 - rate and kept
probabilities are scaled by 1 / (1 - rate); the result multiplies the
normalised attention weights, not the logits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotl(x, d: int):
  return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def threefry2x32(k0, k1, x0, x1):
  """Threefry-2x32 (20 rounds, JAX's PRNG) with plain uint32 adds, xors and shifts.

  k0, k1: the key words; x0, x1: the counter words; uint32 arrays that
  broadcast together. Returns the two output words, bit for bit those of
  ``jax.extend.random.threefry2x32_p``, which lowers only through XLA: this
  form also lowers inside Mosaic (TPU) and Triton (GPU) kernel bodies, so
  the kernels, the XLA engine and the reference draw the same bits.
  """
  ks = (k0, k1, k0 ^ k1 ^ _PARITY)
  x0 = x0 + ks[0]
  x1 = x1 + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = _rotl(x1, r) ^ x0
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x0, x1


def check_dropout(dropout_rate, dropout_rng) -> float:
  """The validated rate as a Python float; ``dropout_rng`` is required when it is > 0."""
  if isinstance(dropout_rate, (bool, np.bool_)):
    raise TypeError(f"dropout_rate must be a Python float in [0, 1), got {dropout_rate!r}.")
  try:
    rate = float(dropout_rate)
  except (TypeError, jax.errors.ConcretizationTypeError) as e:
    raise TypeError(
        f"dropout_rate must be a Python float in [0, 1) (a static number, not a traced "
        f"array), got {type(dropout_rate).__name__}.") from e
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}.")
  if rate > 0.0 and dropout_rng is None:
    raise ValueError(f"dropout_rate={rate} needs dropout_rng (a jax.random key); got None.")
  return rate


@jax.tree_util.register_pytree_node_class
class BroadcastKey:
  """A dropout key whose keep mask is shared by every batch element and head.

  Pass ``dropout_rng=BroadcastKey(rng)`` for one [T, S] mask (Flax's
  ``broadcast_dropout=True``) instead of one per (batch, head). Every path
  (reference, XLA engine, Pallas kernels) then draws the mask of batch 0,
  head 0 for all of them.
  """

  def __init__(self, rng):
    self.rng = rng

  def tree_flatten(self):
    return (self.rng,), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    return cls(*children)

  def __repr__(self):
    return f"BroadcastKey({self.rng!r})"


def head_keys(rng, batch: int, heads: int):
  """Per-(batch, query head) Threefry keys uint32 [batch, heads, 2] derived from ``rng``.

  ``rng``: any jax.random key (typed, or a legacy uint32 key array), or a
  ``BroadcastKey`` (every (batch, head) then gets the key of (0, 0)).
  """
  if isinstance(rng, BroadcastKey):
    return jnp.broadcast_to(head_keys(rng.rng, 1, 1), (batch, heads, 2))
  seed = jax.random.bits(rng, (2,), jnp.uint32)
  b = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.uint32)[:, None], (batch, heads))
  n = jnp.broadcast_to(jnp.arange(heads, dtype=jnp.uint32)[None, :], (batch, heads))
  k0, k1 = threefry2x32(seed[0], seed[1], b, n)
  return jnp.stack([k0, k1], -1)


def _threshold(rate: float):
  """Drop iff the random word < threshold: P(keep) = 1 - threshold / 2**32."""
  return np.uint32(min(int(round(rate * 2.0 ** 32)), 2 ** 32 - 1))


def keep_multiplier(k0, k1, q_idx, k_idx, rate: float):
  """Dropout multiplier float32: 0 (dropped) or 1 / (1 - rate) (kept).

  k0, k1: the two words of ``head_keys`` for each element's (batch, head);
  q_idx, k_idx: int query / key indices. All four broadcast together; the
  result has their broadcast shape.
  """
  k_idx = jnp.asarray(k_idx, jnp.int32)
  u32 = lambda x: jnp.asarray(x).astype(jnp.uint32)
  y0, y1 = threefry2x32(u32(k0), u32(k1), u32(q_idx), u32(k_idx >> 1))
  word = jnp.where((k_idx & 1) == 1, y1, y0)
  return jnp.where(word >= _threshold(rate), jnp.float32(1.0 / (1.0 - rate)),
                   jnp.float32(0.0))


def dense_multiplier(rng, rate: float, batch: int, heads: int, T: int, S: int):
  """The multiplier over the whole [batch, heads, T, S] (the dense reference's)."""
  keys = head_keys(rng, batch, heads)
  return keep_multiplier(keys[:, :, None, None, 0], keys[:, :, None, None, 1],
                         jnp.arange(T)[:, None], jnp.arange(S)[None, :], rate)
