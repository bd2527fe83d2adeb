"""Training-free attention methods on a real pretrained LM (SmolLM2-135M-Instruct).

``python3 -m experiments.pretrained_eval [--context=1024] [--quick]``

Every method runs inside ``attnjax.models.LlamaDecoder`` with the pretrained
weights unchanged, at one key budget per query (``--budget``, default 256
keys at 1k context). Measured per method:

- perplexity of held-out text: the validation split of the standard-library
  corpus (``experiments.tasks.stdlib_lm.load_corpus``, files never used for
  training), tokenised with SmolLM2's tokenizer, ``--ppl_windows``
  non-overlapping windows of ``--context`` tokens (teacher forcing, every
  position scored);
- passkey retrieval: a 5-digit number hidden at a random depth in filler
  text of ``--context`` tokens, then "What is the passkey?"; a trial counts
  when greedy decoding would produce every answer token (checked by teacher
  forcing: the argmax at each answer position equals the answer token,
  which is exactly greedy exact match);
- KV-cache bytes the method needs to keep at ``--context`` tokens (float32,
  all layers), and decode ms/token, prefill excluded, through each method's
  token-by-token decoder (``experiments.pretrained_decode``: LlamaDecoder's
  KV cache for the families with ``supports_kv_cache``, an explicit block
  loop for TidalDecode, H2O's own eviction cache).

Plus, on the dense model: sink metrics (``attnjax.analysis.heads.sink_metrics``)
and echo/induction retrieval-head scores
(``attnjax.decoding.retrieval_head_scores``) on a random token sequence
repeated twice. Rows go to results/pretrained_eval.{csv,json} and the table to
docs/pretrained_results.md.

H2O and TokenSelect are evaluated here as attention families defined in this
file (masks over the full causal attention, per query); see their docstrings
for how they differ from the papers' decode-time algorithms. RazorAttention,
DuoAttention and TidalDecode are built on the model itself
(``experiments.pretrained_builders``: retrieval-head scores, fitted gates,
a layer schedule) and run in teacher-forcing form
(``experiments.pretrained_methods``).

Rows are keyed by (method, context): ``--methods=razor,duo`` merges its rows
into the stored results, and ``--merge_from=FILE`` adds the rows and meta of
another run's results file (``experiments.pretrained_results``).
"""
from __future__ import annotations

import json
import os
import platform
import time
import traceback

from absl import app
from absl import flags

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

from attnjax.layers import get_family
from experiments import pretrained_decode as PD
from experiments import pretrained_results as R
from experiments.pretrained_data import heldout_windows, passkey_batch
from experiments.pretrained_families import method_specs, register_local_families

FLAGS = flags.FLAGS
flags.DEFINE_integer("context", 1024, "Tokens per perplexity window and per passkey prompt.")
flags.DEFINE_integer("budget", 256, "Keys attended per query by every sparse method.")
flags.DEFINE_integer("ppl_windows", 4, "Held-out windows of --context tokens for perplexity.")
flags.DEFINE_integer("passkey_trials", 5, "Passkey trials.")
flags.DEFINE_integer("decode_steps", 16, "Decoded tokens timed per method (0: no decode timing).")
flags.DEFINE_list("methods", [], "Run only these methods, by the name before '(' "
                  "(e.g. razor,duo,tidal,hip; default: all). Their rows replace the stored rows "
                  "of the same method and context; the other rows stay.")
flags.DEFINE_bool("quick", False, "2 windows, 3 passkey trials, decode timing for dense only.")
flags.DEFINE_bool("analysis", True, "Sink metrics and retrieval-head scores of the dense model.")
flags.DEFINE_string("results_dir", "results", "Where pretrained_eval.{csv,json} go.")
flags.DEFINE_bool("passkey_only", False, "Recompute only the passkey columns of the rows in "
                  "<results_dir>/pretrained_eval.json and rewrite the files.")
flags.DEFINE_string("doc", "docs/pretrained_results.md", "Markdown file written ('' for none).")
flags.DEFINE_bool("decode_only", False, "Recompute only decode_ms_per_token of the stored rows "
                  "at --context (methods with a KV-cache path) and rewrite the files "
                  "(with --passkey_only: both).")
flags.DEFINE_string("merge_from", "", "Merge the rows and meta of another results file "
                    "(either format) into <results_dir>/pretrained_eval.json; without "
                    "--methods nothing else runs.")
flags.DEFINE_string("duo_gates", "results/duo_gates_smollm2.json",
                    "DuoAttention gates: read when fitted with the current settings, else fitted "
                    "and written here.")
flags.DEFINE_integer("duo_fit_length", 256, "Tokens per synthetic passkey sequence of the gate fit.")
flags.DEFINE_integer("duo_fit_steps", 30, "Optimisation steps of the gate fit (batch 1).")
flags.DEFINE_bool("duo_refit", False, "Refit the DuoAttention gates even if --duo_gates holds them.")

F32 = 4

#: Methods of attnjax that this experiment does not run, and why.
NOT_RUN = []


LONG = ("one 4k-context method takes tens of minutes on 2 shared CPU cores (perplexity, "
        "passkey and the decode timing); rerun with --context=4096 --ppl_windows=1 "
        "--passkey_trials=4 --methods=<names>")


def not_run(results):
  """NOT_RUN plus the methods that have a 1k row but no 4k row."""
  out = list(NOT_RUN)
  by_ctx = {}
  for r in results["rows"]:
    by_ctx.setdefault(int(r["context"]), set()).add(r["method"].split("(")[0])
  missing = sorted(by_ctx.get(1024, set()) - by_ctx.get(4096, set()))
  if missing:
    out.append((f"context 4096 for {', '.join(missing)}", LONG))
  return out


# --------------------------------------------------------------------------- methods

# --------------------------------------------------------------------------- measurements

def _forward(model, params):
  return jax.jit(lambda p, t: model.apply({"params": p}, t))


def perplexity(fwd, params, windows):
  nll, count = 0.0, 0
  for w in windows:
    logits = fwd(params, jnp.asarray(w[None]))
    lp = jax.nn.log_softmax(logits[0, :-1], axis=-1)
    tgt = jnp.asarray(w[1:])
    nll += float(-jnp.sum(jnp.take_along_axis(lp, tgt[:, None], axis=-1)))
    count += len(w) - 1
  return float(np.exp(nll / count))


def passkey_accuracy(fwd, params, tokens, spans):
  """(greedy exact match of the whole answer, digits exact match given the answer's first token).

  The answer is " 12345" = a space token then one token per digit; the model
  often puts " the"/" a" before the number, which fails the strict match even
  when every digit is retrieved, so the second number scores the digits only.
  """
  hits, digit_hits = 0, 0
  for b in range(tokens.shape[0]):
    logits = np.asarray(fwd(params, jnp.asarray(tokens[b:b + 1])))[0]
    start, answer = spans[b]
    pred = logits[start - 1:start - 1 + len(answer)].argmax(-1)
    hits += int(np.array_equal(pred, np.asarray(answer)))
    digit_hits += int(np.array_equal(pred[1:], np.asarray(answer[1:])))
  return hits / tokens.shape[0], digit_hits / tokens.shape[0]


def analysis_rows(model, params, tok, vocab):
  """Sink mass per head and echo/induction scores (dense attention, weights via probs_hook)."""
  from attnjax.analysis.heads import sink_metrics
  from attnjax.decoding import repeated_random_tokens, retrieval_head_scores
  from attnjax.layers import registry
  store = []

  def probe(query, key, value, *, causal, q_positions=None, k_positions=None, segment_ids=None):
    def hook(p):
      jax.debug.callback(lambda x: store.append(np.asarray(x)), p, ordered=True)
      return p
    return registry.dense_family(query, key, value, causal=causal, q_positions=q_positions,
                                 k_positions=k_positions, segment_ids=segment_ids, probs_hook=hook)
  if "eval_probe" not in registry.list_families():
    registry.register_family("eval_probe", probe)
  import dataclasses as dc
  pm = model.clone(config=dc.replace(model.config, attention="eval_probe"))
  from experiments.tasks.stdlib_lm import load_corpus
  text = bytes(load_corpus()[1][:20000]).replace(b"\x00", b"\n").decode("utf-8", "replace")
  ids = np.asarray(tok.encode(text).ids[:256], np.int32)[None]
  pm.apply({"params": params}, jnp.asarray(ids))
  jax.effects_barrier()
  probs = np.stack(store)[:, 0]                                # [L, N, T, S]
  store.clear()
  sink = np.stack([np.asarray(sink_metrics(jnp.asarray(p[None]))["sink_mass"]) for p in probs])
  rep = np.asarray(repeated_random_tokens(jax.random.PRNGKey(0), 1, 128, vocab), np.int32)
  pm.apply({"params": params}, jnp.asarray(rep))
  jax.effects_barrier()
  probs = np.stack(store)[:, 0]
  sc = retrieval_head_scores(jnp.asarray(probs), jnp.asarray(rep[0]))
  echo, ind = np.asarray(sc["echo"]), np.asarray(sc["induction"])   # [L, N]
  return sink, echo, ind, ids.shape[1], rep.shape[1]


# --------------------------------------------------------------------------- main

NEW_METHODS = ("razor", "duo", "tidal")


def _selected(name: str) -> bool:
  return not FLAGS.methods or name.split("(")[0] in FLAGS.methods


def built_methods(model, params, tok, ctx: int, budget: int):
  """(name, builder) of every method; builders run only for the selected methods."""
  import dataclasses as dc
  from experiments import pretrained_builders as pb
  c = model.config
  per_key = c.num_layers * c.num_kv_heads * c.head_dim * 2 * F32
  out = []
  for name, fam, opts, kept, note in method_specs(budget, ctx, c.num_layers):
    def build(name=name, fam=fam, opts=opts, kept=kept, note=note):
      # FrozenDict: the model is a static (hashed) argument of generate's jit.
      m = model.clone(config=dc.replace(c, attention=fam,
                                        attention_options=FrozenDict(opts) if opts else None))
      if fam == "eval_h2o":
        dec = PD.h2o_decoder(model, **opts)
        note += ("; decode: the paper's greedy eviction with a fixed cache of "
                 f"{opts['heavy']} + {opts['recent']} keys per KV head and layer (scores "
                 "accumulated over the kept keys only) after a full-attention prompt that keeps "
                 "its heavy hitters")
      elif fam == "eval_longheads":
        dec = PD.longheads_decoder(model, chunk_size=opts["chunk_size"],
                                   attn_len=opts["attn_len"], rope_base=opts["rope_base"])
        note += ("; decode: one chunk choice per token over un-rotated caches, chunk keys "
                 "cached as chunks complete")
      else:
        dec = PD.cache_decoder(m) if getattr(get_family(fam), "supports_kv_cache", False) else None
      return pb.Built(name, fam, kept, kept * per_key, note, _forward(m, params), params, dec)
    out.append((name, build))
  out.append(("razor", lambda: pb.razor(model, params, ctx, budget)))
  fit = dict(pb.DUO_FIT, length=FLAGS.duo_fit_length, steps=FLAGS.duo_fit_steps)
  out.append(("duo", lambda: pb.duo(model, params, tok, ctx, budget, gates_path=FLAGS.duo_gates,
                                    refit=FLAGS.duo_refit, fit_settings=fit)))
  out.append(("tidal", lambda: pb.tidal(model, params, ctx, budget)))
  return out


def _can_decode(b) -> bool:
  """Whether the built method has a token-by-token decoder."""
  return b.decoder is not None


def _decode_ms(b, pk_tokens, ctx):
  return PD.decode_ms_per_token(b.decoder, b.params, pk_tokens[:1, :ctx - FLAGS.decode_steps - 1],
                                FLAGS.decode_steps)


def run_method(b, windows, pk_tokens, pk_spans, trials, ctx, budget, quick):
  row = {"method": b.name, "family": b.family, "context": ctx, "budget": budget,
         "kv_keys_kept": b.kv_keys_kept, "kv_bytes_kept": b.kv_bytes_kept, "note": b.note}
  row.update(b.extra)
  t1 = time.time()
  row["ppl"] = perplexity(b.forward, b.params, windows)
  row["ppl_s"] = round(time.time() - t1, 1)
  row["ppl_tokens"] = int(windows.size)
  row["passkey_acc"], row["passkey_digits_acc"] = passkey_accuracy(
      b.forward, b.params, pk_tokens, pk_spans)
  row["passkey_trials"] = trials
  can_decode = _can_decode(b)
  if FLAGS.decode_steps and can_decode and (not quick or b.family == "dense"):
    row["decode_ms_per_token"] = _decode_ms(b, pk_tokens, ctx)
  elif can_decode:
    row["note"] += "; decode not timed in this run"
  else:
    row["decode_ms_per_token"] = None
    row["note"] += "; no token-by-token decode path"
  return row


def _meta(ctx, budget, windows_n, ppl_tokens, trials):
  return {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32)",
          "context": ctx, "budget": budget, "ppl_windows": windows_n,
          "ppl_tokens": ppl_tokens, "passkey_trials": trials,
          "decode_steps": FLAGS.decode_steps, "decode_timing": "prefill_excluded",
          "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()], "cpus": os.cpu_count(),
          "machine": platform.platform(), "jax": jax.__version__,
          "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def save(rows, meta=None):
  """Merges ``rows`` (and ``meta``) into the results file as it is now on disk, then writes it
  and the doc (re-reading keeps the rows another run stored meanwhile)."""
  results = R.merge(R.load(os.path.join(FLAGS.results_dir, R.RESULTS)), rows, meta)
  R.write(results, FLAGS.results_dir)
  if FLAGS.doc:
    R.write_doc(FLAGS.doc, results, not_run(results),
                heads_section(results) + duo_section(FLAGS.duo_gates))


def heads_section(results):
  """The (layer, KV head) choices of the Razor and Duo rows (F: full context, s: compressed)."""
  seen = {}
  for r in results["rows"]:
    for key, what in (("protected_kv_heads", "RazorAttention protected KV heads"),
                      ("retrieval_kv_heads", "DuoAttention retrieval KV heads")):
      if key in r:
        seen.setdefault((what, r["method"], r[key]), []).append(str(r["context"]))
  out = [f"{what} ({method}, context {', '.join(ctxs)}; per layer, KV heads 0-2, "
         f"F = full context, s = compressed): {heads}."
         for (what, method, heads), ctxs in seen.items()]
  return ["## Head choices\n\n" + "\n\n".join(out)] if out else []


def duo_section(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    d = json.load(f)
  s = d["settings"]
  g = np.asarray(d["gates"])
  return [f"## DuoAttention gates\n\nFitted by `fit_duo_gates` on SmolLM2 ({path}): "
          f"{s['steps']} Adam steps (lr {s['lr']}, warm-up and decay over a fifth of the "
          f"steps each), L1 weight {s['reg']}, batch 1 x {s['length']} tokens of synthetic "
          f"passkey text (seed {s['seed']}), gated attention alpha * full + (1 - alpha) * "
          f"(sink {s['sink']} + recent {s['recent']}), distillation of the final hidden states "
          f"at the answer positions; {d['fit_seconds']} s on {d['cpus']} shared CPU cores. "
          f"Loss {d['loss_first']:.4g} -> {d['loss_last']:.4g} (distillation "
          f"{d['distill_first']:.4g} -> {d['distill_last']:.4g}). Gates: mean {g.mean():.3f}, "
          f"min {g.min():.3f}, max {g.max():.3f}; per-layer mean: "
          + ", ".join(f"{v:.2f}" for v in g.mean(1)) + ". The run keeps the top half "
          "(streaming fraction 0.5) as full-attention heads. A short fit: the gates are a "
          "ranking after few steps, not converged values."]


def main(_):
  quick = FLAGS.quick
  windows_n = 2 if quick else FLAGS.ppl_windows
  trials = 3 if quick else FLAGS.passkey_trials
  ctx, budget = FLAGS.context, FLAGS.budget
  if FLAGS.merge_from:
    other = R.load(FLAGS.merge_from)
    for c_, m_ in other["meta"].items():
      save([r for r in other["rows"] if int(r["context"]) == int(c_)], m_)
    print(f"merged {len(other['rows'])} rows from {FLAGS.merge_from}", flush=True)
    if not FLAGS.methods:
      return
  register_local_families()
  from experiments.pretrained_methods import register_families
  register_families()
  from attnjax.models import load_smollm2
  t0 = time.time()
  model, params, tok = load_smollm2()
  c = model.config
  print(f"loaded SmolLM2-135M in {time.time() - t0:.1f}s", flush=True)
  pk_tokens, pk_spans, _ = passkey_batch(tok, ctx, trials)
  builders = built_methods(model, params, tok, ctx, budget)
  if FLAGS.decode_only or FLAGS.passkey_only:
    results = R.load(os.path.join(FLAGS.results_dir, R.RESULTS))
    for row in results["rows"]:
      if int(row["context"]) != ctx or not _selected(row["method"]):
        continue
      b = [bl for n, bl in builders if n == row["method"] or n == row["method"].split("(")[0]]
      b = b[0]()
      if FLAGS.passkey_only:
        row["passkey_acc"], row["passkey_digits_acc"] = passkey_accuracy(
            b.forward, b.params, pk_tokens, pk_spans)
        row["passkey_trials"] = trials
      if FLAGS.decode_only and _can_decode(b):
        row["decode_ms_per_token"] = _decode_ms(b, pk_tokens, ctx)
        row["note"] = b.note
      print(row["method"], ctx, {k: row.get(k) for k in (
          "passkey_acc", "passkey_digits_acc", "decode_ms_per_token")}, flush=True)
      save([row])                                   # saved after every method
    if FLAGS.decode_only:
      save([], {"context": ctx, "decode_steps": FLAGS.decode_steps,
                "decode_timing": "prefill_excluded"})
    return
  windows = heldout_windows(tok, ctx, windows_n)
  meta = _meta(ctx, budget, windows_n, int(windows.size), trials)
  rows = []
  for name, build in builders:
    if not _selected(name):
      continue
    row = {"method": name, "context": ctx, "budget": budget}
    try:
      t1 = time.time()
      b = build()
      setup_s = round(time.time() - t1, 1)
      row = run_method(b, windows, pk_tokens, pk_spans, trials, ctx, budget, quick)
      row["setup_s"] = setup_s
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    print(row, flush=True)
    rows.append(row)
    save(rows, meta)                                  # saved after every method
  if FLAGS.analysis:
    try:
      sink, echo, ind, t_text, t_rep = analysis_rows(model, params, tok, c.vocab_size)
      meta["analysis"] = {"sink_mass": sink.tolist(), "echo": echo.tolist(),
                          "induction": ind.tolist(), "text_tokens": t_text,
                          "repeated_tokens": t_rep}
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc()
  save(rows, meta)
  print(json.dumps(rows, indent=1, default=str))


def rewrite_doc(results_dir="results", doc="docs/pretrained_results.md",
                duo_gates="results/duo_gates_smollm2.json"):
  """Rewrites the markdown from results/pretrained_eval.json (no model run)."""
  results = R.load(os.path.join(results_dir, R.RESULTS))
  R.write_doc(doc, results, not_run(results), heads_section(results) + duo_section(duo_gates))

if __name__ == "__main__":
  app.run(main)
