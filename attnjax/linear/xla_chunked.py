"""XLA backend of the chunked causal linear-attention engine (Lightning Attention-2, arXiv:2401.04658).

Same contract as `engine.BACKENDS` (module docstring of attnjax.linear.engine):
  q [B, N, T, F], k [B, K, T, F], v [B, K, T, E], g [B, N, T] log-decays,
  s0 [B, N, F, E], T a multiple of `chunk`; products accumulate in the
  inputs' dtype promoted to float32 (float64 inputs stay float64).

One sequential loop step per chunk, all heads at once. Each step reads its
chunk straight out of the token-major [B, T, heads, D] arrays (the engine's
head-major inputs are transposes of those, which XLA cancels), so no full-size
layout copy is made; the chunk is regrouped as [B, K, G, C, D] (G = N / K query
heads per key head; K/V are never repeated) and written back into a
token-major output buffer. Per chunk (b = in-chunk inclusive cumsum of g,
W_rc = exp(b_r - b_c) for c <= r, 0 above the diagonal):

  o       = (W * q k^T) v + exp(b) q S
  S_next  = exp(b_last) S + (exp(b_last - b) k)^T v

The C x C decay matrix is factorised about the chunk's mid-decay m = b_last / 2,
W * q k^T = (exp(b - m) q)(exp(m - b) k)^T, whenever every chunk's total
log-decay -b_last is at most FACTOR_LIMIT (then no factor exceeds exp(40) ~
2e17 in float32), which removes C*C exponentials per head from every step;
when some chunk decays faster, the exact exp(b_r - b_c) form is used.
The backward recomputes the states (a forward loop for dq) and carries the
state cotangent in a reverse loop (dk, dv), so memory stays O(T).

Documents (``resets=True``): a log-decay of -inf at position p (lambda_p = 0)
marks the first token of a new document and clears the state there. Inside a
chunk, d_r = the number of marks at or before r; the decay table b is the
cumsum of the finite log-decays only, the scores keep c <= r with d_c == d_r,
only queries with d_r == 0 (the document open at the chunk start) read the
carried state, and the state passed on holds only the keys of the chunk's last
document (plus the carried state when the chunk has no mark). Every mask is a
select, so a NaN in one document's queries or keys never reaches another
document (a NaN value still reaches the other queries of its chunk through the
zero weights of the score-value product, as in the dense form).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.core.precision import accumulation_dtype as _acc

FACTOR_LIMIT = 80.0


def _tril(c: int) -> jax.Array:
  rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
  cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
  return rows >= cols


def _token_major(x: jax.Array) -> jax.Array:
  """[B, H, T, D] -> [B, T, H, D]."""
  return jnp.swapaxes(x, 1, 2)


def _read_chunk(x: jax.Array, i, chunk: int, kh: int) -> jax.Array:
  """Chunk i of token-major [B, T, H, D] as [B, K, H / K, C, D]."""
  b, _, h, d = x.shape
  xc = lax.dynamic_slice_in_dim(x, i * chunk, chunk, 1).reshape(b, chunk, kh, h // kh, d)
  return jnp.transpose(xc, (0, 2, 3, 1, 4))


def _write_chunk(buf: jax.Array, xc: jax.Array, i, chunk: int) -> jax.Array:
  """Writes [B, K, G, C, D] into chunk i of the token-major buffer [B, T, K * G, D]."""
  b, kh, grp, c, d = xc.shape
  xc = jnp.transpose(xc, (0, 3, 1, 2, 4)).reshape(b, c, kh * grp, d)
  return lax.dynamic_update_slice_in_dim(buf, xc.astype(buf.dtype), i * chunk, 1)


def _tables(g: jax.Array, kh: int, chunk: int, has_decay: bool, resets: bool):
  """(cum, doc): the in-chunk inclusive cumsums of the log-decays [B, K, G, nC, C]
  (None without decay) and the in-chunk document index d, int32 of the same
  shape (None without resets), where -inf log-decays (document starts) count
  in d and as 0 in the cumsums."""
  b, n, t = g.shape
  g = g.reshape(b, kh, n // kh, t // chunk, chunk)
  mark = jnp.isneginf(g) if resets else None
  cum = doc = None
  if has_decay:
    cum = jnp.cumsum(g if mark is None else jnp.where(mark, jnp.zeros((), g.dtype), g), axis=-1)
  if mark is not None:
    doc = jnp.cumsum(mark.astype(jnp.int32), axis=-1)
  return cum, doc


def _chunk_decay(cum, i):
  return None if cum is None else lax.dynamic_index_in_dim(cum, i, 3, keepdims=False)


def _open(inter, d):
  """Keeps the carried-state term only for queries of the document open at the chunk start."""
  return inter if d is None else jnp.where((d == 0)[..., None], inter, 0.0)


def _with_decay_form(run, cum):
  """run(safe) with safe = None (no decay), or a Python bool chosen once for all chunks.

  The factorised form is used only when every chunk's total log-decay is at
  most FACTOR_LIMIT; a single branch choice per call keeps the loop bodies free
  of per-step conditionals.
  """
  if cum is None:
    return run(None)
  safe = jnp.all(-cum[..., -1] <= FACTOR_LIMIT)
  return lax.cond(safe, lambda: run(True), lambda: run(False))


def _tn(a: jax.Array, b: jax.Array) -> jax.Array:
  """a^T b over the token axis: [..., C, F] x [..., C, E] -> [..., F, E] (same leading dims).

  Written as one dot_general with all leading axes batched; on CPU, XLA then
  runs it without first copying a transposed operand (an einsum spelling of
  the same product cost a per-step transpose in our measurements).
  """
  nb = a.ndim - 2
  batch = tuple(range(nb))
  return lax.dot_general(a, b, (((nb,), (nb,)), (batch, batch)),
                         preferred_element_type=_acc(a, b))


def decayed_scores(x, y, b, safe, transposed: bool = False, d=None):
  """W * x y^T for one chunk of every head, plus x scaled by exp(b) as (xs, r).

  Args:
    x: [B, K, G, C, D] per query head (queries or output cotangents).
    y: [B, K, C, D] per key head (keys or values).
    b: [B, K, G, C] in-chunk inclusive cumsum of the log-decays, or None.
    safe: Python bool, True when the factorised form cannot overflow.
    transposed: return (W * x y^T)^T, i.e. [.., key c, query r] (upper
      triangular), formed directly as y x^T so that every product stays an
      (A B^T) or (A B) matmul on token-major tiles.
    d: [B, K, G, C] in-chunk document index, or None (one document): pairs
      of different documents are zeroed.
  Returns:
    scores [B, K, G, C, C] float32, and xs [B, K, G, C, D] with a per-head
    factor r [B, K, G, 1, 1] (or None for 1) such that exp(b) * x = r * xs;
    callers apply r to the (smaller or fused) product of xs, not to xs.
  """
  c = x.shape[-2]
  keep = _tril(c).T if transposed else _tril(c)
  if d is not None:
    keep = keep & (d[..., :, None] == d[..., None, :])
  if transposed:
    spec, spec_g = "bkdf,bkgcf->bkgdc", "bkgdf,bkgcf->bkgdc"
  else:
    spec, spec_g = "bkgcf,bkdf->bkgcd", "bkgcf,bkgdf->bkgcd"

  def product(xx, yy, grouped):
    if transposed:
      return jnp.einsum(spec_g if grouped else spec, yy, xx, preferred_element_type=_acc(xx, yy))
    return jnp.einsum(spec_g if grouped else spec, xx, yy, preferred_element_type=_acc(xx, yy))

  if b is None:
    return jnp.where(keep, product(x, y, False), 0.0), x, None

  def factorised(x, y, b):
    mid = 0.5 * b[..., -1:]
    xs = x * jnp.exp(b - mid)[..., None]
    ys = y[:, :, None] * jnp.exp(mid - b)[..., None]
    return jnp.where(keep, product(xs, ys, True), 0.0), xs, jnp.exp(mid)[..., None]

  def exact(x, y, b):
    diff = b[..., :, None] - b[..., None, :]          # [.., r, c] = b_r - b_c
    diff = jnp.swapaxes(diff, -1, -2) if transposed else diff
    w = jnp.exp(jnp.where(keep, diff, 0.0))
    return jnp.where(keep, product(x, y, False) * w, 0.0), x * jnp.exp(b)[..., None], None

  return (factorised if safe else exact)(x, y, b)


def _times(x, r):
  return x if r is None else x * r


def _next_state(state, kc, vc, b, d=None):
  """State after the chunk: exp(b_last) S + (exp(b_last - b) k)^T v; [B, K, G, F, E].

  With documents d, only the keys of the chunk's last document enter, and S
  only when the chunk has no document start.
  """
  if b is None and d is None:
    return state + _tn(kc, vc)[:, :, None]
  k_end, carried = kc[:, :, None], state
  if b is not None:
    last = b[..., -1:]
    k_end = k_end * jnp.exp(last - b)[..., None]
    carried = jnp.exp(last)[..., None] * state
  shape = state.shape[:3] + kc.shape[-2:]
  k_end = jnp.broadcast_to(k_end, shape)
  v_grp = jnp.broadcast_to(vc[:, :, None], shape[:-1] + vc.shape[-1:])
  if d is not None:
    in_last = (d == d[..., -1:])[..., None]
    k_end = jnp.where(in_last, k_end, 0.0)
    v_grp = jnp.where(in_last, v_grp, 0.0)
    carried = jnp.where((d[..., -1:] == 0)[..., None], carried, 0.0)
  return carried + _tn(k_end, v_grp)


def _grouped_state(s, kh):
  return s.reshape((s.shape[0], kh, s.shape[1] // kh) + s.shape[2:])


def _ungrouped_state(s):
  return s.reshape((s.shape[0], s.shape[1] * s.shape[2]) + s.shape[3:])


def forward(q, k, v, g, s0, chunk, has_decay, resets: bool = False):
  """Returns o [B, N, T, E] and the final state [B, N, F, E].

  resets: g holds -inf at the first token of each document after the first
  (see the module docstring); the state then belongs to the last document.
  """
  b, n, t, _ = q.shape
  kh, e = k.shape[1], v.shape[-1]
  qt, kt, vt = _token_major(q), _token_major(k), _token_major(v)
  cum, doc = _tables(g, kh, chunk, has_decay, resets)

  def run(safe):
    def body(i, carry):
      state, out = carry
      qc = _read_chunk(qt, i, chunk, kh)
      kc = _read_chunk(kt, i, chunk, kh)[:, :, 0]
      vc = _read_chunk(vt, i, chunk, kh)[:, :, 0]
      bc, dc = _chunk_decay(cum, i), _chunk_decay(doc, i)
      scores, qs, r = decayed_scores(qc, kc, bc, safe, d=dc)
      o = (jnp.einsum("bkgcd,bkde->bkgce", scores, vc)
           + _open(_times(jnp.einsum("bkgcf,bkgfe->bkgce", qs, state), r), dc))
      return _next_state(state, kc, vc, bc, dc), _write_chunk(out, o, i, chunk)

    out = jnp.zeros((b, t, n, e), _acc(q, v))
    return lax.fori_loop(0, t // chunk, body, (_grouped_state(s0, kh), out))

  state, out = _with_decay_form(run, cum)
  return _token_major(out), _ungrouped_state(state)


def backward(q, k, v, g, s0, do, ds_final, chunk, has_decay, resets: bool = False):
  """Returns dq [B, N, T, F], dk and dv per query head [B, N, T, F|E], ds0 [B, N, F, E]."""
  b, n, t, f = q.shape
  kh, e = k.shape[1], v.shape[-1]
  nc = t // chunk
  qt, kt, vt, dot = _token_major(q), _token_major(k), _token_major(v), _token_major(do)
  cum, doc = _tables(g, kh, chunk, has_decay, resets)

  def read(i):
    return (_read_chunk(kt, i, chunk, kh)[:, :, 0], _read_chunk(vt, i, chunk, kh)[:, :, 0],
            _read_chunk(dot, i, chunk, kh), _chunk_decay(cum, i), _chunk_decay(doc, i))

  def run_dq(safe):
    def body(i, carry):
      state, dq = carry
      kc, vc, do_c, bc, dc = read(i)
      a, dos, r = decayed_scores(do_c, vc, bc, safe, d=dc)
      dqc = (jnp.einsum("bkgcd,bkdf->bkgcf", a, kc)
             + _open(_times(jnp.einsum("bkgce,bkgfe->bkgcf", dos, state), r), dc))
      return _next_state(state, kc, vc, bc, dc), _write_chunk(dq, dqc, i, chunk)

    dq = jnp.zeros((b, t, n, f), _acc(q, do))
    return lax.fori_loop(0, nc, body, (_grouped_state(s0, kh), dq))[1]

  def run_dkv(safe):
    def body(j, carry):
      ds, dk, dv = carry
      i = nc - 1 - j
      kc, vc, do_c, bc, dc = read(i)
      qc = _read_chunk(qt, i, chunk, kh)
      a_t, _, _ = decayed_scores(do_c, vc, bc, safe, transposed=True, d=dc)
      p_t, qs, r = decayed_scores(qc, kc, bc, safe, transposed=True, d=dc)
      dk_in = jnp.einsum("bkgcr,bkgrf->bkgcf", a_t, qc)
      dv_in = jnp.einsum("bkgcr,bkgre->bkgce", p_t, do_c)
      dk_st = jnp.einsum("bkce,bkgfe->bkgcf", vc, ds)
      dv_st = jnp.einsum("bkcf,bkgfe->bkgce", kc, ds)
      ds_carried = ds
      if bc is not None:
        last = bc[..., -1:]
        w_end = jnp.exp(last - bc)[..., None]
        dk_st, dv_st = w_end * dk_st, w_end * dv_st
        ds_carried = jnp.exp(last)[..., None] * ds
      if dc is not None:
        in_last = (dc == dc[..., -1:])[..., None]
        dk_st = jnp.where(in_last, dk_st, 0.0)
        dv_st = jnp.where(in_last, dv_st, 0.0)
        ds_carried = jnp.where((dc[..., -1:] == 0)[..., None], ds_carried, 0.0)
        qs = jnp.where((dc == 0)[..., None], qs, 0.0)
      dkc, dvc = dk_in + dk_st, dv_in + dv_st
      ds = ds_carried + _times(_tn(qs, do_c), r)
      return ds, _write_chunk(dk, dkc, i, chunk), _write_chunk(dv, dvc, i, chunk)

    init = (_grouped_state(ds_final, kh), jnp.zeros((b, t, n, f), _acc(k, do)),
            jnp.zeros((b, t, n, e), _acc(v, do)))
    return lax.fori_loop(0, nc, body, init)

  dq = _with_decay_form(run_dq, cum)
  ds0, dk, dv = _with_decay_form(run_dkv, cum)
  return _token_major(dq), _token_major(dk), _token_major(dv), _ungrouped_state(ds0)
