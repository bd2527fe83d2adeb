"""experiments.compile_report: rows, failures recorded with their error, markdown rewrite."""
import jax
import jax.numpy as jnp
import pytest
from conftest import requires_toolchain

from experiments import compile_report as CR


def test_failed_compile_is_a_row_with_the_error():
  requires_toolchain("tpu_v5e")
  spec = jax.ShapeDtypeStruct((8, 128), jnp.float32)

  def bad(q, k, v):
    raise ValueError("planted failure")
  row = CR.compile_row("tpu_v5e", "planted", bad, spec, spec, backward=False)
  assert row["compiles"] == "no" and "planted failure" in row["error"]


def test_xla_only_program_is_not_counted_as_a_kernel():
  requires_toolchain("tpu_v5e")
  spec = jax.ShapeDtypeStruct((8, 128), jnp.float32)
  row = CR.compile_row("tpu_v5e", "plain", lambda q, k, v: q + k * v, spec, spec, False)
  assert row["compiles"] == "no" and "kernel" in row["error"]


def test_markdown_table_replaces_only_the_marked_block(tmp_path):
  path = tmp_path / "k.md"
  path.write_text(f"intro\n{CR.MARK}\nold\n{CR.MARK}\noutro\n")
  rows = [dict(target="sm90", case="c", pass_="fwd", compiles="yes", seconds=1.0, kernels=1,
               code_kib=2, temp_kib=3, error="")]
  CR.rewrite_markdown(str(path), CR.markdown(rows))
  text = path.read_text()
  assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
  assert "| sm90 | c | fwd | yes | 1.0 | 1 | 2 | 3 |" in text
  path.write_text("no markers")
  with pytest.raises(ValueError, match="markers"):
    CR.rewrite_markdown(str(path), "x")
