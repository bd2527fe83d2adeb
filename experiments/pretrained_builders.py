"""The model-dependent methods of ``experiments.pretrained_eval``: RazorAttention, DuoAttention
and TidalDecode on SmolLM2 (head scores, fitted gates, selection schedule).

Each builder returns a :class:`Built`: the row's fixed columns (KV keys and
bytes kept, note), a jitted ``forward(params, tokens) -> logits`` with the
params it takes, and the method's token-by-token decoder for the decode
timing (``experiments.pretrained_decode.Decoder``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Dict, Optional

import jax
import numpy as np

from attnjax.models.common import unstack_layers
from experiments import pretrained_decode as PD
from experiments import pretrained_methods as pm

F32 = 4


@dataclasses.dataclass
class Built:
  name: str
  family: str
  kv_keys_kept: Any
  kv_bytes_kept: int
  note: str
  forward: Callable
  params: Any
  decoder: Optional[PD.Decoder] = None
  extra: Dict = dataclasses.field(default_factory=dict)


def _kept(model, full_heads, ctx: int, budget: int):
  """(mean keys per KV head, bytes) when ``full_heads`` [L, K] keep ctx keys, the rest budget."""
  c = model.config
  keys = np.where(np.asarray(full_heads, bool), ctx, min(ctx, budget))
  return round(float(keys.mean()), 1), pm.kv_bytes(keys, c.head_dim, F32)


def _heads_str(mask) -> str:
  L = mask.shape[0]
  return ", ".join(f"L{i}:" + "".join("F" if b else "s" for b in mask[i]) for i in range(L))


def razor(model, params, ctx: int, budget: int, *, num_sink: int = 4) -> Built:
  from attnjax.decoding import select_protected_heads
  c = model.config
  scores = pm.razor_head_scores(model, params, c.vocab_size, length=128, seed=0, low=100)
  protected = np.asarray(select_protected_heads(scores, num_kv_heads=c.num_kv_heads))
  window = budget - num_sink - 1
  opts = pm.razor_options(protected, num_sink=num_sink, window=window,
                          num_layers=c.num_layers, num_kv_heads=c.num_kv_heads)
  m = pm.per_layer_model(model, "eval_razor", opts)
  p = unstack_layers(params, c.num_layers)
  keys, nbytes = _kept(model, protected, ctx, budget)
  n_prot = int(protected.sum())
  note = (f"retrieval heads from echo (top 1%) + induction (top 14%) scores of the dense model "
          f"on 128 random tokens x2: {n_prot} of {protected.size} (layer, KV head) pairs "
          f"protected (full context); the others keep {num_sink} sink + {window} recent keys "
          f"+ 1 compensation token (mean of the dropped keys/values, logit + log|D|) = {budget} "
          "per query; teacher forcing: each query sees the cache of its decoding step")
  return Built(f"razor({num_sink}+{window}+1)", "eval_razor", keys, nbytes, note,
               jax.jit(lambda pp, t: m.apply({"params": pp}, t)), p, PD.cache_decoder(m),
               {"protected_kv_heads": _heads_str(protected)})


DUO_FIT = dict(length=256, steps=30, sink=16, recent=64, lr=0.05, reg=0.05, seed=1)


def duo_gates(model, params, tok, path: str, *, refit: bool = False, settings=None):
  """Fitted gates [L, K] from ``path`` when its settings match, else a fit saved to ``path``."""
  settings = dict(DUO_FIT if settings is None else settings)
  if not refit and os.path.exists(path):
    with open(path) as f:
      d = json.load(f)
    if d.get("settings") == settings:
      return np.asarray(d["gates"], np.float32), d
    print(f"{path}: fitted with other settings {d.get('settings')}; refitting.", flush=True)
  s = settings
  fit, seconds = pm.fit_duo(model, params, tok, length=s["length"], steps=s["steps"],
                            sink=s["sink"], recent=s["recent"], lr=s["lr"], reg=s["reg"],
                            seed=s["seed"], streaming_fraction=None)
  d = {"settings": settings, "gates": np.asarray(fit.gates).round(5).tolist(),
       "fit_seconds": round(seconds, 1), "loss_first": float(fit.loss[0]),
       "loss_last": float(fit.loss[-1]), "distill_first": float(fit.distill[0]),
       "distill_last": float(fit.distill[-1]), "backend": jax.default_backend(),
       "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
       "data": "synthetic passkey sequences (filler text, a 5-digit key at a random depth, "
               "the question); distillation of the final hidden states at the answer "
               "positions; seeds disjoint from the evaluation's passkey trials"}
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(d, f, indent=1)
  return np.asarray(fit.gates), d


def duo(model, params, tok, ctx: int, budget: int, *, gates_path: str, refit: bool = False,
        fit_settings=None, sink: int = 64, streaming_fraction: float = 0.5) -> Built:
  from attnjax.decoding import select_retrieval_heads
  c = model.config
  gates, info = duo_gates(model, params, tok, gates_path, refit=refit, settings=fit_settings)
  retrieval = np.asarray(select_retrieval_heads(gates, streaming_fraction=streaming_fraction))
  recent = budget - sink
  opts = pm.duo_options(retrieval, sink=sink, recent=recent, num_layers=c.num_layers,
                        num_kv_heads=c.num_kv_heads)
  m = pm.per_layer_model(model, "eval_duo", opts)
  p = unstack_layers(params, c.num_layers)
  keys, nbytes = _kept(model, retrieval, ctx, budget)
  s = info["settings"]
  note = (f"gates fitted on SmolLM2 ({s['steps']} Adam steps, lr {s['lr']}, L1 {s['reg']}, "
          f"batch 1 x {s['length']} tokens of synthetic passkey text, training mask "
          f"{s['sink']} sink + {s['recent']} recent, {info['fit_seconds']} s); "
          f"streaming fraction {streaming_fraction}: {int(retrieval.sum())} of "
          f"{retrieval.size} KV heads full, the others {sink} sink + {recent} recent")
  return Built(f"duo({sink}+{recent},stream={streaming_fraction})", "eval_duo", keys, nbytes,
               note, jax.jit(lambda pp, t: m.apply({"params": pp}, t)), p, PD.cache_decoder(m),
               {"retrieval_kv_heads": _heads_str(retrieval)})


def tidal(model, params, ctx: int, budget: int) -> Built:
  from attnjax.decoding import TidalSchedule
  c = model.config
  sched = TidalSchedule()
  roles = [sched.role(i) for i in range(c.num_layers)]
  note = (f"layers {[i for i, r in enumerate(roles) if r == 'full']} full, "
          f"{[i for i, r in enumerate(roles) if r == 'select']} full + select (top-{budget} per "
          "query and KV group by the group's summed logits), the other layers attend to the "
          "last selection only (default TidalSchedule, the paper's Llama-3-8B choice, not "
          "tuned for SmolLM2); selects from the whole cache; decode: the same layers over "
          "the decoder's per-layer KV caches, each selection layer ranking the cache for the "
          "new token and handing its positions to the following layers")
  fwd = jax.jit(lambda pp, t: pm.tidal_forward(model, pp, t, schedule=sched, k=budget))
  return Built(f"tidal(k={budget})", "tidal_forward", ctx,
               ctx * c.num_layers * c.num_kv_heads * c.head_dim * 2 * F32, note, fwd, params,
               PD.tidal_decoder(model, schedule=sched, k=budget))
