"""Runs test scripts on 8 simulated CPU devices, all in one shared subprocess.

XLA_FLAGS must set the device count before jax is imported (and a pytest-xdist
worker may have imported jax already), so the multi-device checks run in a
child process. A test module calls ``register(name, SCRIPT)`` at import and
reads the script's result with ``result(name)`` (a module-scoped fixture
usually wraps it). The first ``result`` call starts one child that executes
every script registered so far, each in its own fresh namespace, so the test
modules collected together pay for one jax start-up instead of one each
(under pytest-xdist each worker runs only the scripts its tests read). A
script reports by printing one line ``"RESULT" + json.dumps(dict)``; a script
that raises fails only the tests that read its result.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DEVICES = 8

# The scripts compile many small sharded programs and run each once: LLVM's optimisation
# passes cost more than they save there (about a third of the child's time). The HLO
# passes (SPMD partitioning, collectives) are unchanged, and so are the numerics.
CODEGEN_FLAGS = " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

#: Source prepended to the scripts that compare a sharded op with the unsharded one.
HELPERS = r'''
import jax, jax.numpy as jnp, numpy as np

def inputs(lead, N, K, H, dtype, seed=0):
  """q [*lead, N, H], k, v [*lead, K, H] in dtype and float32 output weights [*lead, N, H]."""
  rng = np.random.default_rng(seed)   # NumPy draws: no sampler compile per shape
  r = lambda n: jnp.asarray(rng.standard_normal(tuple(lead) + (n, H), np.float32), dtype)
  return r(N), r(K), r(K), r(N).astype(jnp.float32)

def rel(a, b):
  """max |a - b| / max |b| in float32."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))

def loss_and_grads(f, w):
  """value_and_grad in q, k, v of sum(f(q, k, v) * w) (+ sum(sin(extra)) when f returns
  (out, extra)); the aux is (out, extra or None)."""
  def fn(q, k, v):
    o = f(q, k, v)
    o, extra = (o if isinstance(o, tuple) else (o, None))
    l = jnp.sum(o.astype(jnp.float32) * w)
    if extra is not None:
      l = l + jnp.sum(jnp.sin(extra))
    return l, (o, extra)
  return jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True)
'''

_SCRIPTS = {}
_RESULTS = {}

RUNNER = r'''
import contextlib, io, json, sys, traceback
scripts = json.loads(sys.stdin.read())
for name, src in scripts.items():
  buf = io.StringIO()
  try:
    with contextlib.redirect_stdout(buf):
      exec(compile(src, "<multidevice:" + name + ">", "exec"), {"__name__": "__main__"})
    lines = [l for l in buf.getvalue().splitlines() if l.startswith("RESULT")]
    if not lines:
      raise RuntimeError("the script printed no RESULT line; its output:\n" + buf.getvalue()[-2000:])
    report = {"ok": json.loads(lines[-1][len("RESULT"):])}
  except BaseException:  # pylint: disable=broad-except
    report = {"error": traceback.format_exc()[-3000:]}
  sys.__stdout__.write("MULTIDEVICE" + json.dumps([name, report]) + "\n")
  sys.__stdout__.flush()
'''


def register(name: str, script: str) -> None:
  """Adds ``script`` (Python source) under ``name`` to the next shared run."""
  if name in _SCRIPTS and _SCRIPTS[name] != script:
    raise ValueError(f"multidevice script {name!r} is already registered with other source.")
  _SCRIPTS[name] = script


def _run(names) -> None:
  flags = os.environ.get("XLA_FLAGS", "") + \
      f" --xla_force_host_platform_device_count={NUM_DEVICES}" + CODEGEN_FLAGS
  env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  payload = json.dumps({n: _SCRIPTS[n] for n in names})
  proc = subprocess.run([sys.executable, "-c", RUNNER], input=payload, cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900, check=False)
  for line in proc.stdout.splitlines():
    if line.startswith("MULTIDEVICE"):
      name, report = json.loads(line[len("MULTIDEVICE"):])
      _RESULTS[name] = report
  for n in names:   # a crash of the child itself (e.g. killed) fails every script not reported
    _RESULTS.setdefault(n, {"error": f"the child exited with {proc.returncode}:\n"
                                     f"{proc.stderr[-3000:]}"})


def result(name: str) -> dict:
  """The dict printed by script ``name``; runs every pending script in one child first."""
  if name not in _SCRIPTS:
    raise KeyError(f"no multidevice script {name!r} is registered.")
  if name not in _RESULTS:
    # Under pytest-xdist a worker runs only some of the registered modules' tests (load
    # scheduling is dynamic), so it runs only the script asked for.
    shared = not os.environ.get("PYTEST_XDIST_WORKER")
    _run([n for n in _SCRIPTS if n not in _RESULTS] if shared else [name])
  report = _RESULTS[name]
  assert "ok" in report, f"multidevice script {name!r} failed:\n{report['error']}"
  return report["ok"]
