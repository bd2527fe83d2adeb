"""ICL vs weight shifting for softmax regression (arXiv:2304.13276): loss, GD step, attention data update.

Li et al., "The Closeness of In-Context Learning and Weight Shifting for
Softmax Regression" (arXiv:2304.13276). Loss ``L(A, x, b) = 1/2 || softmax(A x) - b ||^2`` with
A [n, d], x [d], b [n] (unbatched; vmap for batches). The harness measures how
close the prediction after one self-attention update of the data A is to the
prediction after one gradient step on x, against a provable bound.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _check(A, x, b):
  if A.ndim != 2 or x.shape != (A.shape[1],) or b.shape != (A.shape[0],):
    raise ValueError(f"expected A [n, d], x [d], b [n]; got A {A.shape}, x {x.shape}, b {b.shape}.")


def softmax_regression_loss(A, x, b):
  """``1/2 || <exp(Ax), 1>^-1 exp(Ax) - b ||^2`` (scalar)."""
  _check(A, x, b)
  return 0.5 * jnp.sum(jnp.square(jax.nn.softmax(A @ x) - b))


def softmax_regression_grad(A, x, b):
  """Closed-form gradient in x: ``A^T (diag(f) - f f^T)(f - b)`` with f = softmax(Ax)."""
  _check(A, x, b)
  f = jax.nn.softmax(A @ x)
  g = f - b
  return A.T @ (f * g - f * jnp.dot(f, g))


def gd_step(A, x, b, lr: float):
  """One gradient-descent step on x (the "weight shifting" side)."""
  return x - lr * softmax_regression_grad(A, x, b)


def equivalent_data_shift(A, x, x_new):
  """Minimum-Frobenius-norm dA with ``(A + dA) x = A x_new``: ``dA = A (x_new - x) x^T / |x|^2``.

  A weight step is thus always a rank-one data step; its norm is
  ``|A (x_new - x)| / |x|``, linear in the learning rate.
  """
  return jnp.outer(A @ (x_new - x), x) / jnp.dot(x, x)


def self_attention_data_update(A, wq, wk, wv, lr: float):
  """One softmax self-attention layer over the rows of A (tokens), with residual:
  ``A + lr * softmax(A wq (A wk)^T) A wv``; wq/wk [d, h], wv [d, d]."""
  logits = (A @ wq) @ (A @ wk).T
  return A + lr * jax.nn.softmax(logits, axis=-1) @ (A @ wv)


@functools.partial(jax.jit, static_argnames=("n", "d", "lrs", "num_instances"))
def icl_gd_closeness(rng, *, n: int = 8, d: int = 4, lrs=(1e-3, 1e-2, 1e-1), num_instances: int = 16):
  """Prediction gap between one attention update of A and one GD step on x, on random instances.

  For each lr: ``gap = | softmax(A' x) - softmax(A x') |`` with
  ``A' = self_attention_data_update(A, ..., lr)`` and ``x' = gd_step(A, x, b, lr)``,
  and ``bound = 1/2 | A' x - A x' |`` (softmax is 1/2-Lipschitz in l2: its
  Jacobian diag(f) - f f^T has eigenvalues <= 2 f_i (1 - f_i) <= 1/2 by
  Gershgorin), so gap <= bound, and both shrink linearly with lr.

  Jitted; ``n``, ``d``, ``lrs`` (a tuple) and ``num_instances`` are static.

  Returns:
    dict of float32 arrays [len(lrs)] (means over instances): "lr", "gap",
    "bound", "data_shift_norm" (|dA|_F of ``equivalent_data_shift``),
    "loss_gd" and "loss_attention"; plus "loss0" (scalar).
  """
  if n < 2 or d < 1 or num_instances < 1:
    raise ValueError(f"need n >= 2, d >= 1, num_instances >= 1; got {n}, {d}, {num_instances}.")
  keys = jax.random.split(rng, 6)
  A = jax.random.normal(keys[0], (num_instances, n, d)) / jnp.sqrt(d)
  x = jax.random.normal(keys[1], (num_instances, d))
  b = jax.nn.softmax(jax.random.normal(keys[2], (num_instances, n)), axis=-1)
  wq = jax.random.normal(keys[3], (num_instances, d, d)) / jnp.sqrt(d)
  wk = jax.random.normal(keys[4], (num_instances, d, d)) / jnp.sqrt(d)
  wv = jax.random.normal(keys[5], (num_instances, d, d)) / jnp.sqrt(d)
  lr_arr = jnp.asarray(lrs, jnp.float32)

  def one(A, x, b, wq, wk, wv, lr):
    x_new = gd_step(A, x, b, lr)
    A_new = self_attention_data_update(A, wq, wk, wv, lr)
    gap = jnp.linalg.norm(jax.nn.softmax(A_new @ x) - jax.nn.softmax(A @ x_new))
    bound = 0.5 * jnp.linalg.norm(A_new @ x - A @ x_new)
    shift = jnp.linalg.norm(equivalent_data_shift(A, x, x_new))
    return (gap, bound, shift, softmax_regression_loss(A, x_new, b),
            softmax_regression_loss(A_new, x, b))

  per_lr = jax.vmap(lambda lr: jax.vmap(one, (0, 0, 0, 0, 0, 0, None))(A, x, b, wq, wk, wv, lr))(lr_arr)
  names = ("gap", "bound", "data_shift_norm", "loss_gd", "loss_attention")
  out = {k: jnp.mean(v, axis=1) for k, v in zip(names, per_lr)}
  out["lr"] = lr_arr
  out["loss0"] = jnp.mean(jax.vmap(softmax_regression_loss)(A, x, b))
  return out
