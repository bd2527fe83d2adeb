"""Score variants: how scaled logits become weights (softplus, ReLU, Selective; soft-cap; sinks).

Papers: "Softplus Attention with Re-weighting Boosts Length Extrapolation"
(arXiv:2501.13428), "Active-Dormant Attention Heads: Demystifying Extreme-Token
Phenomena" (arXiv:2410.13835) and "Selective Attention: Enhancing Transformer
through Principled Context Control" (arXiv:2411.12892).

Each variant follows the protocol of ``attnjax.core.scoring`` and composes
with any mask, bias, GQA and position setting of ``attnjax.attention``:

- ``DEFAULT_SCORE`` / ``SoftmaxScore``: plain softmax.
- ``SoftCap(cap)``: ``cap * tanh(s / cap)`` before softmax (Gemma 2).
- ``Sink(logits)``: per-head extra logit that takes softmax mass but brings
  no value (gpt-oss; StreamingLLM's sink token without the token).
- ``Selective(beta)``: Selective Attention's position temperature
  (Zhang et al., NeurIPS 2024); the token temperatures tau_q / tau_v are
  applied by ``selective_temperatures`` (pre-scaling q and v), and computed
  from the tokens by ``selective_token_temperatures`` (the learned networks;
  ``MultiHeadAttention(selective_token_temperatures=True)``).
- ``Softplus(...)`` / ``lssar(power)``: softplus with l1 normalisation and
  length scaling (LSSA), optional re-weighting (LSSAR) (Gao & Spratling 2025).
- ``ReLU(normalize)``: ReLU attention without normalisation (Guo et al. 2024,
  Active-Dormant heads).

All are frozen dataclasses registered as JAX pytrees (``flax.struct``):
constants are static fields, so a variant without learned arrays is hashable
and can be a ``jax.jit`` static argument; learned arrays (``Sink.logits``,
``Selective.beta``) are pytree leaves, so the variant can be passed through
``jit``/``grad`` like any parameter. Variants with learned arrays implement
``init_params(num_heads)`` and ``bind(**arrays)``, which
``attnjax.layers.MultiHeadAttention`` uses to create them as Flax params.

The logits given to ``transform`` are the scaled logits ``scale * q.k``
(plus bias), in float32.
"""
from __future__ import annotations

from typing import Optional, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import scoring
from attnjax.core.scoring import DEFAULT_SCORE, SoftmaxScore

__all__ = ["DEFAULT_SCORE", "SoftmaxScore", "SoftCap", "Sink", "Selective", "Softplus",
           "ReLU", "lssar", "selective_temperatures", "selective_position_factor",
           "selective_token_temperatures", "init_selective_token_params"]

Scalar = Union[float, jax.Array, np.ndarray]


_Score = scoring.ScoreBase  # protocol defaults (see ``attnjax.core.scoring``)


def _per_head(x, head):
  """A scalar, or a per-head vector [N] gathered by ``head`` ([N, 1, 1])."""
  x = jnp.asarray(x, jnp.float32)
  if x.ndim == 0:
    return x
  if x.ndim != 1:
    raise ValueError(f"expected a scalar or a per-head vector [N], got shape {x.shape}.")
  if head is None:
    raise ValueError("a per-head value needs the head index.")
  return x[head]


# -- soft-cap ---------------------------------------------------------------------
@flax.struct.dataclass
class SoftCap(_Score):
  """Logit soft-capping: ``cap * tanh(s / cap)``, then softmax.

  Gemma 2 uses ``cap = 50.0`` on the attention logits (its released configs'
  ``attn_logit_softcapping``; 30.0 is its final-logit cap), the default here.
  As ``cap -> inf`` this is plain softmax.
  """
  cap: float = flax.struct.field(pytree_node=False, default=50.0)

  def __post_init__(self):
    if not (isinstance(self.cap, (int, float)) and self.cap > 0):
      raise ValueError(f"SoftCap cap must be a positive number, got {self.cap!r}.")

  def transform(self, logits, *, head=None, q_pos=None, k_pos=None, row_count=None):
    c = jnp.asarray(self.cap, logits.dtype)
    return c * jnp.tanh(logits / c)


# -- learned sink -----------------------------------------------------------------
@flax.struct.dataclass
class Sink(_Score):
  """A per-head sink logit that takes softmax mass and contributes no value.

  ``p_ij = exp(s_ij) / (exp(sink_h) + sum_j exp(s_ij))``, as gpt-oss's learned
  "sinks" (one logit per query head). ``logits``: a float (shared by all
  heads) or an array [N]; ``-inf`` gives plain softmax, ``0.0`` is
  "softmax off by one". In a layer the logits are learned, initialised to
  ``logits`` (default 0.0; gpt-oss loads its sinks from checkpoints, so it has
  no published initialisation). A row whose keys are all masked returns zeros.
  """
  logits: Scalar = 0.0

  def sink_logits(self):
    return jnp.asarray(self.logits, jnp.float32)

  def init_params(self, num_heads: int):
    return {"sink_logits": np.broadcast_to(np.asarray(self.logits, np.float32),
                                           (num_heads,)).copy()}

  def bind(self, sink_logits):
    return self.replace(logits=sink_logits)


# -- Selective Attention ----------------------------------------------------------
def selective_position_factor(q_pos, beta, variant: str = "exp"):
  """Selective Attention's per-row temperature ``1 + c * log(q_pos + 1)``.

  ``c = exp(-exp(beta))`` (``variant="exp"``, the official GPT-2 script) or
  ``c = beta`` (``variant="linear"``, the "no-function" fine-tuning script).
  ``q_pos`` is the 0-based position of the query (row length ``q_pos + 1``
  in causal self-attention); negative positions are treated as 0.
  """
  if variant == "exp":
    c = jnp.exp(-jnp.exp(beta))
  elif variant == "linear":
    c = beta
  else:
    raise ValueError(f"variant must be 'exp' or 'linear', got {variant!r}.")
  pos = jnp.maximum(jnp.asarray(q_pos, jnp.float32), 0.0)
  return 1.0 + c * jnp.log1p(pos)


@flax.struct.dataclass
class Selective(_Score):
  """Selective Attention's position temperature on the logits (arXiv:2411.12892).

  Row i's logits are multiplied by ``1 + exp(-exp(beta)) * log(i + 1)``
  (``variant="exp"``) or ``1 + beta * log(i + 1)`` (``variant="linear"``),
  where i is the query position; this counters attention dilution as the
  context grows, and equals scaling q_i by the same factor.

  ``beta``: a scalar (one per layer, as the official code) or an array [N]
  (per head). Defaults follow the official repository (umich-sota/
  selective_attention): 1.5 for ``"exp"`` (GPT-2 pre-training script; its
  fine-tuning script uses 2.0) and 1e-5 for ``"linear"``. In a layer beta is
  a learned param initialised to this value.

  The token terms tau_q(x_i), tau_v(x_j) are functions of the embeddings:
  :func:`selective_token_temperatures` computes them (learned, zero-init),
  :func:`selective_temperatures` applies them (pre-scaled q and v), which
  works with every engine.
  """
  beta: Optional[Scalar] = None
  variant: str = flax.struct.field(pytree_node=False, default="exp")

  def __post_init__(self):
    if self.variant not in ("exp", "linear"):
      raise ValueError(f"Selective variant must be 'exp' or 'linear', got {self.variant!r}.")

  @property
  def beta_value(self):
    """``beta``, or the variant's default when it is None."""
    if self.beta is None:
      return 1.5 if self.variant == "exp" else 1e-5
    return self.beta

  def transform(self, logits, *, head=None, q_pos=None, k_pos=None, row_count=None):
    if q_pos is None:
      raise ValueError("Selective needs the query positions (q_pos).")
    beta = _per_head(self.beta_value, head)
    return logits * selective_position_factor(q_pos, beta, self.variant).astype(logits.dtype)

  def init_params(self, num_heads: int):
    return {"beta": np.asarray(self.beta_value, np.float32)}

  def bind(self, beta):
    return self.replace(beta=beta)


def selective_temperatures(query, value, q_temp=None, v_temp=None):
  """Applies Selective Attention's token temperatures by pre-scaling q and v.

  ``softmax(tau_q(x_i) * q_i . k_j) (tau_v(x_j) * v_j)`` is ordinary attention
  of ``tau_q * q`` and ``tau_v * v``, so any engine or kernel runs it unchanged.

  Args:
    query: [B, T, N, H]; value: [B, S, K, Hv].
    q_temp: None or per-token, per-head query temperatures [B, T, N].
    v_temp: None or value temperatures [B, S, K].

  Returns:
    (query, value) scaled, in their dtypes.
  """
  def scale(x, t, name, letters):
    if t is None:
      return x
    t = jnp.asarray(t)
    if t.shape != x.shape[:3]:
      raise ValueError(f"{name} must have shape {letters}={x.shape[:3]}, got {t.shape}.")
    return (x.astype(jnp.float32) * t.astype(jnp.float32)[..., None]).astype(x.dtype)
  return (scale(query, q_temp, "q_temp", "[B, T, N]"),
          scale(value, v_temp, "v_temp", "[B, S, K]"))


def init_selective_token_params(num_heads: int, num_kv_heads: int, head_dim: int,
                                value_dim: Optional[int] = None):
  """Initial (zero) params of :func:`selective_token_temperatures`.

  Returns:
    {"tau_q_kernel": [N, H], "tau_q_bias": [N], "tau_v_kernel": [K, Hv],
    "tau_v_bias": [K]} float32 zeros: both temperatures start at exactly 1,
    so a layer starts as the position-temperature variant (or plain attention).
  """
  value_dim = head_dim if value_dim is None else value_dim
  for name, x in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                  ("head_dim", head_dim), ("value_dim", value_dim)):
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1:
      raise ValueError(f"{name} must be a positive int, got {x!r}.")
  z = lambda *shape: np.zeros(shape, np.float32)
  return {"tau_q_kernel": z(num_heads, head_dim), "tau_q_bias": z(num_heads),
          "tau_v_kernel": z(num_kv_heads, value_dim), "tau_v_bias": z(num_kv_heads)}


def selective_token_temperatures(query, value, params):
  """Selective Attention's learned token temperatures tau_q(x_i), tau_v(x_j) (arXiv:2411.12892).

  ``tau_q = 1 + tanh(q_i . u_h + b_h)`` per query head and
  ``tau_v = 1 + tanh(v_j . w_h + c_h)`` per key/value head, where q_i, v_j
  are the head's projected query and value (before rotary embeddings).

  The paper describes small learned, bounded (tanh-type) scalar functions of
  the token embedding per head, shared with the existing projections so that
  they add < 0.5% parameters, and multiplies logits row-wise by tau_q and
  values by tau_v; its released code holds only the position term. The form
  above is the project's reading: a linear read-out of the head's own
  projection (H + 1 params per head: the weight sharing), ``1 + tanh`` so
  the temperature lies in (0, 2) and is exactly 1 at zero init, and a
  *product* with the position temperature of :class:`Selective`
  (``tau_pos(i) * tau_q(x_i)``) so the layer starts as the position variant.

  Args:
    query: [B, T, N, H]; value: [B, S, K, Hv].
    params: as :func:`init_selective_token_params` (tau_q_kernel [N, H],
      tau_q_bias [N], tau_v_kernel [K, Hv], tau_v_bias [K]).

  Returns:
    (q_temp [B, T, N], v_temp [B, S, K]) float32, for
    :func:`selective_temperatures`.
  """
  N, H = query.shape[2:]
  K, Hv = value.shape[2:]
  want = {"tau_q_kernel": (N, H), "tau_q_bias": (N,), "tau_v_kernel": (K, Hv),
          "tau_v_bias": (K,)}
  for name, shape in want.items():
    got = jnp.shape(params.get(name)) if name in params else None
    if got != shape:
      raise ValueError(f"params[{name!r}] must have shape {shape} for query {query.shape} and "
                       f"value {value.shape}, got {got}.")
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  q_t = 1.0 + jnp.tanh(jnp.einsum("btnh,nh->btn", f32(query), f32(params["tau_q_kernel"]))
                       + f32(params["tau_q_bias"]))
  v_t = 1.0 + jnp.tanh(jnp.einsum("bskh,kh->bsk", f32(value), f32(params["tau_v_kernel"]))
                       + f32(params["tau_v_bias"]))
  return q_t, v_t


# -- Softplus attention (LSSA / LSSAR) ----------------------------------------------
@flax.struct.dataclass
class Softplus(_Score):
  """Softplus with l1 normalisation, length scaling and optional re-weighting (arXiv:2501.13428).

  LSSA: ``a_ij = softplus(lambda_i * s_ij)`` over the visible keys,
  ``A_ij = a_ij / sum_j a_ij``, with the length scale
  ``lambda_i = log(N_i) / log(length_base)`` where N_i is the number of keys
  row i sees (row-dependent under a causal mask; 1 key gives lambda = 0 and
  weight 1). LSSAR then re-weights each row:
  ``A'_ij = relu(N_i * A_ij - offset) ** power``, re-normalised to sum 1
  (``N_i * A_ij > 1`` exactly for weights above the uniform level 1/N_i).

  Defaults and what is confirmed: softplus, the l1 normalisation, a log-of-
  length scale ("log N", N_ij = i in row i) and the shifted-ReLU-power
  re-weighting with an l1 renormalisation are as in Gao & Spratling (2025).
  The log base, the power p and the offset O of the paper could not be
  confirmed (its repository was not retrievable): ``length_base`` defaults
  to e (natural log), ``reweight_power`` to None (LSSA, no re-weighting) and
  ``reweight_offset`` to 0.0 (pure power sharpening; with offset >= 1 a row
  whose weights are all at or below uniform becomes zeros). The paper also
  uses QK-normalisation, which belongs to the layer, not to the score.

  Attributes:
    length_scale: multiply the logits by lambda_i (False: plain softplus).
    length_base: base of the logarithm (> 1); None means e.
    reweight_power: None (LSSA) or p >= 1 (LSSAR).
    reweight_offset: O >= 0.
  """
  length_scale: bool = flax.struct.field(pytree_node=False, default=True)
  length_base: Optional[float] = flax.struct.field(pytree_node=False, default=None)
  reweight_power: Optional[float] = flax.struct.field(pytree_node=False, default=None)
  reweight_offset: float = flax.struct.field(pytree_node=False, default=0.0)

  normalization = "sum"

  def __post_init__(self):
    if self.length_base is not None and not self.length_base > 1:
      raise ValueError(f"length_base must be > 1 or None, got {self.length_base!r}.")
    if self.reweight_power is not None and not self.reweight_power >= 1:
      raise ValueError(f"reweight_power must be >= 1 or None, got {self.reweight_power!r}.")
    if not self.reweight_offset >= 0:
      raise ValueError(f"reweight_offset must be >= 0, got {self.reweight_offset!r}.")

  @property
  def needs_row_count(self):
    return self.length_scale or self.reweight_power is not None

  @property
  def has_reweight(self):
    return self.reweight_power is not None

  def transform(self, logits, *, head=None, q_pos=None, k_pos=None, row_count=None):
    if not self.length_scale:
      return logits
    if row_count is None:
      raise ValueError("Softplus length scaling needs row_count (visible keys per row).")
    lam = jnp.log(jnp.maximum(row_count.astype(jnp.float32), 1.0))
    if self.length_base is not None:
      lam = lam / np.log(self.length_base)
    return logits * lam.astype(logits.dtype)

  def weights(self, logits):
    return jax.nn.softplus(logits)

  def reweight(self, probs, row_count):
    if self.reweight_power is None:
      return probs
    n = row_count.astype(probs.dtype)
    w = jax.nn.relu(n * probs - self.reweight_offset)
    if self.reweight_power != 1:
      w = w ** self.reweight_power
    total = w.sum(-1, keepdims=True)
    return w / jnp.where(total > 0, total, 1.0)


def lssar(power: float, offset: float = 0.0, length_base: Optional[float] = None) -> Softplus:
  """LSSAR: length-scaled softplus attention with re-weighting (see :class:`Softplus`).

  ``power`` (p >= 1) has no default: the paper sweeps it and its value could
  not be confirmed. ``power=1, offset=0`` is LSSA exactly.
  """
  return Softplus(length_scale=True, length_base=length_base, reweight_power=power,
                  reweight_offset=offset)


# -- ReLU attention ---------------------------------------------------------------
@flax.struct.dataclass
class ReLU(_Score):
  """ReLU attention: weights ``relu(s_ij)`` with no row normalisation (arXiv:2410.13835).

  The fix for attention sinks in Guo et al. (2024): a query can put zero
  total weight on the context (all-negative logits give a zero output),
  so no "dormant" mass is forced onto a sink token. ``normalize="length"``
  divides the weights by the number of visible keys of the row (1/L; L is
  the row length under causal masks). ``return_lse`` is undefined for it.
  """
  normalize: Optional[str] = flax.struct.field(pytree_node=False, default=None)

  normalization = "none"

  def __post_init__(self):
    if self.normalize not in (None, "length"):
      raise ValueError(f"ReLU normalize must be None or 'length', got {self.normalize!r}.")

  @property
  def needs_row_count(self):
    return self.normalize == "length"

  def transform(self, logits, *, head=None, q_pos=None, k_pos=None, row_count=None):
    if self.normalize is None:
      return logits
    if row_count is None:
      raise ValueError("ReLU(normalize='length') needs row_count (visible keys per row).")
    # relu(s) / L == relu(s / L) for L > 0.
    return logits / jnp.maximum(row_count, 1).astype(logits.dtype)

  def weights(self, logits):
    return jax.nn.relu(logits)
