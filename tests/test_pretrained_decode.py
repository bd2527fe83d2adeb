"""Token-by-token decoding under TokenSelect, TidalDecode and H2O in a tiny random LlamaDecoder
(experiments.pretrained_decode): each decoded step equals the teacher-forcing form."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.decoding import TidalSchedule
from attnjax.models import LlamaConfig, LlamaDecoder
from experiments import pretrained_decode as PD
from experiments import pretrained_methods as pm
from experiments.pretrained_families import register_local_families

L, P, T = 2, 10, 24          # layers, prompt tokens, total tokens


@pytest.fixture(scope="module")
def tiny():
  pm.register_families()
  register_local_families()
  c = LlamaConfig(vocab_size=64, hidden_size=32, num_layers=L, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=64, max_position_embeddings=64,
                  rope_base=10000.0)
  model = LlamaDecoder(c)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, T), 0, 64)
  params = model.init(jax.random.PRNGKey(0), tokens)["params"]
  return model, params, tokens


def _forced(decoder, params, tokens):
  """Logits [B, T - P + 1, V] of the prompt's last token and of each later token fed one at a
  time (teacher forcing through the decoder's state)."""
  def run(p, tokens):
    logits, state = decoder.prefill(p, tokens[:, :P], T)

    def body(state, t):
      lg, state = decoder.step(p, state, jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1))
      return state, lg[:, 0]
    _, rest = jax.lax.scan(body, state, jnp.arange(P, T))
    return jnp.concatenate([logits[:, -1:], jnp.swapaxes(rest, 0, 1)], axis=1)
  return np.asarray(jax.jit(run)(params, tokens))


def _with(model, family, **opts):
  from flax.core import FrozenDict
  return model.clone(config=dataclasses.replace(model.config, attention=family,
                                                attention_options=FrozenDict(opts)))


def test_tokenselect_decodes_through_the_kv_cache_as_its_forward(tiny):
  model, params, tokens = tiny
  m = _with(model, "eval_tokenselect", n_init=2, n_local=3, top_k=4)
  full = np.asarray(m.apply({"params": params}, tokens))[:, P - 1:]
  dense = np.asarray(model.apply({"params": params}, tokens))[:, P - 1:]
  got = _forced(PD.cache_decoder(m), params, tokens)
  np.testing.assert_allclose(got, full, atol=2e-5, rtol=1e-5)
  assert np.abs(full - dense).max() > 1e-2          # the selection drops keys at this budget


def test_tidal_decode_loop_equals_its_teacher_forcing_form(tiny):
  model, params, tokens = tiny
  sched = TidalSchedule(full_layers=(), select_layers=(0,))   # layer 1 sparse
  full = np.asarray(jax.jit(lambda p, t: pm.tidal_forward(model, p, t, schedule=sched, k=5))(
      params, tokens))[:, P - 1:]
  dense = np.asarray(model.apply({"params": params}, tokens))[:, P - 1:]
  got = _forced(PD.tidal_decoder(model, schedule=sched, k=5), params, tokens)
  np.testing.assert_allclose(got, full, atol=2e-5, rtol=1e-5)
  assert np.abs(full - dense).max() > 1e-2
  out = PD.greedy(PD.tidal_decoder(model, schedule=sched, k=5), params, tokens[:, :P], 4)
  assert out.shape == (2, 4)


def test_h2o_decoder_keeps_a_fixed_cache_and_equals_dense_when_it_holds_everything(tiny):
  model, params, tokens = tiny
  dense = np.asarray(model.apply({"params": params}, tokens))[:, P - 1:]
  got = _forced(PD.h2o_decoder(model, heavy=16, recent=8), params, tokens)
  np.testing.assert_allclose(got, dense, atol=2e-5, rtol=1e-5)
  small = PD.h2o_decoder(model, heavy=3, recent=3)
  got = _forced(small, params, tokens)
  assert np.isfinite(got).all() and np.abs(got - dense).max() > 1e-2
  _, (caches, n) = small.prefill(params, tokens[:, :P], T)
  assert len(caches) == L and caches[0].key.shape == (2, 2, 6, 8)
  assert (np.asarray(n) == P).all()
  with pytest.raises(ValueError, match="one token"):
    small.step(params, (caches, n), tokens[:, :2])


def test_longheads_decoder_equals_the_per_token_forward(tiny):
  model, params, tokens = tiny
  opts = dict(chunk_size=4, attn_len=16, rope_base=10000.0)
  m = _with(model, "eval_longheads", query_block=1, **opts)
  full = np.asarray(m.apply({"params": params}, tokens))[:, P - 1:]
  dense = np.asarray(model.apply({"params": params}, tokens))[:, P - 1:]
  got = _forced(PD.longheads_decoder(model, **opts), params, tokens)
  np.testing.assert_allclose(got, full, atol=2e-5, rtol=1e-5)
  assert np.abs(full - dense).max() > 1e-2
