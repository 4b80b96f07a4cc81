"""Helpers for tests that run nnU-Net's real console scripts in subprocesses on tiny generated data."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnunetv2_grcsf.residual_channels import DATASET_JSON_KEY
from nnunetv2_grcsf.synthetic import write_synthetic_dataset


def make_nnunet_folders(root: Path) -> dict:
    """``{variable: folder}``: nnUNet_raw, nnUNet_preprocessed and nnUNet_results made below ``root``."""
    folders = {name: Path(root) / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    return folders


def set_nnunet_folders(monkeypatch, root: Path) -> dict:
    """Make the three nnU-Net folders below ``root`` and point this process's environment at them (undone with
    ``monkeypatch``); returns them as :func:`make_nnunet_folders` does."""
    folders = make_nnunet_folders(root)
    for name, folder in folders.items():
        monkeypatch.setenv(name, str(folder))
    return folders


def nnunet_env(root: Path, **extra) -> dict:
    """A fresh shell's environment: PATH, HOME and the three nnU-Net folders below ``root``, nothing else."""
    folders = make_nnunet_folders(root)
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(root))}
    env.update({name: str(folder) for name, folder in folders.items()})
    env.update(extra)
    return env


def run(command: list, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a console command; on failure, fail with the end of its output."""
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n--- stdout ---\n"
                             f"{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}")
    return result


def add_lesion_channel(dataset: Path, seed: int = 0) -> None:
    """Append a residual-like channel (blurred lesion mask + noise, 8-bit, named ``rgb_to_0_1`` as
    `nnunetv2_grcsf residuals` writes it) to a generated data set, declared in dataset.json as a residual
    channel. Test data for the network path only: the real MAE residuals are tested in tests/mae and used
    by the demo."""
    rng = np.random.default_rng(seed)
    dataset_json = json.loads((dataset / "dataset.json").read_text())
    channel = len(dataset_json["channel_names"])
    for images, labels in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        for image_file in sorted((dataset / images).glob("*_0000.nii.gz")):
            case = image_file.name[: -len("_0000.nii.gz")]
            image = sitk.ReadImage(str(image_file))
            label = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / labels / f"{case}.nii.gz")))
            residual = ndimage.gaussian_filter(label.astype(np.float32), 2) + 0.2 * rng.random(label.shape)
            out = sitk.GetImageFromArray(np.round(200 * residual).clip(0, 255).astype(np.uint8))
            out.CopyInformation(image)
            sitk.WriteImage(out, str(dataset / images / f"{case}_{channel:04d}.nii.gz"))
    dataset_json["channel_names"][str(channel)] = "rgb_to_0_1"
    dataset_json[DATASET_JSON_KEY] = {"residual_channels": [channel]}
    (dataset / "dataset.json").write_text(json.dumps(dataset_json, indent=2))


def tiny_residual_dataset(root: Path, dataset_id: int, shape=(64, 64), num_training: int = 10,
                          num_test: int = 2) -> tuple:
    """Generate, plan and preprocess a tiny 2D (or 3D) lesion data set with a residual channel.

    Returns (env, raw data set folder).
    """
    env = nnunet_env(root)
    dataset = write_synthetic_dataset(env["nnUNet_raw"], dataset_id, "Tiny", num_training, num_test, shape=shape,
                                      progress=False)
    add_lesion_channel(dataset)
    configuration = "2d" if len(shape) == 2 else "3d_fullres"
    run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", configuration, "-np", "1",
         "--verify_dataset_integrity"], env)
    return env, dataset
