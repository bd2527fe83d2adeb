"""Hugging Face Llama / Qwen2 safetensors -> LlamaDecoder, against a NumPy forward pass.

Tiny random checkpoints in the Hugging Face layout (torch Linear weights
[out, in], q/k/v/o biases as the config says) are written with safetensors;
the loaded model's logits equal an independent NumPy implementation of the
architecture (RMSNorm, rotate-half RoPE, GQA causal softmax, SwiGLU).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

safetensors_numpy = pytest.importorskip("safetensors.numpy")

from attnjax.models import LlamaConfig, LlamaDecoder, load_llama_safetensors  # noqa: E402

V, D, L, N, K, H, F = 61, 32, 2, 4, 2, 8, 48
BASE = dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=N,
            num_key_value_heads=K, intermediate_size=F, rope_theta=10000.0, rms_norm_eps=1e-6,
            max_position_embeddings=64)


def _checkpoint(qkv_bias, out_bias, mlp_bias, tied, seed=0):
  rng = np.random.default_rng(seed)
  w = lambda *s: (0.2 * rng.standard_normal(s)).astype(np.float32)
  t = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": 1 + w(D)}
  if not tied:
    t["lm_head.weight"] = w(V, D)
  for i in range(L):
    p = f"model.layers.{i}."
    t.update({p + "input_layernorm.weight": 1 + w(D), p + "post_attention_layernorm.weight": 1 + w(D),
              p + "self_attn.q_proj.weight": w(N * H, D), p + "self_attn.k_proj.weight": w(K * H, D),
              p + "self_attn.v_proj.weight": w(K * H, D), p + "self_attn.o_proj.weight": w(D, N * H),
              p + "mlp.gate_proj.weight": w(F, D), p + "mlp.up_proj.weight": w(F, D),
              p + "mlp.down_proj.weight": w(D, F)})
    if qkv_bias:
      t.update({p + "self_attn.q_proj.bias": w(N * H), p + "self_attn.k_proj.bias": w(K * H),
                p + "self_attn.v_proj.bias": w(K * H)})
    if out_bias:
      t[p + "self_attn.o_proj.bias"] = w(D)
    if mlp_bias:
      t.update({p + "mlp.gate_proj.bias": w(F), p + "mlp.up_proj.bias": w(F),
                p + "mlp.down_proj.bias": w(D)})
  return t


def _numpy_forward(t, tokens, tied):
  """Logits [B, T, V] of the checkpoint ``t`` (float64 NumPy, the Hugging Face semantics)."""
  def lin(x, name):
    y = x @ t[name + ".weight"].T
    return y + t[name + ".bias"] if name + ".bias" in t else y

  def rms(x, name):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * t[name]

  def rope(x):  # x [B, T, n, H], rotate-half
    inv = 1.0 / 10000.0 ** (np.arange(0, H, 2) / H)
    ang = np.arange(x.shape[1])[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rot = np.concatenate([-x[..., H // 2:], x[..., :H // 2]], -1)
    return x * cos[None, :, None] + rot * sin[None, :, None]

  x = t["model.embed_tokens.weight"][tokens].astype(np.float64)
  B, T = tokens.shape
  causal = np.tril(np.ones((T, T), bool))
  for i in range(L):
    p = f"model.layers.{i}."
    h = rms(x, p + "input_layernorm.weight")
    q = rope(lin(h, p + "self_attn.q_proj").reshape(B, T, N, H))
    k = np.repeat(rope(lin(h, p + "self_attn.k_proj").reshape(B, T, K, H)), N // K, 2)
    v = np.repeat(lin(h, p + "self_attn.v_proj").reshape(B, T, K, H), N // K, 2)
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    s = np.where(causal, s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    x = x + lin(np.einsum("bnts,bsnh->btnh", a, v).reshape(B, T, N * H), p + "self_attn.o_proj")
    h = rms(x, p + "post_attention_layernorm.weight")
    g = lin(h, p + "mlp.gate_proj")
    x = x + lin(g / (1 + np.exp(-g)) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
  x = rms(x, "model.norm.weight")
  return x @ (t["model.embed_tokens.weight"] if tied else t["lm_head.weight"]).T


def _write(tmp_path, tensors, hf_config, shards=1):
  (tmp_path / "config.json").write_text(json.dumps(hf_config))
  if shards == 1:
    safetensors_numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
    return
  names = sorted(tensors)
  weight_map = {}
  for j in range(shards):
    part = {n: tensors[n] for n in names[j::shards]}
    fname = f"model-{j + 1:05d}-of-{shards:05d}.safetensors"
    safetensors_numpy.save_file(part, str(tmp_path / fname))
    weight_map.update({n: fname for n in part})
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("kind", ["qwen2", "llama_biases_untied_sharded"])
def test_loaded_model_equals_numpy_forward(tmp_path, kind):
  if kind == "qwen2":
    hf = dict(BASE, model_type="qwen2", tie_word_embeddings=True, use_sliding_window=False)
    flags, tied, shards = (True, False, False), True, 1
  else:
    hf = dict(BASE, model_type="llama", tie_word_embeddings=False, attention_bias=True,
              mlp_bias=True, head_dim=H)
    flags, tied, shards = (True, True, True), False, 2
  tensors = _checkpoint(*flags, tied=tied)
  _write(tmp_path, tensors, hf, shards)
  config, params = load_llama_safetensors(str(tmp_path), scan_layers=kind == "qwen2")
  assert (config.qkv_bias, config.out_bias, config.mlp_bias) == flags
  tokens = np.array([[3, 17, 42, 5, 60, 0, 9], [1, 2, 3, 4, 5, 6, 7]], np.int32)
  logits = jax.jit(LlamaDecoder(config).apply)({"params": params}, jnp.asarray(tokens))
  np.testing.assert_allclose(logits, _numpy_forward(tensors, tokens, tied), atol=2e-4, rtol=2e-4)


def test_missing_bias_and_sliding_window_are_errors(tmp_path):
  tensors = _checkpoint(True, False, False, tied=True)
  del tensors["model.layers.1.self_attn.k_proj.bias"]
  _write(tmp_path, tensors, dict(BASE, model_type="qwen2", tie_word_embeddings=True))
  with pytest.raises(ValueError, match=r"model.layers.1.self_attn.k_proj.bias' is missing"):
    load_llama_safetensors(str(tmp_path))
  with pytest.raises(ValueError, match="use_sliding_window"):
    LlamaConfig.from_hf(dict(BASE, model_type="qwen2", use_sliding_window=True))
  with pytest.raises(ValueError, match="model_type='mistral'"):
    LlamaConfig.from_hf(dict(BASE, model_type="mistral"))
