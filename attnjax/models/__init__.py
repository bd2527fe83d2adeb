"""Pretrained architectures built from ``attnjax.layers`` and their checkpoint loaders.

``BertEncoder`` (post-LN BERT, e.g. all-MiniLM-L6-v2) and ``LlamaDecoder``
(Llama, e.g. SmolLM2) are Flax Linen modules whose attention family is
chosen per layer (``config.attention``: one name of
``attnjax.layers.list_families()`` or one per layer). Loaders read Hugging
Face safetensors and llama.cpp GGUF files; tokenizers come from the
``tokenizers`` library. The optional dependencies (``pip install
attnjax[models]``) are imported only when a loader or tokenizer runs;
``import attnjax`` does not import this package.
"""
from attnjax.models.bert import (BertConfig, BertEncoder, l2_normalize, mean_pool,
                                 sentence_embedding)
from attnjax.models.checkpoints import (GGUFFile, bert_tensor_map, gguf_llama_tensor_map,
                                        llama_tensor_map, load_bert_safetensors,
                                        load_llama_gguf, load_llama_safetensors, load_params,
                                        read_gguf)
from attnjax.models.common import layer_attention, stack_layers, unstack_layers
from attnjax.models.sampling import generate, pad_prompts, sample_logits
from attnjax.models.llama import LlamaConfig, LlamaDecoder, init_cache
from attnjax.models.pretrained import (load_minilm, load_smollm2, minilm_dir, package_file,
                                       smollm2_gguf_path)
from attnjax.models.tokenizer import encode_batch, gguf_tokenizer, load_tokenizer_json
