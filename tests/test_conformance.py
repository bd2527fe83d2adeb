"""``attnjax.attention`` against the dense oracle on every backend (the suite is
``conformance_base.AttentionConformance``; its docstring lists the cases).

The Pallas classes run the kernels in interpret mode on the CPU: the TPU
(Mosaic) kernels in TPU interpret mode and the GPU (Triton) kernels with
``interpret=True``. ``implementation='pallas'`` picks the kernels of the
platform the call is placed on (the TPU ones on a CPU), so the GPU class
routes the block-sparse kernel entry to ``backend='gpu'``; both classes
count the kernel launches, so a case cannot pass on another path.
"""
import functools

import jax.numpy as jnp
import pytest

from attnjax.block_sparse import api as block_sparse_api
from conformance_base import (CASES, FEATURES, AttentionConformance, case_data,
                              uncovered_pairs)

#: What the block-sparse Pallas kernels take (lengths, bias and mask arrays since c2f97b2).
#: Not "table_masks": a predicate reading a constant table (static Documents(ids),
#: RandomBlocks, KeyIn/QueryIn over more than 16 positions) is refused with a reason.
PALLAS_FEATURES = frozenset({"masks", "segment_ids", "gqa", "bfloat16", "cross", "numpy",
                             "lengths", "bias", "mask_array"})

class TestReference(AttentionConformance):
  __test__ = True
  IMPLEMENTATION = "reference"
  FEATURES = frozenset(FEATURES)


class TestXla(AttentionConformance):
  __test__ = True
  IMPLEMENTATION = "xla"
  FEATURES = frozenset(FEATURES)


class _PallasInterpret(AttentionConformance):
  """The block-sparse kernels of ``KERNEL_BACKEND`` ("tpu" or "gpu"), interpreted."""
  IMPLEMENTATION = "pallas"
  FEATURES = PALLAS_FEATURES
  NUMPY_VALUES = False   # the NumPy call is traced only (a second interpreted forward: seconds)
  KERNEL_BACKEND = "tpu"

  @pytest.fixture(autouse=True)
  def _route_kernels(self, monkeypatch):
    self._launches = []
    original = block_sparse_api.block_sparse_pallas

    @functools.wraps(original)
    def kernels(*args, **kwargs):
      kwargs["backend"] = self.KERNEL_BACKEND
      kwargs["interpret"] = True
      self._launches.append(kwargs["backend"])
      return original(*args, **kwargs)

    monkeypatch.setattr(block_sparse_api, "block_sparse_pallas", kernels)

  def kernel_calls(self):
    return len(self._launches)


class TestPallasTpuInterpret(_PallasInterpret):
  __test__ = True
  KERNEL_BACKEND = "tpu"
  # TPU interpret mode costs 5-8 s of CPU per case; rows 1, 2, 3, 6 hold every feature and
  # CAB pattern (MQA and causal cross with T > S run on these kernels in
  # test_pallas_block_sparse.py).
  SKIP = {name: "budget: the TPU interpreter runs rows 1, 2, 3, 6 (every declared feature "
                "and CAB pattern); this row runs on the GPU kernels and the XLA path"
          for name in ("array_bias_self_mqa_bf16", "head_array_lengths_cross_long_q_gqa_bf16")}


class TestPallasGpuInterpret(_PallasInterpret):
  __test__ = True
  KERNEL_BACKEND = "gpu"


def test_the_covering_set_is_pairwise():
  assert uncovered_pairs() == []
  assert uncovered_pairs(CASES[1:6]) != []      # the check can fail: five rows are too few


def test_a_backend_cannot_leave_out_a_feature_it_runs():
  class XlaWithoutBias(TestXla):
    FEATURES = TestXla.FEATURES - {"bias"}
  case = next(c for c in CASES if "bias" in c.features)
  q, k, v, _, _ = case_data(case.name)
  dt = jnp.dtype(case.dtype)
  with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
    XlaWithoutBias()._check_refused(case.name, {"bias"}, *(jnp.asarray(x, dt) for x in (q, k, v)))
