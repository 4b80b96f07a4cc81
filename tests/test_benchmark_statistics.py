"""The accuracy benchmarks' statistics and data handling on known inputs: the held-out test split, the
shuffled-residual pairing and its inputs, the seed summary with the paired bootstrap interval, the results file."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import benchmark_statistics as stats  # noqa: E402
import nnunet_workspace  # noqa: E402


# ------------------------------------------------------------------------------------------ paired bootstrap
def test_identical_scores_give_a_zero_interval():
    scores = np.random.default_rng(1).uniform(size=(3, 40))
    d = stats.paired_bootstrap(scores, scores.copy(), n_resamples=2000)
    assert d["mean_difference"] == 0 and d["low"] == 0 and d["high"] == 0


def test_a_constant_shift_gives_an_interval_at_the_shift():
    reference = np.random.default_rng(2).uniform(size=(2, 30))
    d = stats.paired_bootstrap(reference + 0.05, reference, n_resamples=2000)
    assert d["mean_difference"] == pytest.approx(0.05)
    assert d["low"] == pytest.approx(0.05) and d["high"] == pytest.approx(0.05)


def test_the_interval_is_paired_over_images_and_seeded():
    """Large per-image spread shared by both rows cancels (paired); noise of 0.1 per image gives an interval about
    the mean difference of about +-2 * 0.1 / sqrt(n) wide; the same seed draws the same interval."""
    rng = np.random.default_rng(3)
    images = rng.uniform(0, 1, size=200)
    reference = np.stack([images, images])
    scores = images + 0.02 + rng.normal(0, 0.1, size=200)
    d = stats.paired_bootstrap(scores, reference, n_resamples=4000, seed=5)
    assert d["low"] < d["mean_difference"] < d["high"]
    assert d["high"] - d["low"] == pytest.approx(2 * 1.96 * 0.1 / np.sqrt(200), rel=0.25)
    assert d == stats.paired_bootstrap(scores, reference, n_resamples=4000, seed=5)
    assert d["n_images"] == 200


def test_seeds_are_averaged_per_image_before_the_difference():
    reference = np.array([[0.2, 0.4, 0.6], [0.4, 0.6, 0.8]])  # per image: 0.3 0.5 0.7
    scores = np.array([[0.3, 0.5, 0.7]] * 3)
    d = stats.paired_bootstrap(scores, reference, n_resamples=500)
    assert [d["low"], d["high"], d["mean_difference"]] == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)
    with pytest.raises(ValueError, match="3 images against a reference of 2"):
        stats.paired_bootstrap(scores, reference[:, :2])


def test_seed_summary_is_mean_and_sample_standard_deviation():
    assert stats.seed_summary({"0": 0.2, "1": 0.4, "2": 0.6}) == {"mean": pytest.approx(0.4), "sd": pytest.approx(0.2),
                                                                   "n": 3}
    assert stats.seed_summary({"0": 0.5}) == {"mean": 0.5, "sd": 0.0, "n": 1}


def _run(per_image: dict, **figures) -> dict:
    values = list(per_image.values())
    return {"status": "ok", "per_image_dice": per_image, "Dice": sum(values) / len(values), "pooled_Dice": 0.5,
            "HD95": 10.0, "lesion_F1": 0.5, "lesion_precision": 0.5, "lesion_recall": 0.5, "train_time_s": 60.0,
            **figures}


def test_row_summaries_compare_every_row_with_the_baseline_and_leave_failed_runs_out():
    rows = {"nnUNetTrainer": {"0": _run({"a": 0.2, "b": 0.4}), "1": _run({"a": 0.4, "b": 0.6})},
            "GRCSFTrainer": {"0": _run({"a": 0.4, "b": 0.6}), "1": _run({"a": 0.6, "b": 0.8}),
                             "2": {"status": "error", "error": "x"}},
            "Broken": {"0": {"status": "error", "error": "x"}}}
    summaries = stats.summarize_rows(rows, "nnUNetTrainer", n_resamples=500)
    assert set(summaries) == {"nnUNetTrainer", "GRCSFTrainer"}
    assert summaries["nnUNetTrainer"]["vs_baseline"] is None
    grcsf = summaries["GRCSFTrainer"]
    assert grcsf["seeds"] == ["0", "1"] and grcsf["Dice"]["mean"] == pytest.approx(0.6)
    assert grcsf["Dice"]["sd"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert grcsf["vs_baseline"]["low"] == pytest.approx(0.2) and grcsf["vs_baseline"]["high"] == pytest.approx(0.2)
    rows["GRCSFTrainer"]["0"] = _run({"a": 0.4, "c": 0.6})
    with pytest.raises(ValueError, match="other images"):
        stats.summarize_rows(rows, "nnUNetTrainer", n_resamples=100)


def test_paired_comparisons_difference_row_minus_reference_only_for_pairs_with_runs():
    rows = {"nnUNetTrainer+residual": {"0": _run({"a": 0.2, "b": 0.4, "c": 0.3})},
            "GRCSFTrainer": {"0": _run({"a": 0.3, "b": 0.5, "c": 0.4}), "1": _run({"a": 0.5, "b": 0.7, "c": 0.6})},
            "GRCSFTrainer+shuffled_residual": {"0": {"status": "error", "error": "x"}}}
    comparisons = stats.paired_comparisons(rows, [("GRCSFTrainer", "nnUNetTrainer+residual"),
                                                  ("GRCSFTrainer", "GRCSFTrainer+shuffled_residual"),
                                                  ("GRCSFTrainer_noGCU", "nnUNetTrainer+residual")], n_resamples=500)
    assert [(c["row"], c["reference"], c["seeds"]) for c in comparisons] == [
        ("GRCSFTrainer", "nnUNetTrainer+residual", (2, 1))]
    # GRCSF's images average to reference + 0.2 over its two seeds: every resample's mean difference is 0.2
    assert comparisons[0]["mean_difference"] == pytest.approx(0.2)
    assert comparisons[0]["low"] == pytest.approx(0.2) and comparisons[0]["high"] == pytest.approx(0.2)


# ------------------------------------------------------------------------------------------ test split
def _cases():
    cases = [f"case_{i:03d}" for i in range(100)]
    empty = [i % 5 == 0 for i in range(100)]  # 20 empty references
    return cases, empty


def test_held_out_split_is_disjoint_complete_deterministic_and_stratified():
    cases, empty = _cases()
    train, test = stats.held_out_split(cases, empty, 0.2, seed=0)
    assert len(test) == 20 and len(train) == 80
    assert not set(train) & set(test) and sorted(train + test) == cases
    for seed in range(10):  # 20 % of the 20 empty ones, whatever the seed (a random split varies around 4)
        assert sum(empty[cases.index(c)] for c in stats.held_out_split(cases, empty, 0.2, seed)[1]) == 4
    reversed_order = stats.held_out_split(cases[::-1], empty[::-1], 0.2, seed=0)
    assert reversed_order == (train, test)
    assert stats.held_out_split(cases, empty, 0.2, seed=1)[1] != test
    assert len(stats.held_out_split(cases, empty, 10, seed=0)[1]) == 10


def test_held_out_split_of_a_linked_data_set_reads_the_masks(tmp_path):
    """On PNG labels (as BUSI256): the split is stratified by empty masks, link_dataset puts it in imagesTs /
    labelsTs, and a workspace linked with another split is refused."""
    from PIL import Image

    shared = tmp_path / "Dataset900_Tiny"
    for sub in ("imagesTr", "labelsTr"):
        (shared / sub).mkdir(parents=True)
    for i in range(20):
        mask = np.zeros((8, 8), np.uint8)
        if i % 4:
            mask[2:4, 2:4] = 1
        Image.fromarray(mask).save(shared / "labelsTr" / f"c{i:02d}.png")
        Image.fromarray(mask * 50).save(shared / "imagesTr" / f"c{i:02d}_0000.png")
    (shared / "dataset.json").write_text(json.dumps({"channel_names": {"0": "x"}, "labels": {"background": 0, "a": 1},
                                                     "numTraining": 20, "file_ending": ".png"}))
    split = nnunet_workspace.held_out_test_split(shared, None, 0.2, seed=0)
    assert len(split["test_cases"]) == 4 and split["test_cases_with_empty_reference"] == 1
    workspace = nnunet_workspace.Workspace(tmp_path / "work", "Tiny", 0)
    target = nnunet_workspace.link_dataset(workspace, shared, 900, None, 0.2, 0)
    assert sorted(p.name for p in (target / "labelsTs").iterdir()) == [f"{c}.png" for c in split["test_cases"]]
    assert len(list((target / "imagesTr").iterdir())) == 16
    with pytest.raises(SystemExit, match="another training / test split"):
        nnunet_workspace.link_dataset(workspace, shared, 900, None, 0.2, 1)


# ------------------------------------------------------------------------------------------ shuffled residuals
@pytest.mark.parametrize("n", [2, 3, 10, 125])
def test_derangement_has_no_fixed_points_and_is_deterministic(n):
    partner = stats.derangement(n, seed=0)
    assert sorted(partner) == list(range(n))
    assert all(p != i for i, p in enumerate(partner))
    assert partner == stats.derangement(n, seed=0)


def test_derangement_needs_two_items():
    with pytest.raises(ValueError):
        stats.derangement(1)


def test_shuffled_inputs_take_the_partners_residual_on_the_own_grid(tmp_path):
    import SimpleITK as sitk

    inputs, output = tmp_path / "inputs", tmp_path / "shuffled"
    inputs.mkdir()
    shapes = {"a": (6, 8), "b": (10, 8)}
    for case, shape in shapes.items():
        sitk.WriteImage(sitk.GetImageFromArray(np.full(shape, 7, np.uint8)), str(inputs / f"{case}_0000.png"))
        residual = np.zeros(shape, np.uint8)
        residual[: shape[0] // 2] = 200 if case == "b" else 100  # top half bright
        sitk.WriteImage(sitk.GetImageFromArray(residual), str(inputs / f"{case}_0001.png"))
    nnunet_workspace.shuffled_residual_inputs(inputs, output, {"a": "b", "b": "a"}, [1], ".png")
    a_residual = sitk.GetArrayFromImage(sitk.ReadImage(str(output / "a_0001.png")))
    assert a_residual.shape == shapes["a"]
    assert a_residual[0, 0] == 200 and a_residual[-1, -1] == 0  # b's residual, resampled to a's 6 x 8
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(output / "b_0001.png")))[0, 0] == 100
    assert (output / "a_0000.png").resolve() == (inputs / "a_0000.png").resolve()
    assert json.loads((output / "pairing.json").read_text()) == {"a": "b", "b": "a"}
    assert not (tmp_path / "shuffled.partial").exists()


def test_shuffled_volumes_pair_the_sorted_test_cases_and_resample_onto_the_own_grid(tmp_path):
    """The Hippocampus control: 3D NIfTI volumes of different grids, pairs from the test labels' case names."""
    import SimpleITK as sitk

    workspace = nnunet_workspace.Workspace(tmp_path / "work", "Vol", n_proc_da=0)
    labels = workspace.dataset_folder(804) / "labelsTs"
    labels.mkdir(parents=True)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shapes = {"c1": (4, 6, 5), "c2": (6, 6, 5), "c3": (4, 8, 6)}
    for index, (case, shape) in enumerate(shapes.items()):
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros(shape, np.uint8)), str(labels / f"{case}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros(shape, np.float32)), str(inputs / f"{case}_0000.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(np.full(shape, 10 * (index + 1), np.float32)),
                        str(inputs / f"{case}_0001.nii.gz"))
    output = nnunet_workspace.shuffled_test_inputs(workspace, 804, inputs, [1], ".nii.gz", seed=0)
    assert output == tmp_path / "inputs_shuffled"
    pairing = json.loads((output / "pairing.json").read_text())
    assert pairing == nnunet_workspace.residual_pairing(workspace, 804, ".nii.gz", seed=0)
    assert sorted(pairing) == sorted(pairing.values()) == sorted(shapes)
    assert all(case != partner for case, partner in pairing.items())
    for case, partner in pairing.items():
        residual = sitk.GetArrayFromImage(sitk.ReadImage(str(output / f"{case}_0001.nii.gz")))
        assert residual.shape == shapes[case]
        assert np.all(residual == 10 * (list(shapes).index(partner) + 1))


def test_zero_channel_dataset_zeroes_the_residual_keeps_geometry_and_links_the_rest(tmp_path):
    """The zero-channel control's data set: the residual data set's image channel linked, its residual channel
    zeros of the same geometry and dtype, its labels linked, its dataset.json without the MAE record but with the
    residual channels' indices."""
    import SimpleITK as sitk

    workspace = nnunet_workspace.Workspace(tmp_path / "work", "Vol", n_proc_da=0)
    residual = workspace.dataset_folder(807)
    (residual / "imagesTr").mkdir(parents=True)
    (residual / "labelsTr").mkdir()
    for case in ("c1", "c2"):
        image = sitk.GetImageFromArray(np.full((4, 6, 5), 3, np.float32))
        image.SetSpacing((1.5, 1.0, 2.0))
        sitk.WriteImage(image, str(residual / "imagesTr" / f"{case}_0000.nii.gz"))
        image = sitk.GetImageFromArray(np.full((4, 6, 5), 200, np.uint8))
        image.SetSpacing((1.5, 1.0, 2.0))
        sitk.WriteImage(image, str(residual / "imagesTr" / f"{case}_0001.nii.gz"))
    dataset_json = {"channel_names": {"0": "T1", "1": "rgb_to_0_1"}, "labels": {"background": 0, "a": 1},
                    "numTraining": 2, "file_ending": ".nii.gz", "nnunetv2_grcsf": {"residual_channels": [1]}}
    (residual / "dataset.json").write_text(json.dumps(dataset_json))
    nnunet_workspace.make_zero_channel_dataset(workspace, 807, 808, [1], ".nii.gz")
    zero = workspace.dataset_folder(808)
    written = json.loads((zero / "dataset.json").read_text())
    assert written["nnunetv2_grcsf"] == {"residual_channels": [1]}  # for an RCU trainer; no MAE record
    assert written["channel_names"] == dataset_json["channel_names"]
    assert (zero / "labelsTr").resolve() == (residual / "labelsTr").resolve()
    assert (zero / "imagesTr" / "c1_0000.nii.gz").resolve() == (residual / "imagesTr" / "c1_0000.nii.gz").resolve()
    zeros = sitk.ReadImage(str(zero / "imagesTr" / "c2_0001.nii.gz"))
    assert zeros.GetSpacing() == (1.5, 1.0, 2.0) and zeros.GetPixelID() == sitk.sitkUInt8
    assert not sitk.GetArrayFromImage(zeros).any()
    assert not workspace.dataset_folder(808).with_name(zero.name + ".partial").exists()


# ------------------------------------------------------------------------------------------ rows and results
def test_rows_name_their_data_and_controls():
    row = nnunet_workspace.Row.parse
    assert row("nnUNetTrainer") == ("nnUNetTrainer", "nnUNetTrainer", False, False, False, False)
    assert row("nnUNetTrainer+residual").residual_data
    assert row("GRCSFTrainer").residual_data and not row("GRCSFTrainer_noRCU").residual_data
    shuffled = row("GRCSFTrainer+shuffled_residual")
    assert shuffled.trainer == "GRCSFTrainer" and shuffled.residual_data and shuffled.shuffled
    plain = row("nnUNetTrainer+shuffled_residual")  # the plain channel's models, given shuffled residuals
    assert plain.trainer == "nnUNetTrainer" and plain.residual_data and plain.shuffled
    zero = row("nnUNetTrainer+zero_channel")
    assert zero.residual_data and zero.zero_channel and not zero.shuffled and zero.test_inputs_kind() == "zero"
    assert [row(name).test_inputs_kind() for name in ("nnUNetTrainer", "GRCSFTrainer", "GRCSFTrainer+shuffled_residual")
            ] == ["source", "residual", "shuffled"]
    interpolation = row("GRCSFTrainer+interpolation_residual")
    assert interpolation.residual_data and interpolation.interpolation and not interpolation.shuffled
    assert interpolation.test_inputs_kind() == "interpolation"
    ids = (802, 803, 809, 810)
    assert [row(name).dataset_id(*ids) for name in ("nnUNetTrainer", "nnUNetTrainer+residual", "GRCSFTrainer",
                                                    "GRCSFTrainer+shuffled_residual", "nnUNetTrainer+zero_channel",
                                                    "GRCSFTrainer+interpolation_residual")] == [802, 803, 803, 803, 809,
                                                                                               810]
    with pytest.raises(SystemExit, match="'residual', 'shuffled_residual', 'zero_channel' or 'interpolation_residual'"):
        row("GRCSFTrainer+other")
    rcu_without_residual = row("GRCSFTrainer_noGCU+zero_channel")  # the RCU given zeros: its architecture alone
    assert rcu_without_residual.zero_channel and rcu_without_residual.dataset_id(*ids) == 809


def test_results_are_kept_per_row_and_seed_and_never_mixed_with_other_settings(tmp_path):
    workspace = nnunet_workspace.Workspace(tmp_path / "work", "Demo", 0)
    results = tmp_path / "results.json"
    settings = {"budget": "5epochs_20iters", "fold": 0}
    nnunet_workspace.record_result(workspace, results, settings, "nnUNetTrainer", 0, {"status": "ok"})
    nnunet_workspace.record_result(workspace, results, settings, "nnUNetTrainer", 1, {"status": "error"})
    assert nnunet_workspace.finished_results(workspace, results, settings) == {
        "nnUNetTrainer": {"0": {"status": "ok"}, "1": {"status": "error"}}}
    with pytest.raises(SystemExit, match="budget: '5epochs_20iters' there, '10epochs_25iters' now"):
        nnunet_workspace.finished_results(workspace, results, {"budget": "10epochs_25iters", "fold": 0})
    with pytest.raises(SystemExit, match="test_split: 'not recorded' there"):
        nnunet_workspace.finished_results(workspace, results, {**settings, "test_split": {"seed": 0}})
    old = tmp_path / "old.json"  # one result per trainer, as the benchmark wrote before seeds
    old.write_text(json.dumps({"settings": settings, "trainers": {"nnUNetTrainer": {"status": "ok"}}}))
    with pytest.raises(SystemExit, match="no seeds"):
        nnunet_workspace.finished_results(workspace, old, settings)
    assert nnunet_workspace.finished_results(workspace, tmp_path / "none.json", settings) == {}


def test_results_keep_notes_on_earlier_runs_and_the_mae_of_each_residual_run(tmp_path):
    workspace = nnunet_workspace.Workspace(tmp_path / "work", "Demo", 0)
    results = tmp_path / "results.json"
    first = {"fold": 0, "mae": {"sha256": "first"}}
    nnunet_workspace.record_result(workspace, results, first, "GRCSFTrainer", 0, {"status": "ok"})
    report = json.loads(results.read_text())
    report["settings"]["mae_note"] = "seed 0 read the first MAE"  # written by hand after the run
    results.write_text(json.dumps(report))
    again = {"fold": 0, "mae": {"sha256": "retrained"}}  # a new work folder trained the MAE again
    for row in ("GRCSFTrainer", "nnUNetTrainer+shuffled_residual", "nnUNetTrainer", "nnUNetTrainer+zero_channel"):
        nnunet_workspace.record_result(workspace, results, again, row, 1, {"status": "ok"})
    report = json.loads(results.read_text())
    assert report["settings"] == {**again, "mae_note": "seed 0 read the first MAE"}
    assert [report["rows"]["GRCSFTrainer"][seed]["mae_sha256"] for seed in "01"] == ["first", "retrained"]
    assert report["rows"]["nnUNetTrainer+shuffled_residual"]["1"]["mae_sha256"] == "retrained"
    assert "mae_sha256" not in report["rows"]["nnUNetTrainer"]["1"]
    assert "mae_sha256" not in report["rows"]["nnUNetTrainer+zero_channel"]["1"]


def test_a_seeded_run_has_its_own_results_folder_and_seed_variable(tmp_path):
    workspace = nnunet_workspace.Workspace(tmp_path / "work", "Demo", 0)
    env = workspace.seed_env(2, training=True)
    assert env["NNUNETV2_GRCSF_SEED"] == "2" and env["nnUNet_results"] == str(workspace.results_root(2))
    assert workspace.results_root(2) != workspace.results_root(3) != workspace.results
    assert workspace.model_folder(1, "T", "2d", seed=2).is_relative_to(workspace.results_root(2))
    assert workspace.seed_env(None)["nnUNet_results"] == str(workspace.results)


def test_the_seed_is_read_from_nnunets_training_log(tmp_path):
    """As PluginTrainer writes it: ``seed: S (from NNUNETV2_GRCSF_SEED)``, or ``seed: none (...)`` unseeded."""
    assert nnunet_workspace.logged_seed(tmp_path) is None
    log = tmp_path / "training_log_2026_1_1_00_00_00.txt"
    log.write_text("2026-01-01 00:00:00.000000: Epoch 0\n2026-01-01 00:00:00.000001: seed: none "
                   "(NNUNETV2_GRCSF_SEED is unset), as nnU-Net: this run is not reproducible\n")
    assert nnunet_workspace.logged_seed(tmp_path) is None
    log.write_text("2026-01-01 00:00:00.000000: Epoch 0\n"
                   "2026-01-01 00:00:00.000001: seed: 7 (from NNUNETV2_GRCSF_SEED)\n")
    assert nnunet_workspace.logged_seed(tmp_path) == 7
