"""The one-shot device check script: its smoke mode runs every section's
correctness check at tiny shapes (Pallas interpret mode on CPU), each case in
one dtype (float32 and bfloat16 in turn); on a device every case runs in both."""
import json

import jax
import pytest

from experiments import gpu_check


@pytest.mark.parametrize("section", gpu_check.SECTIONS)
def test_smoke_section_passes_and_writes_results(section, tmp_path):
  assert gpu_check.main(["--smoke", f"--sections={section}", f"--out={tmp_path}"]) == 0
  rows = json.load(open(tmp_path / "bench_gpu.json"))["rows"]
  checks = [r for r in rows if r["case"].startswith("check ")]
  assert len(checks) >= 2  # smoke: each case once, float32 and bfloat16 in turn
  assert {r["case"].rsplit(" ", 1)[1] for r in checks} == {"float32", "bfloat16"}, rows
  assert all(r["result"] == "PASS" for r in checks), rows


def test_without_gpu_and_smoke_exits_2(tmp_path):
  if jax.default_backend() in ("gpu", "cuda"):
    pytest.skip("a GPU is present")
  assert gpu_check.main([f"--out={tmp_path}"]) == 2
  assert not (tmp_path / "bench_gpu.json").exists()


def test_unknown_section_is_an_error(tmp_path):
  with pytest.raises(SystemExit):
    gpu_check.main(["--smoke", "--sections=neighbourhood", f"--out={tmp_path}"])


def test_check_cases_cover_every_case_and_dtype():
  from experiments.gpu_checks import common as C  # pylint: disable=g-import-not-at-top
  assert C.check_cases(False, ("a", "b"), (1, 2, 3)) == [
      ("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2), ("b", 3)]
  assert C.check_cases(True, ("a", "b"), (1, 2, 3)) == [("a", 1), ("b", 2), ("a", 3)]
