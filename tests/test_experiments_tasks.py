"""Embedded tasks: deterministic given the seed, documented shapes, correct labels."""
import numpy as np
import pytest

from experiments.tasks import TASKS, listops, make_task, passkey, stdlib_lm

SMALL = {
    "stdlib_lm": dict(seq_len=32),
    "mqar": dict(seq_len=32, vocab_size=32, num_kv_pairs=4),
    "passkey": dict(seq_len=48, num_digits=3, min_context=8, eval_contexts=(16, 40)),
    "bigram_backcopy": dict(seq_len=32),
    "listops": dict(seq_len=48, max_depth=3, max_args=4),
    "digits": dict(patch_size=2),
}


def _make(name, seed=0, batch_size=4):
  return make_task(dict(name=name, batch_size=batch_size, eval_batches=2, **SMALL[name]), seed)


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_deterministic_and_shapes(name):
  t1, t2 = _make(name), _make(name)
  b = t1.train_batch(5)
  assert _equal(b, t2.train_batch(5))                 # pure function of (seed, step)
  assert not _equal(b, t1.train_batch(6))
  assert not _equal(b, _make(name, seed=1).train_batch(5))
  assert _equal(next(iter(t1.eval_batches())), next(iter(t2.eval_batches())))
  B, T = 4, t1.seq_len
  if t1.kind == "lm":
    assert b["inputs"].shape == b["targets"].shape == b["weights"].shape == (B, T)
    assert b["inputs"].dtype == np.int32 and b["inputs"].max() < t1.vocab_size
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  else:
    assert b["labels"].shape == b["weights"].shape == (B,)
    assert b["labels"].max() < t1.num_classes
    if t1.vocab_size is None:
      assert b["inputs"].shape == (B, T, t1.input_dim)
    else:
      assert b["inputs"].shape == (B, T)
  assert t1.describe()["task"] == name


def test_stdlib_corpus_split_and_documented_size():
  t = _make("stdlib_lm")
  st = t.stats
  assert st["files_train"] > 100 and st["files_eval"] > 5
  assert st["bytes_train"] > 1_000_000
  files = stdlib_lm.list_files(stdlib_lm.stdlib_dir())
  assert "os.py" in files and files == sorted(files)
  assert not any(f.startswith("test/") for f in files)
  assert t.train_batch(0)["inputs"].max() < 256


def test_mqar_targets_are_the_values_of_queried_keys():
  t = _make("mqar")
  b = t.train_batch(0)
  D = t.num_kv_pairs
  for x, y, w in zip(b["inputs"], b["targets"], b["weights"]):
    table = dict(zip(x[0:2 * D:2], x[1:2 * D:2]))
    pos = np.nonzero(w)[0]
    assert len(pos) == D and all(p >= 2 * D for p in pos)
    assert all(table[x[p]] == y[p] for p in pos)


def test_passkey_answer_and_context_sets():
  t = _make("passkey")
  b = t.context_batch(16, 0)
  for x, y, w in zip(b["inputs"], b["targets"], b["weights"]):
    pos = np.nonzero(w)[0]
    assert x[pos[0]] == passkey.QUERY and pos[0] == 16
    needle = int(np.nonzero(x == passkey.NEEDLE)[0][0])
    np.testing.assert_array_equal(y[pos], x[needle + 1:needle + 4])
  sets = t.extra_eval_sets()
  assert sorted(sets) == ["context_16", "context_40"] and len(sets["context_40"]) == 2


def test_bigram_backcopy_copies_the_token_before_a_trigger():
  t = _make("bigram_backcopy")
  b = t.train_batch(3)
  n = 0
  for x, y, c in zip(b["inputs"], b["targets"], b["copy_weights"]):
    for i in np.nonzero(c)[0]:
      assert 1 <= x[i] <= t.num_triggers and y[i] == x[i - 1]
      n += 1
  assert n > 0


def test_listops_labels_match_the_evaluator():
  assert listops.evaluate([11, 3, 10, 12, 5, 8, 15, 1, 15]) == 9     # [MAX 2 9 [MIN 4 7 ] 0 ]
  assert listops.evaluate([14, 8, 9, 15]) == 5                         # [SM 7 8 ] = 15 % 10
  t = _make("listops")
  b = t.train_batch(0)
  for x, y, m in zip(b["inputs"], b["labels"], b["token_mask"]):
    assert listops.evaluate(x[m]) == y


def test_digits_split_and_eval_padding():
  t = _make("digits", batch_size=64)
  assert len(t.train_y) == 1437 and len(t.test_y) == 360
  batches = list(t.eval_batches())
  assert len(batches) == 6 and sum(b["weights"].sum() for b in batches) == 360


def test_bad_task_fields_name_the_field():
  with pytest.raises(ValueError, match="task.num_kv_pairs"):
    make_task(dict(name="mqar", batch_size=2, seq_len=16, num_kv_pairs=8), 0)
  with pytest.raises(ValueError, match="task.patch_size"):
    make_task(dict(name="digits", batch_size=2, patch_size=3), 0)
  with pytest.raises(ValueError, match="does not take"):
    make_task(dict(name="digits", batch_size=2, bogus=1), 0)
