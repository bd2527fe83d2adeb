"""Data of ``experiments.pretrained_eval``: held-out text windows and passkey prompts."""
from __future__ import annotations

import numpy as np


def heldout_windows(tok, context: int, n: int):
  from experiments.tasks.stdlib_lm import load_corpus
  _, evals, _ = load_corpus()
  text = bytes(evals).replace(b"\x00", b"\n\n").decode("utf-8", errors="replace")
  ids = []
  pos, chunk = 0, 200_000
  while len(ids) < n * context and pos < len(text):
    ids.extend(tok.encode(text[pos:pos + chunk]).ids)
    pos += chunk
  ids = np.asarray(ids[:n * context], np.int32)
  if len(ids) < n * context:
    raise RuntimeError(f"held-out split has only {len(ids)} tokens.")
  return ids.reshape(n, context)


FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


def passkey_batch(tok, context: int, trials: int, seed: int = 0):
  """(tokens [trials, context] int32, answer positions [trials, A], answer ids, keys)."""
  rng = np.random.default_rng(seed)
  filler = tok.encode(FILLER).ids
  rows, spans, keys = [], [], []
  for _ in range(trials):
    key = int(rng.integers(10000, 100000))
    head = tok.encode("There is important info hidden inside a lot of irrelevant text. "
                      "Find it and memorize it.\n").ids
    needle = tok.encode(f" The passkey is {key}. Remember it. {key} is the passkey. ").ids
    question = tok.encode("\nWhat is the passkey? The passkey is").ids
    answer = tok.encode(f" {key}").ids
    room = context - len(head) - len(needle) - len(question) - len(answer)
    body = (filler * (room // len(filler) + 1))[:room]
    depth = int(rng.integers(0, room + 1))
    seq = head + body[:depth] + needle + body[depth:] + question + answer
    assert len(seq) == context, len(seq)
    rows.append(seq)
    spans.append((context - len(answer), answer))
    keys.append(key)
  return np.asarray(rows, np.int32), spans, keys
