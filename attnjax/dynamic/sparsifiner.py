"""Sparsifiner: a low-rank connectivity predictor picks top-k keys per query (Wei et al., CVPR 2023; arXiv:2303.13755).

"Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision
Transformers".

Per head, keys are down-projected along the token axis
(``K_down = W_down K``, ``n_down`` rows, Linformer-style); the approximate
attention ``A~ = softmax(Q K_down^T / sqrt(H))`` [T, n_down] is up-projected
by a sparse learned basis ``W_up`` [n_down, S] (only its ``up_topk``
largest-magnitude entries per row are kept) to connectivity scores
``C = A~ W_up`` [T, S]. The ``topk`` best keys per query form the mask, and
exact softmax attention runs on them only (token-level gather). The
predictor is trained by distillation towards the dense attention map.

Not confirmed from the paper: the exact form of the distillation term (we
use the mean squared error between C and the dense attention
probabilities, the teacher being stop-gradient) and how W_up's sparsity is
enforced (we keep the top ``up_topk`` magnitudes per row).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.core import validation as V
from attnjax.core.reference import reference_attention
from attnjax.dynamic.gather import gather_attention
from attnjax.masks import Causal

__all__ = ["connectivity_scores", "sparsifiner_attention", "sparsifiner_distillation_loss",
           "SparsifinerAttention"]


def _sparse_basis(w_up, up_topk):
  if up_topk is None:
    return w_up
  if not 1 <= up_topk <= w_up.shape[-1]:
    raise ValueError(f"up_topk must be in [1, {w_up.shape[-1]}] (the key length), got {up_topk}.")
  thresh = jax.lax.top_k(jax.lax.stop_gradient(jnp.abs(w_up)), up_topk)[0][..., -1:]
  return jnp.where(jnp.abs(w_up) >= thresh, w_up, 0.0)


def connectivity_scores(query, key, params, *, up_topk: Optional[int] = None, scale=None):
  """Predicted connectivity C [B, N, T, S] float32.

  Args:
    query: [B, T, N, H]; key: [B, S, K, H].
    params: {"w_down": [N, n_down, S], "w_up": [N, n_down, S]}.
    up_topk: nonzeros kept per row of W_up (None: dense W_up).
  """
  d = V.check_qkv(query, key, key)
  scale = V.check_scale(scale, d.H)
  w_down, w_up = params["w_down"], params["w_up"]
  if w_down.ndim != 3 or w_down.shape[0] != d.N or w_down.shape[2] != d.S \
      or w_up.shape != w_down.shape:
    raise ValueError(f"params w_down {w_down.shape} and w_up {w_up.shape} must both have shape "
                     f"[N, n_down, S]=({d.N}, n_down, {d.S}).")
  kf = jnp.repeat(key, d.N // d.K, axis=2).astype(jnp.float32)
  k_down = jnp.einsum("nds,bsnh->bndh", w_down, kf)
  approx = jax.nn.softmax(jnp.einsum("btnh,bndh->bntd", query.astype(jnp.float32), k_down) * scale, -1)
  return jnp.einsum("bntd,nds->bnts", approx, _sparse_basis(w_up, up_topk))


def sparsifiner_attention(query, key, value, params, *, topk: int, up_topk: Optional[int] = None,
                          causal: bool = False, scale=None, return_mask: bool = False):
  """Sparsifiner attention: predicted connectivity -> top-k keys per query -> exact sparse softmax.

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv].
    params: as :func:`connectivity_scores`. topk: keys per query (<= S).
    causal: restrict candidates to k_pos <= q_pos (default positions).

  Returns:
    out [B, T, N, Hv] (and (indices [B, T, N, topk], valid [B, T, N, topk])).
    The selection is discrete: the predictor learns through
    :func:`sparsifiner_distillation_loss`, q/k/v through the attention.
  """
  d = V.check_qkv(query, key, value)
  if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= d.S:
    raise ValueError(f"topk must be an int in [1, S={d.S}], got {topk!r}.")
  conn = jax.lax.stop_gradient(connectivity_scores(query, key, params, up_topk=up_topk,
                                                   scale=scale))
  ok = jnp.ones((d.T, d.S), bool)
  if causal:
    ok = jnp.arange(d.S)[None, :] <= (jnp.arange(d.T) + d.S - d.T)[:, None]
  conn = jnp.where(ok, conn, -jnp.inf)
  _, idx = jax.lax.top_k(jnp.transpose(conn, (0, 2, 1, 3)), topk)  # [B, T, N, k]
  valid = jnp.take_along_axis(jnp.broadcast_to(ok[None, :, None, :], (d.B, d.T, d.N, d.S)),
                              idx, -1)
  out = gather_attention(query, key, value, idx, valid=valid, scale=scale)
  return (out, (idx, valid)) if return_mask else out


def sparsifiner_distillation_loss(query, key, params, *, up_topk: Optional[int] = None,
                                  causal: bool = False, scale=None):
  """Mean squared error between the predicted connectivity and the dense attention probabilities.

  The dense map is the (stop-gradient) teacher; gradients reach w_down and
  w_up (and q/k through the predictor). Dense O(T S) memory (ViT scale).
  """
  conn = connectivity_scores(query, key, params, up_topk=up_topk, scale=scale)
  _, _, probs = reference_attention(jax.lax.stop_gradient(query), jax.lax.stop_gradient(key),
                                    jax.lax.stop_gradient(key), mask=Causal() if causal else None,
                                    scale=scale, return_lse=True, return_probs=True)
  return jnp.mean((conn - probs) ** 2)


class SparsifinerAttention(nn.Module):
  """The connectivity predictor's parameters plus sparse attention on given q/k/v.

  ``w_down``/``w_up`` [N, n_down, S] are sized from the key length at init
  (a fixed token count, as ViT). Call with ``return_loss=True`` to also get
  the distillation loss.
  """
  n_down: int
  topk: int
  up_topk: Optional[int] = None
  causal: bool = False

  @nn.compact
  def __call__(self, query, key, value, *, return_loss: bool = False):
    N, S = query.shape[2], key.shape[1]
    init = nn.initializers.normal(stddev=S ** -0.5)
    params = {"w_down": self.param("w_down", init, (N, self.n_down, S)),
              "w_up": self.param("w_up", init, (N, self.n_down, S))}
    out = sparsifiner_attention(query, key, value, params, topk=self.topk,
                                up_topk=self.up_topk, causal=self.causal)
    if not return_loss:
      return out
    return out, sparsifiner_distillation_loss(query, key, params, up_topk=self.up_topk,
                                              causal=self.causal)
