"""The block-sparse flash engine in pure JAX: online-softmax scans and a custom VJP.

``attend(cfg, kinds, q_r, k_r, v_r, bias_r, score, aux, scheds, row_count)`` runs one scan per
schedule (a schedule of *partial* items applies the element mask, one of
*full* items does not), each step gathering ``lanes`` work items per layout
head (a q-block and a group of up to ``plan.TILE_KEYS / bk`` k-blocks of its
row, side by side in one tile) and updating float32 accumulators (running
max, sum, weighted values) held per slot (see ``schedule``). The backward pass is a
recompute-based flash backward over the same items: ``dq`` is scatter-added
per q-block and ``dk``/``dv`` per k-block (into the KV head of each layout
head), so it needs neither the dense [T, S] probabilities nor per-step
residuals: memory is linear in the sequence length. Shapes: see ``tiles``.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp

from attnjax.block_sparse import tiles as Tl
from attnjax.core import flash as F


class Sched(NamedTuple):
  """One scan's items (jax arrays): qb, slot, valid [Bi, Hl, lanes, steps]; kb, kval
  [Bi, Hl, lanes, steps, g] (see ``schedule.Schedule``)."""
  qb: jax.Array
  kb: jax.Array
  slot: jax.Array
  valid: jax.Array
  kval: jax.Array


class DynSched(NamedTuple):
  """Items of a schedule compacted at run time (``padding``): qb, slot, valid [1, Hl, n];
  kb, kval [1, Hl, n, g]. Item i runs in lane i // steps at step i % steps; ``steps``
  is a traced int32 scalar (the loop's trip count), ``lane`` the lanes' ids [lanes]."""
  qb: jax.Array
  kb: jax.Array
  slot: jax.Array
  valid: jax.Array
  kval: jax.Array
  steps: jax.Array
  lane: jax.Array


def _steps(s: Sched):
  """Per-step slices: the steps axis (3) moved to the front."""
  return tuple(jnp.moveaxis(jnp.asarray(x), 3, 0) for x in s)


def _loop(step, carry, sched):
  """Runs ``step(carry, item slices)`` over a schedule's steps: a scan over a static
  ``Sched``, a loop with a run-time trip count over a ``DynSched``."""
  if not isinstance(sched, DynSched):
    carry, _ = jax.lax.scan(step, carry, _steps(sched))
    return carry

  def body(i, c):
    idx = sched.lane * sched.steps + i
    return step(c, tuple(x[:, :, idx] for x in sched[:5]))[0]

  return jax.lax.fori_loop(0, sched.steps, body, carry)


def put_heads(x_r, heads, idx, val, add=False):
  """x_r[:, heads, idx] = val (or += val); idx [Bi, Hl, L, ...], val [B, Hl, L, ...]."""
  h = jnp.asarray(list(heads), jnp.int32).reshape((-1,) + (1,) * (idx.ndim - 2))
  if idx.shape[0] == 1:
    ref = x_r.at[:, h, idx[0]]
  else:
    b = jnp.arange(x_r.shape[0]).reshape((-1,) + (1,) * (idx.ndim - 1))
    ref = x_r.at[b, h[None], idx]
  return ref.add(val) if add else ref.set(val)


def put_keys(x_r, heads, kb, val):
  """Scatter-adds key tiles val [B, Hl, L, g*bk, D] into x_r [B, K, nk, bk, D] at kb [Bi, Hl, L, g]."""
  val = val.reshape(val.shape[:3] + kb.shape[-1:] + x_r.shape[-2:])
  return put_heads(x_r, heads, kb, val, add=True)


@jax.tree_util.register_pytree_node_class
class StaticScore:
  """A score variant that is not a pytree, carried as static data (no leaves)."""

  def __init__(self, score):
    self.score = score

  def tree_flatten(self):
    return (), self.score

  @classmethod
  def tree_unflatten(cls, aux, children):
    del children
    return cls(aux)

  def __getattr__(self, name):
    return getattr(self.score, name)


def as_pytree(score):
  """The score itself when it is a pytree (learned arrays get gradients), else wrapped."""
  leaves = jax.tree_util.tree_leaves(score)
  if len(leaves) == 1 and leaves[0] is score:
    return StaticScore(score)
  return score


def _norm(cfg):
  return cfg.norm


def _sink(cfg, score):
  """Sink logits broadcast to [N] float32, or None."""
  sink = score.sink_logits()
  if sink is None:
    return None
  return jnp.broadcast_to(jnp.asarray(sink, jnp.float32), (cfg.N,))


# ---------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------
def _fwd_scan(cfg: Tl.Cfg, kind, sched: Sched, q_r, k_r, v_r, bias_r, score, aux,
              row_count, carry):
  partial, _, ragged = kind
  heads = range(cfg.Hl)
  norm = _norm(cfg)

  def step(carry, x):
    acc, m, l = carry
    qb, kb, slot, _, kval = x
    qblk = Tl.take_queries(q_r, qb, cfg.R)
    kblk = Tl.take_keys(k_r, cfg.kvh, kb)
    vblk = Tl.take_keys(v_r, cfg.kvh, kb)
    t = Tl.raw_logits(cfg, qblk, kblk, bias_r, qb, kb)
    t = Tl.transform(cfg, aux, score, t, qb, kb, row_count)
    vis = Tl.visibility(cfg, aux, qb, kb, kval if ragged else None, partial)
    keep = Tl.dropout_keep(cfg, aux, qb, kb)
    shape = t.shape[:3] + (cfg.R * cfg.bq, t.shape[-1])
    l_old = Tl.take_heads(l, heads, slot)
    acc_old = Tl.take_heads(acc, heads, slot)
    if norm == "softmax":
      if vis is not None:
        t = jnp.where(vis, t, F.NEG_INF)
      m_new, l_new, acc_new = F.online_update(Tl.take_heads(m, heads, slot), l_old, acc_old,
                                              t.reshape(shape), vblk, keep)
      m = put_heads(m, heads, slot, m_new)
    else:
      w = score.weights(t).astype(jnp.float32)
      if vis is not None:
        w = jnp.where(vis, w, 0.0)
      w = w.reshape(shape)
      l_new = l_old + w.sum(-1, keepdims=True)
      acc_new = acc_old + F.dot_nn(F.dropped_probs(w, keep).astype(vblk.dtype), vblk)
    acc = put_heads(acc, heads, slot, acc_new)
    l = put_heads(l, heads, slot, l_new)
    return (acc, m, l), None

  return _loop(step, carry, sched)


def _finalize(cfg: Tl.Cfg, groups: int, acc, m, l, sink):
  """Merges slot groups -> out [B, Hl, nq, Rq, Hv] f32 and lse [B, Hl, nq, Rq]."""
  B, Hl, nq, Rq = cfg.B, cfg.Hl, cfg.nq, cfg.R * cfg.bq
  if groups == 0:   # no visited block: every row is empty
    m, l, acc = F.init_state((B, Hl, nq, Rq), cfg.Hv)
    parts = [(m, l, acc)]
  else:
    parts = [(m[:, :, g * nq:(g + 1) * nq], l[:, :, g * nq:(g + 1) * nq],
              acc[:, :, g * nq:(g + 1) * nq]) for g in range(groups)]
  if _norm(cfg) == "softmax":
    if sink is not None:
      sink = jnp.broadcast_to(sink.reshape(1, Hl, 1, cfg.R, 1),
                              (1, Hl, 1, cfg.R, cfg.bq)).reshape(1, Hl, 1, Rq, 1)
    out, lse = F.finalize(*F.merge(parts), sink=sink)
    return out, lse[..., 0]
  L, O = parts[0][1], parts[0][2]
  for _, pl, pacc in parts[1:]:
    L, O = L + pl, O + pacc
  # "sum": divided by the row sum (a NaN weight propagates); "none": unnormalised
  out, lse = F.finalize(jnp.zeros_like(L), L, O)
  return (out if _norm(cfg) == "sum" else O), lse[..., 0]


def _forward(cfg, kinds, q_r, k_r, v_r, bias_r, score, aux, scheds, row_count):
  B, Hl, nq, Rq = cfg.B, cfg.Hl, cfg.nq, cfg.R * cfg.bq
  groups = sum(kind[1] for kind in kinds)
  slots = groups * nq + 1
  m, l, acc = F.init_state((B, Hl, slots, Rq), cfg.Hv)
  offset = 0
  for kind, s in zip(kinds, scheds):
    s = s._replace(slot=jnp.where(s.valid, s.slot + offset * nq, slots - 1))
    acc, m, l = _fwd_scan(cfg, kind, s, q_r, k_r, v_r, bias_r, score, aux, row_count,
                          (acc, m, l))
    offset += kind[1]
  return _finalize(cfg, groups, acc, m, l, _sink(cfg, score))


# ---------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------
def _bwd_scan(cfg: Tl.Cfg, kind, sched: Sched, q_r, k_r, v_r, bias_r, score, aux,
              row_count, lse_r, delta_r, do_r, carry):
  partial, _, ragged = kind
  heads = range(cfg.Hl)
  norm = _norm(cfg)
  Rq = cfg.R * cfg.bq
  plain = _plain(cfg, bias_r)

  def step(carry, x):
    dq, dk, dv, dbias, dscore = carry
    qb, kb, _, valid, kval = x
    qblk = Tl.take_queries(q_r, qb, cfg.R)
    kblk = Tl.take_keys(k_r, cfg.kvh, kb)
    vblk = Tl.take_keys(v_r, cfg.kvh, kb)
    doblk = Tl.take_heads(do_r, heads, qb)
    lse = Tl.take_heads(lse_r, heads, qb)
    delta = Tl.take_heads(delta_r, heads, qb)
    keep = Tl.dropout_keep(cfg, aux, qb, kb, key_major=plain)
    if plain:
      vis = Tl.visibility(cfg, aux, qb, kb, kval if ragged else None, partial)
      dq_blk, dk_blk, dv_blk = _plain_item_grads(cfg, qblk, kblk, vblk, doblk, lse, delta, vis,
                                                 keep)
      ok = valid[..., None, None]
      dq = put_heads(dq, heads, qb, jnp.where(ok, dq_blk, 0.0), add=True)
      dk = put_keys(dk, cfg.kvh, kb, jnp.where(ok, dk_blk, 0.0))
      dv = put_keys(dv, cfg.kvh, kb, jnp.where(ok, dv_blk, 0.0))
      return (dq, dk, dv, dbias, dscore), None
    s = Tl.raw_logits(cfg, qblk, kblk, bias_r, qb, kb)
    if cfg.plain_softmax:
      t, t_vjp = s, None
    else:
      t, t_vjp = jax.vjp(lambda sc, x_: Tl.transform(cfg, aux, sc, x_, qb, kb, row_count),
                         score, s)
    vis = Tl.visibility(cfg, aux, qb, kb, kval if ragged else None, partial)
    W = t.shape[-1]
    shape = t.shape[:3] + (Rq, W)
    if vis is not None and norm == "softmax":
      t = jnp.where(vis, t, F.NEG_INF)
    t = t.reshape(shape)
    if vis is not None:
      vis = jnp.broadcast_to(vis, t.shape[:3] + (cfg.R, cfg.bq, W)).reshape(shape)
    dp = F.dot_nt(doblk, vblk)
    if norm == "softmax":
      probs = F.probs_from_lse(t, lse[..., None], vis)
      ds = F.logits_grad(probs, dp, delta[..., None], keep)
    else:
      w, w_vjp = jax.vjp(lambda sc, x_: sc.weights(x_).astype(jnp.float32), score, t)
      if vis is not None:
        w = jnp.where(vis, w, 0.0)
      if norm == "sum":
        # 1 / the sum (exp(-lse)), 0 for empty rows; a NaN lse keeps its gradients NaN
        fin = lse != F.NEG_INF
        inv = jnp.where(fin, jnp.exp(-jnp.where(fin, lse, 0.0)), 0.0)[..., None]
        probs = w * inv
        dw = F.logits_grad(inv, dp, delta[..., None], keep)
      else:
        probs = w
        dw = F.dropped_probs(dp, keep)
      if vis is not None:
        dw = jnp.where(vis, dw, 0.0)
      dsc_w, ds = w_vjp(dw)
      dscore = _tree_add(dscore, dsc_w)
      if vis is not None:
        ds = jnp.where(vis, ds, 0.0)
    if t_vjp is not None:
      dsc_t, ds = t_vjp(ds.reshape(s.shape))
      dscore = _tree_add(dscore, dsc_t)
    ds6 = ds.reshape(s.shape)
    ds = ds6.reshape(shape)
    ok = valid[..., None, None]
    dv_blk = F.dot_tn(F.dropped_probs(probs, keep).astype(doblk.dtype), doblk)
    dsc = (ds * jnp.float32(cfg.scale)).astype(qblk.dtype)
    dq_blk = F.dot_nn(dsc, kblk)
    dk_blk = F.dot_tn(dsc, qblk)
    dq = put_heads(dq, heads, qb, jnp.where(ok, dq_blk, 0.0), add=True)
    dk = put_keys(dk, cfg.kvh, kb, jnp.where(ok, dk_blk, 0.0))
    dv = put_keys(dv, cfg.kvh, kb, jnp.where(ok, dv_blk, 0.0))
    if dbias is not None:
      dbias = _add_dbias(cfg, dbias, jnp.where(valid[..., None, None, None], ds6, 0.0), qb, kb)
    return (dq, dk, dv, dbias, dscore), None

  return _loop(step, carry, sched)


def _plain(cfg: Tl.Cfg, bias_r) -> bool:
  """Plain softmax without bias: the backward runs key-major (``_plain_item_grads``)."""
  return cfg.plain_softmax and bias_r is None


def _plain_item_grads(cfg: Tl.Cfg, qblk, kblk, vblk, doblk, lse, delta, vis, keep):
  """dq, dk, dv tiles of plain-softmax items, computed with key-major probabilities.

  The logits are formed transposed, [B, Hl, L, W, Rq], so that dS^T Q and
  P^T dO are plain matmuls, and dq is returned transposed, dq^T = K^T dS^T
  [B, Hl, L, H, Rq] (transposing the [W, H] key tile is much cheaper than
  transposing dS). The CPU backend's fast matmul path takes operands
  contracted on their last (lhs) / first (rhs) axis only; a transposed-operand
  product falls back to a path 2-3x slower. ``keep``: the dropout multiplier,
  key-major [B, Hl, L, W, Rq], or None.
  """
  Rq, W = qblk.shape[-2], kblk.shape[-2]
  st = F.dot_nt(kblk, qblk) * jnp.float32(cfg.scale)
  if vis is not None:
    vis = jnp.broadcast_to(vis, vis.shape[:3] + (cfg.R, cfg.bq, W)).reshape(
        vis.shape[:3] + (Rq, W))
    vis = jnp.swapaxes(vis, 3, 4)
  pt = F.probs_from_lse(st, lse[..., None, :], vis)
  dpt = F.dot_nt(vblk, doblk)
  dst = F.logits_grad(pt, dpt, delta[..., None, :], keep) * jnp.float32(cfg.scale)
  dv_blk = F.dot_nn(F.dropped_probs(pt, keep).astype(doblk.dtype), doblk)
  dst = dst.astype(qblk.dtype)
  dk_blk = F.dot_nn(dst, qblk)
  dqt_blk = F.dot_nn(jnp.swapaxes(kblk, 3, 4), dst)
  return dqt_blk, dk_blk, dv_blk


def _tree_add(acc, upd):
  return jax.tree_util.tree_map(lambda a, b: a + jnp.asarray(b, jnp.float32), acc, upd)


def _add_dbias(cfg, dbias, ds6, qb, kb):
  """Scatter-adds ds [B, Hl, L, R, bq, g*bk] into the regrouped bias gradient."""
  shape = cfg.bias_shape
  b, h, qi, ki = Tl.pair_index(shape, cfg, qb, kb)
  Bp, Np, Tp, Sp = shape
  idx_batch = max(Bp, qb.shape[0])
  upd = ds6
  if idx_batch == 1 and upd.shape[0] > 1:
    upd = upd.sum(0, keepdims=True)
  if Np == 1:
    upd = upd.sum(3, keepdims=True)
  if Tp == 1:
    upd = upd.sum(4, keepdims=True)
  if Sp == 1:
    upd = upd.sum(5, keepdims=True)[..., None, :]        # [., ., L, R', bq', 1, 1]
  else:
    upd = upd.reshape(upd.shape[:5] + (kb.shape[-1], cfg.bk))
  upd = jnp.moveaxis(upd, 5, 3)                           # [., ., L, g', R', bq', bk']
  return dbias.at[b, h, qi, ki].add(upd)


def _backward(cfg, kinds, q_r, k_r, v_r, bias_r, score, aux, scheds, row_count, out, lse,
              dout, dlse):
  f32 = jnp.float32
  delta = F.delta(out, dout, dlse if _norm(cfg) != "none" else None)   # [B, Hl, nq, Rq]
  B, Hl, nq, nk, R, bq, bk, K = cfg.B, cfg.Hl, cfg.nq, cfg.nk, cfg.R, cfg.bq, cfg.bk, cfg.K
  plain = _plain(cfg, bias_r)
  # plain-softmax items accumulate dq transposed, [B, Hl, nq, H, R*bq]
  dq = jnp.zeros((B, Hl, nq) + ((cfg.H, R * bq) if plain else (R * bq, cfg.H)), f32)
  dk = jnp.zeros((B, K, nk, bk, cfg.H), f32)
  dv = jnp.zeros((B, K, nk, bk, cfg.Hv), f32)
  dbias = None if bias_r is None else jnp.zeros(bias_r.shape, f32)
  dscore = jax.tree_util.tree_map(lambda x: jnp.zeros(jnp.shape(x), f32), score)
  carry = (dq, dk, dv, dbias, dscore)
  do_r = dout.astype(q_r.dtype)
  for kind, s in zip(kinds, scheds):
    carry = _bwd_scan(cfg, kind, s, q_r, k_r, v_r, bias_r, score, aux, row_count, lse,
                      delta, do_r, carry)
  dq, dk, dv, dbias, dscore = carry
  sink = _sink(cfg, score)
  if sink is not None:
    sk = sink.reshape(1, cfg.Hl, 1, cfg.R, 1)
    shp = (cfg.B, cfg.Hl, cfg.nq, cfg.R, cfg.bq)
    lse5 = lse.reshape(shp)
    p_sink = F.probs_from_lse(sk, lse5)
    dsink = -(p_sink * delta.reshape(shp)).sum((0, 2, 4)).reshape(cfg.N)
    _, sink_vjp = jax.vjp(lambda sc: _sink(cfg, sc), score)
    dscore = _tree_add(dscore, sink_vjp(dsink)[0])
  dscore = jax.tree_util.tree_map(
      lambda g, x: g.astype(jnp.result_type(x)) if jnp.issubdtype(jnp.result_type(x),
                                                                 jnp.floating) else g,
      dscore, score)
  # back to the inputs' token layout
  if plain:
    dq = jnp.swapaxes(dq, 3, 4)
  dq = dq.reshape(B, Hl, nq, R, bq, cfg.H).transpose(0, 2, 4, 1, 3, 5).reshape(
      B, nq, bq, Hl, R * cfg.H)
  dk = dk.transpose(0, 2, 3, 1, 4)
  dv = dv.transpose(0, 2, 3, 1, 4)
  return (dq.astype(q_r.dtype), dk.astype(k_r.dtype), dv.astype(v_r.dtype),
          None if dbias is None else dbias.astype(bias_r.dtype), dscore)


# ---------------------------------------------------------------------------
# custom VJP
# ---------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def attend(cfg: Tl.Cfg, kinds: Tuple[Tuple[bool, int], ...], q_r, k_r, v_r, bias_r, score,
           aux, scheds, row_count):
  """Block-sparse attention on regrouped inputs.

  Args:
    cfg: static ``tiles.Cfg``.
    kinds: per schedule, (partial, number of slot groups, ragged groups).
    q_r [B, nq, bq, Hl, R*H], k_r [B, nk, bk, K, H], v_r [B, nk, bk, K, Hv]:
      the token-layout inputs reshaped (see ``tiles``).
    bias_r: regrouped bias or None. score: the score variant (a pytree: its
      learned arrays, e.g. sink logits or temperatures, get gradients).
    aux: ``tiles.Aux``; scheds: tuple of ``Sched``; row_count: visible keys
      per row [B, Hl, nq, R*bq] float32 (scores that need it) or None.

  Returns:
    out [B, Hl, nq, R*bq, Hv] float32 and lse [B, Hl, nq, R*bq] float32.
  """
  return _forward(cfg, kinds, q_r, k_r, v_r, bias_r, score, aux, scheds, row_count)


def _attend_fwd(cfg, kinds, q_r, k_r, v_r, bias_r, score, aux, scheds, row_count):
  out, lse = _forward(cfg, kinds, q_r, k_r, v_r, bias_r, score, aux, scheds, row_count)
  return (out, lse), (q_r, k_r, v_r, bias_r, score, aux, scheds, row_count, out, lse)


def _attend_bwd(cfg, kinds, res, cts):
  q_r, k_r, v_r, bias_r, score, aux, scheds, row_count, out, lse = res
  dout, dlse = cts
  grads = _backward(cfg, kinds, q_r, k_r, v_r, bias_r, score, aux, scheds, row_count, out,
                    lse, dout, dlse)
  return grads + (None, None, None)


attend.defvjp(_attend_fwd, _attend_bwd)


def row_counts(cfg: Tl.Cfg, kinds, aux, scheds):
  """Visible keys per query row [B, Hl, nq, R*bq] float32 over the scheduled items."""
  Rq = cfg.R * cfg.bq
  cnt = jnp.zeros((cfg.B, cfg.Hl, cfg.nq, Rq), jnp.float32)
  heads = range(cfg.Hl)
  for kind, s in zip(kinds, scheds):
    def step(c, x, kind=kind):
      partial, _, ragged = kind
      qb, kb, _, valid, kval = x
      L, W = qb.shape[-1], kb.shape[-1] * cfg.bk
      vis = Tl.visibility(cfg, aux, qb, kb, kval if ragged else None, partial)
      if vis is not None:
        vis = jnp.broadcast_to(vis, (cfg.B, cfg.Hl, L, cfg.R, cfg.bq, W))
        n = vis.sum(-1).astype(jnp.float32).reshape(cfg.B, cfg.Hl, L, Rq)
      else:
        n = jnp.full((cfg.B, cfg.Hl, L, Rq), float(W), jnp.float32)
      n = jnp.where(jnp.broadcast_to(valid[..., None], n.shape), n, 0.0)
      return put_heads(c, heads, qb, n, add=True), None
    cnt = _loop(step, cnt, s)
  return cnt
