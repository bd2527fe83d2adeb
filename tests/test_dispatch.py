"""One dispatcher: implementation=None means the same for every op, the dense
reference never runs unasked, and ``attnjax.explain`` says why a backend was chosen."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import requires_toolchain

import attnjax
from attnjax import masks as M
from attnjax.core import dispatch
from attnjax.core import reference as R
from pallas_kernels import targets as TG

S = jax.ShapeDtypeStruct


def _qkv(T=64, N=4, K=2, H=16, B=1, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (np.asarray(jax.random.normal(ks[0], (B, T, N, H))),
          np.asarray(jax.random.normal(ks[1], (B, T, K, H))),
          np.asarray(jax.random.normal(ks[2], (B, T, K, H))))


@pytest.fixture
def no_reference(monkeypatch):
  """Makes every module-level handle on the dense oracle raise."""
  import sys  # pylint: disable=g-import-not-at-top

  def forbidden(*a, **k):
    raise AssertionError("the dense reference ran without being asked")

  for mod in list(sys.modules.values()):
    name = getattr(mod, "__name__", "")
    if name.startswith(("attnjax", "pallas_kernels")) and \
        getattr(mod, "reference_attention", None) is R.reference_attention:
      monkeypatch.setattr(mod, "reference_attention", forbidden)


CALLS = {
    "causal": lambda q, k, v: attnjax.attention(q, k, v, mask=M.Causal()),
    "window_gqa": lambda q, k, v: attnjax.attention(q, k, v, mask=M.Causal() & M.SlidingWindow(9)),
    "bias": lambda q, k, v: attnjax.attention(q, k, v, bias=jnp.zeros((1, 1, 64, 64))),
    "mask_array": lambda q, k, v: attnjax.attention(q, k, v, mask=np.tril(np.ones((64, 64), bool))),
    "segments": lambda q, k, v: attnjax.attention(
        q, k, v, mask=M.Causal(), segment_ids=np.repeat(np.arange(2), 32)[None]),
    "dpa_lengths": lambda q, k, v: attnjax.dot_product_attention(
        q, k, v, is_causal=True, key_value_seq_lengths=np.array([40])),
    "dpa_window": lambda q, k, v: attnjax.dot_product_attention(q, k, v, local_window_size=(8, 0)),
    "s2": lambda q, k, v: attnjax.s2_attention(q, k, v, block_size=16, local_blocks=1,
                                               vert_stride=2),
    "sliding": lambda q, k, v: attnjax.sliding_window_attention(q, k, v, left=7),
    "block_sparse_mask": lambda q, k, v: attnjax.block_sparse_attention(q, k, v, M.Causal()),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_public_entry_points_never_reach_the_reference_unasked(name, no_reference):
  q, k, v = _qkv()
  with warnings.catch_warnings():
    warnings.simplefilter("error")          # no fallback warning either
    out = CALLS[name](q, k, v)
  assert np.isfinite(np.asarray(out)).all()


def test_numpy_inputs_and_python_scalars_are_accepted():
  q, k, v = _qkv()
  out = attnjax.attention(q, k, v, mask=M.Causal(), scale=0.25)
  want = attnjax.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=M.Causal(),
                           scale=0.25, implementation="reference")
  np.testing.assert_allclose(out, want, atol=2e-5)
  layout = M.Causal().block_layout(64, 64, 16, 16, 1)
  np.testing.assert_allclose(attnjax.block_sparse_attention(q, k, v, layout), want, atol=2e-5)


def test_explain_names_the_backend_and_the_reasons_on_cpu():
  q, k, v = _qkv()
  (d,) = attnjax.explain(lambda q, k, v: attnjax.attention(q, k, v, mask=M.Causal()), q, k, v)
  assert d.backend == "xla" and d.platform == "cpu"
  assert d.passed_over[0][0] == "pallas" and "cpu" in d.passed_over[0][1]
  assert "attention on cpu (implementation=None): xla" in str(d)


def test_reference_runs_with_a_warning_naming_every_reason_when_nothing_else_can():
  q, k, v = _qkv()
  fn = jax.jit(lambda s: attnjax.attention(q, k, v, scale=s))
  with pytest.warns(UserWarning, match=r"reference runs \(pallas: .*; xla: .*static"):
    fn(0.25)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    attnjax.attention(q, k, v, scale=jnp.float32(0.25), implementation="reference")


def test_explicit_backends_that_cannot_run_say_why():
  q, k, v = _qkv()
  with pytest.raises(NotImplementedError, match="implementation='pallas'.*row_count"):
    attnjax.attention(q, k, v, score=attnjax.scores.ReLU(normalize="length"),
                      implementation="pallas")
  with pytest.raises(ValueError, match="implementation must be one of"):
    attnjax.attention(q, k, v, implementation="triton")


def test_on_a_tpu_target_kernels_are_chosen_and_row_count_scores_move_to_xla():
  requires_toolchain("tpu_v5e")
  q, kv = S((1, 1024, 4, 128), jnp.bfloat16), S((1, 1024, 2, 128), jnp.bfloat16)
  with jax.default_device(TG.device("tpu_v5e")):
    (d,) = attnjax.explain(lambda q, k, v: attnjax.attention(q, k, v, mask=M.Causal()), q, kv, kv)
    assert (d.backend, d.target) == ("pallas", "tpu_v5e")
    (d,) = attnjax.explain(lambda q, k, v: attnjax.attention(   # bias: kernels read it too
        q, k, v, mask=M.Causal(), bias=jnp.zeros((1, 1, 1024, 1024))), q, kv, kv)
    assert d.backend == "pallas"
    (d,) = attnjax.explain(lambda q, k, v: attnjax.attention(
        q, k, v, mask=M.Causal(), score=attnjax.scores.ReLU(normalize="length")), q, kv, kv)
    assert d.backend == "xla" and "row_count" in d.passed_over[0][1]


def test_masks_reading_constant_tables_are_refused_by_the_kernels_and_move_to_xla():
  """A predicate that reads a table (kernels cannot capture arrays) goes to the XLA path."""
  from pallas_kernels.block_sparse import block_sparse_pallas  # pylint: disable=g-import-not-at-top
  q, k, v = _qkv(T=64)
  table_masks = (M.Causal() & M.RandomBlocks(block_size=16, num_random=1, seq_len=64),
                 M.Documents(tuple([0] * 20 + [1] * 44)) & M.Causal(),
                 M.Causal() & M.KeyIn(tuple(range(0, 60, 3))))            # 20 positions
  for mask in table_masks:
    with pytest.raises(NotImplementedError, match="constant tables"):
      attnjax.attention(q, k, v, mask=mask, implementation="pallas")
    with pytest.raises(NotImplementedError, match="constant tables"):
      block_sparse_pallas(q, k, v, mask.block_layout(64, 64, 16, 16), mask=mask)
    (d,) = attnjax.explain(lambda q, k, v, m=mask: attnjax.attention(q, k, v, mask=m), q, k, v)
    assert d.backend == "xla"
  # a few KeyIn positions are compared one by one: no table, the kernels take it
  few = M.Causal() & M.KeyIn((0, 9, 40))
  np.testing.assert_allclose(
      attnjax.attention(q, k, v, mask=few, implementation="pallas"),
      attnjax.attention(q, k, v, mask=few, implementation="reference"), atol=2e-5)


def test_resolution_rules_on_a_toy_table():
  call = dispatch.Call("toy", "cpu", None, {"fast_ok": False})
  table = (dispatch.Backend("pallas", lambda c, e: None if e else "opt-in only"),
           dispatch.Backend("xla", lambda c, e: None if c["fast_ok"] else "no"))
  with dispatch.recording() as log:
    assert dispatch.resolve(call, table, "pallas").backend == "pallas"
    with pytest.warns(UserWarning):
      assert dispatch.resolve(call, table, None).backend == "reference"
  assert [d.backend for d in log] == ["pallas", "reference"]
  assert log[1].passed_over == (("pallas", "opt-in only"), ("xla", "no"))
