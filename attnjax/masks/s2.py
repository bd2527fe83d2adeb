"""S2-Attention heterogeneous context sharding among heads (Lin, Zhang et al.; arXiv:2407.17678).

"Efficient LLM Training and Serving with Heterogeneous Context Sharding among
Attention Heads".

The pattern follows DKernel's ``get_sparse_attn_mask`` (read in the official
repository) on blocks of ``block_size`` tokens, ``qb = q_pos // B``,
``kb = k_pos // B`` (absolute positions, so sequence-parallel chunks are the
same mask with ``q_offset``/``k_offset``, DKernel's q_start/kv_start):

* local: ``qb - kb < left`` and ``kb - qb < right`` (causal: ``right = 1``,
  ``local_blocks`` counts the diagonal block);
* vertical, absolute (default when causal): KV head ``g`` keeps ``kb`` iff
  ``(kb + g * step + head_sliding_offset) % vert_stride == 0`` with
  ``step = head_sliding_step or max(1, vert_stride // num_heads)`` (DKernel
  divides by the number of *query* heads); query head ``h`` uses KV head
  ``g = h // (num_heads // num_kv_heads)``;
* vertical, relative (default when not causal; homogeneous): keep iff
  ``(max(qb - kb - left + 1, 0) + max(kb - qb - right + 1, 0)) % vert_stride == 0``;
* the last ``num_dense_heads`` KV heads are dense; ``homo_head`` gives every
  head KV head 0's pattern (no dense heads then);
* causal: token-level ``k_pos <= q_pos`` on top (which implies ``qb >= kb``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple, Union

import numpy as np

from attnjax.masks.base import Causal, Mask, and_bounds, check_int, is_int
from attnjax.masks.primitives import count_multiples


def _relu(x):
  return x * (x > 0)


@dataclasses.dataclass(frozen=True)
class S2(Mask):
  """S2-Attention's per-head local + strided block pattern (see module docstring).

  Defaults are Phi-3-small's released config (block 64, 16 local blocks,
  stride 8). ``block_size`` may be any positive
  integer for the mask (DKernel's kernels need a power of two >= 16).
  """
  num_heads: int
  block_size: int = 64
  local_blocks: Union[int, Tuple[int, int]] = 16
  vert_stride: int = 8
  causal: bool = True
  homo_head: bool = False
  num_dense_heads: int = 0
  num_kv_heads: Optional[int] = None
  head_sliding_step: Optional[int] = None
  head_sliding_offset: int = 0
  vert_position_type: Optional[str] = None

  def __post_init__(self):
    check_int("S2", "num_heads", self.num_heads, 1)
    check_int("S2", "block_size", self.block_size, 1)
    check_int("S2", "vert_stride", self.vert_stride, 1)
    lb = self.local_blocks
    if isinstance(lb, (tuple, list)):
      if self.causal or len(lb) != 2 or not all(is_int(x) and x >= 1 for x in lb):
        raise ValueError(
            "S2 local_blocks must be an integer >= 1, or (left, right) integers >= 1 "
            f"when causal=False; got {lb!r} with causal={self.causal}.")
      object.__setattr__(self, "local_blocks", (int(lb[0]), int(lb[1])))
    else:
      check_int("S2", "local_blocks", lb, 1)
    kv = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
    check_int("S2", "num_kv_heads", kv, 1)
    if self.num_heads % kv:
      raise ValueError(f"S2 num_kv_heads={kv} must divide num_heads={self.num_heads}.")
    check_int("S2", "num_dense_heads", self.num_dense_heads, 0)
    if self.num_dense_heads > kv:
      raise ValueError(f"S2 num_dense_heads={self.num_dense_heads} exceeds the {kv} "
                       "(KV) heads it counts.")
    if self.homo_head and self.num_dense_heads:
      raise ValueError("S2 homo_head=True cannot have num_dense_heads > 0.")
    if self.head_sliding_step is not None:
      check_int("S2", "head_sliding_step", self.head_sliding_step, 0)
    if not is_int(self.head_sliding_offset):
      raise ValueError(f"S2 head_sliding_offset must be an integer, got {self.head_sliding_offset!r}.")
    if self.vert_position_type not in (None, "absolute", "relative"):
      raise ValueError("S2 vert_position_type must be None, 'absolute' or 'relative', got "
                       f"{self.vert_position_type!r}.")
    if not isinstance(self.causal, (bool, np.bool_)):
      raise ValueError(f"S2 causal must be a bool, got {self.causal!r}.")

  # -- resolved parameters -------------------------------------------------------
  @property
  def left_right(self) -> Tuple[int, int]:
    lb = self.local_blocks
    if self.causal:
      return int(lb), 1
    return lb if isinstance(lb, tuple) else (int(lb), int(lb))

  @property
  def relative(self) -> bool:
    if self.vert_position_type is None:
      return not self.causal
    return self.vert_position_type == "relative"

  @property
  def step(self) -> int:
    if self.head_sliding_step is not None:
      return self.head_sliding_step
    return max(1, self.vert_stride // (1 if self.homo_head else self.num_heads))

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def head_dependent(self):
    if self.homo_head:
      return False
    return self.num_dense_heads > 0 or not self.relative

  @property
  def exact_bounds(self):  # type: ignore[override]
    return not (self.causal and self.relative)

  def head_params(self, head):
    """(shift, dense) of query head(s) ``head``: vertical kb satisfy (kb + shift) % V == 0."""
    g = head * 0 if self.homo_head else head // (self.num_heads // self.kv_heads)
    shift = g * self.step + self.head_sliding_offset
    dense = g >= self.kv_heads - self.num_dense_heads
    return shift, dense

  # -- predicates -----------------------------------------------------------------
  def block_pattern(self, head, qb, kb):
    """Block-level pattern (no token causality) for block indices qb, kb."""
    left, right = self.left_right
    shift, dense = self.head_params(head)
    d = qb - kb
    if self.relative:
      e = _relu(d - left + 1) + _relu(-d - right + 1)
      pat = e % self.vert_stride == 0
    else:
      pat = ((d < left) & (-d < right)) | ((kb + shift) % self.vert_stride == 0)
    return pat | dense

  def predicate(self, head, q_pos, k_pos, q_seg=None, k_seg=None):
    b = self.block_size
    pat = self.block_pattern(head, q_pos // b, k_pos // b)
    return pat & (k_pos <= q_pos) if self.causal else pat & (q_pos == q_pos)

  # -- block bounds ---------------------------------------------------------------
  def classify_block(self, head, q_lo, q_hi, k_lo, k_hi):
    return self.block_bounds(head, q_lo, q_hi, k_lo, k_hi)[:2]

  def block_bounds(self, head, q_lo, q_hi, k_lo, k_hi):
    B, V = self.block_size, self.vert_stride
    left, right = self.left_right
    shift, dense = self.head_params(int(head))
    none = np.zeros((), bool)
    causal = Causal().block_bounds(head, q_lo, q_hi, k_lo, k_hi)
    if dense:
      return causal if self.causal else (np.True_, np.True_, none)
    qa, qz, ka, kz = q_lo // B, (q_hi - 1) // B, k_lo // B, (k_hi - 1) // B

    def count_vert(a, z):
      return count_multiples(a + shift, z + shift, V)

    def full_vert(a, z):
      return (z < a) | (count_vert(a, z) == z - a + 1)

    if self.relative:
      any_, all_ = _relative_bounds(qa - kz, qz - ka, left, right, V)
      if self.causal:
        return and_bounds(causal, (any_, all_, none))
      return any_, all_, none
    if self.causal:
      tok_any, tok_all = causal[0], causal[1]
      any_local = np.maximum(qa - kz, 0) < left
      any_vert = count_vert(ka, (np.minimum(k_hi, q_hi) - 1) // B) > 0
      all_ = tok_all & full_vert(ka, np.minimum(kz, qz - left))
      return tok_any & (any_local | any_vert), all_, none
    any_local = (qa - kz <= left - 1) & (qz - ka >= 1 - right)
    any_ = any_local | (count_vert(ka, kz) > 0)
    all_ = full_vert(ka, np.minimum(kz, qz - left)) & full_vert(np.maximum(ka, qa + right), kz)
    return any_, all_, none

  def validate(self, num_heads, q_pos, k_pos):
    Mask.validate(self, num_heads, q_pos, k_pos)


def _relative_bounds(dlo, dhi, left, right, V):
  """Exact (any, all) of the relative S2 rule over block distances d in [dlo, dhi]."""
  band_any = (dlo <= left - 1) & (dhi >= 1 - right)
  ua = np.maximum(dlo, left)          # upper part: d >= left, e = d - left + 1
  cu = count_multiples(ua - left + 1, dhi - left + 1, V)
  nu = np.maximum(dhi - ua + 1, 0)
  lz = np.minimum(dhi, -right)        # lower part: d <= -right, e = -d - right + 1
  cl = count_multiples(-lz - right + 1, -dlo - right + 1, V)
  nl = np.maximum(lz - dlo + 1, 0)
  return band_any | (cu > 0) | (cl > 0), (cu == nu) & (cl == nl)


def s2_block_mask(num_heads: int, q_len: int, kv_len: Optional[int] = None, *,
                  block_size: int = 64, local_blocks=16, vert_stride: int = 8,
                  causal: bool = True, homo_head: bool = False, num_dense_heads: int = 0,
                  num_kv_heads: Optional[int] = None, head_sliding_step: Optional[int] = None,
                  head_sliding_offset: int = 0, vert_position_type: Optional[str] = None,
                  q_start: int = 0, kv_start: int = 0) -> np.ndarray:
  """S2-Attention block mask, closed form: bool [num_heads, nqb, nkb].

  ``nqb = ceil(q_len / block_size)`` blocks of the queries at positions
  ``[q_start, q_start + q_len)`` and ``nkb`` of the keys at
  ``[kv_start, kv_start + kv_len)`` (``kv_len`` defaults to ``q_len``);
  the starts must be multiples of ``block_size``. Causal masks also require
  ``qb >= kb``; the token mask is ``kron(mask, ones(B, B))`` and, when causal,
  ``k_pos <= q_pos`` (``S2(...).to_dense``).
  """
  m = S2(num_heads, block_size, local_blocks, vert_stride, causal, homo_head,
         num_dense_heads, num_kv_heads, head_sliding_step, head_sliding_offset,
         vert_position_type)
  kv_len = q_len if kv_len is None else kv_len
  for name, v in (("q_len", q_len), ("kv_len", kv_len)):
    check_int("s2_block_mask", name, v, 1)
  for name, v in (("q_start", q_start), ("kv_start", kv_start)):
    if not is_int(v) or v % block_size:
      raise ValueError(f"s2_block_mask {name}={v!r} must be a multiple of block_size={block_size}.")
  qb = q_start // block_size + np.arange(-(-q_len // block_size))
  kb = kv_start // block_size + np.arange(-(-kv_len // block_size))
  head = np.arange(num_heads)[:, None, None]
  pat = m.block_pattern(head, qb[None, :, None], kb[None, None, :])
  if causal:
    pat = pat & (qb[:, None] >= kb[None, :])
  return np.broadcast_to(pat, (num_heads, len(qb), len(kb))).copy()


def is_kv_cache_efficient(block_mask) -> bool:
  """DKernel's check on a causal block mask [H, nqb, nkb] (same block size, aligned):
  strictly below the diagonal, once a column leaves the pattern it never
  comes back, so a decoder can evict that key block for good."""
  bm = np.asarray(block_mask, bool)
  if bm.ndim == 2:
    bm = bm[None]
  nq, nk = bm.shape[1:]
  below = np.arange(nq)[:, None] > np.arange(nk)[None, :]
  grows = bm[:, 1:] & ~bm[:, :-1]
  return not bool((grows & below[1:]).any())
