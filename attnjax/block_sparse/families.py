"""Static sparse families on the block-sparse engine: sliding window, Longformer and
BigBird ("Clinical-Longformer and Clinical-BigBird: Transformers for long clinical
sequences", arXiv:2201.11838), StreamingLLM/DuoAttention streaming heads ("DuoAttention:
Efficient Long-Context LLM Inference with Retrieval and Streaming Heads", arXiv:2410.10819),
AnchorAttention ("When Precision Meets Position: BFloat16 Breaks Down RoPE in Long-Context
Training", arXiv:2411.13476), EE-MLLM composite attention ("EE-MLLM: A Data-Efficient and
Compute-Efficient Multimodal Large Language Model", arXiv:2408.11795) and MASFormer's
block-local layers ("Efficient Long-Range Transformers: You Need to Attend More, but Not
Necessarily at Every Layer", arXiv:2310.12442).

Every family is a mask from ``attnjax.masks`` run through ``attnjax.attention``
(so ``implementation`` and the reference fallback behave as there), and
equals the dense reference with that mask. Shapes: query [B, T, N, H],
key [B, S, K, H], value [B, S, K, Hv] -> [B, T, N, Hv]. Positions are
bottom-right aligned by default (``q_pos = arange(T) + S - T``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from attnjax.block_sparse.api import attention
from attnjax.core import validation as V
from attnjax.masks import (AnchorDocuments, Causal, GlobalTokens, Modality, RandomBlocks,
                           SameBlock, SinkWindow, SlidingWindow)


def _attend(query, key, value, mask, *, score=None, scale=None, q_positions=None,
            k_positions=None, segment_ids=None, return_lse=False, implementation=None,
            bias=None, query_seq_lengths=None, key_value_seq_lengths=None):
  return attention(query, key, value, mask=mask, score=score, bias=bias, scale=scale,
                   q_positions=q_positions, k_positions=k_positions,
                   segment_ids=segment_ids, query_seq_lengths=query_seq_lengths,
                   key_value_seq_lengths=key_value_seq_lengths, return_lse=return_lse,
                   implementation=implementation)


def sliding_window_attention(query, key, value, *, left: int, right: int = 0,
                             causal: bool = False, **kwargs):
  """Local attention: key j visible iff ``q_pos - left <= k_pos <= q_pos + right``.

  ``left`` keys before the query and ``right`` after it (``right=0``: a causal
  window of ``left + 1`` keys); ``causal=True`` also applies ``k_pos <= q_pos``.
  Other keyword arguments as ``attnjax.attention``.
  """
  mask = SlidingWindow(left, right)
  if causal:
    mask = mask & Causal()
  return _attend(query, key, value, mask, **kwargs)


def _positions_tuple(name, positions, length):
  if positions is None:
    return ()
  arr = np.asarray(positions)
  if arr.dtype == bool:
    if arr.shape != (length,):
      raise ValueError(f"{name} as a boolean mask must have shape [T]=({length},), got "
                       f"{arr.shape}.")
    arr = np.nonzero(arr)[0]
  arr = arr.reshape(-1)
  if arr.size and (arr.min() < 0 or arr.max() >= length):
    raise ValueError(f"{name} must lie in [0, {length}), got {arr.tolist()}.")
  return tuple(int(p) for p in arr)


def longformer_mask(seq_len: int, *, window: int = 512, global_positions=None,
                    causal: bool = False):
  """Longformer's Mask: ``window // 2`` keys each side, global tokens, optionally causal.

  ``global_positions``: ints or a boolean mask [seq_len] (checked to lie in [0, seq_len)).
  """
  V.check_positive_int("window", window, minimum=0)
  glob = _positions_tuple("global_positions", global_positions, seq_len)
  mask = SlidingWindow(window // 2, window // 2)
  if glob:
    mask = mask | GlobalTokens(glob)
  return mask & Causal() if causal else mask


def longformer_attention(query, key, value, *, window: int = 512, global_positions=None,
                         global_qkv=None, causal: bool = False, **kwargs):
  """Longformer: a symmetric window plus global tokens (Clinical-Longformer, arXiv:2201.11838).

  Args:
    window: total window; each query sees ``window // 2`` keys on each side
      (HF ``attention_window=512`` -> 256 each side).
    global_positions: static positions (ints, or a boolean mask [T]) of the
      global tokens (e.g. CLS = 0): they attend to all keys and all queries
      attend to them.
    global_qkv: optional (q_g [B, T, N, H], k_g [B, S, K, H], v_g [B, S, K, Hv])
      from Longformer's separate global projections: the rows of the global
      tokens are then full attention of ``q_g`` over ``k_g``/``v_g``, as in
      the original model (the other rows use ``query``/``key``/``value``).
    causal: add ``k_pos <= q_pos``.
  """
  d = V.check_qkv(query, key, value)
  glob = _positions_tuple("global_positions", global_positions, d.S)
  mask = longformer_mask(d.S, window=window, global_positions=glob, causal=causal)
  return_lse = kwargs.get("return_lse", False)
  out = _attend(query, key, value, mask, **kwargs)
  if global_qkv is None or not glob:
    return out
  qg, kg, vg = global_qkv
  V.check_qkv(qg, kg, vg)
  if qg.shape != query.shape:
    raise ValueError(f"global_qkv query must have the query's shape {query.shape}, got "
                     f"{qg.shape}.")
  rows = jnp.asarray(glob, jnp.int32)
  g_kwargs = dict(kwargs)
  q_pos, k_pos = V.check_positions(g_kwargs.pop("q_positions", None),
                                   g_kwargs.pop("k_positions", None), d)
  g_qpos = q_pos[..., rows]
  g_out = _attend(qg[:, rows], kg, vg, Causal() if causal else None, q_positions=g_qpos,
                  k_positions=k_pos, **{k: v for k, v in g_kwargs.items()
                                        if k not in ("segment_ids", "query_seq_lengths")})
  if return_lse:
    (o, lse), (go, glse) = out, g_out
    return o.at[:, rows].set(go), lse.at[:, rows].set(glse)
  return out.at[:, rows].set(g_out)


def bigbird_mask(seq_len: int, *, block_size: int = 64, window_blocks: int = 3,
                 num_global_blocks: int = 1, num_random_blocks: int = 3, seed: int = 0,
                 num_heads: int = 1, causal: bool = False):
  """BigBird-ITC mask (Clinical-BigBird, arXiv:2201.11838): block window, global first/last
  blocks, random blocks.

  Each query block sees ``window_blocks`` (odd) blocks centred on itself, the
  first and last ``num_global_blocks`` blocks (whose queries see everything),
  and ``num_random_blocks`` random blocks per head drawn from a fixed seed
  (excluding window and global blocks, as BigBird does).
  """
  V.check_positive_int("block_size", block_size)
  V.check_positive_int("window_blocks", window_blocks)
  if window_blocks % 2 == 0:
    raise ValueError(f"window_blocks must be odd (centred on the query block), got "
                     f"{window_blocks}.")
  V.check_positive_int("num_global_blocks", num_global_blocks, minimum=0)
  V.check_positive_int("num_random_blocks", num_random_blocks, minimum=0)
  if seq_len % block_size:
    raise ValueError(f"block_size={block_size} does not divide the sequence length {seq_len}.")
  r = window_blocks // 2
  span = (r + 1) * block_size
  mask = SameBlock(span)
  for j in range(1, r + 1):
    mask = mask | SameBlock(span, j * block_size)
  g = min(num_global_blocks * block_size, seq_len)
  if g:
    glob = tuple(range(g)) + tuple(p for p in range(seq_len - g, seq_len) if p >= g)
    mask = mask | GlobalTokens(glob)
  if num_random_blocks:
    mask = mask | RandomBlocks(block_size, num_random_blocks, seq_len, seed=seed,
                               num_heads=num_heads, causal=causal, exclude_window=r + 1,
                               exclude_global=num_global_blocks)
  if causal:
    mask = mask & Causal()
  return mask


def bigbird_attention(query, key, value, *, block_size: int = 64, window_blocks: int = 3,
                      num_global_blocks: int = 1, num_random_blocks: int = 3, seed: int = 0,
                      causal: bool = False, **kwargs):
  """BigBird-ITC attention (self-attention, T == S); see ``bigbird_mask``."""
  d = V.check_qkv(query, key, value)
  if d.T != d.S:
    raise NotImplementedError(f"bigbird_attention is defined for self-attention only "
                              f"(its pattern has no cross-attention form): T={d.T} must equal S={d.S}.")
  mask = bigbird_mask(d.S, block_size=block_size, window_blocks=window_blocks,
                      num_global_blocks=num_global_blocks,
                      num_random_blocks=num_random_blocks, seed=seed,
                      num_heads=d.N if num_random_blocks else 1, causal=causal)
  return _attend(query, key, value, mask, **kwargs)


def streaming_attention(query, key, value, *, num_sink: int = 4, window: int = 256, **kwargs):
  """StreamingLLM / DuoAttention streaming heads: sinks + recent window (causal).

  ``M[i, j] = j <= i and (j < num_sink or i - j < window)`` on positions.
  DuoAttention's defaults are 64 sinks + 256 recent at deployment (128 + 256
  during gate training); StreamingLLM's 4 sinks are the default here.
  """
  return _attend(query, key, value, SinkWindow(num_sink, window), **kwargs)


def anchor_attention(query, key, value, *, doc_ids=None, anchor_id: int = 0, **kwargs):
  """AnchorAttention (arXiv:2411.13476): causal intra-document attention plus a shared anchor.

  ``M[i, j] = j <= i and (doc[i] == doc[j] or doc[j] == anchor_id)``.
  ``doc_ids``: static ids [S] (a tuple or concrete array; exact block
  layout, empty cross-document blocks skipped), or per-batch ids [B, S]
  (passed as segment ids: every block is visited, masked element-wise).
  Self-attention (T == S) with bottom-right positions.
  """
  d = V.check_qkv(query, key, value)
  if doc_ids is None:
    raise ValueError("anchor_attention needs doc_ids ([S] static or [B, S]).")
  ids = doc_ids
  try:
    arr = np.asarray(ids)
  except Exception:  # pylint: disable=broad-except  (traced ids)
    arr = None
  if arr is not None and arr.ndim == 1:
    if arr.shape != (d.S,):
      raise ValueError(f"doc_ids must have shape [S]=({d.S},) or [B, S], got {arr.shape}.")
    return _attend(query, key, value, AnchorDocuments(tuple(int(x) for x in arr), anchor_id),
                   **kwargs)
  ids = jnp.asarray(ids)
  if ids.shape != (d.B, d.S) or d.T != d.S:
    raise ValueError(f"doc_ids must have shape [S]=({d.S},) or [B, S]=({d.B}, {d.S}) with "
                     f"T == S; got {ids.shape} (T={d.T}).")
  if kwargs.get("segment_ids") is not None:
    raise ValueError("anchor_attention reads per-batch doc_ids as segment ids: do not pass "
                     "segment_ids too.")
  kwargs["segment_ids"] = ids
  return _attend(query, key, value, AnchorDocuments(anchor_id=anchor_id), **kwargs)


def composite_attention(query, key, value, *, num_visual: int, **kwargs):
  """EE-MLLM composite attention (arXiv:2408.11795) for a ``[visual; text]`` sequence.

  Text queries attend causally to every visual and earlier text key; a
  visual query attends only to itself, so its output is exactly its own value
  (cost O(N_t (N_v + N_t)) instead of O((N_v + N_t)^2)). Self-attention.
  """
  d = V.check_qkv(query, key, value)
  if d.T != d.S:
    raise NotImplementedError(f"composite_attention is defined for self-attention only "
                              f"(its pattern has no cross-attention form): T={d.T} must equal S={d.S}.")
  V.check_positive_int("num_visual", num_visual, minimum=0)
  if num_visual > d.S:
    raise ValueError(f"num_visual={num_visual} exceeds the sequence length {d.S}.")
  return _attend(query, key, value, Modality.vision_then_text(num_visual, d.S - num_visual),
                 **kwargs)


def block_local_attention(query, key, value, *, block_size: int, causal: bool = True,
                          include_prev_block: bool = False, **kwargs):
  """MASFormer's short-span layers (arXiv:2310.12442): attention inside blocks of positions.

  ``M[i, j] = i // b == j // b`` (and ``j <= i`` when causal);
  ``include_prev_block`` also lets a block see the previous one.
  """
  mask = block_local_mask(block_size=block_size, causal=causal,
                          include_prev_block=include_prev_block)
  return _attend(query, key, value, mask, **kwargs)


def block_local_mask(*, block_size: int, causal: bool = True, include_prev_block: bool = False):
  """The Mask of :func:`block_local_attention`."""
  V.check_positive_int("block_size", block_size)
  mask = SameBlock(block_size)
  if include_prev_block:
    mask = SameBlock(2 * block_size) | SameBlock(2 * block_size, block_size)
    if not causal:
      raise NotImplementedError(
          "include_prev_block is defined for causal block-local attention only.")
  return mask & Causal() if causal else mask


class LayerSpec(NamedTuple):
  """One layer's attention: a registered family name and its options."""
  family: str
  options: dict


def masformer_layer_specs(num_layers: int, full_layers: Optional[Sequence[int]] = None, *,
                          num_full: int = 2, block_size: int = 1024, kind: str = "block",
                          include_prev_block: bool = False):
  """MASFormer's per-layer schedule (arXiv:2310.12442): a few full layers, the rest short-span.

  Args:
    num_layers: depth.
    full_layers: indices of the full-attention layers; default ``num_full``
      layers spread evenly with the last layer among them (the paper ablates
      the placement; its recommended placement is not confirmed here).
    block_size: span b of the sparse layers (window size for ``kind="window"``).
    kind: "block" (block-local causal) or "window" (causal sliding window of b keys).

  Returns:
    A list of ``LayerSpec(family, options)``; in an experiment config use
    ``layer_attention = tuple(s.family for s in specs)`` and the options of
    the sparse family as ``family_options``.
  """
  V.check_positive_int("num_layers", num_layers)
  V.check_positive_int("block_size", block_size)
  if kind not in ("block", "window"):
    raise ValueError(f"kind must be 'block' or 'window', got {kind!r}.")
  if full_layers is None:
    V.check_positive_int("num_full", num_full, minimum=0)
    if num_full > num_layers:
      raise ValueError(f"num_full={num_full} exceeds num_layers={num_layers}.")
    full_layers = sorted({num_layers - 1 - round(i * num_layers / num_full)
                          for i in range(num_full)}) if num_full else []
  full = set()
  for i in full_layers:
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < num_layers:
      raise ValueError(f"full_layers entry {i!r} is not a layer index in [0, {num_layers}).")
    full.add(int(i))
  if kind == "block":
    sparse = LayerSpec("block_local", {"block_size": block_size,
                                       "include_prev_block": include_prev_block})
  else:
    sparse = LayerSpec("sliding_window", {"window": block_size})
  return [LayerSpec("dense", {}) if i in full else sparse for i in range(num_layers)]
