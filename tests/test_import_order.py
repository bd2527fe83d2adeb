"""Every package of attnjax and pallas_kernels imports as the first one of the two."""
import subprocess
import sys
import textwrap

PACKAGES = [
    "pallas_kernels", "pallas_kernels.block_sparse", "pallas_kernels.block_sparse.runtime",
    "pallas_kernels.linear", "pallas_kernels.neighborhood", "pallas_kernels.neighborhood.ops",
    "pallas_kernels.targets", "attnjax.masks", "attnjax.core", "attnjax.plan",
    "attnjax.block_sparse", "attnjax.linear", "attnjax.linear.engine", "attnjax.neighborhood",
    "attnjax.layers", "attnjax.dynamic", "attnjax.sharding", "attnjax.models",
]


def test_each_package_imported_first():
  # One interpreter: import each package with no attnjax / pallas_kernels module loaded yet.
  script = textwrap.dedent(f"""
      import importlib, sys
      failed = []
      for name in {PACKAGES!r}:
        for m in [m for m in sys.modules if m.split(".")[0] in ("attnjax", "pallas_kernels")]:
          del sys.modules[m]
        try:
          importlib.import_module(name)
        except Exception as e:  # pylint: disable=broad-except
          failed.append(f"{{name}}: {{type(e).__name__}}: {{e}}")
      print("FAILED" if failed else "OK", *failed, sep="\\n")
      """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=600)
  assert out.stdout.strip().startswith("OK"), out.stdout[-3000:] + out.stderr[-3000:]
