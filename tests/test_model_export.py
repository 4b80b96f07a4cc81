"""A GRCSF model is one portable folder: train, export with nnU-Net's zip, install elsewhere, predict.

Everything runs through the real console scripts on a tiny synthetic data set: `mae-train`,
`residuals -d`, nnU-Net planning and training (GRCSFTrainer, 2 epochs of 4 steps), then
`nnUNetv2_export_model_to_zip` and `nnUNetv2_install_pretrained_model_from_zip` into a fresh set of
nnU-Net folders, with the raw data sets and the MAE moved away. `nnunetv2_grcsf predict` on the new
images there must give what `residuals -i --from-dataset` + `nnUNetv2_predict` gave on the original
machine (segmentations and probabilities).
"""
import hashlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_runs import nnunet_env, run
from nnunetv2_grcsf.model_mae import CHECKPOINT_KEY
from nnunetv2_grcsf.prediction import TEMPORARY_PREFIX
from nnunetv2_grcsf.synthetic import write_synthetic_dataset

pytestmark = pytest.mark.slow

SOURCE_ID, RESIDUAL_ID = 981, 982
TRAINER = "GRCSFTrainer_2epochs_4iters"
FEW_WORKERS = {"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"}
PREDICT = ["-d", str(RESIDUAL_ID), "-c", "2d", "-f", "0", "-tr", TRAINER, "-device", "cpu", "--save_probabilities"]


@pytest.fixture(scope="module")
def shared_model(tmp_path_factory):
    """Train on one "machine", predict there by hand, export; install on another. Returns a dict of paths/envs."""
    root = tmp_path_factory.mktemp("export")
    env = nnunet_env(root / "machine_a")
    raw, results = Path(env["nnUNet_raw"]), Path(env["nnUNet_results"])
    source = write_synthetic_dataset(raw, SOURCE_ID, "Tiny", 10, 2, shape=(64, 64), progress=False)
    run(["nnunetv2_grcsf", "mae-train", "-d", str(SOURCE_ID), "--steps", "10", "--batch-size", "4",
         "--image-size", "64", "--num-threads", "1", "--quiet"], env)
    run(["nnunetv2_grcsf", "residuals", "-d", str(SOURCE_ID), "-o", str(RESIDUAL_ID), "--quiet"], env)
    run(["nnUNetv2_plan_and_preprocess", "-d", str(RESIDUAL_ID), "-c", "2d", "-np", "1", "-npfp", "1"], env)
    run(["nnUNetv2_train", str(RESIDUAL_ID), "2d", "0", "-tr", TRAINER, "-device", "cpu"], {**env, **FEW_WORKERS})
    residual_dataset = next(raw.glob(f"Dataset{RESIDUAL_ID}_*"))
    recorded_sha256 = json.loads((residual_dataset / "dataset.json").read_text())["nnunetv2_grcsf"]["mae_sha256"]
    checkpoints = sorted(results.glob(f"{residual_dataset.name}/{TRAINER}__nnUNetPlans__2d/fold_0/checkpoint_*.pth"))

    new_images = root / "new_images"  # images only, as a colleague would get them
    shutil.copytree(source / "imagesTs", new_images)
    with_residuals = root / "new_images_with_residuals"
    run(["nnunetv2_grcsf", "residuals", "-i", str(new_images), "-o", str(with_residuals), "--from-dataset",
         str(RESIDUAL_ID), "--quiet"], env)
    reference = root / "predictions_machine_a"
    run(["nnUNetv2_predict", "-i", str(with_residuals), "-o", str(reference), *PREDICT, "-npp", "0", "-nps", "0",
         "--disable_progress_bar"], env)
    zip_file = root / "model.zip"
    run(["nnUNetv2_export_model_to_zip", "-d", str(RESIDUAL_ID), "-o", str(zip_file), "-c", "2d", "-tr", TRAINER,
         "-f", "0"], env)

    moved = root / "moved_away"  # nothing of machine A's data or MAE is where the model's records point
    moved.mkdir()
    for folder in [*raw.glob("Dataset*"), *results.glob(f"Dataset{SOURCE_ID:03d}_*")]:
        shutil.move(str(folder), str(moved / folder.name))
    env_b = nnunet_env(root / "machine_b")
    run(["nnUNetv2_install_pretrained_model_from_zip", str(zip_file)], env_b)
    return {"root": root, "env_b": env_b, "new_images": new_images, "with_residuals": with_residuals,
            "reference": reference, "checkpoints": checkpoints, "recorded_sha256": recorded_sha256}


def test_every_checkpoint_carries_the_mae_the_residual_data_set_was_made_with(shared_model):
    names = [p.name for p in shared_model["checkpoints"]]
    assert "checkpoint_final.pth" in names and "checkpoint_best.pth" in names
    for checkpoint in shared_model["checkpoints"]:
        entry = torch.load(checkpoint, map_location="cpu", weights_only=False)[CHECKPOINT_KEY]
        assert entry["sha256"] == hashlib.sha256(entry["checkpoint_bytes"]).hexdigest()
        assert entry["sha256"] == shared_model["recorded_sha256"]


def assert_same_predictions(folder, reference):
    cases = sorted(p.name for p in reference.glob("*.nii.gz"))
    assert cases and sorted(p.name for p in folder.glob("*.nii.gz")) == cases
    for case in cases:
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / case))),
                              sitk.GetArrayFromImage(sitk.ReadImage(str(reference / case))))
        probabilities = case.replace(".nii.gz", ".npz")
        assert np.array_equal(np.load(folder / probabilities)["probabilities"],
                              np.load(reference / probabilities)["probabilities"])


def test_installed_model_predicts_new_images_with_its_own_mae(shared_model, tmp_path):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    output = tmp_path / "predictions_machine_b"
    result = run(["nnunetv2_grcsf", "predict", "-i", str(shared_model["new_images"]), "-o", str(output), *PREDICT],
                 {**shared_model["env_b"], "TMPDIR": str(temporary)})
    assert "adding residual channel(s) [1] with the model's MAE of Dataset981_Tiny" in result.stdout
    assert "residuals" in result.stderr  # the progress bar of the residual maps
    assert_same_predictions(output, shared_model["reference"])
    assert not list(temporary.glob(f"{TEMPORARY_PREFIX}*"))  # the temporary residual inputs are gone
    assert sorted(p.name for p in shared_model["new_images"].iterdir()) == ["tiny_010_0000.nii.gz",
                                                                             "tiny_011_0000.nii.gz"]


def test_images_that_already_have_the_residual_channel_get_no_second_one(shared_model, tmp_path):
    output = tmp_path / "predictions"
    result = run(["nnunetv2_grcsf", "predict", "-i", str(shared_model["with_residuals"]), "-o", str(output), *PREDICT,
                  "-npp", "0", "-nps", "0", "--disable_progress_bar"], shared_model["env_b"])
    assert "already have the residual channel(s) [1]" in result.stdout
    assert_same_predictions(output, shared_model["reference"])


def plain_predict_error_lines(shared_model, output, extra_arguments=()):
    """Run plain nnUNetv2_predict on images without the residual channel; returns (exit code, stderr lines)."""
    result = subprocess.run(["nnUNetv2_predict", "-i", str(shared_model["new_images"]), "-o", str(output), *PREDICT,
                             *extra_arguments], env=shared_model["env_b"], capture_output=True, text=True, timeout=600)
    return result.returncode, result.stderr.strip().splitlines()


def assert_says_what_to_run(line):
    assert "needs 2 input channels" in line and "the images have 1" in line
    assert "`nnunetv2_grcsf predict`" in line


def test_plain_nnunet_predict_without_the_residual_channel_says_what_to_run(shared_model, tmp_path):
    code, lines = plain_predict_error_lines(shared_model, tmp_path / "out", ["-npp", "0", "-nps", "0"])
    assert code != 0
    assert_says_what_to_run(lines[-1])


def test_plain_nnunet_predict_with_its_worker_processes_says_it_once(shared_model, tmp_path):
    """With nnU-Net's default preprocessing workers, a worker may print its own traceback after ours when the main
    process ends (its manager's socket is gone): the error is the main process's exception line, said once."""
    code, lines = plain_predict_error_lines(shared_model, tmp_path / "out")
    assert code != 0
    ours = [line for line in lines if line.startswith("nnunetv2_grcsf.residual_channels.ResidualChannelError: ")]
    assert len(ours) == 1
    assert_says_what_to_run(ours[0])


def test_sigterm_removes_the_temporary_residual_inputs(shared_model, tmp_path):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    process = subprocess.Popen(["nnunetv2_grcsf", "predict", "-i", str(shared_model["new_images"]), "-o",
                                str(tmp_path / "out"), *PREDICT, "-npp", "0", "-nps", "0", "--disable_progress_bar"],
                               env={**shared_model["env_b"], "TMPDIR": str(temporary)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(temporary.glob(f"{TEMPORARY_PREFIX}*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "predict ended before its temporary folder was seen"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == -signal.SIGTERM  # ends as killed by SIGTERM, as without our handler
    assert not list(temporary.glob(f"{TEMPORARY_PREFIX}*"))
