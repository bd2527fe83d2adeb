"""Public linear attention: chunked, recurrent and quadratic forms.

Lightning Attention-2 (arXiv:2401.04658), TNL (arXiv:2405.17381) and BASED
(arXiv:2402.18668).

Causality is by positions, bottom-right aligned: query i (position i + S - T)
sees key j iff j <= i + S - T, so the four CAB patterns (non-causal/causal x
self/cross) all run through one causal-self engine: queries (or keys) are
padded at the front with zeros until both sides align. Packed documents
(segment_ids) clear the state at each document start (a log-decay of -inf
there); non-causal documents add the same scan over the reversed sequence.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import dispatch
from attnjax.core import placement
from attnjax.core import precision
from attnjax.core.validation import (as_arrays, check_positions, check_positive_int, check_qkv,
                                     check_segment_ids)
from attnjax.linear import engine, reference, xla_chunked
from attnjax.linear.decay import resolve_decay
from attnjax.linear.feature_maps import resolve_feature_map



def _compute_dtype(x, implementation: str = "xla"):
  """Accumulation dtype: float32 for bfloat16/float16/float32 inputs, float64 for
  float64 ones (under ``jax_enable_x64``) except on the Pallas kernels, which
  compute in float32 (and warn)."""
  if implementation == "pallas":
    return jnp.dtype(jnp.float32)
  return precision.accumulation_dtype(x)


def _apply_feature_map(phi, x, name, dtype=jnp.float32):
  out = phi(x.astype(dtype))
  if out.ndim != x.ndim or out.shape[:-1] != x.shape[:-1]:
    raise ValueError(
        f"feature_map applied to {name} of shape {x.shape} returned shape {out.shape}; "
        "expected the same leading dimensions and a feature axis last.")
  return out.astype(dtype)


def _check_state(state, shape, name="initial_state", dtype=jnp.float32):
  if state is None:
    return None
  if tuple(np.shape(state)) != shape:
    raise ValueError(
        f"{name} must have shape [B, N, F, E]={shape} (E = Hv + 1 when normalize=True, "
        f"the last column holding the normaliser) or be None (zero state), got "
        f"{tuple(np.shape(state))}.")
  return jnp.asarray(state, dtype)


def _drop_padded_keys(key_mask, kf, v, batch, seq):
  """Zeroes the features [B, S, K, F] and values [B, S, K, Hv] of padded keys."""
  m = jnp.asarray(key_mask)
  if m.shape != (batch, seq) or m.dtype != jnp.bool_:
    raise ValueError(f"key_mask must be a boolean array [B, S]=({batch}, {seq}) (True = a "
                     f"real key), got {m.dtype} {m.shape}.")
  m = m[:, :, None, None]
  return jnp.where(m, kf, jnp.zeros((), kf.dtype)), jnp.where(m, v, jnp.zeros((), v.dtype))


#: The xla engine backend with document starts marked in the log-decays.
engine.BACKENDS.setdefault("xla_documents", engine.Backend(
    functools.partial(xla_chunked.forward, resets=True),
    functools.partial(xla_chunked.backward, resets=True)))


def _chunked_supports(call: dispatch.Call, explicit: bool):
  del explicit
  if call["positions"]:
    return call["positions"]
  if call["segment_pair"]:
    return ("segment ids given as a (q, kv) pair match documents by id across two "
            "sequences; the chunked path takes one [B, T] array (packed documents)")
  return None


def _pallas_supports(call: dispatch.Call, explicit: bool):
  if not explicit and not call["kernel_default"]:
    return ("the linear kernels are opt-in (implementation='pallas') until they have run "
            "on hardware")
  if call["segments"]:
    return ("the linear kernels do not take segment ids (packed documents); "
            "implementation='xla' does")
  return _chunked_supports(call, explicit)


#: The linear op's backends, fastest first.
LINEAR_BACKENDS = (dispatch.Backend("pallas", _pallas_supports),
                   dispatch.Backend("xla", _chunked_supports))


def _pick_implementation(implementation, query, key, value, positions: Optional[str] = None,
                         segment_ids=None):
  """The backend of a linear_attention call (``attnjax.core.dispatch``)."""
  facts = dict(positions=positions, segments=segment_ids is not None,
               segment_pair=isinstance(segment_ids, (tuple, list)),
               kernel_default=placement.default_kernel_implementation(
                   "linear", query, key, value) == "pallas")
  call = dispatch.Call("linear", placement.target_platform(query, key, value),
                       placement.compile_target(query, key, value), facts)
  return dispatch.resolve(call, LINEAR_BACKENDS, implementation).backend


def scan_order_violations(q, k, same, same_distances: bool, xp=np):
  """bool [R, T]: where positions q, k [R, T] break the chunked scan's order.

  The scan sees key j from query i iff j <= i within a document, which equals
  causality by positions when ``k_pos[i] <= q_pos[i] < k_pos[i + 1]`` for
  consecutive tokens of one document (``same`` [R, T - 1]: token i + 1 is in
  token i's document); with ``same_distances`` (decay counts i - j) when
  ``q_pos == k_pos`` and ``k_pos[i + 1] == k_pos[i] + 1`` there. ``xp``: np or jnp.
  """
  if same_distances:
    tok, pair = q == k, ~same | (k[:, 1:] == k[:, :-1] + 1)
  else:
    tok, pair = k <= q, ~same | (q[:, :-1] < k[:, 1:])
  return ~tok | xp.concatenate([~pair, xp.zeros((q.shape[0], 1), bool)], axis=1)


def _positions_out_of_order(q_positions, k_positions, d, segment_ids, *, causal: bool,
                            has_decay: bool, has_s0: bool, return_state: bool):
  """None when custom positions give the chunked path's result, else why not.

  The chunked path sees key j from query i iff j <= i in the same document
  and decays by i - j. Concrete [T] positions (self attention) keep that when
  k_pos[i] <= q_pos[i] < k_pos[i + 1] for consecutive tokens of one
  document, and with decay when q_pos == k_pos and k_pos[i + 1] == k_pos[i] + 1
  there (e.g. arange(T) + offset, or positions restarting at each packed
  document); the decayed initial state also needs q_pos[0] == 0, a decayed
  returned state k_pos[-1] == max(k_pos). Non-causal without decay ignores
  positions. Traced positions (or traced segment ids, when the positions
  only hold document by document) cannot be checked.
  """
  if q_positions is None and k_positions is None:
    return None
  if not causal and not has_decay:
    return None
  why = ("the chunked paths need positions whose causal order is the order along T "
         "(k_pos[i] <= q_pos[i] < k_pos[i + 1] in each document; with decay q_pos == k_pos, "
         "consecutive in each document), checked on concrete [T] positions with T == S")
  if d.T != d.S or any(isinstance(p, jax.core.Tracer) for p in (q_positions, k_positions)):
    return why
  q_pos, k_pos = (np.arange(d.T) if p is None else np.asarray(p)
                  for p in (q_positions, k_positions))
  if q_pos.shape != (d.T,) or k_pos.shape != (d.T,) or not all(
      np.issubdtype(p.dtype, np.integer) for p in (q_pos, k_pos)):
    return why
  same = np.ones((1, d.T - 1), bool)
  if segment_ids is not None and not isinstance(segment_ids, (tuple, list)) \
      and not isinstance(segment_ids, jax.core.Tracer):
    seg = np.asarray(segment_ids)
    same = seg[:, 1:] == seg[:, :-1]
  r = same.shape[0]
  q2, k2 = np.broadcast_to(q_pos, (r, d.T)), np.broadcast_to(k_pos, (r, d.T))
  ok = not scan_order_violations(q2, k2, same, has_decay).any()
  if has_decay:
    ok = ok and (not has_s0 or q_pos[0] == 0) and (not return_state or k_pos[-1] == k_pos.max())
  return None if ok else why


def _to_heads(x):
  return jnp.swapaxes(x, 1, 2)


def _causal_chunked(qf, kf, v, slopes, s0, chunk, backend, starts=None):
  """Causal (self or bottom-right cross) chunked form on BTNF inputs; returns BTNE, state.

  starts: optional bool [B, T] (T == S), True at the first token of every
  document but the first: the state is cleared there (lambda = 0).
  """
  b, t, n, _ = qf.shape
  s = kf.shape[1]
  front_q, front_k = max(s - t, 0), max(t - s, 0)
  length = max(t, s)
  total = -(-length // chunk) * chunk
  pad = lambda x, front: jnp.pad(x, ((0, 0), (front, total - length), (0, 0), (0, 0)))
  q, k, vv = _to_heads(pad(qf, front_q)), _to_heads(pad(kf, front_k)), _to_heads(pad(v, front_k))
  has_decay = slopes is not None
  if has_decay:
    real = (jnp.arange(total) >= front_k) & (jnp.arange(total) < length)
    g = -slopes[None, :, None].astype(qf.dtype) * real[None, None, :].astype(qf.dtype)
    g = jnp.broadcast_to(g, (b, n, total))
  else:
    g = jnp.zeros((b, n, total), qf.dtype)
  if starts is not None:
    marks = jnp.pad(starts, ((0, 0), (0, total - length)))[:, None, :]
    g = jnp.where(marks, jnp.asarray(-jnp.inf, g.dtype), g)
    backend = backend + "_documents"
  o, state = engine.causal_core(q, k, vv, g, s0, chunk, backend, has_decay)
  return _to_heads(o)[:, front_q:front_q + t], state


def _document_starts(segment_ids):
  """bool [B, T]: True where the id differs from the previous token's."""
  seg = jnp.asarray(segment_ids)
  return jnp.pad(seg[:, 1:] != seg[:, :-1], ((0, 0), (1, 0)))


def _noncausal_documents(qf, kf, v, s0, chunk, backend, segment_ids):
  """Every key of the query's document: the causal inclusive pass plus the same pass
  on the reversed sequence, less the diagonal counted twice. BTNF in, BTNE out."""
  flip = lambda x: jnp.flip(x, 1)
  o, state = _causal_chunked(qf, kf, v, None, s0, chunk, backend,
                             _document_starts(segment_ids))
  o_rev, _ = _causal_chunked(flip(qf), flip(kf), flip(v), None, jnp.zeros_like(s0), chunk,
                             backend, _document_starts(flip(segment_ids)))
  b, t, n, f = qf.shape
  kh = kf.shape[2]
  qk = jnp.einsum("btkgf,btkf->btkg", qf.reshape(b, t, kh, n // kh, f), kf)
  diag = (qk[..., None] * v[:, :, :, None]).reshape(o.shape)
  return o + flip(o_rev) - diag, state


def linear_attention(query, key, value, *, feature_map="identity", causal: bool = True,
                     decay=None, normalize: bool = False, eps: float = 1e-6,
                     chunk_size: int = 64, initial_state=None, return_state: bool = False,
                     implementation: Optional[str] = None, q_positions=None,
                     k_positions=None, segment_ids=None, key_mask=None):
  """Kernelised linear attention o_i = sum_{j visible} lambda^(i-j) phi(q_i).phi(k_j) v_j.

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv]; N % K == 0.
    feature_map: "identity", "elu+1", "relu", "taylor" (BASED) or a callable
      [..., H] -> [..., F] applied to queries and keys.
    causal: key j is visible to query i iff j <= i + S - T (bottom-right aligned).
    decay: None, "tnl"/"alibi", a scalar or [N] slopes s >= 0 (lambda = exp(-s));
      only with causal=True.
    normalize: divide by phi(q_i) . sum_j lambda^(i-j) phi(k_j) + eps.
    chunk_size: chunk length C of the intra-chunk quadratic / inter-chunk state
      split; T need not be a multiple (the engine pads).
    initial_state: [B, N, F, E] state of keys before position 0
      (E = Hv, or Hv + 1 with normalize=True, the last column the normaliser).
    return_state: also return the state after the last key (same shape).
    implementation: "reference" (dense oracle), "xla" (chunked loop over the chunks),
      "pallas" (kernel; interpret mode on CPU) or None: "xla" on every platform
      (the kernels compile for every target but have not run on hardware, so they
      are opt-in); ``attnjax.explain`` shows the choice.
    segment_ids: packed documents, an int [B, T] array (self attention,
      T == S): each document is a run of equal ids along T, and a change of
      id starts a new one (so an id that comes back later is a new
      document); a query sees only keys of its own document (with causal,
      the earlier ones). The initial state belongs to the first document and
      the returned state is the last document's. Runs on the chunked path
      (the state is cleared at each document start; non-causal adds the
      same pass over the reversed sequence). A pair (q_segment_ids [B, T],
      kv_segment_ids [B, S]) matches equal ids instead and runs on the
      dense reference only.
    q_positions, k_positions: [T] / [S] positions (causality and decay
      distances). The chunked paths take concrete positions of self
      attention whose causal order is the order along T inside each
      document (e.g. arange(T) + offset, or positions restarting at each
      packed document; with decay, equal for queries and keys and
      consecutive in each document); others (and traced ones) run on the
      dense reference, which warns with implementation=None.
    key_mask: optional boolean [B, S] (True = a real key; padded batches): a
      padded key's features and value are zeroed, so it adds nothing to the
      state or the normaliser on every path. Decay still counts positions: a
      padded position is a step of time (right or left padding therefore
      leaves the real tokens' outputs as without padding; a hole inside a
      sequence decays the state across it).

  Returns:
    out [B, T, N, Hv] in query.dtype, plus the final state if return_state.
    Accumulation (and the state) is float32 for bfloat16/float16/float32
    inputs and float64 for float64 inputs under ``jax_enable_x64`` on the
    reference and xla paths; the pallas path computes float64 inputs in
    float32 and warns.
  """
  query, key, value = as_arrays(query, key, value)
  d = check_qkv(query, key, value)
  check_positive_int("chunk_size", chunk_size)
  segs = check_segment_ids(segment_ids, d)
  positions = _positions_out_of_order(
      q_positions, k_positions, d, segment_ids, causal=causal, has_decay=decay is not None,
      has_s0=initial_state is not None, return_state=return_state)
  impl = _pick_implementation(implementation, query, key, value, positions, segment_ids)
  phi = resolve_feature_map(feature_map)
  slopes = resolve_decay(decay, d.N)
  if slopes is not None and not causal:
    raise NotImplementedError(
        "decay needs causal=True: a non-causal decayed form has no single linear state.")
  dt = _compute_dtype(query, impl)
  if impl == "pallas":
    precision.warn_float32_accumulation("linear_attention(implementation='pallas')", query)
  qf = _apply_feature_map(phi, query, "query", dt)
  kf = _apply_feature_map(phi, key, "key", dt)
  f = qf.shape[-1]
  if kf.shape[-1] != f:
    raise ValueError(f"feature_map gave {f} features for query but {kf.shape[-1]} for key.")
  v = value.astype(dt)
  if key_mask is not None:
    kf, v = _drop_padded_keys(key_mask, kf, v, d.B, d.S)
  if normalize:
    v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
  e = v.shape[-1]
  s0 = _check_state(initial_state, (d.B, d.N, f, e), dtype=dt)
  if impl == "reference":
    q_pos, k_pos = check_positions(q_positions, k_positions, d)
    if q_pos.ndim != 1 or k_pos.ndim != 1:
      raise NotImplementedError("linear attention takes positions of shape [T] / [S] only.")
    if segs is not None and not isinstance(segment_ids, (tuple, list)):
      segs = segs[0]
    o, state = reference.dense_linear_attention(
        qf, kf, v, slopes=slopes, causal=causal, s0=s0, q_positions=q_positions,
        k_positions=k_positions, segment_ids=segs)
  else:
    backend = impl
    if s0 is None:
      s0 = jnp.zeros((d.B, d.N, f, e), dt)
    if segs is not None and causal:
      o, state = _causal_chunked(qf, kf, v, slopes, s0, chunk_size, backend,
                                 _document_starts(segs[0]))
    elif segs is not None:
      o, state = _noncausal_documents(qf, kf, v, s0, chunk_size, backend, segs[0])
    elif causal:
      o, state = _causal_chunked(qf, kf, v, slopes, s0, chunk_size, backend)
    else:
      o, state = engine.noncausal_core(_to_heads(qf), _to_heads(kf), _to_heads(v), s0)
      o = _to_heads(o)
  if normalize:
    o = o[..., :-1] / (o[..., -1:] + eps)
  out = o.astype(query.dtype)
  return (out, state.astype(dt)) if return_state else out


def init_state(batch: int, num_heads: int, features: int, value_dim: int, *,
               normalize: bool = False) -> jax.Array:
  """Zero decoding state [B, N, F, Hv (+1 if normalize)] float32."""
  return jnp.zeros((batch, num_heads, features, value_dim + int(normalize)), jnp.float32)


def linear_attention_step(state, q_t, k_t, v_t, *, feature_map="identity", decay=None,
                          normalize: bool = False, eps: float = 1e-6):
  """One decoding step with a constant-size state.

  Args:
    state: [B, N, F, E] (E = Hv, or Hv + 1 with normalize=True; float32, or
      float64 for float64 inputs), or
      None for the zero state (no key seen yet), as ``initial_state=None``
      means in :func:`linear_attention`.
    q_t: [B, N, H]; k_t: [B, K, H]; v_t: [B, K, Hv] (one token).
  Returns:
    (o_t [B, N, Hv] in q_t.dtype, new state): the same as the last row of
    `linear_attention(..., causal=True, initial_state=state, return_state=True)`.
  """
  for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
    if getattr(x, "ndim", None) != 3:
      raise ValueError(f"{name} must have rank 3 [B, heads, dim], got shape {getattr(x, 'shape', None)}.")
  check_qkv(q_t[:, None], k_t[:, None], v_t[:, None])
  b, n, _ = q_t.shape
  phi = resolve_feature_map(feature_map)
  slopes = resolve_decay(decay, n)
  dt = _compute_dtype(q_t)
  qf = _apply_feature_map(phi, q_t, "q_t", dt)
  kf = _apply_feature_map(phi, k_t, "k_t", dt)
  v = v_t.astype(dt)
  if normalize:
    v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
  shape = (b, n, qf.shape[-1], v.shape[-1])
  state = _check_state(state, shape, "state", dt)
  if state is None:
    state = jnp.zeros(shape, dt)
  o, state = reference.recurrent_step(state, qf, kf, v, slopes=slopes)
  if normalize:
    o = o[..., :-1] / (o[..., -1:] + eps)
  return o.astype(q_t.dtype), state
