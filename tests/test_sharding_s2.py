"""Sharding on 8 simulated CPU devices (in a subprocess: XLA_FLAGS must precede the jax import).

S2 head-sharded context parallelism (the block-sparse exchange with a head
axis) equals unsharded attention (forward and gradients) on several meshes; a model trained on a (data, heads, context) =
(2, 2, 2) mesh matches the single-device run; mesh errors name the field;
the communication plan receives less than an all-gather, and no more blocks
than the S2 route's own plan did before it ran on the block-sparse exchange.
"""

import numpy as np
import pytest

import multidevice

SCRIPT = r'''
import json, os, tempfile
import jax, jax.numpy as jnp, numpy as np
from attnjax import masks as M
from attnjax.core.reference import reference_attention
from attnjax.layers import registry
from attnjax.sharding import make_mesh, context_parallel_attention, communication_bytes
out = {"devices": jax.device_count()}
B, T, N, K, H = 2, 64, 4, 2, 8
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, H), np.float32)) for n in (N, K, K))
cases = [((1, 1, 8), M.S2(N, block_size=8, local_blocks=2, vert_stride=4, num_kv_heads=K)),
         ((2, 2, 2), M.S2(N, block_size=8, local_blocks=2, vert_stride=4, num_kv_heads=K)),
         ((1, 2, 4), M.S2(N, block_size=8, local_blocks=(2, 1), vert_stride=3, causal=False,
                          num_kv_heads=K))]
loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v) ** 2))
for shape, m in cases:
  mesh = make_mesh(*shape)
  f = lambda q, k, v: context_parallel_attention(q, k, v, m, mesh, implementation="reference")
  r = lambda q, k, v: reference_attention(q, k, v, mask=m)
  both = jax.jit(lambda *a: [(g(*a), jax.grad(loss(g), argnums=(0, 1, 2))(*a)) for g in (f, r)])
  (o1, g1), (o2, g2) = both(q, k, v)    # one compile per case
  out[str(shape)] = {"fwd": float(jnp.abs(o1 - o2).max()),
                     "grad": max(float(jnp.abs(a - b).max()) for a, b in zip(g1, g2))}
s2 = M.S2(8, block_size=16, local_blocks=2, vert_stride=8)
kw = dict(batch=1, seq_len=1024, num_heads=8, num_kv_heads=8, head_dim=64, num_chunks=8)
out["bytes_s2"] = communication_bytes(s2, **kw)

# -- training on a mesh equals training on one device ---------------------------------
if "s2" not in registry.list_families():
  def _s2(query, key, value, *, causal, q_positions=None, k_positions=None, segment_ids=None,
          implementation=None, **o):
    m = M.S2(query.shape[2], causal=causal, num_kv_heads=key.shape[2], **o)
    return reference_attention(query, key, value, mask=m)
  registry.register_family("s2", _s2)
from configs import common
from experiments import metrics, trainer
def cfg(mesh):
  c = common.base_config("t")
  c.task.name = "stdlib_lm"; c.task.seq_len = 32; c.task.batch_size = 4; c.task.eval_batches = 1
  c.model.num_layers = 1; c.model.d_model = 32; c.model.num_heads = 4; c.model.num_kv_heads = 2
  c.model.layer_attention = ("s2",)
  c.model.family_options = {"s2": {"block_size": 4, "local_blocks": 2, "vert_stride": 4}}
  c.model.use_presets = False
  c.optim.warmup_steps = 0; c.train.num_steps = 1; c.train.log_every = 1; c.train.eval_every = 1
  c.train.checkpoint_every = 1; c.train.progress_bar = False
  c.mesh.data, c.mesh.heads, c.mesh.context = mesh
  return c
losses = {}
for mesh in [(1, 1, 1), (2, 2, 2)]:
  wd = tempfile.mkdtemp()
  trainer.train(cfg(mesh), wd, echo=lambda s: None)
  losses[str(mesh)] = [r["value"] for r in metrics.read_csv(os.path.join(wd, "metrics.csv"))
                       if r["metric"] == "loss"]
out["train_losses"] = losses
errs = {}
for mesh, field, value in [((1, 2, 4), "num_heads", 3), ((1, 1, 8), "seq_len", 36),
                           ((1, 1, 4), None, None)]:
  c = cfg(mesh)
  if field == "num_heads":
    c.model.num_heads = 3; c.model.num_kv_heads = 0; c.model.d_model = 24
  elif field == "seq_len":
    c.task.seq_len = 36
  try:
    trainer.Experiment(c, tempfile.mkdtemp())
    errs[str(mesh)] = "no error"
  except ValueError as e:
    errs[str(mesh)] = str(e)
out["errors"] = errs
print("RESULT" + json.dumps(out))
'''


multidevice.register("s2", SCRIPT)


@pytest.fixture(scope="module")
def result():
  return multidevice.result("s2")


def test_eight_devices(result):
  assert result["devices"] == 8


@pytest.mark.parametrize("mesh", ["(1, 1, 8)", "(2, 2, 2)", "(1, 2, 4)"])
def test_context_parallel_equals_unsharded(result, mesh):
  assert result[mesh]["fwd"] < 1e-5
  assert result[mesh]["grad"] < 1e-4


def test_s2_receives_less_than_an_allgather(result):
  b = result["bytes_s2"]
  # stride 8: a device needs ~1/8 of each remote chunk plus the band.
  assert b["needed_ratio_max"] < 0.25
  assert b["transferred_bytes"] < b["allgather_bytes"]


# Transferred blocks (x local KV heads, padding included) and the most any device needs, as
# measured on the S2 route's own plan before it ran on the block-sparse exchange.
OLD_PLAN_BLOCKS = {"causal_c8": (14, 5), "causal_h2c4": (4, 3), "bidirectional_h2c4": (8, 4)}


@pytest.mark.parametrize("name", sorted(OLD_PLAN_BLOCKS))
def test_s2_plan_moves_no_more_blocks_than_before(name):
  from attnjax import masks as M
  from attnjax.sharding import block_sparse_context_plan
  causal = M.S2(4, block_size=8, local_blocks=2, vert_stride=4, num_kv_heads=2)
  both = M.S2(4, block_size=8, local_blocks=(2, 1), vert_stride=3, causal=False, num_kv_heads=2)
  mask, chunks, heads = {"causal_c8": (causal, 8, 1), "causal_h2c4": (causal, 4, 2),
                         "bidirectional_h2c4": (both, 4, 2)}[name]
  plan = block_sparse_context_plan(mask, 64, 4, 2, chunks, heads, 8)
  moved, needed = OLD_PLAN_BLOCKS[name]
  assert plan.transferred_blocks() <= moved
  assert plan.needed_blocks.max() == needed
  if name == "bidirectional_h2c4":   # distances +-2 share one cyclic permute
    assert plan.transferred_blocks() == moved - 1


def test_removed_names_say_what_replaces_them():
  import attnjax.sharding as S
  with pytest.raises(AttributeError, match="block_sparse_context_plan"):
    S.kv_block_needs  # pylint: disable=pointless-statement
  with pytest.warns(DeprecationWarning, match="block_sparse_context_plan"):
    from attnjax import masks as M
    S.make_plan(M.S2(4, block_size=8, local_blocks=2, vert_stride=4), 64, 4, 4, 4)


def test_training_on_a_mesh_matches_one_device(result):
  one, mesh = result["train_losses"]["(1, 1, 1)"], result["train_losses"]["(2, 2, 2)"]
  # one step (its loss before the update) and the eval after the update: one compile of
  # the train step per mesh (its outputs keep the state's shardings, so later steps reuse it)
  assert len(one) == len(mesh) == 2
  np.testing.assert_allclose(mesh, one, rtol=2e-5)


def test_mesh_errors_name_the_field(result):
  e = result["errors"]
  assert "config.model.num_heads=3 is not divisible by the mesh's 'heads' axis" in e["(1, 2, 4)"]
  assert "config.task.seq_len=36 is not divisible by the mesh's 'context' axis" in e["(1, 1, 8)"]
  assert "config.mesh: data * heads * context = 1 * 1 * 4 = 4 must equal" in e["(1, 1, 4)"]
