"""The one-shot device check script: its smoke mode runs every section's
correctness check at tiny shapes (Pallas interpret mode on CPU)."""
import json

import jax
import pytest

from experiments import gpu_check


@pytest.mark.parametrize("section", gpu_check.SECTIONS)
def test_smoke_section_passes_and_writes_results(section, tmp_path):
  assert gpu_check.main(["--smoke", f"--sections={section}", f"--out={tmp_path}"]) == 0
  rows = json.load(open(tmp_path / "bench_gpu.json"))["rows"]
  checks = [r for r in rows if r["case"].startswith("check ")]
  assert len(checks) >= 4  # float32 and bfloat16, two cases or more each
  assert all(r["result"] == "PASS" for r in checks), rows


def test_without_gpu_and_smoke_exits_2(tmp_path):
  if jax.default_backend() in ("gpu", "cuda"):
    pytest.skip("a GPU is present")
  assert gpu_check.main([f"--out={tmp_path}"]) == 2
  assert not (tmp_path / "bench_gpu.json").exists()


def test_unknown_section_is_an_error(tmp_path):
  with pytest.raises(SystemExit):
    gpu_check.main(["--smoke", "--sections=neighbourhood", f"--out={tmp_path}"])
