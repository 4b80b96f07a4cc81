"""Faults around residual data sets: SIGTERM mid-run, a changed MAE, replacing a data set a model was trained on."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nnunetv2_grcsf.mae import MAEError
from nnunetv2_grcsf.mae.residuals import ResidualSettings, make_residual_dataset, make_residual_folder

from mae_testutils import blob_free_mae, make_raw_dataset, nnunet_env, one_thread, run_command  # noqa: F401

QUIET = dict(progress=False, num_threads=1, log=lambda *a: None)


# ---- SIGTERM ----------------------------------------------------------------------------------------------
def _terminate_once_writing(command: list, env: dict, watch: Path, prefix: str) -> subprocess.CompletedProcess:
    """Start ``command``; as soon as its hidden build folder ``watch/<prefix>*`` holds files, send SIGTERM.

    The runs below process many small cases one slice per forward pass, so they are mid-run when the first files
    appear. Returns the finished process (its stdout / stderr read).
    """
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        building = [p for p in watch.glob(prefix + "*") if p.is_dir()]
        if building and any(f.is_file() for f in building[0].rglob("*")):
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.002)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _env(nnunet_env):
    return {**os.environ, **{k: str(v) for k, v in nnunet_env.items()}}


def _cli(*args):
    return [sys.executable, "-c", "import sys; from nnunetv2_grcsf.cli import main; sys.exit(main())", *args]


def test_sigterm_in_folder_mode_leaves_no_output_folder(nnunet_env, blob_free_mae, tmp_path):
    source = make_raw_dataset(nnunet_env["nnUNet_raw"], 60, "Many", num_cases=60, shape=(24, 24), blobs=False)
    out = tmp_path / "out"
    result = _terminate_once_writing(
        _cli("residuals", "-i", str(source / "imagesTr"), "-o", str(out), "-m", str(blob_free_mae["checkpoint"]),
             "--batch-size", "1", "--num-threads", "1", "--device", "cpu", "--quiet"),
        _env(nnunet_env), tmp_path, ".out.incomplete-")
    assert result.returncode == -signal.SIGTERM, (result.returncode, result.stderr[-2000:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nnUNet_preprocessed", "nnUNet_raw", "nnUNet_results"]


def test_sigterm_in_dataset_mode_leaves_no_data_set_and_no_build_folder(nnunet_env, blob_free_mae):
    raw = nnunet_env["nnUNet_raw"]
    make_raw_dataset(raw, 61, "Many", num_cases=60, shape=(24, 24), blobs=False)
    result = _terminate_once_writing(
        _cli("residuals", "-d", "61", "-o", "62", "-m", str(blob_free_mae["checkpoint"]), "--batch-size", "1",
             "--num-threads", "1", "--device", "cpu", "--quiet"),
        _env(nnunet_env), raw, ".Dataset062_Many.incomplete-")
    assert result.returncode == -signal.SIGTERM, (result.returncode, result.stderr[-2000:])
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset061_Many"]


# ---- which MAE made the residuals ----------------------------------------------------------------------------
def _changed_copy(checkpoint: Path, path: Path, scale_factor: float = 1.0) -> Path:
    """A retrained MAE stand-in: the checkpoint with other weights (and optionally another residual scale)."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for value in ckpt["model_state"].values():
        if value.is_floating_point():
            value.add_(0.01)
    ckpt["residual_scale"] = float(ckpt["residual_scale"]) * scale_factor
    torch.save(ckpt, path)
    return path


def _predict_inputs(source: Path, out: Path, dataset: str, *extra) -> int:
    return run_command("residuals", ["residuals", "-i", str(source / "imagesTr"), "-o", str(out), "--from-dataset",
                                     dataset, "--quiet", "--num-threads", "1", *extra])


@pytest.mark.usefixtures("one_thread")
def test_a_changed_mae_is_caught_by_its_hash(nnunet_env, blob_free_mae, tmp_path, capsys):
    from nnunetv2_grcsf.commands import doctor

    raw = nnunet_env["nnUNet_raw"]
    source = make_raw_dataset(raw, 63, "Src", num_cases=2)
    mae = tmp_path / "mae" / "checkpoint_final.pth"
    mae.parent.mkdir()
    shutil.copyfile(blob_free_mae["checkpoint"], mae)
    make_residual_dataset(63, 64, checkpoint=mae, **QUIET)
    recorded = json.loads((raw / "Dataset064_Src" / "dataset.json").read_text())["nnunetv2_grcsf"]
    assert recorded["mae_sha256"] == hashlib.sha256(mae.read_bytes()).hexdigest()
    assert _predict_inputs(source, tmp_path / "same", "64") == 0

    # a copy of the same MAE elsewhere (e.g. shipped with the model) is accepted with -m
    copy = shutil.copyfile(mae, tmp_path / "copy.pth")
    assert _predict_inputs(source, tmp_path / "copied", "64", "-m", str(copy)) == 0
    # the recorded checkpoint gone: say to copy it, not to train a new one
    mae.rename(tmp_path / "away.pth")
    with pytest.raises(MAEError, match=r"recorded in Dataset064_Src.*does not exist: copy that file there or pass it "
                                       r"with -m"):
        _predict_inputs(source, tmp_path / "gone", "64")
    # retrained in place (same path, other weights, same scale): refused, naming what to run
    _changed_copy(tmp_path / "away.pth", mae)
    with pytest.raises(MAEError, match=r"is not the one Dataset064_Src was made with: its SHA-256 differs.*"
                                       r"residuals -d Dataset063_Src -o Dataset064_Src -m .*--overwrite"):
        _predict_inputs(source, tmp_path / "changed", "64")
    assert not (tmp_path / "changed").exists()
    capsys.readouterr()
    report = doctor.Report()
    doctor._check_dataset(report, "64")
    out = capsys.readouterr().out
    assert report.failures == 1 and "is not the one Dataset064_Src was made with" in out, out


@pytest.mark.usefixtures("one_thread")
def test_a_data_set_without_hash_compares_the_residual_scale(nnunet_env, blob_free_mae, tmp_path, capsys):
    raw = nnunet_env["nnUNet_raw"]
    source = make_raw_dataset(raw, 65, "Old", num_cases=2)
    mae = shutil.copyfile(blob_free_mae["checkpoint"], tmp_path / "mae.pth")
    make_residual_dataset(65, 66, checkpoint=mae, **QUIET)
    path = raw / "Dataset066_Old" / "dataset.json"
    dataset_json = json.loads(path.read_text())
    del dataset_json["nnunetv2_grcsf"]["mae_sha256"]  # as written before the hash was recorded
    path.write_text(json.dumps(dataset_json))
    assert _predict_inputs(source, tmp_path / "same_scale", "66") == 0
    assert "records no MAE hash" in capsys.readouterr().out
    _changed_copy(blob_free_mae["checkpoint"], mae, scale_factor=1.04)
    with pytest.raises(MAEError, match=r"records no MAE hash, and the residual scale \S+, recorded \S+"):
        _predict_inputs(source, tmp_path / "other_scale", "66")


@pytest.mark.usefixtures("one_thread")
def test_overwrite_warns_about_models_trained_on_the_old_channel(nnunet_env, blob_free_mae, tmp_path):
    raw, results = nnunet_env["nnUNet_raw"], nnunet_env["nnUNet_results"]
    make_raw_dataset(raw, 67, "Src", num_cases=2)
    ckpt = blob_free_mae["checkpoint"]
    make_residual_dataset(67, 68, checkpoint=ckpt, **QUIET)
    model = results / "Dataset068_Src" / "GRCSFTrainer__nnUNetPlans__2d"
    (model / "fold_0").mkdir(parents=True)
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"a trained model")
    lines = []
    make_residual_dataset(67, 68, checkpoint=ckpt, overwrite=True, **{**QUIET, "log": lines.append})
    assert not any("warning" in line for line in lines), lines  # same MAE, same settings: same channel
    make_residual_dataset(67, 68, checkpoint=ckpt, overwrite=True, settings=ResidualSettings(smoothing_sigma=0),
                          **{**QUIET, "log": lines.append})
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and str(model) in warnings[0] and "nnUNetv2_plan_and_preprocess -d 68" in warnings[0]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("splits, saw", [(["imagesTr", "imagesTs"], True), (["imagesTr"], False), (None, None)])
def test_report_and_doctor_say_when_the_mae_saw_the_test_images(nnunet_env, blob_free_mae, tmp_path, capsys, splits,
                                                                saw):
    from nnunetv2_grcsf.commands import doctor
    from nnunetv2_grcsf.mae import TRAINING_SPLITS_KEY

    ckpt = torch.load(blob_free_mae["checkpoint"], map_location="cpu", weights_only=True)
    ckpt.pop(TRAINING_SPLITS_KEY, None)  # None: a checkpoint from before the splits were recorded
    if splits is not None:
        ckpt[TRAINING_SPLITS_KEY] = splits
    ckpt["train_config"]["skip_labelled_patches"] = splits == ["imagesTr"]  # reported as read from the checkpoint
    mae = tmp_path / "mae.pth"
    torch.save(ckpt, mae)
    make_raw_dataset(nnunet_env["nnUNet_raw"], 69, "Src", num_cases=2, num_test=1)
    lines = []
    result = make_residual_dataset(69, 70, checkpoint=mae, report=True, **{**QUIET, "log": lines.append})
    assert result["report"]["mae_saw_test_images"] is saw
    assert result["report"]["mae_skipped_labelled_patches"] is (splits == ["imagesTr"])
    assert f"it modelled normal tissue only): {'yes' if splits == ['imagesTr'] else 'no'}" in "\n".join(lines)
    raw = Path(nnunet_env["nnUNet_raw"]) / "Dataset069_Src"
    folder_lines = []
    folder = make_residual_folder(raw / "imagesTr", tmp_path / "residuals_tr", mae, labels_folder=raw / "labelsTr",
                                  **{**QUIET, "log": folder_lines.append})
    assert folder["report"]["mae_saw_test_images"] is saw
    assert folder["report"]["mae_skipped_labelled_patches"] is (splits == ["imagesTr"])
    assert sum(line.startswith("warning: the MAE") for line in folder_lines) == (saw is not False)
    warned = [line for line in lines if line.startswith("warning: the MAE")]
    capsys.readouterr()
    report = doctor.Report()
    doctor._check_dataset(report, "70")
    out = capsys.readouterr().out
    assert ("[ok]   MAE loss: outside the labelled patches" in out) is (splits == ["imagesTr"])
    assert ("[info] MAE loss: on every patch" in out and "mae-train -d Dataset069_Src --overwrite" in out) is \
        (splits != ["imagesTr"])
    if saw is False:
        assert not warned and report.warnings == 0 and "imagesTr only" in out
        return
    expected = "was trained on the test images" if saw else "may have been trained on the test images"
    assert len(warned) == 1 and expected in warned[0] and "mae-train -d Dataset069_Src --overwrite" in warned[0]
    assert report.failures == 0 and report.warnings == 1 and expected in out
