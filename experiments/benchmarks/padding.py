"""Padded batches on the XLA path: does the cost follow the real lengths?

A batch of B = 8 sequences with lengths drawn uniformly in [T/4, T] (seeded),
right-padded to T, runs through ``attnjax.dot_product_attention`` with
``query_seq_lengths`` / ``key_value_seq_lengths`` (causal, and causal with a
sliding window of 1024). It is timed against the same sequences run one by one
unpadded (the sum of the per-sequence medians): ``ratio = padded / sum``; 1.0
means padding costs nothing, T^2-style dense padding would be far above.
The padded call and the per-sequence calls are timed alternately (rounds),
because the machine is shared. Forward at full size; forward and
forward+backward with ``--quick`` (T = 1024 unless ``--seq_lens``).

Two extra rows compare, at one sequence, a causal mask given as a boolean
array and as an equivalent additive bias (0 / -inf) with the same mask as a
``Mask`` object (``ratio = array / Mask``).
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import attnjax
from experiments.benchmarks import common

FLAGS = flags.FLAGS
B, N, H = 8, 4, 64
WINDOW = 1024


def _flag(name, default):
  try:
    return getattr(FLAGS, name)
  except (AttributeError, flags.UnparsedFlagAccessError):
    return default


def _fn(window, lengths, backward):
  """jitted dot_product_attention (or its gradient) for one case."""
  kw = dict(is_causal=True, implementation="xla")
  if window is not None:
    kw["local_window_size"] = (window, 0)

  def f(q, k, v, *lens):
    if lengths:
      kw2 = dict(kw, query_seq_lengths=lens[0], key_value_seq_lengths=lens[0])
    else:
      kw2 = kw
    return attnjax.dot_product_attention(q, k, v, **kw2)

  if not backward:
    return jax.jit(f)
  return jax.jit(jax.grad(lambda q, k, v, *l: jnp.sum(f(q, k, v, *l)), argnums=(0, 1, 2)))


def _time_rounds(calls, repeats):
  """Median seconds of each (fn, args) in ``calls``, timed alternately after a warm-up."""
  for fn, args in calls:
    common.block(fn(*args))
  times = [[] for _ in calls]
  for _ in range(repeats):
    for i, (fn, args) in enumerate(calls):
      t0 = time.perf_counter()
      common.block(fn(*args))
      times[i].append(time.perf_counter() - t0)
  return [statistics.median(t) for t in times], [min(t) for t in times]


def _padding_rows(T, window, backward, repeats, dtype):
  rng = np.random.default_rng(T)
  lens = rng.integers(T // 4, T + 1, size=B).astype(np.int32)
  q, k, v = common.random_qkv(jax.random.PRNGKey(T), B, T, T, N, N, H, dtype=dtype)
  padded = _fn(window, True, backward)
  single = _fn(window, False, backward)
  calls = [(padded, (q, k, v, jnp.asarray(lens)))]
  calls += [(single, (q[b:b + 1, :L], k[b:b + 1, :L], v[b:b + 1, :L]))
            for b, L in enumerate(lens)]
  med, mins = _time_rounds(calls, repeats)
  return {"case": "lengths", "mask": "causal" if window is None else f"causal+window{window}",
          "mode": "fwdbwd" if backward else "fwd", "T": T, "B": B,
          "lengths": " ".join(map(str, lens)), "real_fraction": float(lens.sum() / (B * T)),
          "padded_s": med[0], "sum_unpadded_s": float(sum(med[1:])),
          "ratio": med[0] / sum(med[1:]), "ratio_of_mins": mins[0] / sum(mins[1:])}


def _array_rows(T, repeats, dtype):
  q, k, v = common.random_qkv(jax.random.PRNGKey(1), 1, T, T, N, N, H, dtype=dtype)
  tril = np.tril(np.ones((T, T), bool))
  bias = np.where(tril, 0.0, -np.inf).astype(np.float32)
  obj = jax.jit(lambda q, k, v: attnjax.attention(q, k, v, mask=attnjax.masks.Causal(),
                                                  implementation="xla"))
  arr = jax.jit(lambda q, k, v: attnjax.attention(q, k, v, mask=tril, implementation="xla"))
  bia = jax.jit(lambda q, k, v: attnjax.attention(q, k, v, bias=bias, implementation="xla"))
  med, mins = _time_rounds([(obj, (q, k, v)), (arr, (q, k, v)), (bia, (q, k, v))], repeats)
  rows = []
  for name, i in (("bool_mask_array", 1), ("bias_array", 2)):
    rows.append({"case": name, "mask": "causal", "mode": "fwd", "T": T, "B": 1,
                 "padded_s": med[i], "sum_unpadded_s": med[0], "ratio": med[i] / med[0],
                 "ratio_of_mins": mins[i] / mins[0]})
  return rows


def run():
  quick = _flag("quick", False)
  repeats = _flag("repeats", 3)
  dtype = jnp.dtype(_flag("dtype", "float32"))
  lens = [int(x) for x in _flag("seq_lens", [])] or ([1024] if quick else [8192])
  back = quick
  rows = []
  for T in lens:
    for window in (None, WINDOW):
      if window is not None and window >= T:
        window = T // 4
      for backward in (False, True) if back else (False,):
        rows.append(_padding_rows(T, window, backward, repeats, dtype))
        print(common.format_table(rows[-1:]), flush=True)
    rows += _array_rows(min(T, 2048), repeats, dtype)
    print(common.format_table(rows[-2:]), flush=True)
  return rows
