"""benchmarks/gpu_check.py's CPU dry run: every row of the GPU check (nnU-Net's train step of each trainer,
sliding-window inference, ratios to nnUNetTrainer) runs on tiny networks and the results are written."""
import json
import sys

import pytest
from conftest import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
import gpu_check  # noqa: E402


@pytest.mark.slow
def test_dry_run_measures_every_trainer_and_writes_results(tmp_path):
    assert gpu_check.main(["--dry-run", "--output-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_dry_run.json").read_text())
    assert report["device"] == "CPU dry run"
    rows = {(row["row"], row["configuration"]) for row in report["rows"]}
    assert rows == {(row, configuration) for row, _, _, configuration in gpu_check.ROWS}
    for row in report["rows"]:
        assert "error" not in row, row.get("error")
        assert row["train_step_s"] > 0 and row["inference_finite"] and row["train_step_ratio"] > 0
    assert next(r for r in report["rows"] if r["row"] == "nnUNetTrainer")["train_step_ratio"] == 1
    table = (tmp_path / "gpu_dry_run.md").read_text()
    assert "GRCSF_FIASTrainer" in table and "ResEnc-M" in table
