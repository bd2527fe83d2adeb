"""Inference-time edits of attention logits and probabilities.

VAR ("See What You Are Told: Visual Attention Sink in Large Multimodal Models",
arXiv:2503.03321), ACT ("Unveiling and Harnessing Hidden Attention Sinks",
arXiv:2406.15765) and the head-specific visual boost of "Fixing Imbalanced
Attention to Mitigate In-Context Hallucination of Large Vision-Language Model"
(arXiv:2501.12206). Each edit is a pure
function over [B, N, T, S] tensors, used as a ``probs_hook``/``logits_hook``
of :func:`hooked_attention` (the dense reference path, which materialises the
rows these methods need).
"""
from __future__ import annotations

import functools

import jax.numpy as jnp

from attnjax.core.reference import reference_attention


def hooked_attention(query, key, value, *, logits_hook=None, probs_hook=None,
                     head_out_hook=None, **kwargs):
  """Dense attention with edit hooks: q [B,T,N,H], k/v [B,S,K,H] -> [B,T,N,Hv].

  ``logits_hook(logits [B,N,T,S])`` edits the scaled logits before masking,
  ``probs_hook(probs [B,N,T,S])`` the normalised weights, and
  ``head_out_hook(out [B,T,N,Hv])`` the per-head outputs (before any output
  projection). Other keyword arguments go to ``reference_attention``.
  """
  out = reference_attention(query, key, value, logits_hook=logits_hook,
                            probs_hook=probs_hook, **kwargs)
  if head_out_hook is None:
    return out
  if isinstance(out, tuple):
    return (head_out_hook(out[0]),) + tuple(out[1:])
  return head_out_hook(out)


def _rms_normalize(h, eps=1e-6):
  h = h.astype(jnp.float32)
  return h * jnp.reciprocal(jnp.sqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps))


def find_sink_tokens(hidden, sink_dims, tau: float = 20.0):
  """VAR's visual-sink detector: hidden [B, S, D] -> bool [B, S].

  A token is a sink when ``max_{d in sink_dims} |RMSNorm(h)_d| > tau``
  (tau = 20 in the paper; ``sink_dims`` are model specific, e.g. 2533 and 1415
  for LLaMA-2-7B).
  """
  dims = jnp.asarray(sink_dims, jnp.int32)
  if dims.ndim != 1 or dims.size == 0:
    raise ValueError(f"sink_dims must be a non-empty 1-D list of indices, got {sink_dims!r}.")
  if hidden.ndim != 3:
    raise ValueError(f"hidden must be [B, S, D], got shape {hidden.shape}.")
  vals = jnp.abs(_rms_normalize(hidden)[..., dims])
  return jnp.max(vals, axis=-1) > tau


def _key_mask(name, m, probs):
  m = jnp.asarray(m, bool)
  S = probs.shape[-1]
  if m.shape == (S,):
    return m
  if m.ndim == 2 and m.shape == (probs.shape[0], S):
    return m[:, None, None, :]
  raise ValueError(f"{name} must be bool [S]=({S},) or [B, S]=({probs.shape[0]}, {S}), got {m.shape}.")


def image_centric_rows(probs, image_mask, sink_mask, *, rho: float = 0.5, min_mass: float = 0.2):
  """VAR's selection of (head, query) rows to edit: probs [B,N,T,S] -> bool [B,N,T].

  A row qualifies when its mass on image tokens is at least ``min_mass`` and
  the share of that mass on visual sinks is at most ``rho``.
  """
  img = _key_mask("image_mask", image_mask, probs)
  sink = _key_mask("sink_mask", sink_mask, probs)
  img_mass = jnp.sum(jnp.where(img, probs, 0.0), -1)
  sink_img = jnp.sum(jnp.where(img & sink, probs, 0.0), -1)
  share = sink_img / jnp.where(img_mass > 0, img_mass, 1.0)
  return (img_mass >= min_mass) & (share <= rho)


def redistribute_attention(probs, *, sink_mask, target_mask, p: float = 0.6, row_mask=None):
  """VAR: move (1-p) of the sink mass to non-sink target (image) tokens.

  probs [B, N, T, S]; sink_mask / target_mask bool [S] or [B, S]; row_mask
  bool broadcastable to [B, N, T] (rows to edit; default all). Sink columns
  are scaled by exactly ``p``; the freed budget is shared among non-sink
  target tokens in proportion to their weight, so rows keep their sum. Rows
  with no weight on non-sink targets are left unchanged. p = 1 is the
  identity.
  """
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"p must be in [0, 1], got {p}.")
  sink = _key_mask("sink_mask", sink_mask, probs)
  tgt = _key_mask("target_mask", target_mask, probs) & ~sink
  sink_mass = jnp.sum(jnp.where(sink, probs, 0.0), -1, keepdims=True)
  tgt_mass = jnp.sum(jnp.where(tgt, probs, 0.0), -1, keepdims=True)
  budget = (1.0 - p) * sink_mass
  gain = budget / jnp.where(tgt_mass > 0, tgt_mass, 1.0)
  edited = jnp.where(sink, p * probs, jnp.where(tgt, probs * (1.0 + gain), probs))
  ok = tgt_mass > 0
  if row_mask is not None:
    ok = ok & jnp.asarray(row_mask, bool)[..., None]
  return jnp.where(ok, edited, probs)


def find_hidden_sinks(probs, *, threshold: float = 0.1, keep_first_sink: bool = True):
  """ACT's sink columns of causal self-attention probs [..., T, T] -> bool [..., T].

  Column score ``c_j = sum_i A[i, j] / (T - j)`` (mean over the queries that
  can see key j); sinks are columns with ``c_j > threshold``, minus the first
  such column when ``keep_first_sink`` (the BOS sink is left alone).
  """
  T = probs.shape[-1]
  if probs.shape[-2] != T:
    raise ValueError(f"probs must be causal self-attention [..., T, T], got {probs.shape}.")
  c = jnp.sum(probs, -2) / (T - jnp.arange(T))
  sinks = c > threshold
  if keep_first_sink:
    first = jnp.argmax(sinks, axis=-1)
    sinks = sinks & (jnp.arange(T) != first[..., None])
  return sinks


def act_calibrate(probs, *, threshold: float = 0.1, beta: float = 0.4, keep_first_sink: bool = True):
  """ACT: scale hidden-sink columns by beta and give the mass to the other keys.

  probs [..., T, T] (causal self-attention rows). For every row but the first,
  sink columns become ``beta * A`` and the freed ``(1 - beta) * sum_sinks A``
  is spread over the non-sink columns in proportion to their weight. Rows keep
  their sum; beta = 1 is the identity. Defaults: tau = 0.1, beta = 0.4.
  """
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"beta must be in [0, 1], got {beta}.")
  sinks = find_hidden_sinks(probs, threshold=threshold, keep_first_sink=keep_first_sink)[..., None, :]
  sink_mass = jnp.sum(jnp.where(sinks, probs, 0.0), -1, keepdims=True)
  rest = jnp.sum(jnp.where(sinks, 0.0, probs), -1, keepdims=True)
  gain = (1.0 - beta) * sink_mass / jnp.where(rest > 0, rest, 1.0)
  edited = jnp.where(sinks, beta * probs, probs * (1.0 + gain))
  T = probs.shape[-1]
  row = jnp.arange(T)[:, None]
  ok = (rest > 0) & (row > 0)
  return jnp.where(ok, edited, probs)


def boost_token_attention(logits, token_mask, head_strength, *, alpha: float = 1.0):
  """Head-specific boost of selected keys (arXiv:2501.12206): logits [B,N,T,S] -> logits.

  Adds ``alpha * head_strength[h]`` to the logits of keys in ``token_mask``
  (bool [S] or [B, S]); strength 0 is the identity and the attention mass on
  the selected keys grows monotonically with alpha. The paper's dual-stream
  token selection and its modulation rule are in ``attnjax.analysis.imbalance``.
  """
  tm = _key_mask("token_mask", token_mask, logits)
  N = logits.shape[1]
  hs = jnp.asarray(head_strength, logits.dtype)
  if hs.shape != (N,):
    raise ValueError(f"head_strength must have shape [N]=({N},), got {hs.shape}.")
  return logits + jnp.where(tm, alpha * hs[:, None, None], 0.0)


def as_probs_hook(fn, **kwargs):
  """Binds keyword arguments so an edit can be passed as ``probs_hook``."""
  return functools.partial(fn, **kwargs)
