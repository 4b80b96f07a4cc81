"""benchmarks/gpu_check.py's CPU dry run: every row of the GPU check (nnU-Net's train step of each trainer,
sliding-window inference, ratios to nnUNetTrainer), each in its own process, runs on tiny networks and the results
are written; a row that overruns its time is stopped and recorded, and the others still run."""
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
    assert report["device"] == "CPU dry run" and report["compile"] == "on"
    rows = {(row["row"], row["configuration"]) for row in report["rows"]}
    assert rows == {(row, configuration) for row, _, _, configuration in gpu_check.ROWS}
    for row in report["rows"]:
        assert "error" not in row, row.get("error")
        assert row["train_step_s"] > 0 and row["inference_finite"] and row["train_step_ratio"] > 0
    assert next(r for r in report["rows"] if r["row"] == "nnUNetTrainer")["train_step_ratio"] == 1
    table = (tmp_path / "gpu_dry_run.md").read_text()
    assert "GRCSF_FIASTrainer" in table and "ResEnc-M" in table


def test_selected_rows_put_each_configurations_reference_first():
    rows = gpu_check.selected_rows(["FIASTrainer_noCheckpointing", "GRCSFTrainer"], ["2d"])
    assert [row[0] for row in rows] == ["nnUNetTrainer", "GRCSFTrainer", "FIASTrainer_noCheckpointing"]
    assert {row[3] for row in rows} == {"2d"}
    every_configuration = gpu_check.selected_rows(["FIASTrainer_noCheckpointing"], None)
    assert [(row[0], row[3]) for row in every_configuration] == [
        ("nnUNetTrainer", "2d"), ("FIASTrainer_noCheckpointing", "2d"),
        ("nnUNetTrainer", "3d_fullres"), ("FIASTrainer_noCheckpointing", "3d_fullres")]
    assert gpu_check.selected_rows(None, None) == gpu_check.ROWS


def test_unknown_row_is_refused_with_the_known_ones(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--rows", "GRCSFTrainr"])
    assert "GRCSFTrainer_noRCU" in capsys.readouterr().err


@pytest.mark.slow
def test_a_row_that_overruns_is_stopped_recorded_and_the_rest_written(tmp_path):
    """The diagnostic row (eager, compile off) runs; GRCSFTrainer's row gets too little time: it is stopped,
    its error says so, and the JSON written after every row holds both."""
    code = gpu_check.main(["--dry-run", "--compile", "off", "--rows", "FIASTrainer_noCheckpointing",
                           "--configurations", "2d", "--output-dir", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "gpu_dry_run_eager.json").read_text())
    assert report["compile"] == "off"
    assert [row["row"] for row in report["rows"]] == ["nnUNetTrainer", "FIASTrainer_noCheckpointing"]
    assert all("error" not in row for row in report["rows"])

    code = gpu_check.main(["--dry-run", "--rows", "GRCSFTrainer", "--configurations", "2d", "--row-seconds", "2",
                           "--output-dir", str(tmp_path)])
    assert code == 1
    report = json.loads((tmp_path / "gpu_dry_run.json").read_text())
    assert [row["row"] for row in report["rows"]] == ["nnUNetTrainer", "GRCSFTrainer"]
    assert all(row["error"].startswith("stopped after 2 s") for row in report["rows"])
    assert "stopped after 2 s" in (tmp_path / "gpu_dry_run.md").read_text()


def test_a_row_trained_uncompiled_after_a_compile_failure_says_so():
    """Our trainers go on uncompiled when torch.compile fails: the row's line and table entry say so, with the
    compiler's error, so that its eager times are not read as compiled ones."""
    failure = {"message": "FIASTrainer: torch.compile could not compile this network on cuda:0 (torch 2.11.0): "
                          "LoweringException: no lowering", "traceback": "..."}
    row = {"row": "FIASTrainer", "plans": "Dataset802_BUSI256_nnUNetPlans", "configuration": "2d",
           "train_step_s": 0.05, "train_step_ratio": 2.0, "train_max_memory_mb": 1000.0, "train_memory_ratio": 1.2,
           "first_step_s": 30.0, "inference_s": 1.0, "inference_max_memory_mb": 300.0, "compiled": False,
           "compile_failure": failure}
    note = "(uncompiled: torch.compile could not compile this network on cuda:0 (torch 2.11.0): LoweringException"
    assert note in gpu_check.summary_line(row)
    report = {"device": "NVIDIA H200", "torch": "2.11.0", "nnunetv2": "2.8.1", "compile": "on", "steps": 5,
              "rows": [row], "smoke": {}}
    assert f"| FIASTrainer {note}" in gpu_check.markdown(report)
    assert "uncompiled" not in gpu_check.summary_line({**row, "compile_failure": None})


def test_profile_step_dry_run_writes_the_kernel_table(tmp_path, monkeypatch):
    """benchmarks/profile_step.py, as gpu_session.sh runs it, on the CPU with a tiny network."""
    import profile_step

    monkeypatch.setenv("nnUNet_compile", "t")  # --compile off sets it to f: unset again after the test
    assert profile_step.main(["GRCSFTrainer_noRCU", "--dry-run", "--compile", "off", "--steps", "1", "--flops",
                              "--output", str(tmp_path / "profile")]) == 0
    table = (tmp_path / "profile.txt").read_text()
    assert table.startswith("GRCSFTrainer_noRCU on Dataset802_BUSI256_nnUNetPlans 2d") and "aten::" in table
    assert "FLOPs of one train step: " in table and "aten.convolution" in table
    assert not (tmp_path / "profile.json").exists()
