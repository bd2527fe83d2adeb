"""One block plan (``BlockLayout``) for every block-sparse backend, static and run-time."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import plan as PL
from attnjax.block_sparse import plan as XP
from attnjax.block_sparse.sparse import block_sparse_attention, block_sparse_attention_indices
from attnjax.core import validation as V
from attnjax.masks import Causal, SlidingWindow
from attnjax.masks import layout as LY
from pallas_kernels.block_sparse import api as KA
from pallas_kernels.block_sparse import block_sparse_pallas, block_sparse_pallas_indices

T, N, K, H, BLOCK = 64, 2, 1, 8, 16


def _qkv():
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  return (jax.random.normal(ks[0], (1, T, N, H)), jax.random.normal(ks[1], (1, T, K, H)),
          jax.random.normal(ks[2], (1, T, K, H)))


@pytest.fixture
def received(monkeypatch):
  """The plans the XLA engine's scheduler and the kernels' list preparation receive."""
  seen = []
  xla, kernels = XP.layout_plan, KA.plan_attention

  def spy_xla(layout, *args):
    seen.append(("xla", layout))
    return xla(layout, *args)

  def spy_kernels(cfg, layout, module):
    seen.append((module.__name__.rsplit(".", 1)[-1], layout))
    return kernels(cfg, layout, module)

  monkeypatch.setattr(XP, "layout_plan", spy_xla)
  monkeypatch.setattr(KA, "plan_attention", spy_kernels)
  return seen


def test_static_plan_reaches_every_backend(received):
  q, k, v = _qkv()
  bm = np.tril(np.ones((T // BLOCK, T // BLOCK), bool))[None]
  plan = LY.layout_from_block_mask(bm, T, T, BLOCK, BLOCK)
  want = block_sparse_attention(q, k, v, plan, implementation="reference")
  outs = [block_sparse_attention(q, k, v, plan, implementation="xla")]
  outs += [block_sparse_pallas(q, k, v, plan, backend=b, interpret=True) for b in ("tpu", "gpu")]
  assert [name for name, _ in received] == ["xla", "tpu", "gpu"]
  assert all(p is plan for _, p in received)
  for out in outs:
    np.testing.assert_allclose(out, want, atol=2e-5)


def test_runtime_lists_are_the_same_plan_type(received):
  q, k, v = _qkv()
  nq = T // BLOCK
  idx = jnp.broadcast_to(jnp.arange(nq, dtype=jnp.int32), (1, K, nq, nq))
  counts = jnp.broadcast_to(jnp.arange(1, nq + 1, dtype=jnp.int32), (1, K, nq))
  kw = dict(block_q=BLOCK, block_kv=BLOCK, mask=Causal())
  want = block_sparse_attention_indices(q, k, v, idx, counts, implementation="reference", **kw)
  outs = [jax.jit(lambda q, i, c: block_sparse_attention_indices(
      q, k, v, i, c, implementation="xla", **kw))(q, idx, counts)]
  outs += [block_sparse_pallas_indices(q, k, v, idx, counts, backend=b, interpret=True, **kw)
           for b in ("tpu", "gpu")]
  assert [name for name, _ in received] == ["xla", "tpu", "gpu"]
  defs = {jax.tree_util.tree_structure(p) for _, p in received}
  assert len(defs) == 1
  assert all(isinstance(p, LY.BlockLayout) and p.batched and p.any_partial for _, p in received)
  for out in outs:
    np.testing.assert_allclose(out, want, atol=2e-5)


def test_plan_is_a_pytree_with_list_leaves():
  q, k, v = _qkv()
  d = V.check_qkv(q, k, v)
  nq = T // BLOCK
  idx = jnp.zeros((1, K, nq, 2), jnp.int32).at[..., 1].set(1)
  plan = PL.from_lists(idx, None, d, BLOCK, BLOCK)
  leaves, treedef = jax.tree_util.tree_flatten(plan)
  assert len(leaves) == 4        # fwd/bwd indices and counts (run-time kinds are static)
  got = jax.jit(lambda p: p)(plan)
  assert isinstance(got, LY.BlockLayout) and got.batched and got.block_q == BLOCK
  np.testing.assert_array_equal(got.bwd_counts[0, 0], [nq, nq, 0, 0])
  static = Causal().block_layout(T, T, BLOCK, BLOCK)
  again = jax.tree_util.tree_unflatten(*reversed(jax.tree_util.tree_flatten(static)))
  assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(static)
  np.testing.assert_array_equal(again.block_mask, static.block_mask)


def test_at_blocks_matches_the_mask_compiled_at_those_blocks():
  mask = Causal() & SlidingWindow(40)
  fine = mask.block_layout(128, 256, 16, 64)
  coarse = PL.at_blocks(fine, 32, 128, num_heads=2)
  want = mask.block_layout(128, 256, 32, 128)
  assert coarse.num_heads == 2 and (coarse.block_q, coarse.block_kv) == (32, 128)
  np.testing.assert_array_equal(coarse.block_mask, np.repeat(want.block_mask, 2, 0))
  with pytest.raises(ValueError, match="multiples"):
    PL.at_blocks(fine, 24, 64)
