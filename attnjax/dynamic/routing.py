"""Routing Transformer: online k-means routing attention (Roy et al., TACL 2021; arXiv:2003.05997).

"Efficient Content-Based Sparse Attention with Routing Transformers".

Queries and keys are normalised (LayerNorm without scale/bias, divided by
sqrt(H) so they are unit vectors) and compared with C unit centroids per
head. Balanced assignment: each centroid takes its ``window`` nearest
queries and ``window`` nearest keys (top-w of the dot products), re-sorted
by position; the queries of a cluster attend (causally by positions) to the
keys of the same cluster. A query that lands in several clusters gets the
mean of its outputs (scatter-mean, as lucidrains' port); a query in no
cluster, or whose clusters hold no visible key, outputs zeros. Centroids
learn by an exponential moving average of their members (not by gradient),
kept as layer state in the "batch_stats" collection; a commitment loss
(weight 1e-4) pulls the normalised q/k towards their centroids.

Not confirmed against the official TF code: its exact handling of tokens in
no cluster / several clusters, and the EMA's normalisation (we renormalise
``decay * mu + (1 - decay) * normalise(sum of members)``).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.core import validation as V
from attnjax.dynamic.gather import masked_softmax_attend
from attnjax.dynamic.select import normalize_positions

__all__ = ["routing_attention", "routing_normalize", "kmeans_assign", "kmeans_ema_update",
           "RoutingAttention"]


def routing_normalize(x):
  """LayerNorm without scale/bias over the head dim, divided by sqrt(H): unit vectors [..., H]."""
  x = x.astype(jnp.float32)
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + 1e-6) / jnp.sqrt(jnp.float32(x.shape[-1]))


def _unit(x, axis=-1):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-6)


def _head_keys(key, N):
  return jnp.repeat(key, N // key.shape[2], axis=2)


def kmeans_assign(x_hat, centroids):
  """Nearest centroid of each normalised vector: x_hat [B, L, N, H], centroids [N, C, H] -> int32 [B, L, N]."""
  return jnp.argmax(jnp.einsum("blnh,nch->blnc", x_hat, centroids), -1).astype(jnp.int32)


def routing_attention(query, key, value, centroids, *, window: int, causal: bool = True,
                      share_qk: bool = False, q_positions=None, k_positions=None, scale=None,
                      commitment_weight: float = 1e-4):
  """Routing attention for all heads.

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv].
    centroids: [N, C, H] unit centroids per query head.
    window: w, members per cluster (n / C in the paper), <= min(T, S).
    causal: key visible iff k_pos <= q_pos (positions as ``attnjax.attention``).
    share_qk: keys are the (un-normalised) queries, as the LM configs; key is
      then ignored for routing and attention (value is still used).
    commitment_weight: beta of the commitment loss.

  Returns:
    (out [B, T, N, Hv], aux) with aux = {"q_members" int32 [B, N, C, w],
    "k_members" int32 [B, N, C, w], "commitment_loss" float32 scalar}.
  """
  if share_qk:
    key = query
  d = V.check_qkv(query, key, value)
  scale = V.check_scale(scale, d.H)
  if centroids.ndim != 3 or centroids.shape[0] != d.N or centroids.shape[2] != d.H:
    raise ValueError(f"centroids must have shape [N, C, H]=({d.N}, C, {d.H}), got "
                     f"{centroids.shape}.")
  V.check_positive_int("window", window)
  if window > min(d.T, d.S):
    raise ValueError(f"window={window} is larger than the sequence (T={d.T}, S={d.S}).")
  q_pos, k_pos = normalize_positions(q_positions, k_positions, d)
  mu = jax.lax.stop_gradient(centroids.astype(jnp.float32))
  kf = _head_keys(key, d.N)
  vf = _head_keys(value, d.N)
  q_hat, k_hat = routing_normalize(query), routing_normalize(kf)
  sel = lambda x_hat: jnp.sort(jax.lax.top_k(
      jax.lax.stop_gradient(jnp.einsum("blnh,nch->bncl", x_hat, mu)), window)[1], -1)
  q_idx, k_idx = sel(q_hat), sel(k_hat)  # [B, N, C, w]
  bi = jnp.arange(d.B)[:, None, None, None]
  hi = jnp.arange(d.N)[None, :, None, None]
  qg, kg, vg = query[bi, q_idx, hi], kf[bi, k_idx, hi], vf[bi, k_idx, hi]  # [B, N, C, w, .]
  valid = jnp.ones((1, 1, 1, 1, 1), bool)
  if causal:
    qp = jnp.broadcast_to(q_pos, (d.B, d.T))[jnp.arange(d.B)[:, None, None, None], q_idx]
    kp = jnp.broadcast_to(k_pos, (d.B, d.S))[jnp.arange(d.B)[:, None, None, None], k_idx]
    valid = kp[..., None, :] <= qp[..., :, None]
  out_c, lse_c = masked_softmax_attend(qg, kg, vg, valid, scale)
  seen = jnp.isfinite(lse_c).astype(jnp.float32)  # [B, N, C, w]
  total = jnp.zeros((d.B, d.N, d.T, d.Hv), jnp.float32).at[bi, hi, q_idx].add(out_c * seen[..., None])
  count = jnp.zeros((d.B, d.N, d.T), jnp.float32).at[bi, hi, q_idx].add(seen)
  out = total / jnp.maximum(count, 1.0)[..., None]
  out = jnp.transpose(out, (0, 2, 1, 3)).astype(query.dtype)
  commit = _commitment(q_hat, mu) + (0.0 if share_qk else _commitment(k_hat, mu))
  aux = {"q_members": q_idx, "k_members": k_idx,
         "commitment_loss": commitment_weight * commit}
  return out, aux


def _commitment(x_hat, mu):
  near = mu[jnp.arange(mu.shape[0])[None, None, :], kmeans_assign(x_hat, mu)]  # [B, L, N, H]
  return jnp.mean(jnp.sum((x_hat - near) ** 2, -1))


def kmeans_ema_update(centroids, query, key=None, *, decay: float = 0.999):
  """One mini-batch k-means step by EMA: returns new unit centroids [N, C, H].

  Members are the nearest-centroid assignments of the normalised queries and
  keys (key None: queries only, e.g. share_qk). Clusters with no member keep
  their centroid. ``mu <- unit(decay * mu + (1 - decay) * unit(sum of members))``.
  """
  if not 0.0 <= decay <= 1.0:
    raise ValueError(f"decay must be in [0, 1], got {decay}.")
  mu = jax.lax.stop_gradient(centroids.astype(jnp.float32))
  N, C, _ = mu.shape
  xs = [routing_normalize(jax.lax.stop_gradient(query))]
  if key is not None:
    xs.append(routing_normalize(jax.lax.stop_gradient(_head_keys(key, N))))
  sums = jnp.zeros_like(mu)
  counts = jnp.zeros((N, C), jnp.float32)
  for x in xs:
    onehot = jax.nn.one_hot(kmeans_assign(x, mu), C, dtype=jnp.float32)  # [B, L, N, C]
    sums = sums + jnp.einsum("blnc,blnh->nch", onehot, x)
    counts = counts + onehot.sum((0, 1))
  new = _unit(decay * mu + (1.0 - decay) * _unit(sums))
  return jnp.where(counts[..., None] > 0, new, mu).astype(centroids.dtype)


class RoutingAttention(nn.Module):
  """Routing attention on given q/k/v with centroids as state.

  Centroids [N, C, H] live in the ``"batch_stats"`` collection (initialised
  as random unit vectors from the "params" RNG). With ``update=True`` and the
  collection mutable (``apply(..., mutable=["batch_stats"])``) they take one
  EMA step on this batch. Returns (out, aux) as :func:`routing_attention`.
  """
  num_clusters: int
  window: int
  causal: bool = True
  share_qk: bool = False
  decay: float = 0.999
  commitment_weight: float = 1e-4

  @nn.compact
  def __call__(self, query, key, value, *, update: bool = False, q_positions=None,
               k_positions=None):
    N, H = query.shape[2], query.shape[3]
    rng = self.make_rng("params") if self.is_initializing() else None
    mu = self.variable("batch_stats", "centroids",
                       lambda: _unit(jax.random.normal(rng, (N, self.num_clusters, H))))
    out, aux = routing_attention(query, key, value, mu.value, window=self.window,
                                 causal=self.causal, share_qk=self.share_qk,
                                 q_positions=q_positions, k_positions=k_positions,
                                 commitment_weight=self.commitment_weight)
    if update and self.is_mutable_collection("batch_stats") and not self.is_initializing():
      mu.value = kmeans_ema_update(mu.value, query, None if self.share_qk else key,
                                   decay=self.decay)
    return out, aux
