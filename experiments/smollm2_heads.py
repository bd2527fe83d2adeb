"""Head analyses of the seed papers on a real pretrained LM (SmolLM2-135M-Instruct).

``python3 -m experiments.smollm2_heads [--context=1024] [--trials=4]``

Runs ``attnjax.analysis`` on SmolLM2's own attention weights (dense model,
weights unchanged) and writes results/smollm2_heads.json and
docs/smollm2_heads.md:

- Retrieval Head ("Retrieval Head Mechanistically Explains Long-Context
  Factuality"): a needle sentence hidden at ``--trials`` depths of
  ``--context`` tokens of held-out text; the model copies it under teacher
  forcing; a head scores ``1/|needle|`` at each copied token whose top-1 key is
  that token inside the needle (``attnjax.analysis.heads.retrieval_score_step``;
  the emitted token is the model's argmax at that position).
- Active-Dormant heads ("Active-Dormant Attention Heads"): sink mass (mean
  weight on token 0) and value-norm ratio of token 0 per head
  (``sink_metrics``) on two input domains, Python source and the English
  comment lines of the same files; heads dormant (sink mass > ``--dormant``)
  on one domain and active on the other.
- ACT ("Unveiling and Harnessing Hidden Attention Sinks"): hidden sinks per
  head (``find_hidden_sinks``: columns other than the first with mean
  received weight > 0.1), which tokens they are, and held-out perplexity with
  ``act_calibrate`` applied to every head versus the unchanged model.
- VAR ("See What You Are Told: Visual Attention Sink"): the residual-stream
  dimensions with massive activations (|RMSNorm(h)| > tau = 20 at some token),
  the tokens ``find_sink_tokens`` flags with them, and the attention mass those
  tokens receive. SmolLM2 is text-only: VAR's redistribution towards image
  tokens has no target here, only its sink detector is measured.

Attention weights come from the dense reference path (``probs_hook``), which
materialises [N, T, T] per layer: this is an analysis run, not a fast path.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import time

from absl import app
from absl import flags

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.models.common import unstack_layers

FLAGS = flags.FLAGS

NEEDLE = (" The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park "
          "on a sunny day.")
QUESTION = ("\nWhat is the best thing to do in San Francisco? Answer: The best thing to do in "
            "San Francisco is")
ANSWER = " eat a sandwich and sit in Dolores Park on a sunny day."


# --------------------------------------------------------------------------- model access


class Probe:
  """Runs the model with dense attention and returns, per layer, probs [N, T, T],
  values [T, K, H] and the residual stream after the block [T, D] (batch 1)."""

  def __init__(self, model, params, hook=None):
    from attnjax.layers import registry
    self._store = []
    name = f"heads_probe_{id(self)}"

    def family(query, key, value, *, causal, q_positions=None, k_positions=None,
               segment_ids=None):
      def record(p):
        jax.debug.callback(lambda a, b: self._store.append((np.asarray(a), np.asarray(b))),
                           p, value, ordered=True)
        return p if hook is None else hook(p)
      return registry.dense_family(query, key, value, causal=causal, q_positions=q_positions,
                                   k_positions=k_positions, segment_ids=segment_ids,
                                   probs_hook=record)
    registry.register_family(name, family)
    c = dataclasses.replace(model.config, attention=name, scan_layers=False)
    self.model = model.clone(config=c)
    self.params = unstack_layers(params)
    self.num_layers = c.num_layers
    self._fwd = jax.jit(lambda p, t: self.model.apply({"params": p}, t,
                                                      capture_intermediates=True))

  def __call__(self, ids):
    logits, state = self._fwd(self.params, jnp.asarray(ids, jnp.int32)[None])
    jax.effects_barrier()
    probs = np.stack([s[0][0] for s in self._store])             # [L, N, T, T]
    values = np.stack([s[1][0] for s in self._store])            # [L, T, K, H]
    self._store.clear()
    inter = state["intermediates"]
    resid = np.stack([np.asarray(inter[f"layer_{i}"]["__call__"][0][0])
                      for i in range(self.num_layers)])          # [L, T, D]
    return np.asarray(logits[0]), probs, values, resid


# --------------------------------------------------------------------------- data

def heldout_text(n_bytes: int = 400_000) -> str:
  from experiments.tasks.stdlib_lm import load_corpus
  evals = load_corpus()[1][:n_bytes]
  return bytes(evals).replace(b"\x00", b"\n\n").decode("utf-8", errors="replace")


def comment_text(text: str) -> str:
  """The English of the comment lines ('# ...') of Python source, one line each."""
  lines = [ln.strip()[1:].strip() for ln in text.splitlines() if ln.strip().startswith("# ")]
  return "\n".join(ln for ln in lines if len(ln.split()) >= 4)


def needle_prompt(tok, text_ids, context: int, depth: float):
  """(ids [context], needle (start, end), answer positions, answer ids)."""
  needle = tok.encode(NEEDLE).ids
  question = tok.encode(QUESTION).ids
  answer = tok.encode(ANSWER).ids
  room = context - len(needle) - len(question) - len(answer)
  if room < 16:
    raise ValueError(f"context={context} leaves no room for the haystack.")
  hay = list(text_ids[:room])
  d = int(depth * room)
  ids = hay[:d] + needle + hay[d:] + question + answer
  start = len(ids) - len(answer)
  return np.asarray(ids, np.int32), (d, d + len(needle)), start, np.asarray(answer)


# --------------------------------------------------------------------------- analyses

def retrieval_scores(probe, tok, text_ids, context, trials):
  from attnjax.analysis.heads import retrieval_score_step
  total, copied = None, []
  for t in range(trials):
    depth = (t + 0.5) / trials
    ids, span, start, answer = needle_prompt(tok, text_ids[t * 97:], context, depth)
    logits, probs, _, _ = probe(ids)
    score = np.zeros(probs.shape[:2], np.float32)
    hits = 0
    for a in range(len(answer)):
      pos = start + a - 1                         # this query predicts answer[a]
      gen = int(logits[pos].argmax())
      hits += int(gen == answer[a])
      score += np.asarray(retrieval_score_step(jnp.asarray(probs[:, :, pos, :]), gen,
                                               jnp.asarray(ids), span))
    total = score if total is None else total + score
    copied.append(hits / len(answer))
  return total / trials, copied


def domain_sinks(probe, ids):
  from attnjax.analysis.heads import sink_metrics
  from attnjax.analysis.edits import find_hidden_sinks
  _, probs, values, resid = probe(ids)
  L, N = probs.shape[:2]
  mass = np.zeros((L, N))
  vratio = np.zeros((L, values.shape[2]))
  for layer in range(L):
    m = sink_metrics(jnp.asarray(probs[layer][None]), jnp.asarray(values[layer][None]))
    mass[layer], vratio[layer] = np.asarray(m["sink_mass"]), np.asarray(m["value_norm_ratio"])
  hidden = np.asarray(find_hidden_sinks(jnp.asarray(probs)))     # [L, N, T]
  return mass, vratio, hidden, probs, resid


def massive_dims(resid, tau: float = 20.0):
  """Dimensions d with |RMSNorm(h)_d| > tau at some token of some layer -> sorted list."""
  h = resid.astype(np.float32)
  h = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + 1e-6)
  return sorted(int(d) for d in np.unique(np.nonzero(np.abs(h) > tau)[-1]))


def act_perplexity(model, params, windows):
  from attnjax.analysis.edits import act_calibrate
  from attnjax.layers import registry
  name = "heads_act"
  if name not in registry.list_families():
    registry.register_family(name, functools.partial(registry.dense_family,
                                                     probs_hook=act_calibrate))
  out = {}
  for label, fam in (("dense", "dense"), ("act", name)):
    m = model.clone(config=dataclasses.replace(model.config, attention=fam))
    fwd = jax.jit(lambda p, t, m=m: m.apply({"params": p}, t))
    nll, count = 0.0, 0
    for w in windows:
      lp = jax.nn.log_softmax(fwd(params, jnp.asarray(w[None]))[0, :-1], axis=-1)
      nll += float(-jnp.sum(jnp.take_along_axis(lp, jnp.asarray(w[1:, None]), axis=-1)))
      count += len(w) - 1
    out[label] = float(np.exp(nll / count))
  return out


def _top(scores, n=8):
  N = scores.shape[1]
  return [(f"L{int(i) // N}H{int(i) % N}", round(float(scores.flat[i]), 3))
          for i in np.argsort(-scores, axis=None)[:n]]


def main(_):
  from attnjax.models import load_smollm2
  t0 = time.time()
  model, params, tok = load_smollm2()
  probe = Probe(model, params)
  text = heldout_text()
  text_ids = np.asarray(tok.encode(text).ids, np.int32)
  res = {"context": FLAGS.context, "trials": FLAGS.trials, "domain_tokens": FLAGS.domain_tokens,
         "dormant_threshold": FLAGS.dormant, "needle": NEEDLE, "ppl_windows": FLAGS.ppl_windows}

  score, copied = retrieval_scores(probe, tok, text_ids, FLAGS.context, FLAGS.trials)
  res["retrieval"] = {"score": score.tolist(), "copy_accuracy": copied,
                      "top": _top(score), "heads_over_0.1": int((score > 0.1).sum()),
                      "heads_nonzero": int((score > 0).sum())}
  print("retrieval", res["retrieval"]["top"], copied, flush=True)

  n = FLAGS.domain_tokens
  code_ids = text_ids[:n]
  prose_ids = np.asarray(tok.encode(comment_text(text)).ids[:n], np.int32)
  dom = {}
  for label, ids in (("code", code_ids), ("comments", prose_ids)):
    mass, vratio, hidden, probs, resid = domain_sinks(probe, ids)
    counts = collections.Counter()
    for tpos in np.nonzero(hidden.any(axis=(0, 1)))[0]:
      counts[tok.decode([int(ids[tpos])])] += int(hidden[..., tpos].sum())
    dims = massive_dims(resid)
    from attnjax.analysis.edits import find_sink_tokens
    # VAR per layer: tokens flagged in the residual entering layer l (the output of l-1),
    # position 0 excluded, and the mean weight layer l's queries give them.
    flagged = (np.array(find_sink_tokens(jnp.asarray(resid[:-1]), dims)) if dims
               else np.zeros((resid.shape[0] - 1, resid.shape[1]), bool))   # [L-1, T]
    flagged[:, 0] = False
    recv = probs.mean(axis=(1, 2))[1:]                          # [L-1, T] weight received
    dom[label] = {
        "sink_mass": mass.tolist(), "value_norm_ratio": vratio.tolist(),
        "dormant": int((mass > FLAGS.dormant).sum()),
        "heads_with_hidden_sinks": int(hidden.any(-1).sum()),
        "hidden_sink_tokens": counts.most_common(8),
        "massive_dims": dims,
        "var_sinks_per_layer": float(flagged.sum(-1).mean()),
        "var_sink_attention": float((recv * flagged).sum(-1).mean()),
        "var_sink_tokens": collections.Counter(
            tok.decode([int(ids[p])]) for p in np.nonzero(flagged.any(0))[0]).most_common(8),
        "first_token_attention": float(recv[:, 0].mean())}
    print(label, {k: v for k, v in dom[label].items()
                  if k not in ("sink_mass", "value_norm_ratio")}, flush=True)
  res["domains"] = dom
  a, b = (np.asarray(dom[d]["sink_mass"]) > FLAGS.dormant for d in ("code", "comments"))
  res["switching_heads"] = {"dormant_code_only": int((a & ~b).sum()),
                            "dormant_comments_only": int((b & ~a).sum()),
                            "dormant_both": int((a & b).sum())}

  n_win = FLAGS.ppl_windows * FLAGS.context
  if len(text_ids) < n_win:
    raise ValueError(f"--ppl_windows x --context = {n_win} tokens exceeds the {len(text_ids)} "
                     "held-out tokens read.")
  windows = text_ids[:n_win].reshape(FLAGS.ppl_windows, FLAGS.context)
  res["act_ppl"] = act_perplexity(model, params, windows)
  print("act", res["act_ppl"], flush=True)
  res["seconds"] = round(time.time() - t0, 1)
  res["backend"] = jax.default_backend()
  os.makedirs(FLAGS.results_dir, exist_ok=True)
  with open(os.path.join(FLAGS.results_dir, "smollm2_heads.json"), "w") as f:
    json.dump(res, f, indent=1)
  if FLAGS.doc:
    write_doc(FLAGS.doc, res)


def write_doc(path, r):
  L = len(r["retrieval"]["score"])
  N = len(r["retrieval"]["score"][0])
  rs = r["retrieval"]
  d, sw = r["domains"], r["switching_heads"]
  fmt = lambda top: ", ".join(f"{h} ({s:.2f})" for h, s in top)
  lines = [
      "# SmolLM2-135M: head analyses of the seed papers", "",
      "Generated by `python3 -m experiments.smollm2_heads` on the unchanged "
      f"SmolLM2-135M-Instruct ({L} layers x {N} query heads), dense attention weights from the "
      f"reference path. Backend {r['backend']}; {r['seconds']} s in all.", "",
      "## Retrieval heads (needle copy task)", "",
      f"Needle \"{r['needle'].strip()}\" at {r['trials']} depths of a {r['context']}-token "
      "prompt of held-out Python source, then the question and the answer under teacher "
      "forcing. Copy accuracy (the model's argmax equals the answer token) per depth: "
      + ", ".join(f"{c:.2f}" for c in rs["copy_accuracy"]) + ".", "",
      f"Heads with retrieval score > 0.1: {rs['heads_over_0.1']} of {L * N}; heads with a "
      f"nonzero score: {rs['heads_nonzero']}. Top heads: {fmt(rs['top'])}.", "",
      "## Active and dormant heads", "",
      f"Sink mass = mean attention weight on token 0 over {r['domain_tokens']} tokens; dormant = "
      f"sink mass > {r['dormant_threshold']} (a threshold chosen here, not the paper's).", "",
      "| domain | dormant heads | heads with a hidden sink (ACT) | mean weight on token 0 | "
      "top hidden-sink tokens (head count) |", "|---|---|---|---|---|"]
  for k, v in d.items():
    toks = ", ".join(f"{t!r} ({c})" for t, c in v["hidden_sink_tokens"])
    lines.append(f"| {k} | {v['dormant']} of {L * N} | {v['heads_with_hidden_sinks']} | "
                 f"{v['first_token_attention']:.3f} | {toks} |")
  lines += [
      "", f"Heads dormant on code only: {sw['dormant_code_only']}; on comments only: "
      f"{sw['dormant_comments_only']}; on both: {sw['dormant_both']}.", "",
      "Value-norm ratio of token 0 (||v_0|| / mean ||v||), mean over KV heads and layers: "
      + ", ".join(f"{k} {np.mean(v['value_norm_ratio']):.3f}" for k, v in d.items()) + ".", "",
      "## ACT calibration", "",
      f"Perplexity of held-out text ({r['ppl_windows']} windows of {r['context']} tokens, the "
      "first of the validation split): unchanged "
      f"{r['act_ppl']['dense']:.4g}, ACT on every head (tau 0.1, beta 0.4) "
      f"{r['act_ppl']['act']:.4g}. The paper selects the heads to calibrate on a task's "
      "calibration set; calibrating every head is the simple variant.", "",
      "## VAR sink detector", ""]
  for k, v in d.items():
    toks = ", ".join(f"{t!r} ({c})" for t, c in v["var_sink_tokens"])
    lines.append(f"- {k}: massive dimensions (|RMSNorm(h)| > 20 at some token) "
                 f"{v['massive_dims']}; per layer, {v['var_sinks_per_layer']:.1f} tokens after "
                 f"position 0 are flagged in the residual entering it (of {r['domain_tokens']}) and "
                 f"they receive {100 * v['var_sink_attention']:.1f}% of that layer's attention "
                 f"(token 0: {100 * v['first_token_attention']:.1f}%); flagged tokens: {toks}.")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def define_flags():
  """The command's flags (defined on demand, so importing this module defines none)."""
  flags.DEFINE_integer("context", 1024, "Tokens of the needle prompt and of each ppl window.")
  flags.DEFINE_integer("trials", 4, "Needle depths for the retrieval-head scores.")
  flags.DEFINE_integer("domain_tokens", 512, "Tokens per input domain for sink statistics.")
  flags.DEFINE_integer("ppl_windows", 2, "Held-out windows for the ACT perplexity.")
  flags.DEFINE_float("dormant", 0.5, "Sink mass above which a head counts as dormant.")
  flags.DEFINE_string("results_dir", "results", "Where smollm2_heads.json goes.")
  flags.DEFINE_string("doc", "docs/smollm2_heads.md", "Markdown file written ('' for none).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
