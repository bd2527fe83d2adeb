"""HyperAttention: sortLSH block-diagonal attention plus sampled columns, merged by lse (Han et al., ICLR 2024; arXiv:2310.05869).

"HyperAttention: Long-context Attention in Near-Linear Time".

Non-causal: queries and keys are hashed by angular LSH (``lsh_num_projs``
Gaussian hyperplanes shared by q and k, the bit code mapped through a Gray
code so that adjacent buckets differ by one bit), stably sorted by bucket,
and cut into equal blocks; exact attention runs inside each diagonal block.
``sample_size`` keys drawn uniformly (per batch and head) add a residual
estimate for every query (samples inside the query's own block are masked,
and the lse gets ``+log(S / sample_size)``). Both parts merge through the
lse. Causal: recursive halving; the two diagonal halves are causal
sub-problems (stacked on the batch axis), the lower-left block is the
non-causal approximation; below ``min_seq_len`` attention is exact.
Defaults as the released code: 7 projections, block 256, 256 samples,
min_seq_len 4096. Non-deterministic by design: pass a PRNG key.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attnjax.core import validation as V
from attnjax.core.merge import merge_attention
from attnjax.dynamic.gather import masked_softmax_attend
from attnjax import api
from attnjax.masks import Causal

__all__ = ["hyper_attention", "sort_lsh_buckets", "gray_code_permutation"]


def gray_code_permutation(num_bits: int):
  """int32 [2**num_bits]: bucket id of each bit code, so that adjacent ids differ by one bit."""
  n = 1 << num_bits
  gray = [i ^ (i >> 1) for i in range(n)]  # gray[rank] = code
  perm = [0] * n
  for rank, code in enumerate(gray):
    perm[code] = rank
  return jnp.asarray(perm, jnp.int32)


def sort_lsh_buckets(x, proj):
  """Angular LSH buckets of x [..., H] with hyperplanes proj [H, P] -> int32 [...] in [0, 2**P)."""
  bits = (jnp.einsum("...h,hp->...p", x.astype(jnp.float32), proj) > 0).astype(jnp.int32)
  code = (bits * (1 << jnp.arange(proj.shape[-1], dtype=jnp.int32))).sum(-1)
  return gray_code_permutation(proj.shape[-1])[code]


def _exact(query, key, value, causal, scale, implementation):
  """Exact (causal) attention with lse through ``attnjax.attention``."""
  return api.attention(query, key, value, mask=Causal() if causal else None, scale=scale,
                       return_lse=True, implementation=implementation)


def _noncausal(query, key, value, rng, *, proj, block_size, sample_size, scale):
  d = V.check_qkv(query, key, value)
  if d.S <= block_size and sample_size == 0:
    return _exact(query, key, value, False, scale, None)
  if d.S % block_size:
    raise ValueError(f"block_size={block_size} must divide the key length S={d.S}.")
  nb = d.S // block_size
  if d.T % nb:
    raise ValueError(f"the {nb} key blocks (S={d.S} / block_size={block_size}) must divide the "
                     f"query length T={d.T}.")
  bq = d.T // nb
  g = d.N // d.K
  hi = jnp.arange(d.N) // g
  qt = jnp.transpose(query, (0, 2, 1, 3))  # [B, N, T, H]
  kt = jnp.transpose(key, (0, 2, 1, 3))[:, hi]  # [B, N, S, H]
  vt = jnp.transpose(value, (0, 2, 1, 3))[:, hi]
  q_order = jnp.argsort(sort_lsh_buckets(qt, proj), axis=-1, stable=True)
  k_order = jnp.argsort(sort_lsh_buckets(kt, proj), axis=-1, stable=True)
  take = lambda x, o: jnp.take_along_axis(x, o[..., None], axis=2)
  qs = take(qt, q_order).reshape(d.B, d.N, nb, bq, d.H)
  ks = take(kt, k_order).reshape(d.B, d.N, nb, block_size, d.H)
  vs = take(vt, k_order).reshape(d.B, d.N, nb, block_size, d.Hv)
  o, lse = masked_softmax_attend(qs, ks, vs, jnp.ones((1, 1, 1, 1, 1), bool), scale)
  o, lse = o.reshape(d.B, d.N, d.T, d.Hv), lse.reshape(d.B, d.N, d.T)
  if sample_size:
    m = min(sample_size, d.S)
    cols = jnp.sort(jax.random.randint(rng, (d.B, d.N, m), 0, d.S), axis=-1)
    k_rank = jnp.argsort(k_order, axis=-1)  # sorted position of each key
    col_block = jnp.take_along_axis(k_rank, cols, -1) // block_size  # [B, N, m]
    q_block = jnp.arange(d.T) // bq
    valid = col_block[:, :, None, :] != q_block[None, None, :, None]
    ks2, vs2 = take(kt, cols), take(vt, cols)
    o2, lse2 = masked_softmax_attend(qs.reshape(d.B, d.N, d.T, d.H), ks2, vs2, valid, scale)
    lse2 = lse2 + math.log(d.S / m)
    o, lse = merge_attention(o, lse, o2, lse2)
  q_rank = jnp.argsort(q_order, axis=-1)
  o = jnp.take_along_axis(o, q_rank[..., None], axis=2)
  lse = jnp.take_along_axis(lse, q_rank, axis=2)
  return jnp.transpose(o, (0, 2, 1, 3)), jnp.transpose(lse, (0, 2, 1))


def _causal(query, key, value, rng, *, opts, min_seq_len, scale, implementation):
  T = query.shape[1]
  if T <= min_seq_len:
    return _exact(query, key, value, True, scale, implementation)
  if T % 2:
    raise ValueError(f"causal HyperAttention halves the sequence down to min_seq_len="
                     f"{min_seq_len}; length {T} is odd (pad it to a multiple of a power of 2).")
  h = T // 2
  r1, r2 = jax.random.split(rng)
  cat = lambda x: jnp.concatenate([x[:, :h], x[:, h:]], axis=0)
  o, lse = _causal(cat(query), cat(key), cat(value), r1, opts=opts, min_seq_len=min_seq_len,
                   scale=scale, implementation=implementation)
  B = query.shape[0]
  o1, o2, l1, l2 = o[:B], o[B:], lse[:B], lse[B:]
  o3, l3 = _noncausal(query[:, h:], key[:, :h], value[:, :h], r2, scale=scale, **opts)
  o2, l2 = merge_attention(o2, l2, o3.astype(o2.dtype), l3)
  return jnp.concatenate([o1, o2], axis=1), jnp.concatenate([l1, l2], axis=1)


def hyper_attention(query, key, value, rng=None, *, causal: bool = False,
                    lsh_num_projs: int = 7, block_size: int = 256, sample_size: int = 256,
                    min_seq_len: int = 4096, scale=None, return_lse: bool = False,
                    implementation=None):
  """HyperAttention.

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv].
    rng: PRNG key for the hyperplanes and the column samples (default key 0).
    causal: recursive causal variant (self-attention, or cross attention with
      S >= T, bottom-right aligned: the first S - T keys are seen by every
      query and handled by the non-causal approximation).
    lsh_num_projs, block_size, sample_size, min_seq_len: as the paper's code.
      ``sample_size=0`` drops the residual term.

  Returns:
    out [B, T, N, Hv] in the query dtype (and lse [B, T, N]).
  """
  d = V.check_qkv(query, key, value)
  scale = V.check_scale(scale, d.H)
  for name, val in (("lsh_num_projs", lsh_num_projs), ("block_size", block_size),
                    ("min_seq_len", min_seq_len)):
    V.check_positive_int(name, val)
  V.check_positive_int("sample_size", sample_size, minimum=0)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  r_proj, r_rest = jax.random.split(rng)
  proj = jax.random.normal(r_proj, (d.H, lsh_num_projs), jnp.float32)
  opts = dict(proj=proj, block_size=block_size, sample_size=sample_size)
  if not causal:
    if d.T < min_seq_len:
      o, lse = _exact(query, key, value, False, scale, implementation)
    else:
      o, lse = _noncausal(query, key, value, r_rest, scale=scale, **opts)
  else:
    if d.S < d.T:
      raise ValueError(f"causal HyperAttention needs S >= T (bottom-right aligned), got "
                       f"T={d.T}, S={d.S}.")
    r1, r2 = jax.random.split(r_rest)
    o, lse = _causal(query, key[:, d.S - d.T:], value[:, d.S - d.T:], r1, opts=opts,
                     min_seq_len=min_seq_len, scale=scale, implementation=implementation)
    if d.S > d.T:
      p = d.S - d.T
      o2, l2 = (_exact(query, key[:, :p], value[:, :p], False, scale, implementation)
                if d.T < min_seq_len else
                _noncausal(query, key[:, :p], value[:, :p], r2, scale=scale, **opts))
      o, lse = merge_attention(o, lse, o2.astype(o.dtype), l2)
  o = o.astype(query.dtype)
  return (o, lse) if return_lse else o
