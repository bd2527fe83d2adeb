"""Linear-attention benchmark (Lightning Attention-2, arXiv:2401.04658 / TNL, arXiv:2405.17381): constant speed over T.

B = 1, N = 8, H = 64: causal linear attention (identity features, TNL decay,
chunk 64, XLA path) forward and forward+backward tokens/s from T = 1k to 64k,
peak memory from XLA's analysis, the dense causal path at T = 16k for the
speed ratio, and the per-token decode step time after prefilling T tokens.
`fwd_gflops` is the arithmetic rate of the chunked forward: per position and
head 2C(F + E) for the in-chunk C x C products (full blocks, as computed) plus
4FE for reading and updating the F x E state. Linear-attention timings are
medians over at least `repeats` calls and at least MIN_TIME seconds, so the
short calls at small T get enough samples on a shared machine.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import flags

import attnjax
from attnjax import linear as L
from experiments.benchmarks import common

FLAGS = flags.FLAGS
DEFAULT_LENS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
DENSE_T = 16384
B, N, H = 1, 8, 64
CHUNK = 64
MIN_TIME = 0.5


def _chunked_fwd_flops(t: int) -> float:
  return float(t) * B * N * (2 * CHUNK * (H + H) + 4 * H * H)


def _flag(name, default):
  try:
    return getattr(FLAGS, name)
  except (AttributeError, flags.UnparsedFlagAccessError):
    return default


def _fns(dtype):
  fwd = jax.jit(lambda q, k, v: L.linear_attention(q, k, v, decay="tnl", chunk_size=CHUNK,
                                                   implementation="xla"))
  loss = lambda q, k, v: jnp.sum(L.linear_attention(q, k, v, decay="tnl", chunk_size=CHUNK,
                                                    implementation="xla").astype(jnp.float32))
  fwdbwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  return fwd, fwdbwd


def _dense(q, k, v):
  return attnjax.attention(q, k, v, mask=attnjax.masks.Causal(), implementation="xla")


def run():
  quick = _flag("quick", False)
  repeats = _flag("repeats", 3)
  dtype = jnp.dtype(_flag("dtype", "float32"))
  lens = [int(x) for x in _flag("seq_lens", [])] or ([256, 512, 1024] if quick else DEFAULT_LENS)
  dense_t = 512 if quick else DENSE_T
  fwd, fwdbwd = _fns(dtype)
  step = jax.jit(lambda s, q, k, v: L.linear_attention_step(s, q, k, v, decay="tnl"))
  rows = []
  for t in lens:
    q, k, v = common.random_qkv(jax.random.PRNGKey(t), B, t, t, N, N, H, dtype=dtype)
    t_f = common.time_fn(fwd, q, k, v, repeats=repeats, min_time=MIN_TIME)
    t_fb = common.time_fn(fwdbwd, q, k, v, repeats=repeats, min_time=MIN_TIME)
    _, state = L.linear_attention(q, k, v, decay="tnl", return_state=True)
    t_step = common.time_fn(step, state, q[:, -1], k[:, -1], v[:, -1], repeats=max(repeats, 10))
    rows.append({"op": "linear_causal_xla", "T": t, "fwd_s": t_f, "fwd_tokens_per_s": t / t_f,
                 "fwd_gflops": _chunked_fwd_flops(t) / t_f / 1e9,
                 "fwdbwd_s": t_fb, "fwdbwd_tokens_per_s": t / t_fb,
                 "fwd_peak_bytes": common.peak_bytes(fwd, q, k, v),
                 "fwdbwd_peak_bytes": common.peak_bytes(fwdbwd, q, k, v),
                 "decode_step_s": t_step})
  q, k, v = common.random_qkv(jax.random.PRNGKey(1), B, dense_t, dense_t, N, N, H, dtype=dtype)
  dense = jax.jit(_dense)
  dense_fb = jax.jit(jax.grad(lambda q, k, v: jnp.sum(_dense(q, k, v).astype(jnp.float32)),
                              argnums=(0, 1, 2)))
  t_d = common.time_fn(dense, q, k, v, repeats=1)
  t_dfb = common.time_fn(dense_fb, q, k, v, repeats=1)
  t_l = common.time_fn(fwd, q, k, v, repeats=repeats, min_time=MIN_TIME)
  t_lfb = common.time_fn(fwdbwd, q, k, v, repeats=repeats, min_time=MIN_TIME)
  rows.append({"op": "dense_causal_xla (attnjax.attention)", "T": dense_t, "fwd_s": t_d,
               "fwd_tokens_per_s": dense_t / t_d, "fwdbwd_s": t_dfb,
               "fwdbwd_tokens_per_s": dense_t / t_dfb,
               "fwd_peak_bytes": common.peak_bytes(dense, q, k, v),
               "fwdbwd_peak_bytes": common.peak_bytes(dense_fb, q, k, v),
               "speedup_linear_fwd": t_d / t_l, "speedup_linear_fwdbwd": t_dfb / t_lfb})
  return rows
