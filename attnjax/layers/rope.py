"""Rotary position embeddings (RoFormer, Su et al. 2021), shared by every layer.

Two conventions for which dimensions form a rotated pair:

* rotate-half (GPT-NeoX / Llama, the default): the rotated part of the head
  dimension is split into halves ``x1, x2`` and the pair ``(x1[i], x2[i])``
  is rotated;
* interleaved (GPT-J, the original RoFormer): the pair ``(x[2i], x[2i+1])``.

Pair ``i`` turns by ``pos * inv_freq[i]`` with ``inv_freq[i] = base **
(-2 i / R)``, ``R`` the number of rotated dimensions (the first ``R`` of the
head dimension; the rest pass unchanged). Rotating q and k this way makes the
logit ``q_i . k_j`` depend on positions only through ``i - j``.

Context-extension scalings of the frequencies (:class:`RopeScaling`), with
Hugging Face transformers' ``rope_scaling`` names and defaults:

* ``"linear"``: position interpolation, ``inv_freq / factor`` ("Extending
  Context Window of Large Language Models via Positional Interpolation",
  arXiv:2306.15595);
* ``"dynamic"``: dynamic NTK-aware scaling; for a sequence of ``L >
  original_max_position_embeddings`` (``L`` = largest position + 1) the base
  becomes ``base * (factor * L / L0 - (factor - 1)) ** (R / (R - 2))``;
  shorter sequences are unscaled (also with factor 1, longer ones are not);
* ``"yarn"``: YaRN ("YaRN: Efficient Context Window Extension of Large
  Language Models", arXiv:2309.00071): per pair, a ramp between interpolation
  (``inv_freq / factor``) and extrapolation (``inv_freq``) over the pairs that
  turn between ``beta_slow`` and ``beta_fast`` times within ``L0``, and cos/sin
  multiplied by ``attention_factor`` (default ``0.1 ln(factor) + 1``);
* ``"llama3"``: Llama 3.1's scaling ("The Llama 3 Herd of Models",
  arXiv:2407.21783): wavelengths longer than ``L0 / low_freq_factor`` are
  divided by ``factor``, shorter than ``L0 / high_freq_factor`` kept, and the
  band between interpolated smoothly.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import jax.numpy as jnp

__all__ = ["RopeScaling", "apply_rope", "as_rope_scaling", "rope_attention_factor",
           "rope_frequencies", "rotary_dims"]

_KINDS = ("linear", "dynamic", "yarn", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """A RoPE frequency scaling (hashable; see the module docstring for the formulas).

  Attributes:
    kind: "linear" | "dynamic" | "yarn" | "llama3".
    factor: the context extension factor s (>= 1 in practice; 1 is unscaled
      for every kind but "dynamic" past L0).
    original_max_position_embeddings: L0, the pre-training context
      ("dynamic", "yarn", "llama3"; llama3's default 8192).
    beta_fast, beta_slow: YaRN's rotation bounds (32, 1).
    attention_factor: YaRN's cos/sin multiplier; None: ``0.1 ln(factor) + 1``
      (or, with ``mscale`` and ``mscale_all_dim``, the ratio of the two).
    mscale, mscale_all_dim: YaRN as DeepSeek-V2 writes its attention factor.
    truncate: YaRN: round the ramp's ends to integers (floor, ceil) as HF does.
    low_freq_factor, high_freq_factor: Llama 3's band limits (1, 4).
  """
  kind: str
  factor: float = 1.0
  original_max_position_embeddings: Optional[int] = None
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  attention_factor: Optional[float] = None
  mscale: Optional[float] = None
  mscale_all_dim: Optional[float] = None
  truncate: bool = True
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0

  def __post_init__(self):
    if self.kind not in _KINDS:
      raise ValueError(f"RopeScaling kind must be one of {_KINDS}, got {self.kind!r}.")
    if not self.factor > 0:
      raise ValueError(f"RopeScaling factor must be positive, got {self.factor!r}.")
    if self.kind in ("dynamic", "yarn") and not self.original_max_position_embeddings:
      raise ValueError(f"RopeScaling kind={self.kind!r} needs "
                       "original_max_position_embeddings (the pre-training context).")
    if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
      raise ValueError(f"llama3 scaling needs high_freq_factor > low_freq_factor > 0, got "
                       f"{self.high_freq_factor}, {self.low_freq_factor}.")

  @classmethod
  def from_hf(cls, rope_scaling: Mapping[str, Any],
              max_position_embeddings: Optional[int] = None) -> Optional["RopeScaling"]:
    """From a Hugging Face ``config.json`` ``rope_scaling`` dict (None for "default").

    ``max_position_embeddings`` (the config's) stands in for a missing
    ``original_max_position_embeddings``, as in transformers.
    """
    d = dict(rope_scaling)
    kind = d.pop("rope_type", None) or d.pop("type", None)
    d.pop("type", None)
    if kind == "default":
      return None
    if kind == "llama3":
      d.setdefault("original_max_position_embeddings", 8192)
    elif max_position_embeddings is not None:
      d.setdefault("original_max_position_embeddings", max_position_embeddings)
    names = {f.name for f in dataclasses.fields(cls)} - {"kind"}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"rope_scaling keys {unknown} are not supported (kind {kind!r}); "
                       f"known: {sorted(names)}.")
    d = {k: v for k, v in d.items() if v is not None}
    return cls(kind=kind, **d)


def as_rope_scaling(scaling) -> Optional[RopeScaling]:
  """None, a RopeScaling, or an HF-style dict -> RopeScaling or None."""
  if scaling is None or isinstance(scaling, RopeScaling):
    return scaling
  if isinstance(scaling, Mapping):
    return RopeScaling.from_hf(scaling)
  raise TypeError(f"rope scaling must be None, a RopeScaling or a dict, got "
                  f"{type(scaling).__name__}.")


def rotary_dims(head_dim: int, fraction: float = 1.0) -> int:
  """Number of rotated dimensions: ``floor(head_dim * fraction)`` rounded down to even."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction must be in (0, 1], got {fraction!r}.")
  rot = int(head_dim * fraction) // 2 * 2
  if rot < 2:
    raise ValueError(
        f"fraction={fraction} of head_dim={head_dim} rotates {rot} dimensions; at least "
        "2 are needed.")
  return rot


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_attention_factor(scaling=None) -> float:
  """The multiplier of cos and sin: YaRN's attention factor, else 1."""
  s = as_rope_scaling(scaling)
  if s is None or s.kind != "yarn":
    return 1.0
  if s.attention_factor is not None:
    return float(s.attention_factor)
  if s.mscale and s.mscale_all_dim:
    return _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim)
  return _yarn_mscale(s.factor)


def rope_frequencies(rot: int, base: float = 10000.0, scaling=None, *, seq_len=None):
  """Inverse frequencies [rot // 2] float32: ``base ** (-2 i / rot)``, then scaled.

  Args:
    rot: number of rotated dimensions (even).
    base: the frequency base.
    scaling: None, a :class:`RopeScaling` or an HF ``rope_scaling`` dict.
    seq_len: "dynamic" only: the sequence length L (int or traced scalar).
  """
  if not base > 0:
    raise ValueError(f"base must be positive, got {base!r}.")
  s = as_rope_scaling(scaling)
  exps = jnp.arange(0, rot, 2, dtype=jnp.float32) / rot
  inv = jnp.asarray(base, jnp.float32) ** (-exps)
  if s is None:
    return inv
  f = s.factor
  if s.kind == "linear":
    return inv / f
  L0 = s.original_max_position_embeddings
  if s.kind == "dynamic":
    if seq_len is None:
      raise ValueError("dynamic NTK scaling needs seq_len (largest position + 1).")
    L = jnp.maximum(jnp.asarray(seq_len, jnp.float32), L0)
    new_base = base * (f * L / L0 - (f - 1)) ** (rot / (rot - 2))
    return new_base ** (-exps)
  if s.kind == "yarn":
    def corr(n_rot):  # the pair index that turns n_rot times within L0
      return rot * math.log(L0 / (n_rot * 2 * math.pi)) / (2 * math.log(base))
    low, high = corr(s.beta_fast), corr(s.beta_slow)
    if s.truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot - 1)
    if low == high:
      high += 0.001
    ramp = jnp.clip((jnp.arange(rot // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp
    return inv / f * (1 - extrapolate) + inv * extrapolate
  # llama3
  lo_wave, hi_wave = L0 / s.low_freq_factor, L0 / s.high_freq_factor
  wave = 2 * math.pi / inv
  scaled = jnp.where(wave > lo_wave, inv / f, inv)
  smooth = (L0 / wave - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / f + smooth * scaled
  medium = (wave >= hi_wave) & (wave <= lo_wave)
  return jnp.where(medium, smoothed, scaled)


def apply_rope(x, positions, base: float = 10000.0, fraction: float = 1.0, *,
               rotary_dim: Optional[int] = None, scaling=None, interleaved: bool = False,
               seq_len=None):
  """Applies rotary embeddings to ``x``.

  Args:
    x: [B, T, N, H] queries or keys (any float dtype).
    positions: int or float [T] (shared by the batch) or [B, T].
    base: the frequency base (10000 in RoFormer and Llama 1/2).
    fraction: share of the head dimension that is rotated (partial rotary, as
      GPT-NeoX's ``rotary_pct``); the rest passes unchanged. The rotated
      dimensions are the first ``rotary_dims(H, fraction)``.
    rotary_dim: the number of rotated dimensions instead of ``fraction``
      (even, 2 <= rotary_dim <= H; GPT-J's ``rotary_dim``).
    scaling: None, a :class:`RopeScaling` or an HF ``rope_scaling`` dict.
    interleaved: pairs ``(x[2i], x[2i+1])`` (GPT-J) instead of rotate-half.
    seq_len: "dynamic" scaling's L; default ``max(positions) + 1``. Pass the
      same value for queries and keys (the layer passes the keys').

  Returns:
    [B, T, N, H] in x's dtype; the rotation is computed in float32.
  """
  if getattr(x, "ndim", None) != 4:
    raise ValueError(f"x must have rank 4 [B, T, N, H], got shape {getattr(x, 'shape', None)}.")
  B, T, _, H = x.shape
  positions = jnp.asarray(positions)
  if positions.shape not in ((T,), (B, T)):
    raise ValueError(
        f"positions must have shape [T]=({T},) or [B, T]=({B}, {T}), got {positions.shape}.")
  if rotary_dim is None:
    rot = rotary_dims(H, fraction)
  elif not isinstance(rotary_dim, int) or rotary_dim % 2 or not 2 <= rotary_dim <= H:
    raise ValueError(f"rotary_dim must be an even int in [2, H={H}], got {rotary_dim!r}.")
  else:
    rot = rotary_dim
  s = as_rope_scaling(scaling)
  if s is not None and s.kind == "dynamic" and seq_len is None:
    seq_len = jnp.max(positions) + 1
  inv_freq = rope_frequencies(rot, base, s, seq_len=seq_len)
  pos = positions.astype(jnp.float32)
  if pos.ndim == 1:
    pos = pos[None]
  angles = pos[..., None] * inv_freq  # [B|1, T, rot/2]
  m = rope_attention_factor(s)
  cos = jnp.cos(angles)[:, :, None, :] * m
  sin = jnp.sin(angles)[:, :, None, :] * m
  xf = x.astype(jnp.float32)
  rest = xf[..., rot:]
  if interleaved:
    x1, x2 = xf[..., 0:rot:2], xf[..., 1:rot:2]
    pairs = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    out = jnp.concatenate([pairs.reshape(xf.shape[:-1] + (rot,)), rest], axis=-1)
  else:
    x1, x2 = xf[..., : rot // 2], xf[..., rot // 2: rot]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
  return out.astype(x.dtype)
