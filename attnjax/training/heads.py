"""Training only chosen heads ("precise SFT" of "Interpreting and Improving Large
Language Models in Arithmetic Calculation", arXiv:2409.01659).

:func:`head_gradient_mask` marks, inside the parameters of one
``attnjax.layers.MultiHeadAttention``, the slices that belong to the chosen
heads (their columns of W_q, W_k, W_v and rows of W_o); :func:`mask_updates`
is an optax transformation that zeroes every other update, so only those
heads (and any leaves the caller marks) train.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax


def head_gradient_mask(attn_params, heads: Sequence[int], *, num_heads: int):
  """Mask pytree (same structure as ``attn_params``) with 1 on the chosen heads' slices.

  Args:
    attn_params: the params of one MultiHeadAttention: ``query``/``key``/
      ``value`` kernels [D, heads, H] (biases [heads, H]) and ``out`` kernel
      [N, H, D]. With GQA a KV head trains when any of its query heads is chosen.
    heads: query-head indices to train.
    num_heads: N.

  The output bias is shared by all heads and gets 0.
  """
  sel = jnp.zeros((num_heads,), bool).at[jnp.asarray(list(heads), jnp.int32)].set(True)
  kv = attn_params["key"]["kernel"].shape[-2]
  if num_heads % kv:
    raise ValueError(f"num_heads={num_heads} must be a multiple of the key heads {kv}.")
  sel_kv = jnp.any(sel.reshape(kv, num_heads // kv), axis=1)

  def mark(name, leaf_name, leaf):
    if name == "out":
      if leaf_name == "kernel":
        return jnp.broadcast_to(sel[:, None, None], leaf.shape).astype(leaf.dtype)
      return jnp.zeros_like(leaf)
    s = sel if name == "query" else sel_kv
    if leaf_name == "kernel":
      return jnp.broadcast_to(s[None, :, None], leaf.shape).astype(leaf.dtype)
    return jnp.broadcast_to(s[:, None], leaf.shape).astype(leaf.dtype)

  out = {}
  for name, sub in attn_params.items():
    if name in ("query", "key", "value", "out"):
      out[name] = {leaf_name: mark(name, leaf_name, leaf) for leaf_name, leaf in sub.items()}
    else:
      out[name] = jax.tree_util.tree_map(jnp.zeros_like, sub)
  return out


def mask_updates(mask) -> optax.GradientTransformation:
  """optax transformation multiplying updates by ``mask`` (a pytree like the params)."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(lambda u, m: u * m.astype(u.dtype), updates, mask), state

  return optax.GradientTransformation(init_fn, update_fn)
