"""``attnjax.sharding.context_parallel``: one entry for every registered family.

On 8 simulated CPU devices (the shared ``multidevice`` child): sliding window
(block-sparse route, heads axis too), linear (state scan) and na1d (halo)
equal the unsharded registry family, i.e. the function the layer calls (sliding
window also with segment ids through the registry signature); segment ids
on the linear (with and without decay), na1d and S2 routes equal the unsharded
family, forward and gradients, and decreasing ids give NaN rows on the linear
route; the launcher gives a config error naming a family that cannot run
context-parallel. In this process: the support table covers every registered
family, an unsupported family raises, naming itself, families without
segments refuse segment_ids, and the benchmark family reads the bytes each
device receives off HLO collectives.
"""
import pytest

import multidevice
from attnjax.layers import registry
from attnjax.sharding import context_parallel, context_parallel_support, make_mesh

SCRIPT = r'''
import json
import jax, jax.numpy as jnp, numpy as np
from attnjax.layers import registry
from attnjax.sharding import context_parallel, context_parallel_family, make_mesh
out = {"devices": jax.device_count()}
B, T, N, K, H = 2, 32, 4, 2, 8
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, H), np.float32)) for n in (N, K, K))
cases = {
    "sliding_window": ((1, 2, 4), dict(causal=True, window=6), dict(head_axis="heads")),
    "linear": ((1, 1, 8), dict(causal=True), {}),
    "na1d": ((2, 1, 4), dict(causal=False, kernel_size=5), dict(data_axis="data")),
}
for fam, (shape, opts, axes) in cases.items():
  f = jax.jit(context_parallel(fam, make_mesh(*shape), **axes, **opts))
  o = dict(opts); causal = o.pop("causal")
  ref = registry.get_family(fam)(q, k, v, causal=causal, **o)
  out[fam] = float(jnp.abs(f(q, k, v) - ref).max())

# segment ids (packed documents) through the registry signature, as the layer passes them
docs = jnp.asarray(np.sort(rng.integers(0, 4, (B, T)), axis=1))
fam = context_parallel_family("sliding_window", make_mesh(1, 1, 4, devices=jax.devices()[:4]))
o1 = jax.jit(lambda q, k, v, s: fam(q, k, v, causal=True, window=6, segment_ids=s))(q, k, v, docs)
o2 = registry.get_family("sliding_window")(q, k, v, causal=True, window=6, segment_ids=docs)
out["sliding_window_documents"] = float(jnp.abs(o1 - o2).max())

# segment ids (packed documents) on the linear (segmented state scan), na1d and S2 routes:
# forward and gradients equal the unsharded family; one document spans six shards. One
# compile per case: ids and positions are arguments, so the same program also shows that
# decreasing ids give NaN in their row (linear) and that positions traced under jit are
# checked at run time (arange(T) runs, others give NaN; S2 through s2_family_for_mesh, which
# the launcher's S2 layers call directly)
import warnings
warnings.simplefilter("ignore")      # the unsharded linear family warns (dense oracle)
from attnjax.sharding import s2_family_for_mesh
docs = jnp.asarray(np.stack([np.repeat([0, 1, 2, 3], [3, 20, 1, 8]), np.repeat([5, 6], [30, 2])]))
seg_cases = {
    "linear": ((1, 1, 8), dict(causal=True)),
    "linear_decay": ((1, 1, 8), dict(causal=True, decay="tnl")),
    "na1d": ((1, 1, 4), dict(causal=False, kernel_size=5)),
    "s2": ((1, 2, 4), dict(causal=True, block_size=4, local_blocks=1, vert_stride=2)),
}
loss = lambda f: lambda *a: (lambda o: (o * jnp.cos(o)).sum())(f(*a))
ar = jnp.arange(T)
for name, (shape, opts) in seg_cases.items():
  fam, o = name.split("_")[0], dict(opts)
  causal = o.pop("causal")
  mesh = make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
  sh = (s2_family_for_mesh(mesh) if fam == "s2" else
        context_parallel_family(fam, mesh, head_axis="heads" if shape[1] > 1 else None))
  f1 = lambda q, k, v, s, p: sh(q, k, v, causal=causal, segment_ids=s, q_positions=p,
                                k_positions=p, **o)
  f2 = lambda q, k, v, s, p: registry.get_family(fam)(q, k, v, causal=causal, segment_ids=s,
                                                      **o)
  run = jax.jit(lambda *a: ((f1(*a), jax.grad(loss(f1), (0, 1, 2))(*a)),
                            (f2(*a), jax.grad(loss(f2), (0, 1, 2))(*a))))
  (o1, g1), (o2, g2) = run(q, k, v, docs, ar)
  out["documents_" + name] = max(float(jnp.abs(a - b).max()) for a, b in zip((o1,) + g1,
                                                                             (o2,) + g2))
  if fam in ("linear", "s2"):
    y = run(q, k, v, docs, ar[::-1])[0][0]
    out["traced_positions_" + fam] = bool(jnp.isnan(y).all())
  if fam == "linear":
    y = run(q, k, v, docs.at[1, 20:].set(0), ar)[0][0]
    out["linear_decreasing_ids"] = [bool(jnp.isnan(y[0]).any()), bool(jnp.isnan(y[1]).all())]

from configs import common
from experiments import models, tasks
c = common.base_config("t")
c.task.name = "stdlib_lm"; c.task.seq_len = 32; c.task.batch_size = 4
c.model.num_layers = 1; c.model.d_model = 32; c.model.num_heads = 4; c.model.num_kv_heads = 2
c.model.layer_attention = ("hip",)
try:
  models.build_model(c, tasks.make_task(c.task, 0), mesh=make_mesh(1, 1, 8))
  out["launcher_error"] = None
except ValueError as e:
  out["launcher_error"] = str(e)
print("RESULT" + json.dumps(out))
'''

multidevice.register("context_parallel", SCRIPT)


@pytest.fixture(scope="module")
def result():
  return multidevice.result("context_parallel")


def test_eight_devices(result):
  assert result["devices"] == 8


@pytest.mark.parametrize("family", ["sliding_window", "linear", "na1d",
                                    "sliding_window_documents"])
def test_context_parallel_equals_unsharded_family(result, family):
  assert result[family] < 2e-5


@pytest.mark.parametrize("family", ["linear", "linear_decay", "na1d", "s2"])
def test_segment_ids_equal_unsharded_family_forward_and_grads(result, family):
  assert result["documents_" + family] < 2e-5


def test_linear_route_returns_nan_for_rows_whose_segment_ids_decrease(result):
  assert result["linear_decreasing_ids"] == [False, True]


@pytest.mark.parametrize("family", ["lightning", "based"])
def test_families_without_segments_refuse_segment_ids(family):
  import jax.numpy as jnp
  from attnjax.sharding import context_parallel_family
  x = jnp.zeros((1, 8, 2, 4))
  with pytest.raises(NotImplementedError, match="segment_ids"):
    context_parallel_family(family, make_mesh())(x, x, x, causal=True,
                                                 segment_ids=jnp.zeros((1, 8), jnp.int32))


@pytest.mark.parametrize("family", ["linear", "s2"])
def test_traced_positions_are_checked_at_run_time(result, family):
  assert result["documents_" + family] < 2e-5     # traced arange(T): runs
  assert result["traced_positions_" + family]     # any other values: NaN


@pytest.mark.parametrize("family", ["sliding_window", "s2", "linear", "na1d"])
def test_custom_positions_raise_naming_the_argument(family):
  # the block-sparse and S2 routes run concrete custom positions (test_sharding_positions)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from attnjax.sharding import context_parallel_family
  x = jnp.zeros((1, 8, 2, 4))
  f = context_parallel_family(family, make_mesh())
  opts = dict(block_size=4, local_blocks=1, vert_stride=2) if family == "s2" else {}
  if family in ("linear", "na1d"):
    with pytest.raises(NotImplementedError, match="custom k_positions"):
      f(x, x, x, causal=True, k_positions=jnp.arange(8) + 1)
  else:    # traced only: the plan is built at trace time
    jax.eval_shape(lambda x: f(x, x, x, causal=True, k_positions=np.arange(8) + 1, **opts), x)
  with pytest.raises(ValueError, match="q_positions must have shape"):
    f(x, x, x, causal=True, q_positions=jnp.arange(7), **opts)


def test_launcher_names_a_family_that_cannot_run_context_parallel(result):
  e = result["launcher_error"]
  assert e is not None and "config.mesh.context=8" in e and "'hip'" in e, e
  assert "\n" not in e


def test_support_table_covers_every_registered_family():
  table = context_parallel_support()
  assert set(table) == set(registry.list_families())
  routes = {"block_sparse", "s2", "linear", "neighborhood"}
  assert table["sliding_window"] == "block_sparse" and table["s2"] == "s2"
  assert table["lightning"] == "linear" and table["na1d"] == "neighborhood"
  assert all(r in routes or len(r) > 20 for r in table.values())


def test_unsupported_family_raises_naming_it():
  with pytest.raises(NotImplementedError, match="'hip' cannot run context-parallel: .*keys"):
    context_parallel("hip", make_mesh())


def test_benchmark_is_one_family_covering_every_engine():
  from experiments import bench
  from experiments.benchmarks import context_parallel as cp
  fams = bench.available_families()
  assert "context_parallel" in fams and "context_parallel_block_sparse" not in fams
  assert {"sliding_window_4k", "linear_decay", "causal_zigzag"} <= set(cp.GOALS)
  for name in ("block_sparse_rows", "s2_rows", "block_list_rows", "linear_rows",
               "neighborhood_rows", "plan_block_list_rows"):
    assert callable(getattr(cp, name))


def test_benchmark_reads_received_bytes_off_hlo_collectives():
  from experiments.benchmarks.context_parallel import received_bytes
  hlo = "\n".join([
      "  %cp = f32[2,8]{1,0} collective-permute(f32[2,8]{1,0} %a), channel_id=1, "
      "source_target_pairs={{0,1},{1,2},{2,3}}",
      "  %t = (f32[4]{0}, s32[2]{0}) collective-permute(%b), source_target_pairs={{3,0}}",
      "  %ag = bf16[4,16]{1,0} all-gather(bf16[1,16]{1,0} %c), dimensions={0}",
      "  %ar = f32[3]{0} all-reduce(f32[3]{0} %d), to_apply=%add",
      "  %x = f32[100]{0} add(f32[100]{0} %e, f32[100]{0} %e)",
  ])
  ag = 4 * 16 * 2 * 3 // 4
  assert received_bytes(hlo, 4).tolist() == [24 + ag + 12, 64 + ag + 12, 64 + ag + 12,
                                             64 + ag + 12]


@pytest.mark.parametrize("family,options", [
    ("lightning", dict(chunk_size=8, decay=[0.1, 0.5])),
    ("lightning", dict(layer_idx=1, num_layers=2)),
    ("based", dict(left=3, right=0, chunk_size=8)),
])
def test_registry_option_names_on_the_linear_route(family, options):
  # the family's own option spelling (one context shard in this process)
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 16, 2, 4), np.float32)) for _ in range(3))
  got = context_parallel(family, make_mesh(), causal=True, **options)(q, k, v)
  want = registry.get_family(family)(q, k, v, causal=True, **options)
  assert float(jnp.abs(got - want).max()) < 1e-5
