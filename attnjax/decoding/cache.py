"""Decode attention over contiguous and paged KV caches, and a page-allocator simulator.

vAttention ("vAttention: Dynamic Memory Management for Serving LLMs without
PagedAttention", arXiv:2405.04437): the KV cache stays contiguous so unmodified attention code
serves decoding. JAX has no user-level virtual memory, so attnjax offers the
contiguous decode path, the paged path (identical outputs for any block
table), and a pure-Python simulator of on-demand page mapping that reports
fragmentation and allocation calls for a request trace.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence, Tuple

import jax.numpy as jnp

from attnjax import masks
from attnjax.api import attention


def _check_lengths(lengths, B, L):
  lengths = jnp.asarray(lengths)
  if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths must be an int array of shape [B]=({B},), got {lengths.shape} {lengths.dtype}.")
  return lengths.astype(jnp.int32)


def decode_attention(query, k_cache, v_cache, lengths, *, scale=None, return_lse=False,
                     implementation=None):
  """Attention of the newest T tokens of each sequence over its cache.

  Args:
    query: [B, T, N, H], the queries of positions ``lengths - T .. lengths - 1``.
    k_cache: [B, L, K, H]; v_cache: [B, L, K, Hv]; entries at positions >=
      ``lengths[b]`` are never read into the result (garbage there is harmless).
    lengths: int [B], tokens in each cache including the T new ones.

  Returns:
    [B, T, N, Hv] (and lse [B, T, N] with ``return_lse``).
  """
  B, T = query.shape[:2]
  lengths = _check_lengths(lengths, B, k_cache.shape[1])
  q_pos = lengths[:, None] - T + jnp.arange(T, dtype=jnp.int32)[None, :]
  return attention(query, k_cache, v_cache, mask=masks.Causal(), scale=scale,
                   q_positions=q_pos, k_positions=jnp.arange(k_cache.shape[1], dtype=jnp.int32),
                   return_lse=return_lse, implementation=implementation)


def gather_pages(pages, block_table):
  """pages [P, page_size, K, H], block_table int [B, max_pages] -> [B, max_pages*page_size, K, H]."""
  if pages.ndim != 4:
    raise ValueError(f"pages must be [num_pages, page_size, K, H], got shape {pages.shape}.")
  bt = jnp.asarray(block_table)
  if bt.ndim != 2 or not jnp.issubdtype(bt.dtype, jnp.integer):
    raise ValueError(f"block_table must be an int array [B, max_pages], got {bt.shape} {bt.dtype}.")
  g = pages[bt]  # [B, max_pages, page_size, K, H]
  return g.reshape(bt.shape[0], bt.shape[1] * pages.shape[1], *pages.shape[2:])


def paged_decode_attention(query, k_pages, v_pages, block_table, lengths, *, scale=None,
                           return_lse=False, implementation=None):
  """:func:`decode_attention` over a paged cache (PagedAttention layout).

  k_pages/v_pages [P, page_size, K, H]; block_table int [B, max_pages] maps a
  sequence's logical pages to physical ones. Equals the contiguous path on
  the gathered cache for any block table.
  """
  k = gather_pages(k_pages, block_table)
  v = gather_pages(v_pages, block_table)
  return decode_attention(query, k, v, lengths, scale=scale, return_lse=return_lse,
                          implementation=implementation)


@dataclasses.dataclass
class PageAllocator:
  """Simulates on-demand mapping of fixed-size pages for growing sequences.

  ``bytes_per_token`` is the KV footprint of one token (all layers); a
  request's reserved virtual range is contiguous, and physical pages are
  mapped as it grows and returned when it finishes.
  """
  page_bytes: int
  bytes_per_token: int
  mapped: Dict[int, int] = dataclasses.field(default_factory=dict)
  used_tokens: Dict[int, int] = dataclasses.field(default_factory=dict)
  alloc_calls: int = 0
  peak_pages: int = 0

  def __post_init__(self):
    if self.page_bytes < 1 or self.bytes_per_token < 1:
      raise ValueError("page_bytes and bytes_per_token must be positive.")

  def _pages_for(self, tokens: int) -> int:
    return -(-tokens * self.bytes_per_token // self.page_bytes)

  def grow(self, request: int, tokens: int) -> None:
    """Request ``request`` now holds ``tokens`` tokens; maps pages as needed."""
    need = self._pages_for(tokens)
    have = self.mapped.get(request, 0)
    if need > have:
      self.alloc_calls += need - have
      self.mapped[request] = need
    self.used_tokens[request] = tokens
    self.peak_pages = max(self.peak_pages, sum(self.mapped.values()))

  def free(self, request: int) -> None:
    self.mapped.pop(request, None)
    self.used_tokens.pop(request, None)

  def fragmentation(self) -> float:
    """Fraction of mapped bytes not holding tokens (internal fragmentation)."""
    mapped = sum(self.mapped.values()) * self.page_bytes
    used = sum(self.used_tokens.values()) * self.bytes_per_token
    return 0.0 if mapped == 0 else 1.0 - used / mapped


def simulate_trace(trace: Sequence[Tuple[int, int, int]], page_bytes: int,
                   bytes_per_token: int) -> Dict[str, float]:
  """Runs a trace of (request, prompt_tokens, generated_tokens) requests one after another
  in lock-step decode; returns peak pages, allocation calls and mean fragmentation."""
  alloc = PageAllocator(page_bytes, bytes_per_token)
  frags: List[float] = []
  for r, prompt, _ in trace:
    alloc.grow(r, prompt)
  step = 0
  live = {r: (p, g) for r, p, g in trace}
  while live:
    step += 1
    for r in list(live):
      p, g = live[r]
      if step > g:
        alloc.free(r)
        del live[r]
      else:
        alloc.grow(r, p + step)
    frags.append(alloc.fragmentation())
  return {"peak_pages": float(alloc.peak_pages), "alloc_calls": float(alloc.alloc_calls),
          "mean_fragmentation": sum(frags) / max(len(frags), 1)}
