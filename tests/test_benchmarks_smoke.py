"""The benchmark scripts run end to end on small inputs (they are not timed tests: only that they work)."""
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import accuracy_busi256  # noqa: E402
import compare  # noqa: E402
import gcu_activity  # noqa: E402
import rcu_attention_speed  # noqa: E402
import speed  # noqa: E402


@pytest.mark.slow
def test_speed_measures_the_reference_and_a_plugin_network_on_busi_plans(tmp_path):
    output = tmp_path / "speed_cpu"
    speed.main(["--device", "cpu", "--dims", "2d", "--networks", "GRCSFTrainer_noRCU",
                "--variant", "GRCSFTrainer_noRCU", "use_gcu=false", "--patch-size", "64", "64",
                "--batch-size", "1", "--steps", "1", "--warmup", "0", "--inference-runs", "1", "--image-scale", "1",
                "--output", str(output), "--work-dir", str(tmp_path / "work")])
    report = json.loads(output.with_suffix(".json").read_text())
    rows = {r["name"]: r for r in report["cases"][0]["rows"]}
    assert list(rows) == ["PlainConvUNet", "GRCSFTrainer_noRCU", "GRCSFTrainer_noRCU(use_gcu=false)"]
    # the variant's arguments reach its network: without GCUs it has the plain network's parameters
    assert rows["GRCSFTrainer_noRCU(use_gcu=false)"]["network_kwargs"] == {"use_rcu": False, "use_gcu": False}
    assert rows["GRCSFTrainer_noRCU(use_gcu=false)"]["params"] == rows["PlainConvUNet"]["params"]
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["PlainConvUNet"]["network_class"].endswith("PlainConvUNet")
    assert rows["GRCSFTrainer_noRCU"]["network_class"].endswith("GRCSFUNet")
    assert rows["PlainConvUNet"]["params_ratio"] == 1.0
    assert rows["GRCSFTrainer_noRCU"]["train_step_cpu_median_s"] > 0
    assert rows["GRCSFTrainer_noRCU"]["train_step_ratio"] > 0
    assert "| GRCSFTrainer_noRCU |" in output.with_suffix(".md").read_text()


def test_speed_variant_rows_parse_their_arguments_and_refuse_unknown_trainers():
    row = speed.variant_network(["FIASTrainer", "mlp_ratio=2", "activation_checkpointing=false",
                                 "msda_implementation=loop"])
    assert row.name == "FIASTrainer(mlp_ratio=2, activation_checkpointing=false, msda_implementation=loop)"
    assert row.trainer == "FIASTrainer"
    assert row.kwargs_override == {"mlp_ratio": 2, "activation_checkpointing": False, "msda_implementation": "loop"}
    assert row.network_kwargs["use_rcu"] is False  # the trainer's own arguments stay
    for words in (["NoSuchTrainer", "a=1"], ["FIASTrainer"], ["FIASTrainer", "mlp_ratio"]):
        with pytest.raises(SystemExit, match="--variant"):
            speed.variant_network(words)


@pytest.mark.parametrize("gcu_start", ["zero_scale", "zero_projection"])
def test_gcu_activity_is_zero_for_new_units_and_names_the_stage_a_trained_one_changes(gcu_start):
    import torch
    from conftest import build_network_from_plans

    torch.manual_seed(0)
    network, _ = build_network_from_plans("nnunetv2_grcsf.architectures.grcsf.GRCSFUNet",
                                          "Dataset802_BUSI256_nnUNetPlans", "2d", 1, 2, use_rcu=False,
                                          gcu_start=gcu_start)
    batches = [torch.randn(1, 1, 64, 64) for _ in range(2)]
    fresh = gcu_activity.gcu_contributions(network, batches)
    assert sorted(fresh) == ["1", "2", "3", "4", "5"] and all(v == [0.0, 0.0] for v in fresh.values())
    unit = network.encoder.global_compensation["2"]
    with torch.no_grad():
        (unit.scale if gcu_start == "zero_scale" else unit.detail_projection.weight).normal_(0, 0.1)
    moved = gcu_activity.gcu_contributions(network, batches)
    assert all(v > 0 for v in moved["2"]) and moved["1"] == [0.0, 0.0]
    assert gcu_activity.base_trainer_name("GRCSFTrainer_noRCU_10epochs_25iters") == "GRCSFTrainer_noRCU"
    assert gcu_activity.has_gcus("GRCSFTrainer_20epochs_25iters") and not gcu_activity.has_gcus("GRCSFTrainer_noGCU")
    assert not gcu_activity.has_gcus("nnUNetTrainer_10epochs_25iters")


@pytest.mark.slow
def test_rcu_attention_speed_times_every_layout_at_every_rcu_of_the_network(tmp_path):
    output = tmp_path / "rcu_attention"
    rcu_attention_speed.main(["--cases", "busi256", "--batch-size", "1", "--rounds", "1", "--output", str(output)])
    report = json.loads(output.with_suffix(".json").read_text())
    assert [row["rcu"] for row in report["rows"]] == ["decoder.region_compensation.1", "decoder.region_compensation.0"]
    assert [row["features"] for row in report["rows"]] == [[1, 64, 112, 128], [1, 32, 224, 256]]
    assert report["layouts"] == ["sdpa", "sdpa_folded", "keys_first", "window_sum"]
    for row in report["rows"]:
        assert all(row["median_s"][layout] > 0 for layout in report["layouts"]) and row["ratio_median"]["sdpa"] == 1
    assert "| busi256 | `decoder.region_compensation.0` | 1x32x224x256 |" in output.with_suffix(".md").read_text()


def test_speed_reports_a_network_that_fails_and_goes_on():
    rows = [{"name": "PlainConvUNet", "status": "ok", "train_step_cpu_median_s": 2.0, "inference_cpu_median_s": 1.0,
             "peak_memory_train_mb": 100.0, "peak_memory_inference_mb": 50.0, "params": 10},
            {"name": "Broken", "status": "error", "stage": "build", "error": "ImportError: no module"}]
    speed.add_ratios(rows, "_cpu")
    assert rows[0]["train_step_ratio"] == 1.0 and rows[1]["train_step_ratio"] is None
    assert rows[1]["params_ratio"] is None


def test_accuracy_subset_keeps_every_class_of_cases():
    cases = [f"busi_{kind}_{i:03d}" for kind in ("benign", "malignant", "normal") for i in range(10)]
    subset = accuracy_busi256.subset_cases(cases, 6)
    assert len(subset) == 6 and {c.split("_")[1] for c in subset} == {"benign", "malignant", "normal"}
    assert accuracy_busi256.subset_cases(cases, None) == cases


def _accuracy_report(rows: dict) -> dict:
    """A results report of accuracy_busi256.py as it writes one (settings of a smoke run)."""
    split = {"rule": "train_test_split", "seed": 0, "fraction": 0.2, "training_count": 19, "test_count": 5,
             "test_cases_with_empty_reference": 1, "test_cases": ["a", "b", "c", "d", "e"]}
    return {"settings": {"budget": "2epochs_4iters", "schedule": {}, "batch_size": 2, "configuration": "2d_bs2",
                         "iterations_per_epoch": 6, "fold": 0, "device": "cpu", "num_cases": 24, "test_split": split,
                         "mae": {"trained_on_images": 19}, "shuffled_residual": "derangement",
                         "bootstrap": {"n_resamples": 1000, "seed": 0}}, "rows": rows}


def _run(trainer: str, dice: list, **figures) -> dict:
    return {"status": "ok", "trainer": trainer, "trained_as": f"{trainer}_2epochs_4iters",
            "dataset": "Dataset802_BUSI256",
            "per_image_dice": dict(zip("abcde", dice)), "Dice": sum(dice) / len(dice), "pooled_Dice": 0.5,
            "HD95": 12.0, "lesion_F1": 0.6, "lesion_precision": 0.5, "lesion_recall": 0.75, "validation_dice": 0.4,
            "train_time_s": 60.0, "epochs_done": 2, "seed_in_training_log": 0, **figures}


def test_accuracy_table_and_plot_from_a_report(tmp_path):
    report = _accuracy_report({
        "nnUNetTrainer": {"0": _run("nnUNetTrainer", [0.1, 0.2, 0.3, 0.4, 0.5]),
                          "1": _run("nnUNetTrainer", [0.3, 0.4, 0.5, 0.6, 0.7], seed_in_training_log=1)},
        "GRCSFTrainer+shuffled_residual": {"0": _run("GRCSFTrainer", [0.3, 0.4, 0.5, 0.6, 0.7]),
                                           "1": _run("GRCSFTrainer", [0.3, 0.4, 0.5, 0.6, 0.7],
                                                     seed_in_training_log=None)},
        "GRCSFTrainer": {"0": {"status": "error", "trainer": "GRCSFTrainer", "error": "RuntimeError: no residuals"}}})
    table = accuracy_busi256.format_table(report)
    assert "| nnUNetTrainer |  | Dataset802_BUSI256 | 2 | 0.400 ± 0.141 |" in table
    assert "| +0.100 [+0.100, +0.100] |" in table  # each image averaged over seeds: +0.1 on every image
    assert "| GRCSFTrainer | " in table and "error: RuntimeError" in table
    assert "Warning: the training logs of GRCSFTrainer+shuffled_residual seed 1 do not record" in table
    png = accuracy_busi256.plot(report, tmp_path / "missing_speed.json", tmp_path / "plot.png")
    assert png.is_file() and png.stat().st_size > 0


def test_accuracy_table_reads_the_trainer_against_its_controls():
    rows = {"nnUNetTrainer": {"0": _run("nnUNetTrainer", [0.1, 0.2, 0.3, 0.4, 0.5])},
            "GRCSFTrainer": {"0": _run("GRCSFTrainer", [0.3, 0.4, 0.5, 0.6, 0.7])},
            "GRCSFTrainer+shuffled_residual": {"0": _run("GRCSFTrainer", [0.2, 0.3, 0.4, 0.5, 0.6])}}
    table = accuracy_busi256.format_table(_accuracy_report(rows))
    assert "## The trainer against its controls" in table
    assert "| GRCSFTrainer | GRCSFTrainer+shuffled_residual | 1, 1 |" in table
    assert table.split("against its controls")[1].split("\n## ")[0].count("| +0.100 [+0.100, +0.100] |") == 1
    del rows["GRCSFTrainer+shuffled_residual"]
    assert "against its controls" not in accuracy_busi256.format_table(_accuracy_report(rows))


def test_comparison_joins_scores_with_the_cost_of_each_trainers_network():
    """An optimizer variant gets its network's cost row, nnUNetTrainer PlainConvUNet's; a missing row stays empty."""
    def row(name, step, plans="default"):
        return {"name": name, "status": "ok", "plans": plans, "params": 2e7, "train_step_ratio": step,
                "inference_ratio": 1.0, "peak_tensors_train_mb_ratio": 1.5, "peak_memory_train_mb_ratio": 2.0}

    speed_report = {"settings": {"device": "cpu"}, "date": "today", "cases": [
        {"case": {"name": "busi256"}, "rows": [row("PlainConvUNet", 1.0), row("ResEncUNet-M", 2.0, "resenc"),
                                               row("FIASTrainer", 1.4)]},
        {"case": {"name": "volume"}, "rows": [row("PlainConvUNet", 1.0)]}]}
    accuracy = _accuracy_report({"nnUNetTrainer": {"0": _run("nnUNetTrainer", [0.5] * 5)},
                                 "FIASTrainerAdamW": {"0": _run("FIASTrainerAdamW", [0.5] * 5)},
                                 "nnUNetTrainer+residual": {"0": _run("nnUNetTrainer", [0.6] * 5)},
                                 "GRCSFTrainer": {"0": {"status": "error", "trainer": "GRCSFTrainer", "error": "x"}}})
    report = compare.join(speed_report, accuracy, "speed_cpu_busi256.json")
    assert report["trainers"]["FIASTrainerAdamW"]["speed_row"] == "FIASTrainer"
    assert report["trainers"]["FIASTrainerAdamW"]["cost"]["busi256"]["train_step_ratio"] == 1.4
    assert report["trainers"]["FIASTrainerAdamW"]["cost"]["volume"] is None
    assert report["trainers"]["nnUNetTrainer+residual"]["cost"]["volume"]["train_step_ratio"] == 1.0
    assert report["trainers"]["GRCSFTrainer"]["scores"] is None
    table = compare.format_table(report)
    assert ("| FIASTrainerAdamW | 0.500 | +0.000 [+0.000, +0.000] | 12 | 0.60 | 20.0 | 1.40x | 1.00x | 1.50x "
            "|  |  |  |") in table
    assert "| nnUNetTrainer+residual | 0.600 | +0.100 [+0.100, +0.100] |" in table
    assert "| GRCSFTrainer | not scored |" in table
    assert "(results/speed_cpu_busi256.md: times are CPU time" in table


def test_hippocampus_table_from_a_report():
    import hippocampus_3d

    def run(dice, seed):
        return {**_run("nnUNetTrainer", dice, seed_in_training_log=seed), "dataset": "Dataset804_Hippocampus",
                "Dice_per_label": {"1": 0.7, "2": 0.8}, "predict_wall_s": 30.0}

    report = _accuracy_report({"nnUNetTrainer": {"0": run([0.7] * 5, 0), "1": run([0.8] * 5, 1)},
                               "GRCSFTrainer_noRCU": {"0": run([0.8] * 5, 0), "1": run([0.9] * 5, 1)}})
    report["settings"].update(configuration="3d_fullres_bs2", patch_size="40x56x40")
    table = hippocampus_3d.format_table(report)
    assert "seeds [0, 1]" in table
    assert ("| GRCSFTrainer_noRCU | Dataset804_Hippocampus | 2 | 0.700 | 0.800 | 0.850 ± 0.071 | 0.500 ± 0.000 "
            "| 12.0 ± 0.0 | +0.100 [+0.100, +0.100] | 0.400 | 1.0 |") in table
    assert "against its controls" not in table
    report["rows"]["GRCSFTrainer"] = {"0": run([0.85] * 5, 0), "1": run([0.95] * 5, 1)}
    table = hippocampus_3d.format_table(report)
    assert "| GRCSFTrainer | GRCSFTrainer_noRCU | 2, 2 | what the RCU adds to the GCU | +0.050 [+0.050, +0.050] |" \
        in table.split("against its controls")[1]


def test_accuracy_benchmarks_take_their_own_budget_and_smoke_settings():
    import hippocampus_3d

    assert accuracy_busi256.parse_args([]).budget == "20epochs_25iters"
    assert hippocampus_3d.parse_args([]).budget == "10epochs_25iters"
    smoke = accuracy_busi256.parse_args(["--smoke", "--seeds", "5"])
    assert (smoke.budget, smoke.num_cases, smoke.seeds) == ("2epochs_4iters", 24, [5])  # given arguments stay
    assert hippocampus_3d.parse_args(["--smoke"]).work_dir.endswith("hippocampus_3d_heldout_smoke")


def test_accuracy_plot_places_each_row_at_its_train_step_ratio_to_plainconvunet(tmp_path):
    """The plot's speed axis is speed.py's side-by-side ratio (PlainConvUNet = 1), not one run's absolute time; a row
    whose network the speed file lacks is named and left out rather than turning every row to wall time."""
    speed_file = BENCHMARKS / "results" / "speed_cpu_busi256_hippocampus.json"
    ratios, clock = accuracy_busi256.speed_step_ratios(speed_file)
    rows = {r["name"]: r for r in json.loads(speed_file.read_text())["cases"][0]["rows"]}
    assert clock == "CPU" and ratios["nnUNetTrainer"] == 1.0
    assert ratios["GRCSFTrainer"] == rows["GRCSFTrainer"]["train_step_ratio"] != rows["GRCSFTrainer"][
        "train_step_cpu_median_s"]
    report = _accuracy_report({"nnUNetTrainer": {"0": _run("nnUNetTrainer", [0.1, 0.2, 0.3, 0.4, 0.5])},
                               "GRCSFTrainer": {"0": _run("GRCSFTrainer", [0.3, 0.4, 0.5, 0.6, 0.7])},
                               "NewTrainer": {"0": _run("NewTrainer", [0.2, 0.3, 0.4, 0.5, 0.6])}})
    summaries = accuracy_busi256.row_summaries(report)
    positions, label = accuracy_busi256.speed_positions(report, summaries, speed_file)
    assert positions == {"nnUNetTrainer": 1.0, "GRCSFTrainer": ratios["GRCSFTrainer"]}
    assert label.endswith(f"not plotted, not in {speed_file.name}: NewTrainer")
    positions, label = accuracy_busi256.speed_positions(report, summaries, tmp_path / "missing_speed.json")
    assert positions == {name: 60.0 / (2 * 6) for name in report["rows"]} and "wall s" in label


@pytest.mark.slow
def test_an_interrupted_mae_training_is_resumed_by_the_benchmark(tmp_path, monkeypatch):
    """The accuracy benchmarks resume: an MAE training stopped before its end (checkpoint_latest.pth only, as
    Ctrl-C or a killed run leaves it) is continued with --resume, not refused, and the residual data set is made."""
    from nnunet_workspace import Workspace, make_interpolation_dataset, make_residual_dataset

    from nnunetv2_grcsf.mae.train import DEFAULT_SUBFOLDER, FINAL, LATEST, TrainConfig, load_checkpoint, train_mae
    from nnunetv2_grcsf.synthetic import write_synthetic_dataset

    workspace = Workspace(tmp_path, "SyntheticLesions", n_proc_da=0)
    write_synthetic_dataset(workspace.raw, 901, num_training=6, num_test=2, shape=(64, 64), progress=False)
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(key, workspace.env[key])
    mae_folder = workspace.results / "Dataset901_SyntheticLesions" / DEFAULT_SUBFOLDER
    train_mae(901, train_config=TrainConfig(steps=4, batch_size=4, save_every=2), stop_after_steps=2,
              progress=False, num_threads=1, log=lambda *a: None)
    assert (mae_folder / LATEST).is_file() and not (mae_folder / FINAL).exists()
    record = make_residual_dataset(workspace, 901, 902, mae_steps=4, device="cpu")
    assert "--resume" in (workspace.logs / "residuals.log").read_text()
    assert load_checkpoint(mae_folder / FINAL)["step"] == 4 and record["steps"] == 4
    assert (workspace.dataset_folder(902) / "dataset.json").is_file()
    # the interpolation control: the same checkpoint and mask ratios, the interpolation's residual
    make_interpolation_dataset(workspace, 901, 902, 903, "cpu")
    mae, control = (json.loads((workspace.dataset_folder(i) / "dataset.json").read_text())["nnunetv2_grcsf"]
                    for i in (902, 903))
    assert control["residual_definition"]["reconstruction"] == "interpolation"
    assert (control["mae_checkpoint"], control["mask_ratios"]) == (mae["mae_checkpoint"], mae["mask_ratios"])


@pytest.mark.parametrize("name", ["../elsewhere", "..", "work/sub"])
def test_mae_brats6_refuses_an_output_name_that_is_a_path(name, monkeypatch, capsys):
    import mae_brats6

    monkeypatch.setattr(mae_brats6, "setup_env", lambda work: pytest.fail(f"would have replaced {work}"))
    with pytest.raises(SystemExit):
        mae_brats6.main(["--output", name])
    assert "give a plain name" in capsys.readouterr().err
