"""DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads
(arXiv:2410.10819).

Each KV head is either a *retrieval* head (full causal attention, full KV
cache) or a *streaming* head (the Lambda mask: ``sink`` first tokens plus the
``recent`` latest; a constant-size cache). During identification every head
mixes both, ``o = alpha * full + (1 - alpha) * stream``, and only the gates
``alpha`` are trained (an L2 distillation loss plus ``0.05 * L1(alpha)``).
Defaults: sink 64 and recent 256 at deployment (128 + 256 during gate
training), gate threshold 0.5. :func:`fit_duo_gates` is the identification
step: gates initialised at 1, Adam with lr 0.02 on the distillation loss,
each gate projected back to [0, 1] after every step, then thresholded.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attnjax import masks
from attnjax.api import attention
from attnjax.core.merge import merge_attention


def duo_mask(retrieval_heads: Sequence[bool], num_heads: int, *, sink: int = 64,
             recent: int = 256) -> masks.Mask:
  """PerHead mask over the N query heads: Causal for retrieval KV heads, SinkWindow otherwise."""
  K = len(retrieval_heads)
  if K < 1 or num_heads % K:
    raise ValueError(f"num_heads={num_heads} must be a multiple of len(retrieval_heads)={K}.")
  g = num_heads // K
  stream = masks.SinkWindow(sink, recent)
  return masks.PerHead(tuple(masks.Causal() if bool(retrieval_heads[h // g]) else stream
                             for h in range(num_heads)))


def duo_attention(query, key, value, *, retrieval_heads: Sequence[bool], sink: int = 64,
                  recent: int = 256, scale=None, return_lse=False, implementation=None):
  """Prefill with retrieval heads at full attention and streaming heads on the Lambda mask.

  query [B, T, N, H], key/value [B, S, K, H]; ``retrieval_heads`` a static
  sequence of K booleans.
  """
  if len(retrieval_heads) != key.shape[2]:
    raise ValueError(f"retrieval_heads has {len(retrieval_heads)} entries, key has K={key.shape[2]}.")
  m = duo_mask(tuple(bool(r) for r in retrieval_heads), query.shape[2], sink=sink, recent=recent)
  return attention(query, key, value, mask=m, scale=scale, return_lse=return_lse,
                   implementation=implementation)


def mix_heads(full, stream, alpha):
  """o = alpha * full + (1 - alpha) * stream; full/stream [B, T, N, H], alpha [K] (per KV head)."""
  N = full.shape[2]
  a = jnp.asarray(alpha, full.dtype)
  if a.ndim != 1 or N % a.shape[0]:
    raise ValueError(f"alpha must be [K] with N={N} a multiple of K, got shape {a.shape}.")
  a = jnp.repeat(a, N // a.shape[0])[None, None, :, None]
  return a * full + (1 - a) * stream


def duo_gate_loss(alpha, reference_out, mixed_out, *, reg: float = 0.05, loss_mask=None):
  """Distillation loss of the gates: ``distill + reg * mean(|alpha|)``.

  Args:
    alpha: the gates, any shape (e.g. [L, K]); the L1 term is their mean
      absolute value.
    reference_out, mixed_out: [B, T, ...] outputs (final hidden states, or a
      layer's attention output) of the original model (every gate 1) and of
      the gated model.
    reg: weight of the L1 term (the paper's 0.05).
    loss_mask: optional [B, T] weights (1 on the answer positions the paper
      supervises). ``distill`` is the squared error averaged over the feature
      axes, summed over positions and divided by the number (total weight) of
      supervised positions; without a mask every position counts, i.e. the
      plain mean of the squared error.
  """
  ref = jnp.asarray(reference_out, jnp.float32)
  mix = jnp.asarray(mixed_out, jnp.float32)
  if ref.shape != mix.shape or ref.ndim < 2:
    raise ValueError(f"reference_out {ref.shape} and mixed_out {mix.shape} must have the same "
                     "shape [B, T, ...].")
  sq = (ref - mix) ** 2
  per_pos = jnp.mean(sq.reshape(sq.shape[:2] + (-1,)), axis=-1)  # [B, T]
  if loss_mask is None:
    distill = jnp.mean(per_pos)
  else:
    w = jnp.asarray(loss_mask, jnp.float32)
    if w.shape != per_pos.shape:
      raise ValueError(f"loss_mask must have shape [B, T]={per_pos.shape}, got {w.shape}.")
    distill = jnp.sum(per_pos * w) / jnp.maximum(jnp.sum(w), 1e-9)
  a = jnp.asarray(alpha, jnp.float32)
  return distill + reg * jnp.mean(jnp.abs(a))


def duo_mixed_attention(query, key, value, alpha, *, sink: int = 128, recent: int = 256,
                        scale=None, implementation=None):
  """The gated attention of gate training: ``alpha * full + (1 - alpha) * streaming``.

  query [B, T, N, H], key/value [B, S, K, H], alpha [K] (one gate per KV
  head) -> [B, T, N, Hv]. ``full`` is causal attention, ``streaming`` the
  Lambda mask (``sink`` first + ``recent`` latest keys). Defaults are the
  paper's training sizes (128 + 256).
  """
  full = attention(query, key, value, mask=masks.Causal(), scale=scale,
                   implementation=implementation)
  stream = attention(query, key, value, mask=masks.SinkWindow(sink, recent), scale=scale,
                     implementation=implementation)
  return mix_heads(full, stream, alpha)


class DuoGateFit(NamedTuple):
  """Result of :func:`fit_duo_gates`.

  gates: the fitted gates (shape ``gate_shape``, float32, in [0, 1]).
  retrieval_heads: bool, same shape: the heads kept at full attention.
  loss, distill: [steps] float32 histories of the total and distillation losses.
  """
  gates: jax.Array
  retrieval_heads: jax.Array
  loss: np.ndarray
  distill: np.ndarray


def _duo_schedule(lr: float, steps: int):
  """Linear warm-up over steps//5, flat, linear decay over the last steps//5; floor 0.1*lr."""
  ramp = max(steps // 5, 1)

  def schedule(count):
    c = jnp.asarray(count, jnp.float32)
    up = jnp.maximum((c + 1) / ramp, 0.1)
    down = jnp.maximum((steps - c) / ramp, 0.1)
    return lr * jnp.minimum(1.0, jnp.minimum(up, down))
  return schedule


def fit_duo_gates(forward: Callable[[Any, jax.Array, Any], Any], params, data, *,
                  gate_shape: Sequence[int], steps: int = 2000, reg: float = 0.05,
                  lr: float = 0.02, init: float = 1.0, threshold: float = 0.5,
                  streaming_fraction: Optional[float] = None,
                  loss_mask_fn: Optional[Callable[[Any], Any]] = None,
                  optimizer: Optional[optax.GradientTransformation] = None) -> DuoGateFit:
  """DuoAttention's retrieval-head identification: fits the per-head gates.

  The model stays frozen; only the gates ``alpha`` (shape ``gate_shape``,
  e.g. [L, K]: one per layer and KV head) are trained. Each step computes
  the original model's output ``forward(params, ones, batch)`` (every head at
  full attention; no gradient) and the gated output
  ``forward(params, alpha, batch)``, and descends
  :func:`duo_gate_loss` (squared error between the two on the supervised
  positions + ``reg * mean|alpha|``). The gates are then projected back to
  [0, 1]. Finally :func:`select_retrieval_heads` picks the heads
  (``alpha >= threshold``, or a target ``streaming_fraction`` over all heads).

  Args:
    forward: ``forward(params, gates, batch) -> out [B, T, ...]``, a pure
      function whose attention layers mix full and streaming attention with
      the given gates (for one layer: :func:`duo_mixed_attention` on that
      layer's q/k/v; for a model: each layer uses its row of ``gates``).
      ``out`` is what is distilled: final hidden states in the paper.
    params: frozen model parameters, passed through to ``forward``.
    data: a sequence of batches (cycled) or a callable ``step -> batch``,
      e.g. synthetic passkey sequences. Every batch must have the same shapes
      (the step is compiled once).
    gate_shape: shape of the gates.
    steps: optimisation steps (the paper: 2,000 at batch size 1).
    reg: L1 weight (the paper: 0.05). lr: peak learning rate (the paper: 0.02).
    init: initial gate value (the paper: 1.0, every head full).
    threshold, streaming_fraction: see :func:`select_retrieval_heads`.
    loss_mask_fn: optional ``batch -> [B, T]`` weights of the supervised
      (answer) positions; default all positions.
    optimizer: an optax transformation; default Adam (no weight decay) with
      ``lr`` warmed up linearly over the first ``steps // 5`` steps and
      decayed linearly over the last ``steps // 5`` (floor ``0.1 * lr``), the
      schedule of the authors' release.

  Returns:
    :class:`DuoGateFit`.
  """
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}.")
  if not 0.0 <= init <= 1.0:
    raise ValueError(f"init must be in [0, 1], got {init}.")
  gate_shape = tuple(int(d) for d in gate_shape)
  if callable(data):
    get_batch = data
  else:
    batches = list(data)
    if not batches:
      raise ValueError("data must hold at least one batch.")
    get_batch = lambda i: batches[i % len(batches)]
  opt = optimizer if optimizer is not None else optax.adam(_duo_schedule(lr, steps))
  ones = jnp.ones(gate_shape, jnp.float32)

  def loss_fn(gates, batch):
    ref = jax.lax.stop_gradient(forward(params, ones, batch))
    mixed = forward(params, gates, batch)
    mask = None if loss_mask_fn is None else loss_mask_fn(batch)
    distill = duo_gate_loss(jnp.zeros(()), ref, mixed, reg=0.0, loss_mask=mask)
    return distill + reg * jnp.mean(jnp.abs(gates)), distill

  @jax.jit
  def step(gates, opt_state, batch):
    (loss, distill), grad = jax.value_and_grad(loss_fn, has_aux=True)(gates, batch)
    updates, opt_state = opt.update(grad, opt_state, gates)
    gates = jnp.clip(optax.apply_updates(gates, updates), 0.0, 1.0)
    return gates, opt_state, loss, distill

  gates = jnp.full(gate_shape, init, jnp.float32)
  opt_state = opt.init(gates)
  losses, distills = [], []
  for i in itertools.islice(itertools.count(), steps):
    gates, opt_state, loss, distill = step(gates, opt_state, get_batch(i))
    losses.append(loss)
    distills.append(distill)
  heads = select_retrieval_heads(gates, threshold=threshold, streaming_fraction=streaming_fraction)
  return DuoGateFit(gates, heads, np.asarray(jnp.stack(losses)), np.asarray(jnp.stack(distills)))


def select_retrieval_heads(alpha, *, threshold: float = 0.5, streaming_fraction=None):
  """Bool retrieval heads, same shape as alpha ([K] or [L, K]).

  ``alpha >= threshold``, or, with ``streaming_fraction``, the top
  ``1 - streaming_fraction`` of all gates (ranked over every layer and head).
  """
  alpha = jnp.asarray(alpha)
  if streaming_fraction is None:
    return alpha >= threshold
  if not 0.0 <= streaming_fraction <= 1.0:
    raise ValueError(f"streaming_fraction must be in [0, 1], got {streaming_fraction}.")
  flat = jnp.ravel(alpha)
  n_keep = flat.shape[0] - int(round(streaming_fraction * flat.shape[0]))
  order = jnp.argsort(-flat, stable=True)
  return jnp.zeros(flat.shape, bool).at[order[:n_keep]].set(True).reshape(alpha.shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SinkRecentKVCache:
  """Constant-size cache of a streaming head: ``sink`` first tokens and a ring of ``recent``.

  k_sink/v_sink [B, sink, K, H], k_ring/v_ring [B, recent, K, H], length: the
  number of tokens appended so far (int32 scalar).
  """
  k_sink: jax.Array
  v_sink: jax.Array
  k_ring: jax.Array
  v_ring: jax.Array
  length: jax.Array

  @classmethod
  def create(cls, batch: int, kv_heads: int, head_dim: int, *, sink: int = 64, recent: int = 256,
             dtype=jnp.float32, value_dim=None):
    if sink < 0 or recent < 1:
      raise ValueError(f"sink must be >= 0 and recent >= 1, got {sink}, {recent}.")
    hv = head_dim if value_dim is None else value_dim
    z = lambda n, h: jnp.zeros((batch, n, kv_heads, h), dtype)
    return cls(z(sink, head_dim), z(sink, hv), z(recent, head_dim), z(recent, hv),
               jnp.zeros((), jnp.int32))

  @property
  def nbytes(self) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in (self.k_sink, self.v_sink, self.k_ring, self.v_ring))

  def append(self, k_t, v_t) -> "SinkRecentKVCache":
    """Adds one token, k_t [B, K, H], v_t [B, K, Hv]."""
    sink, recent = self.k_sink.shape[1], self.k_ring.shape[1]
    n = self.length
    in_sink = n < sink
    si = jnp.minimum(n, max(sink - 1, 0))
    ri = jnp.mod(n - sink, recent)
    k_sink = jnp.where(in_sink, self.k_sink.at[:, si].set(k_t), self.k_sink) if sink else self.k_sink
    v_sink = jnp.where(in_sink, self.v_sink.at[:, si].set(v_t), self.v_sink) if sink else self.v_sink
    k_ring = jnp.where(in_sink, self.k_ring, self.k_ring.at[:, ri].set(k_t))
    v_ring = jnp.where(in_sink, self.v_ring, self.v_ring.at[:, ri].set(v_t))
    return SinkRecentKVCache(k_sink, v_sink, k_ring, v_ring, n + 1)

  def attend(self, q_t, *, scale=None):
    """Attention of the newest token's query q_t [B, N, H] over the cache -> [B, N, Hv].

    Equals one row of :func:`duo_attention`'s streaming heads (``SinkWindow``).
    """
    sink, recent = self.k_sink.shape[1], self.k_ring.shape[1]
    n = self.length
    q = q_t[:, None]
    slot = jnp.arange(recent)
    ring_pos = sink + slot + recent * jnp.floor_divide(n - 1 - sink - slot, recent)
    ring_valid = (n > sink) & (ring_pos >= sink) & (ring_pos <= n - 1) & (ring_pos > n - 1 - recent)
    o2, l2 = attention(q, self.k_ring, self.v_ring, mask=ring_valid[None, None, None, :],
                       scale=scale, return_lse=True)
    if sink == 0:
      return o2[:, 0]
    sink_valid = jnp.arange(sink) < n
    o1, l1 = attention(q, self.k_sink, self.v_sink, mask=sink_valid[None, None, None, :],
                       scale=scale, return_lse=True)
    return merge_attention(o1, l1, o2, l2)[0][:, 0]
