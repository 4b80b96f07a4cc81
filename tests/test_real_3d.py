"""The real 3D path on a few real volumes (Hippocampus), through the commands a user types.

A reduced version of ``benchmarks/hippocampus_3d.py`` (same code: ``benchmarks/nnunet_workspace.py``), so
every submission runs the 3D path on real data: 12 cases of ../shared/data/Dataset804_Hippocampus (10 for
training, 2 held out), ``nnunetv2_grcsf mae-train`` (20 steps) and ``residuals`` for the residual channel,
``nnUNetv2_plan_and_preprocess`` (3d_fullres, real plans of these volumes), a ``3d_fullres_bs2``
configuration added to the plans, then for each 3D trainer ``nnUNetv2_train`` (2 epochs of 4 iterations),
``nnUNetv2_predict`` of the held-out cases and nnU-Net's ``nnUNetv2_evaluate_folder``. Skipped when the
shared data are absent.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from nnunet_workspace import (Workspace, evaluate_nnunet, link_dataset, make_residual_dataset,  # noqa: E402
                              plan_and_preprocess, predict, train)

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]

SOURCE_ID, RESIDUAL_ID, NAME = 804, 814, "Hippocampus"
SHARED = Path(os.environ.get("GRCSF_SHARED_DATA", BENCHMARKS.parent.parent / "shared" / "data"))
TRAINER_DATASETS = {"GRCSFTrainer": RESIDUAL_ID, "FIASTrainer": SOURCE_ID, "GRCSF_FIASTrainer": RESIDUAL_ID}
BUDGET = "2epochs_4iters"


@pytest.fixture(scope="module")
def hippocampus(tmp_path_factory):
    """A workspace with 12 real cases (2 in imagesTs), its residual data set, both planned: (workspace, configs)."""
    shared = SHARED / f"Dataset{SOURCE_ID}_{NAME}"
    if not (shared / "dataset.json").is_file():
        pytest.skip(f"real 3D data not found at {shared} (set GRCSF_SHARED_DATA to the folder holding it)")
    workspace = Workspace(tmp_path_factory.mktemp("real3d"), NAME, n_proc_da=0)
    workspace.train_env["nnUNet_def_n_proc"] = "1"
    link_dataset(workspace, shared, SOURCE_ID, num_cases=12, num_test=2)
    make_residual_dataset(workspace, SOURCE_ID, RESIDUAL_ID, mae_steps=20, device="cpu")
    configurations = {i: plan_and_preprocess(workspace, i, "3d_fullres", batch_size=2)
                      for i in (SOURCE_ID, RESIDUAL_ID)}
    return workspace, configurations


def geometry(path: Path) -> tuple:
    """Size, spacing, origin and direction of an image file, as one flat tuple of numbers."""
    image = sitk.ReadImage(str(path))
    return (*image.GetSize(), *image.GetSpacing(), *image.GetOrigin(), *image.GetDirection())


def test_residual_volumes_keep_the_geometry_of_their_source(hippocampus):
    workspace, _ = hippocampus
    source, residual = workspace.dataset_folder(SOURCE_ID), workspace.dataset_folder(RESIDUAL_ID)
    dataset_json = json.loads((residual / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": "MRI", "1": "rgb_to_0_1"}
    assert dataset_json["nnunetv2_grcsf"]["residual_channels"] == [1]
    images = sorted((source / "imagesTr").glob("*_0000.nii.gz")) + sorted((source / "imagesTs").glob("*_0000.nii.gz"))
    assert len(images) == 12
    for image in images:
        residual_file = residual / image.parent.name / image.name.replace("_0000.", "_0001.")
        assert geometry(residual_file) == pytest.approx(geometry(image)), image.name
        assert sitk.GetArrayFromImage(sitk.ReadImage(str(residual_file))).max() > 0


def test_the_plans_are_nnunets_3d_plans_of_these_volumes_with_a_small_batch(hippocampus):
    workspace, configurations = hippocampus
    plans = json.loads(workspace.plans_file(RESIDUAL_ID).read_text())
    assert configurations[RESIDUAL_ID] == "3d_fullres_bs2"
    assert plans["configurations"]["3d_fullres_bs2"] == {"inherits_from": "3d_fullres", "batch_size": 2}
    assert len(plans["configurations"]["3d_fullres"]["patch_size"]) == 3


@pytest.mark.parametrize("trainer", list(TRAINER_DATASETS))
def test_3d_trainer_trains_predicts_and_is_evaluated_by_nnunet(hippocampus, trainer):
    workspace, configurations = hippocampus
    dataset_id, name = TRAINER_DATASETS[trainer], f"{trainer}_{BUDGET}"
    folder = train(workspace, dataset_id, name, configurations[dataset_id], 0, "cpu")
    assert (folder / "checkpoint_final.pth").is_file()
    predictions = predict(workspace, dataset_id, name, configurations[dataset_id], [0], "cpu")
    labels = workspace.dataset_folder(dataset_id) / "labelsTs"
    summary = evaluate_nnunet(workspace, dataset_id, predictions, labels, workspace.plans_file(dataset_id))
    assert len(summary["metric_per_case"]) == 2 and set(summary["mean"]) == {"1", "2"}
    for label_file in sorted(labels.glob("*.nii.gz")):
        prediction = predictions / label_file.name
        assert geometry(prediction) == pytest.approx(geometry(label_file))
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(prediction))))) <= {0, 1, 2}
