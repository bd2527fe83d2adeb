"""Kernel x target compile table: every engine's Pallas kernels through the real compilers.

    JAX_PLATFORMS=cpu python3 -m experiments.compile_report [--targets=tpu_v4,...,sm90]
        [--out=results] [--markdown=docs/kernels.md]

For each engine (block-sparse, neighborhood, linear) and each compile target
of ``pallas_kernels.targets`` it compiles one representative forward and one
forward+backward program through the public API (bfloat16, GQA, H=128),
under the target's deviceless device, and records whether it compiled, the
compile seconds, the number of kernels in the program and the code / temp
bytes of ``memory_analysis()``. Rows go to ``<out>/bench_compile_targets.{csv,json}``
and, with ``--markdown``, to a table in that file between the markers
``<!-- compile-table -->`` (the rest of the file is kept). Needs the
``compile`` extra (libtpu, the CUDA plugin and ptxas).
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import attnjax  # noqa: E402
from attnjax import masks  # noqa: E402
from experiments.benchmarks.common import write_results  # noqa: E402
from attnjax.block_sparse import plan as P  # noqa: E402
from attnjax.plan.neighborhood import pallas_tile_shape  # noqa: E402
from pallas_kernels import targets as TG  # noqa: E402
from pallas_kernels.block_sparse import resources as BR  # noqa: E402
from pallas_kernels.linear import resources as LR  # noqa: E402
from pallas_kernels.neighborhood import resources as NR  # noqa: E402
from pallas_kernels.targets import budgets as BG  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("targets", list(TG.TARGETS), "compile targets")
flags.DEFINE_string("out", "results", "directory of bench_compile_targets.{csv,json}")
flags.DEFINE_string("markdown", "", "markdown file whose compile table is rewritten")
flags.DEFINE_bool("budgets", False, "only write the chooser's configurations per target with "
                  "their on-chip memory need vs the budget (no compiling)")

S = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16
MARK = "<!-- compile-table -->"
BUDGET_MARK = "<!-- budget-table -->"


def _grad(fn):
  return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), (0, 1, 2))


def cases() -> Dict[str, tuple]:
  """name -> (function of q, k, v, q spec, kv spec)."""
  seq_q, seq_kv = S((1, 8192, 8, 128), BF16), S((1, 8192, 2, 128), BF16)
  grid_q, grid_kv = S((1, 64, 64, 8, 128), BF16), S((1, 64, 64, 2, 128), BF16)
  window = lambda q, k, v: attnjax.attention(q, k, v, mask=masks.Causal()
                                             & masks.SlidingWindow(2048))
  na = lambda q, k, v: attnjax.na2d(q, k, v, kernel_size=7, implementation="pallas")
  lin = lambda q, k, v: attnjax.linear_attention(q, k, v, decay="tnl",
                                                 implementation="pallas")
  return {
      "block_sparse causal+window 8k": (window, seq_q, seq_kv),
      "neighborhood na2d 64x64 k7": (na, grid_q, grid_kv),
      "linear tnl decay 8k": (lin, seq_q, seq_kv),
  }


def compile_row(target: str, name: str, fn: Callable, q, kv, backward: bool) -> Dict:
  row = dict(target=target, case=name, pass_="fwd+bwd" if backward else "fwd")
  try:
    r = TG.compile_on(target, _grad(fn) if backward else fn, q, kv, kv)
    TG.require_kernels(r)
    row.update(compiles="yes", seconds=round(r.seconds, 2), kernels=r.kernel_calls,
               code_kib=r.code_bytes // 1024, temp_kib=r.temp_bytes // 1024, error="")
  except Exception as e:  # pylint: disable=broad-except  (the table records it)
    row.update(compiles="no", seconds="", kernels="", code_kib="", temp_kib="",
               error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
  return row


def _kib(n: int) -> str:
  return f"{n / 1024:,.0f} KiB"


def budget_rows(targets) -> List[Dict]:
  """Per target and engine: the configuration the chooser picks for bfloat16, H = 128
  (block-sparse at T = 512 / 8k / 128k, neighborhood na2d with rpb, linear chunk 64)
  and the largest per-kernel need against the target's budget. Nothing is compiled."""
  rows = []
  H, isz = 128, 2
  for target in targets:
    bud = BG.budget(target)
    tpu = bud.platform == "tpu"
    avail = bud.vmem_bytes if tpu else bud.shared_bytes
    what = "scoped VMEM" if tpu else "shared memory"
    for T in (512, 8192, 131072):
      if tpu:
        bq, bk = BR.choose_tpu_blocks(T, T, H, H, isz, target)
        need = BR.tpu_need_bytes(bq, bk, H, H, isz, isz, 0)
        config = f"blocks {bq}x{bk}"
      else:
        bq, bk = P.choose_blocks(T, T)[:2]
        cfg = _Blocks(H, bq, bk)
        tiles = BR.choose_gpu_tiles(cfg, bud, jnp.bfloat16)
        need = BR.gpu_shared_need(cfg, jnp.bfloat16, tiles)
        config = f"blocks {bq}x{bk}, tiles " + " / ".join(f"{a}x{b}" for a, b in tiles)
      rows.append(dict(target=target, engine=f"block_sparse T={T}", config=config,
                       need=max(need.values()), budget=avail, what=what))
    tile = pallas_tile_shape((64, 64), (7, 7), (1, 1))
    nc = NR.configure("tpu" if tpu else "gpu", target, tile, H, H, jnp.bfloat16, True)
    rows.append(dict(target=target, engine="neighborhood na2d k7 rpb", config=f"tile {tile}",
                     need=max(nc.need), budget=avail, what=what))
    if tpu:
      need = LR.check_tpu(64, H, H, target)
    else:
      need = max(LR.gpu_plan(k, 64, H, H, target).shared_bytes for k in LR.GPU_KERNELS)
    rows.append(dict(target=target, engine="linear decay", config="chunk 64", need=need,
                     budget=avail, what=what))
  return rows


class _Blocks:
  """The fields of a kernel configuration the GPU tile model reads."""

  def __init__(self, H, block_q, block_kv):
    self.H = self.Hv = H
    self.block_q, self.block_kv = block_q, block_kv


def budget_markdown(rows: List[Dict]) -> str:
  lines = ["| target | engine | chosen configuration | largest kernel need | budget |",
           "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['target']} | {r['engine']} | {r['config']} | {_kib(r['need'])} | "
                 f"{_kib(r['budget'])} {r['what']} |")
  return "\n".join(lines)


def markdown(rows: List[Dict]) -> str:
  head = "| target | case | pass | compiles | seconds | kernels | code KiB | temp KiB |"
  lines = [head, "|" + "---|" * 8]
  for r in rows:
    status = r["compiles"] if not r["error"] else f"no: {r['error']}"
    lines.append(f"| {r['target']} | {r['case']} | {r['pass_']} | {status} | {r['seconds']} | "
                 f"{r['kernels']} | {r['code_kib']} | {r['temp_kib']} |")
  return "\n".join(lines)


def rewrite_markdown(path: str, table: str, mark: str = MARK) -> None:
  """Replaces the text between the two ``mark`` lines of ``path`` with ``table``."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  parts = text.split(mark)
  if len(parts) != 3:
    raise ValueError(f"{path} must hold exactly two {mark} markers around the table.")
  with open(path, "w", encoding="utf-8") as f:
    f.write(parts[0] + mark + "\n" + table + "\n" + mark + parts[2])


def main(argv):
  del argv
  unknown = sorted(set(FLAGS.targets) - set(TG.TARGETS))
  if unknown:
    raise app.UsageError(f"--targets: unknown {unknown}; expected names from {TG.TARGETS}.")
  if FLAGS.budgets:
    table = budget_markdown(budget_rows(FLAGS.targets))
    print(table)
    if FLAGS.markdown:
      rewrite_markdown(FLAGS.markdown, table, BUDGET_MARK)
      print("wrote", FLAGS.markdown)
    return 0
  rows = []
  for target in FLAGS.targets:
    if not TG.toolchain_available(TG.platform_of(target)):
      raise app.UsageError(f"{target}: compiler toolchain missing: pip install -e \".[compile]\"")
    for name, (fn, q, kv) in cases().items():
      for backward in (False, True):
        rows.append(compile_row(target, name, fn, q, kv, backward))
        r = rows[-1]
        print(f"{target:8s} {name:32s} {r['pass_']:8s} {r['compiles']:3s} {r['seconds']!s:6s} "
              f"{r['error']}", flush=True)
  for path in write_results("compile_targets", rows, FLAGS.out):
    print("wrote", path)
  if FLAGS.markdown:
    rewrite_markdown(FLAGS.markdown, markdown(rows))
    print("wrote", FLAGS.markdown)
  return 0 if all(r["compiles"] == "yes" for r in rows) else 1


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
