"""Combiner-Logsparse, TNL (SGLU, LRPE, token mixer) and Titans (MAC, MAG, MAL) oracles."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import dynamic as D
from attnjax.dynamic import combiner_logsparse as LS
from test_dynamic_select import _qkv, assert_same

CAUSAL = attnjax.masks.Causal()
ref_causal = lambda q, k, v: attnjax.reference_attention(q, k, v, mask=CAUSAL)


def J(fn, *args, **static):
  """fn(*args, **static) compiled once."""
  return jax.jit(functools.partial(fn, **static))(*args)


# -- Combiner-Logsparse ----------------------------------------------------------------
def test_logsparse_spans_partition_the_past():
  assert LS.logsparse_spans(0) == []
  assert LS.logsparse_spans(1) == [(0, 1)]
  assert LS.logsparse_spans(4) == [(0, 4)]
  assert LS.logsparse_spans(7) == [(0, 4), (4, 6), (6, 7)]
  assert LS.logsparse_spans(6) == [(0, 4), (4, 6)]
  for g in range(40):
    spans = LS.logsparse_spans(g)
    covered = [j for a, b in spans for j in range(a, b)]
    assert covered == list(range(g))  # a partition of [0, g), far to near
    sizes = [b - a for a, b in spans]
    assert len(set(sizes)) == len(sizes) and all(x & (x - 1) == 0 for x in sizes)
    assert all(a % (b - a) == 0 for a, b in spans)  # aligned: shared by many queries
  assert [LS.num_levels(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [0, 1, 2, 2, 3, 3, 4]


def test_combiner_logsparse_effective_matrix_limits_and_gradients():
  q, k, v = _qkv()  # T = 32, N = 4, K = 2
  call = lambda s, pool="max": functools.partial(D.combiner_attention, segment_len=s,
                                                 pattern="logsparse", pool=pool)
  peff_of = lambda s, pool="max": functools.partial(D.combiner_effective_matrix, segment_len=s,
                                                    pattern="logsparse", pool=pool)

  @jax.jit
  def forward(a, b, c):
    return dict(one_segment=call(32)(a, b, c), dense=ref_causal(a, b, c),
                fixed=D.combiner_attention(a, b, c, segment_len=4), log=call(4)(a, b, c),
                peff1=peff_of(1)(a, b, c), peff4_mean=peff_of(4, "mean")(a, b, c),
                log4_mean=call(4, "mean")(a, b, c))

  r = forward(q, k, v)
  # s = T: one segment, the direct part is the whole causal prefix.
  np.testing.assert_allclose(r["one_segment"], r["dense"], atol=2e-5)
  for peff in (r["peff1"], r["peff4_mean"]):  # s = 1 is the paper's form
    np.testing.assert_allclose(peff.sum(-1), 1.0, atol=1e-5)
    assert bool(((peff > 0) == np.tril(np.ones((32, 32), bool))).all())  # full causal support
  np.testing.assert_allclose(jnp.einsum("bnts,bsnh->btnh", r["peff4_mean"], jnp.repeat(v, 2, 2)),
                             r["log4_mean"], atol=2e-5)
  # Segments 0 and 1 have the same regions as in Combiner-Fixed (none, then segment 0);
  # Logsparse differs once a query has a multi-segment span (segment >= 2).
  np.testing.assert_allclose(r["log"][:, :8], r["fixed"][:, :8], atol=2e-5)
  assert float(jnp.abs(r["log"][:, 8:] - r["fixed"][:, 8:]).max()) > 1e-3
  q, k, v = _qkv(T=16)  # out = P_eff V, forward and gradients (4 segments, 2 levels)
  via_peff = lambda a, b, c: jnp.einsum("bnts,bsnh->btnh", peff_of(4)(a, b, c),
                                        jnp.repeat(c, 2, axis=2))
  assert_same(call(4), via_peff, q, k, v)


def test_combiner_logsparse_tiny_case_weights():
  # s = 1, T = 4, max pool: query 3 sees itself directly, region {2} (one token: its own key
  # and value) and region {0, 1} (key max(k0, k1), summary softmax(max(q0, q1) . k_j) v_j).
  q, k, v = _qkv(T=4, N=1, K=1)
  peff = np.asarray(J(D.combiner_effective_matrix, q, k, v, segment_len=1, pattern="logsparse"))
  qn, kn = np.asarray(q)[0, :, 0], np.asarray(k)[0, :, 0]
  sc = 1 / np.sqrt(8)
  logits = np.array([qn[3] @ kn[3], qn[3] @ kn[2], qn[3] @ np.maximum(kn[0], kn[1])]) * sc
  p = np.exp(logits) / np.exp(logits).sum()
  inner = np.exp(np.array([np.maximum(qn[0], qn[1]) @ kn[j] for j in (0, 1)]) * sc)
  inner /= inner.sum()
  np.testing.assert_allclose(peff[0, 0, 3], [p[2] * inner[0], p[2] * inner[1], p[1], p[0]],
                             rtol=1e-5)
  # query 1: itself and the single-token region {0}, i.e. dense causal attention
  e = np.exp(np.array([qn[1] @ kn[0], qn[1] @ kn[1]]) * sc)
  np.testing.assert_allclose(peff[0, 0, 1, :2], e / e.sum(), rtol=1e-5)


def test_combiner_logsparse_errors():
  q, k, v = _qkv()
  with pytest.raises(NotImplementedError, match="causal"):
    D.combiner_attention(q, k, v, segment_len=4, pattern="logsparse", causal=False)
  with pytest.raises(ValueError, match="segment_len=5"):
    D.combiner_attention(q, k, v, segment_len=5, pattern="logsparse")
  with pytest.raises(ValueError, match="pattern"):
    D.combiner_attention(q, k, v, segment_len=4, pattern="log")


# -- TNL: srms_norm, SGLU, LRPE, token mixer --------------------------------------------
import attnjax.linear as L  # noqa: E402


def test_srms_norm_direct():
  x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
  want = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6)  # x / (||x||_2 / sqrt(d))
  np.testing.assert_allclose(L.srms_norm(x), want, rtol=1e-5)
  np.testing.assert_allclose(L.srms_norm(3.0 * x), want, rtol=1e-4)  # scale-invariant
  np.testing.assert_allclose(np.sqrt(np.mean(np.asarray(L.srms_norm(x)) ** 2, -1)), 1.0, rtol=1e-5)
  y = L.srms_norm(jnp.asarray(x, jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), want, atol=3e-2)
  np.testing.assert_allclose(L.srms_norm(np.zeros((1, 4), np.float32)), 0.0)  # eps: no NaN


def test_sglu_function_and_layer():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
  layer = L.SGLU(hidden_dim=12)
  params = jax.jit(layer.init)(jax.random.PRNGKey(0), x)
  p = params["params"]
  assert set(p) == {"u", "v", "out"} and "bias" not in p["u"]
  w = {"w_u": p["u"]["kernel"], "w_v": p["v"]["kernel"], "w_o": p["out"]["kernel"]}
  out, out_fn, out_2x = jax.jit(lambda x: (layer.apply(params, x), L.sglu(x, w),
                                            L.sglu(2.0 * x, w)))(x)
  np.testing.assert_allclose(out, out_fn, rtol=1e-5, atol=1e-6)
  xn, wn = np.asarray(x), {kk: np.asarray(vv) for kk, vv in w.items()}
  np.testing.assert_allclose(out, ((xn @ wn["w_u"]) * (xn @ wn["w_v"])) @ wn["w_o"],
                             rtol=1e-4, atol=1e-5)
  # no activation: bilinear, sglu(c x) = c^2 sglu(x)
  np.testing.assert_allclose(out_2x, 4.0 * out_fn, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="w_o"):
    L.sglu(x, {"w_u": w["w_u"], "w_v": w["w_v"]})


def test_lrpe_relative_rotation():
  rng = np.random.default_rng(2)
  theta = L.lrpe_thetas(2, 4)
  assert theta.shape == (2, 4)
  np.testing.assert_allclose(theta.reshape(-1), 10000.0 ** (-2 * np.arange(8) / 8), rtol=1e-6)
  q = rng.standard_normal((1, 1, 2, 4)).astype(np.float32)
  k = rng.standard_normal((1, 1, 2, 4)).astype(np.float32)
  for s, t in ((5, 2), (9, 6), (3, 3), (40, 1)):
    qs = np.asarray(L.lrpe_rotate(q, theta, [s]))[0, 0]
    kt = np.asarray(L.lrpe_rotate(k, theta, [t]))[0, 0]
    want = np.sum(q[0, 0] * k[0, 0] * np.cos(theta * (s - t)), -1)  # Re sum q k e^{i theta (s-t)}
    np.testing.assert_allclose(np.sum(qs * kt, -1), want, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="theta"):
    L.lrpe_rotate(q, theta[:1], [0])


def _tnl_oracle(p, x, num_heads, slopes, use_lrpe):
  """TNL's token mixer composed from lightning_attention, lrpe_rotate, srms_norm and the gates."""
  b, t, dim = x.shape
  dense = lambda name, z: z @ p[name]["kernel"] + p[name].get("bias", 0.0)
  heads = lambda z: z.reshape(b, t, num_heads, dim // num_heads)
  q, k, v = (heads(jax.nn.silu(dense(nm, x))) for nm in ("query", "key", "value"))
  if use_lrpe:
    q, k = (L.lrpe_rotate(z, p["lrpe_theta"], jnp.arange(t)) for z in (q, k))
  o = L.lightning_attention(q, k, v, slopes=slopes, implementation="reference")
  o = L.srms_norm(o.reshape(b, t, dim))
  gate = jax.nn.sigmoid(dense("gate_up", dense("gate_down", x)))
  return dense("out", o * gate)


def test_tnl_token_mixer_oracle_and_decode():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 8))
  layers = {lrpe: L.TNLTokenMixer(2, layer_idx=1, num_layers=3, chunk_size=4, use_lrpe=lrpe)
            for lrpe in (False, True)}
  params = jax.jit(lambda x: {lrpe: lay.init(jax.random.PRNGKey(1), x)
                              for lrpe, lay in layers.items()})(x)
  assert "lrpe_theta" in params[True]["params"] and "lrpe_theta" not in params[False]["params"]
  slopes = L.tnl_decay_slopes(2, 1, 3)
  layer = layers[True]

  @jax.jit
  def prefill(params, x):
    plain = layers[False].apply(params[False], x)
    plain_ref = _tnl_oracle(params[False]["params"], x, 2, slopes, False)
    ref = _tnl_oracle(params[True]["params"], x, 2, slopes, True)
    head, state = layer.apply(params[True], x[:, :6], return_state=True)
    rest = layer.apply(params[True], x[:, 6:], initial_state=state, offset=6)  # chunked continuation
    return plain, plain_ref, layer.apply(params[True], x), ref, jnp.concatenate([head, rest], 1)

  plain, plain_ref, full, ref, resumed = prefill(params, x)
  np.testing.assert_allclose(plain, plain_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(full, ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(resumed, full, rtol=1e-4, atol=1e-5)
  step = jax.jit(lambda xt, state, pos: layer.apply(
      params[True], xt, initial_state=state, offset=pos, return_state=True))
  state = jnp.zeros((2, 2, 2 * 4, 4), jnp.float32)  # LRPE doubles the key features
  outs = []
  for i in range(x.shape[1]):  # token-by-token recurrence (linear_attention_step) == prefill
    o, state = step(x[:, i:i + 1], state, i)
    outs.append(o)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-4, atol=1e-5)


# -- Titans: short causal conv, MAC, MAG, MAL ---------------------------------------------
from attnjax.linear.layers import SlidingWindowBlock, TitansMemory  # noqa: E402


def test_short_causal_conv_matches_depthwise_conv_and_streams():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 7, 6)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)
  y, state = L.short_causal_conv(x, kernel)
  xn, kn = np.asarray(x), np.asarray(kernel)
  want = np.zeros_like(xn)
  for t in range(7):  # y_t = sum_i kernel[i] x_{t - 3 + i}, zeros before the start
    for i in range(4):
      if t - 3 + i >= 0:
        want[:, t] += kn[i] * xn[:, t - 3 + i]
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state, xn[:, -3:])
  conv = nn.Conv(6, (4,), padding=((3, 0),), feature_group_count=6, use_bias=False)
  np.testing.assert_allclose(conv.apply({"params": {"kernel": kernel[:, None, :]}}, x), want,
                             rtol=1e-5, atol=1e-6)
  y1, s1 = L.short_causal_conv(x[:, :2], kernel)  # pieces shorter than the kernel
  y2, _ = L.short_causal_conv(x[:, 2:], kernel, s1)
  np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="channels"):
    L.short_causal_conv(x, kernel[:, :5])


def _layer_norm(p, z):
  mu = z.mean(-1, keepdims=True)
  var = ((z - mu) ** 2).mean(-1, keepdims=True)
  return (z - mu) / jnp.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def test_titans_mag_mal_oracles():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 10, 8))
  mag = L.TitansMAG(2, window=(3, 0), chunk_size=4, num_persistent=2)
  mal = L.TitansMAL(2, window=(3, 0), chunk_size=4, num_persistent=2)
  pa = jax.jit(lambda x: mag.init(jax.random.PRNGKey(1), x))(x)
  assert pa["params"]["memory"]["conv_query"].shape == (4, 8)
  assert pa["params"]["persistent"]["persistent"].shape == (2, 8)
  # MAL has the same sub-layers ("persistent", "memory", "attention"): reuse them
  pl = {"params": {nm: pa["params"][nm] for nm in ("persistent", "memory", "attention")}}
  swa_sink, swa, mem = SlidingWindowBlock(2, (3, 0), 2), SlidingWindowBlock(2, (3, 0)), TitansMemory(2, 4)
  sub = lambda p, name: {"params": p["params"][name]}

  @jax.jit
  def oracles(pa, x):
    xt = jnp.concatenate([pa["params"]["persistent"]["persistent"][None], x], 1)  # [P || x]
    y, m = swa_sink.apply(sub(pa, "attention"), xt), mem.apply(sub(pa, "memory"), xt)
    attention_branch = _layer_norm(pa["params"]["norm_attention"], y)
    gate = jax.nn.sigmoid(_layer_norm(pa["params"]["norm_memory"], m))
    h = xt + m
    return dict(mag=(attention_branch * gate)[:, 2:], attention_branch=attention_branch[:, 2:],
                mal=(h + swa.apply(sub(pa, "attention"), h))[:, 2:],
                attention_on_x=(xt + swa.apply(sub(pa, "attention"), xt))[:, 2:],
                plain_window=_layer_norm(pa["params"]["norm_attention"],
                                         swa.apply(sub(pa, "attention"), xt))[:, 2:])

  def with_norm(p, scale, bias):
    p = jax.tree.map(lambda a: a, p)
    p["params"]["norm_memory"] = {"scale": jnp.full((8,), scale), "bias": jnp.full((8,), bias)}
    return p

  def zero_memory_out(p):
    p = jax.tree.map(lambda a: a, p)
    p["params"]["memory"]["out"] = jax.tree.map(jnp.zeros_like, p["params"]["memory"]["out"])
    return p

  mag_apply, mal_apply = jax.jit(mag.apply), jax.jit(mal.apply)  # one compile each
  r = oracles(pa, x)
  tol = dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mag_apply(pa, x), r["mag"], **tol)  # MAG from its composed parts
  np.testing.assert_allclose(mag_apply(with_norm(pa, 0.0, 30.0), x), r["attention_branch"], **tol)
  np.testing.assert_allclose(mag_apply(with_norm(pa, 0.0, -30.0), x), 0.0, atol=1e-10)
  np.testing.assert_allclose(mal_apply(pl, x), r["mal"], **tol)  # MAL: SWA on [P || x] + M
  # a memory that outputs nothing (identity through the residual): the attention layer on [P || x]
  np.testing.assert_allclose(mal_apply(zero_memory_out(pl), x), r["attention_on_x"], **tol)
  # SW-Attn*: the persistent tokens stay visible beyond the window (a plain window loses them)
  assert float(jnp.abs(r["attention_branch"] - r["plain_window"])[:, 4:].max()) > 1e-4


def test_titans_mac_zero_memory_is_attention_over_persistent_and_segment():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 10, 8))  # 3 segments of 4, the last padded
  mac = L.TitansMAC(2, segment=4, num_persistent=2)
  params = jax.jit(lambda x: mac.init(jax.random.PRNGKey(1), x))(x)
  p = dict(params["params"])
  p["mem_q"] = jnp.zeros_like(p["mem_q"])  # retrieves nothing: h = M(0) = 0 and M(y) = 0

  def oracle(p, x):
    """(0.5 y) W_out, y = attention over [persistent || segment] plus the zero tokens h."""
    b, t, dim = x.shape
    heads = lambda z: z.reshape(z.shape[:-1] + (2, 4))
    xp = jnp.pad(x, ((0, 0), (0, 2), (0, 0)))
    outs = []
    for s0 in range(0, 12, 4):
      seg = xp[:, s0:s0 + 4]
      z = jnp.concatenate([jnp.broadcast_to(p["persistent"], (b, 2, dim)), seg], 1)
      mask = jnp.concatenate([jnp.ones((4, 2), bool), jnp.tril(jnp.ones((4, 4), bool))], 1)
      o, lse = attnjax.reference_attention(heads(seg @ p["wq"]), heads(z @ p["wk"]),
                                           heads(z @ p["wv"]), mask=mask, return_lse=True)
      # the i + 1 visible memory tokens are zero vectors: logit 0, value 0
      o = o * jax.nn.sigmoid(lse - jnp.log(jnp.arange(1.0, 5.0))[None, :, None])[..., None]
      outs.append((0.5 * (o.reshape(b, 4, dim) @ p["wo"])) @ p["w_out"])
    return jnp.concatenate(outs, 1)[:, :t]

  mac_apply = jax.jit(mac.apply)  # compiled once for both parameter sets
  out = mac_apply({"params": p}, x)
  np.testing.assert_allclose(out, jax.jit(oracle)(p, x), rtol=1e-5, atol=1e-5)
  out_mem = mac_apply(params, x)  # a live memory changes the output
  assert float(jnp.abs(out_mem - out).max()) > 1e-4
