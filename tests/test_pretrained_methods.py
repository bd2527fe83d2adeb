"""RazorAttention, DuoAttention and TidalDecode in a tiny random LlamaDecoder (experiments.pretrained_methods)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.decoding import TidalSchedule
from attnjax.layers import registry
from attnjax.models import LlamaConfig, LlamaDecoder
from attnjax.models.common import unstack_layers
from experiments import pretrained_methods as pm

L, N, K, H, T = 4, 4, 2, 8, 32


@pytest.fixture(scope="module")
def tiny():
  pm.register_families()
  c = LlamaConfig(vocab_size=64, hidden_size=32, num_layers=L, num_heads=N, num_kv_heads=K,
                  head_dim=H, intermediate_size=64, max_position_embeddings=64,
                  rope_base=10000.0)
  model = LlamaDecoder(c)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, T), 0, 64)
  params = model.init(jax.random.PRNGKey(0), tokens)["params"]
  dense = np.asarray(model.apply({"params": params}, tokens))
  return model, params, tokens, dense


def _ref_attention(q, k, v, keep, extra=None):
  """float64 softmax attention; keep bool [N, T, S]; extra: (logit [T, N], value [T, N, H]) or None."""
  q, k, v = (np.asarray(x, np.float64)[0] for x in (q, k, v))
  g = q.shape[1] // k.shape[1]
  k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
  s = np.einsum("tnh,snh->nts", q, k) / np.sqrt(q.shape[-1])
  s = np.where(keep, s, -np.inf)
  vals = np.broadcast_to(v.transpose(1, 0, 2)[:, None], s.shape + (v.shape[-1],))
  if extra is not None:
    el, ev = extra
    s = np.concatenate([s, el.T[:, :, None]], axis=-1)
    vals = np.concatenate([vals, ev.transpose(1, 0, 2)[:, :, None]], axis=2)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("nts,ntsh->tnh", p, vals)[None]


def _razor_reference(q, k, v, protected, num_sink, window):
  """The compressed cache each query would have at its decoding step, built explicitly."""
  Tq, Nq = q.shape[1], q.shape[2]
  g = Nq // k.shape[2]
  kk, vv = np.asarray(k, np.float64)[0], np.asarray(v, np.float64)[0]
  keep = np.zeros((Nq, Tq, Tq), bool)
  el = np.full((Tq, Nq), -np.inf)
  ev = np.zeros((Tq, Nq, v.shape[-1]))
  for n in range(Nq):
    for i in range(Tq):
      if protected[n // g]:
        keep[n, i, :i + 1] = True
        continue
      kept = [j for j in range(i + 1) if j < num_sink or i - j < window]
      dropped = [j for j in range(i + 1) if j not in kept]
      keep[n, i, kept] = True
      if dropped:
        kh = kk[dropped, n // g].mean(0)
        ev[i, n] = vv[dropped, n // g].mean(0)
        el[i, n] = np.asarray(q, np.float64)[0, i, n] @ kh / np.sqrt(q.shape[-1]) + np.log(len(dropped))
  return _ref_attention(q, k, v, keep, (el, ev))


def _qkv(seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(ks[0], (1, T, N, H)), jax.random.normal(ks[1], (1, T, K, H)),
          jax.random.normal(ks[2], (1, T, K, H)))


def test_razor_family_matches_explicit_cache_reference():
  q, k, v = _qkv()
  for protected in ((False, False), (True, False)):
    out = pm.razor_family(q, k, v, causal=True, protected_heads=protected, num_sink=2, window=5)
    ref = _razor_reference(q, k, v, protected, 2, 5)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)


def test_razor_all_protected_model_is_dense(tiny):
  model, params, tokens, dense = tiny
  opts = pm.razor_options(np.ones((L, K), bool), num_sink=2, window=4, num_layers=L,
                          num_kv_heads=K)
  m = pm.per_layer_model(model, "eval_razor", opts)
  out = m.apply({"params": unstack_layers(params, L)}, tokens)
  np.testing.assert_allclose(np.asarray(out), dense, atol=2e-5)
  # and not dense once heads are compressed
  opts = pm.razor_options(np.zeros((L, K), bool), num_sink=2, window=4, num_layers=L,
                          num_kv_heads=K)
  out = pm.per_layer_model(model, "eval_razor", opts).apply(
      {"params": unstack_layers(params, L)}, tokens)
  assert np.abs(np.asarray(out) - dense).max() > 1e-3


def test_block_loop_is_the_decoder(tiny):
  model, params, tokens, dense = tiny
  c = model.config
  h = pm.run_blocks(model, params, tokens, pm.dense_step(c))
  np.testing.assert_allclose(np.asarray(pm.lm_head(c, params, h)), dense, atol=2e-5)


def _probe_qk(model, params, tokens):
  """Post-RoPE q/k of every layer, recorded by a family the decoder calls (eager)."""
  rec = []

  def probe(query, key, value, *, causal, q_positions=None, k_positions=None,
            segment_ids=None):
    rec.append((np.asarray(query), np.asarray(key)))
    return registry.dense_family(query, key, value, causal=causal)
  registry.register_family("test_pm_probe", probe)
  m = model.clone(config=dataclasses.replace(model.config, attention="test_pm_probe",
                                             scan_layers=False))
  m.apply({"params": unstack_layers(params, L)}, tokens)
  return rec


def test_tidal_k_at_least_T_is_dense(tiny):
  model, params, tokens, dense = tiny
  sched = TidalSchedule(full_layers=(0,), select_layers=(1,))
  out = pm.tidal_forward(model, params, tokens, schedule=sched, k=T + 3)
  np.testing.assert_allclose(np.asarray(out), dense, atol=2e-5)


def test_tidal_sparse_layers_match_explicit_mask(tiny):
  model, params, tokens, dense = tiny
  kk = 6
  sched = TidalSchedule(full_layers=(0,), select_layers=(1,))
  out = np.asarray(pm.tidal_forward(model, params, tokens, schedule=sched, k=kk))
  q1, k1 = _probe_qk(model, params, tokens)[1]                 # layers 0-1 dense: same q/k
  g = N // K
  s = np.einsum("tkgh,skh->kts", q1[0].reshape(T, K, g, H), k1[0])
  keep = np.zeros((K, T, T), bool)
  for h in range(K):
    for i in range(T):
      keep[h, i, np.argsort(-s[h, i, :i + 1], kind="stable")[:kk]] = True
  keep = np.repeat(keep, g, axis=0)

  def masked(query, key, value, *, causal, q_positions=None, k_positions=None,
             segment_ids=None):
    return jnp.asarray(_ref_attention(query, key, value, keep), jnp.float32)
  registry.register_family("test_pm_tidal_ref", masked)
  ref_model = model.clone(config=dataclasses.replace(
      model.config, attention=("dense", "dense", "test_pm_tidal_ref", "test_pm_tidal_ref"),
      scan_layers=False))
  ref = np.asarray(ref_model.apply({"params": unstack_layers(params, L)}, tokens))
  np.testing.assert_allclose(out, ref, atol=1e-4)
  assert np.abs(out - dense).max() > 1e-3


def test_duo_gates_one_dense_zero_streaming(tiny):
  model, params, tokens, dense = tiny
  c = model.config
  fwd = jax.jit(lambda p, gates: pm.lm_head(c, p, pm.duo_hidden_states(
      model, p, gates, tokens, sink=2, recent=5)))
  np.testing.assert_allclose(np.asarray(fwd(params, jnp.ones((L, K)))), dense, atol=2e-5)
  gates = jax.random.uniform(jax.random.PRNGKey(3), (L, K))
  unrolled = pm.duo_hidden_states(model, unstack_layers(params, L), gates, tokens, sink=2,
                                  recent=5)
  np.testing.assert_allclose(np.asarray(pm.lm_head(c, params, unrolled)),
                             np.asarray(fwd(params, gates)), atol=2e-5)   # scan == loop
  keep = np.tril(np.ones((T, T), bool)) & ((np.arange(T)[None] < 2) |
                                           (np.arange(T)[:, None] - np.arange(T)[None] < 5))

  def stream(query, key, value, *, causal, q_positions=None, k_positions=None,
             segment_ids=None):
    return jnp.asarray(_ref_attention(query, key, value, np.broadcast_to(keep, (N, T, T))),
                       jnp.float32)
  registry.register_family("test_pm_stream_ref", stream)
  ref = model.clone(config=dataclasses.replace(model.config, attention="test_pm_stream_ref",
                                               scan_layers=False))
  ref = np.asarray(ref.apply({"params": unstack_layers(params, L)}, tokens))
  np.testing.assert_allclose(np.asarray(fwd(params, jnp.zeros((L, K)))), ref, atol=1e-4)
  # the deployed family: every head retrieval == dense; none == the streaming reference
  for flag, want in ((True, dense), (False, ref)):
    opts = pm.duo_options(np.full((L, K), flag), sink=2, recent=5, num_layers=L,
                          num_kv_heads=K)
    out = pm.per_layer_model(model, "eval_duo", opts).apply(
        {"params": unstack_layers(params, L)}, tokens)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-4)


def test_bad_input_names_the_argument(tiny):
  model, params, tokens, _ = tiny
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="protected_heads"):
    pm.razor_family(q, k, v, causal=True, protected_heads=(True, False, True))
  with pytest.raises(ValueError, match="retrieval_heads"):
    pm.duo_family(q, k, v, causal=True, retrieval_heads=(True,))
  with pytest.raises(ValueError, match="gates"):
    pm.duo_hidden_states(model, params, jnp.ones((L, K + 1)), tokens, sink=2, recent=4)
  with pytest.raises(ValueError, match="k must be"):
    pm.tidal_forward(model, params, tokens, schedule=TidalSchedule((0,), (1,)), k=0)
  with pytest.raises(ValueError, match="k must be"):
    pm.tidal_select(q, k, -2)
  with pytest.raises(ValueError, match="protected"):
    pm.razor_options(np.ones((L - 1, K), bool), num_sink=2, window=4, num_layers=L,
                     num_kv_heads=K)
  with pytest.raises(ValueError, match="options"):
    pm.per_layer_model(model, "eval_duo", [{}] * (L + 1))


def test_results_merge_by_method_and_context(tmp_path):
  from experiments import pretrained_results as R
  old = {"meta": {"context": 1024, "ppl_windows": 4}, "rows": [
      {"method": "dense", "context": 1024, "ppl": 6.3},
      {"method": "hip(top_k=256)", "context": 1024, "ppl": 6.5, "error": "failed"}]}
  res = R.normalise(old)
  assert list(res["meta"]) == ["1024"]
  res = R.merge(res, [{"method": "hip(top_k=256)", "context": 1024, "ppl": 6.4},
                      {"method": "dense", "context": 4096, "ppl": 7.0}],
                {"context": 4096, "ppl_windows": 1})
  assert [(r["method"], r["context"], r["ppl"]) for r in res["rows"]] == [
      ("dense", 1024, 6.3), ("hip(top_k=256)", 1024, 6.4), ("dense", 4096, 7.0)]
  assert res["meta"]["1024"]["ppl_windows"] == 4 and res["meta"]["4096"]["ppl_windows"] == 1
  R.write(res, str(tmp_path))
  assert R.load(str(tmp_path / R.RESULTS)) == res
  with pytest.raises(ValueError, match="context"):
    R.normalise({"meta": {}, "rows": [{"method": "dense"}]})
