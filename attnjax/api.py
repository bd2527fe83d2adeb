"""The front door: ``attention``, ``dot_product_attention`` and ``merge_attention``.

Causality is by positions: key j is visible to query i iff
``k_pos[j] <= q_pos[i]``; by default positions are bottom-right aligned
(``q_pos = arange(T) + S - T``), which is what decoding with a KV cache needs.
``dot_product_attention`` keeps ``jax.nn.dot_product_attention``'s own
top-left convention so that it is a drop-in replacement.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.block_sparse import padding as PD
from attnjax.block_sparse.api import attention
from attnjax.core import placement
from attnjax.core import validation as V
from attnjax.core.dispatch import IMPLEMENTATIONS, explain  # noqa: F401  (re-exported)
from attnjax.core.merge import merge_attention
from attnjax import masks as M

__all__ = ["attention", "dot_product_attention", "merge_attention", "default_implementation",
           "explain"]


def default_implementation(*arrays) -> str:
  """'pallas' on a TPU/GPU target the block-sparse kernels compile for, else 'xla'.

  Placement follows ``attnjax.core.placement`` (committed inputs, then
  ``jax.default_device``, then the mesh, then the default backend); the
  targets are those of ``pallas_kernels.targets.support.COMPILES``.
  """
  return placement.default_kernel_implementation("block_sparse", *arrays)


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None,
                          is_causal=False, query_seq_lengths=None,
                          key_value_seq_lengths=None, local_window_size=None,
                          implementation=None, return_residual=False):
  """Drop-in for ``jax.nn.dot_product_attention`` (same arguments and semantics).

  Shapes as there: query [B, T, N, H] or [T, N, H]; key/value [B, S, K, H];
  bias/mask broadcastable to [B, N, T, S]. ``is_causal`` and
  ``local_window_size`` are top-left aligned (query i sees key j <= i), as in
  JAX. ``implementation`` may also be "cudnn" (forwarded to JAX) or any of
  attnjax's ("reference", "xla", "pallas"). Fully masked rows give zeros.
  With ``return_residual`` the lse [B, T, N] is returned too.
  """
  if implementation == "cudnn":
    return jax.nn.dot_product_attention(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size, implementation="cudnn",
        return_residual=return_residual)
  unbatched = getattr(query, "ndim", 0) == 3
  if unbatched:
    query, key, value = query[None], key[None], value[None]
  d = V.check_qkv(query, key, value)
  m = None
  if is_causal:
    m = M.Causal()
  if local_window_size is not None:
    w = M.SlidingWindow(*_window_pair(local_window_size))
    m = w if m is None else m & w
  # Lengths stay per-batch bounds (no dense mask): the fast path skips padded blocks.
  qlen = PD.check_lengths("query_seq_lengths", query_seq_lengths, d.B)
  klen = PD.check_lengths("key_value_seq_lengths", key_value_seq_lengths, d.B)
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    V.check_broadcastable("mask", mask, (d.B, d.N, d.T, d.S))
  full_mask = m if mask is None else combine_mask(m, mask, d.N, np.arange(d.T), np.arange(d.S))
  # Top-left positions. With T == S they are attention's defaults, passed as None
  # (no O(T) host arrays); else NumPy positions, which stay static under jit, so
  # the fast path keeps its block layout (traced ones would make every block partial).
  pos = (None, None) if d.T == d.S else (np.arange(d.T, dtype=np.int32),
                                         np.arange(d.S, dtype=np.int32))
  out = attention(query, key, value, mask=full_mask, bias=bias, scale=scale,
                  q_positions=pos[0], k_positions=pos[1], query_seq_lengths=qlen,
                  key_value_seq_lengths=klen, return_lse=return_residual,
                  implementation=implementation)
  if unbatched:
    out = jax.tree_util.tree_map(lambda x: x[0], out)
  return out


def combine_mask(mask_obj, mask_arr, num_heads: int, q_pos, k_pos):
  """A Mask and a boolean array [B, N|1, T|1, S|1] as one boolean argument for ``attention``.

  The Mask is evaluated densely on positions q_pos [T] and k_pos [S]; either
  argument may be None.
  """
  if mask_arr is None:
    return mask_obj
  if mask_obj is None:
    return mask_arr
  head = jnp.arange(num_heads)[:, None, None]
  dense = jnp.asarray(mask_obj.predicate(head, jnp.asarray(q_pos)[:, None],
                                         jnp.asarray(k_pos)[None, :]), bool)
  T, S = len(q_pos), len(k_pos)
  return mask_arr & jnp.broadcast_to(dense, (num_heads, T, S))[None]


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _window_pair(local_window_size):
  """``local_window_size`` (an int or a (left, right) pair of ints >= 0) as a pair."""
  lws = local_window_size
  pair = (lws, lws) if _is_int(lws) else lws
  if not isinstance(pair, (tuple, list)) or not all(_is_int(w) for w in pair):
    raise TypeError(
        f"local_window_size must be an int or a pair (left, right) of ints, got "
        f"{type(lws).__name__} {lws!r}.")
  if len(pair) != 2 or min(pair) < 0:
    raise ValueError(
        f"local_window_size must be an int >= 0 or a pair (left, right) of ints >= 0, "
        f"got {lws!r}.")
  return int(pair[0]), int(pair[1])
