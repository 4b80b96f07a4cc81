"""Bad inputs around 3D: 2D/3D checkpoint mix-ups, far-off spacings, slices smaller than a patch, and the
geometry check of residual data sets (``nnunetv2_grcsf doctor -d``)."""
import json
import re
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_grcsf.commands.doctor import Report, _check_dataset
from nnunetv2_grcsf.mae import MAEGeometryError, MAEIncompatibleError
from nnunetv2_grcsf.mae import data as mdata
from nnunetv2_grcsf.mae.geometry import check_residual_dataset, verify_residual_dataset
from nnunetv2_grcsf.mae.residuals import (SPACING_WARNING_FACTOR, SPACING_WARNING_MAX_CASES, make_residual_dataset,
                                          make_residual_folder)
from nnunetv2_grcsf.mae.train import TrainConfig, dataset_images, load_checkpoint, load_training_slices, train_mae

from nnunet_runs import set_nnunet_folders
from mae_testutils import make_raw_dataset, nnunet_env, one_thread, snapshot, tiny_model_config, write_image  # noqa: F401

QUIET = dict(progress=False, num_threads=1, log=lambda *a: None)
pytestmark = pytest.mark.usefixtures("one_thread")

#: SimpleITK (x, y, z) spacings: 1 mm and 3 mm in-plane, thick slices along z (nnU-Net's axis 0).
AT_1MM = dict(spacing=(1.0, 1.0, 3.0))
AT_3MM = dict(spacing=(3.0, 3.0, 6.0))
VOLUME = (4, 32, 32)


def _train_tiny(root, dataset_id, **dataset):
    """A 2-step tiny MAE (img_size 32, patch 8) on a fresh raw data set under ``root``; returns its checkpoint."""
    with pytest.MonkeyPatch.context() as mp:
        set_nnunet_folders(mp, root)
        make_raw_dataset(root / "nnUNet_raw", dataset_id, "Train", num_cases=3, **dataset)
        return train_mae(dataset_id, root / "mae", tiny_model_config(img_size=32), TrainConfig(steps=2, batch_size=4),
                         **QUIET)


@pytest.fixture(scope="module")
def mae_3d(tmp_path_factory):
    """A tiny MAE trained on 3D .nii.gz volumes at 1 mm in-plane (3 mm slices)."""
    return _train_tiny(tmp_path_factory.mktemp("mae3d"), 1, shape=VOLUME, ending=".nii.gz", geometry=AT_1MM,
                       channel_name="MRI")


@pytest.fixture(scope="module")
def mae_2d(tmp_path_factory):
    """A tiny MAE trained on 2D PNG images."""
    return _train_tiny(tmp_path_factory.mktemp("mae2d"), 2, shape=(32, 40))


# ---- 2D checkpoint on 3D images and the reverse ----------------------------------------------------------
def test_a_3d_mae_refuses_2d_images_in_dataset_and_folder_mode(nnunet_env, mae_3d, tmp_path):
    assert load_checkpoint(mae_3d)["data"]["image_dim"] == 3
    raw = nnunet_env["nnUNet_raw"]
    src = make_raw_dataset(raw, 60, "Flat", num_cases=2, shape=(32, 40), ending=".nii.gz")  # 2D NIfTI images
    before = snapshot(raw)
    with pytest.raises(MAEIncompatibleError, match=r"case 'case_000' \(.*case_000_0000.nii.gz\) is a 2D image but "
                                                   r"the MAE checkpoint was trained on 3D images.*"
                                                   r"`nnunetv2_grcsf mae-train -d Dataset060_Flat`"):
        make_residual_dataset(60, 61, checkpoint=mae_3d, **QUIET)
    assert snapshot(raw) == before  # no output data set, no temporary folder
    with pytest.raises(MAEIncompatibleError, match=r"case 'case_000'.*2D image.*trained on 3D.*mae-train -d DATASET"):
        make_residual_folder(src / "imagesTr", tmp_path / "out", mae_3d, **QUIET)
    pngs = make_raw_dataset(raw, 62, "Png", num_cases=1, shape=(32, 40))
    with pytest.raises(MAEIncompatibleError, match=r"case 'case_000'.*2D image.*trained on 3D"):
        make_residual_folder(pngs / "imagesTr", tmp_path / "out", mae_3d, file_ending=".png", **QUIET)
    assert not (tmp_path / "out").exists()


def test_a_2d_mae_refuses_3d_images_in_folder_mode(nnunet_env, mae_2d, tmp_path):
    src = make_raw_dataset(nnunet_env["nnUNet_raw"], 63, "Vol", num_cases=1, shape=VOLUME, ending=".nii.gz",
                           geometry=AT_1MM)
    with pytest.raises(MAEIncompatibleError, match=r"case 'case_000'.*3D image.*trained on 2D.*mae-train"):
        make_residual_folder(src / "imagesTr", tmp_path / "out", mae_2d, file_ending=".nii.gz", **QUIET)
    assert not (tmp_path / "out").exists()


# ---- in-slice spacing ----------------------------------------------------------------------------------
def test_in_slice_spacing_is_in_slice_array_order():
    assert mdata.in_slice_spacing((3.0, 0.8, 0.5), (4, 32, 32)) == (0.8, 0.5)  # slices along axis 0
    assert mdata.in_slice_spacing((0.8, 3.0, 0.5), (32, 4, 32)) == (0.8, 0.5)  # slices along axis 1
    assert mdata.in_slice_spacing((999.0, 0.7, 0.5), (1, 32, 40)) == (0.7, 0.5)  # 2D: the two real axes
    assert mdata.slice_size((0.8, 3.0, 0.5), (32, 4, 40)) == (32, 40)


def test_checkpoint_records_the_median_in_slice_spacing(nnunet_env, mae_3d, mae_2d):
    assert load_checkpoint(mae_3d)["data"]["in_slice_spacing"] == [1.0, 1.0]
    assert load_checkpoint(mae_2d)["data"]["in_slice_spacing"] == [1.0, 1.0]  # PNG: nnU-Net reports 1 x 1
    folder = make_raw_dataset(nnunet_env["nnUNet_raw"], 64, "Mixed", num_cases=3, shape=VOLUME, ending=".nii.gz")
    for case, spacing in (("case_000", (0.5, 0.8, 3.0)), ("case_001", (0.6, 0.9, 3.0)), ("case_002", (2.0, 2.0, 3.0))):
        write_image(folder / "imagesTr" / f"{case}_0000.nii.gz", np.random.default_rng(0).normal(size=VOLUME),
                    ".nii.gz", spacing=spacing)
    *_, cases, reader = dataset_images(64)
    normalizer = mdata.IntensityNormalizer(["per_image"])
    *_, spacing, _ = load_training_slices(cases, reader, normalizer, 32, 8, 1, progress=False)
    assert spacing == pytest.approx((0.9, 0.6))  # median per axis; (y, x) = SimpleITK's (y, x) of the slices


def test_no_spacing_warning_at_the_training_spacing(nnunet_env, mae_3d):
    make_raw_dataset(nnunet_env["nnUNet_raw"], 65, "Same", num_cases=2, shape=VOLUME, ending=".nii.gz",
                     geometry=AT_1MM)
    lines = []
    result = make_residual_dataset(65, 66, checkpoint=mae_3d, **{**QUIET, "log": lines.append})
    assert result["spacing_warning"] is None
    assert not [line for line in lines if line.startswith("warning:")]


def test_far_off_spacing_warns_once_naming_the_first_cases(nnunet_env, mae_3d, tmp_path):
    src = make_raw_dataset(nnunet_env["nnUNet_raw"], 67, "Coarse", num_cases=SPACING_WARNING_MAX_CASES + 2,
                           shape=VOLUME, ending=".nii.gz", geometry=AT_3MM)
    lines = []
    result = make_residual_dataset(67, 68, checkpoint=mae_3d, **{**QUIET, "log": lines.append})
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0] == result["spacing_warning"]
    text = warnings[0]
    assert f"{SPACING_WARNING_MAX_CASES + 2} case(s)" in text and "and 2 more" in text
    assert "'case_000' (3 x 3)" in text and f"'case_{SPACING_WARNING_MAX_CASES - 1:03d}'" in text
    assert f"'case_{SPACING_WARNING_MAX_CASES:03d}'" not in text
    assert f"{SPACING_WARNING_FACTOR:g}x" in text and "1 x 1 the MAE was trained on" in text
    assert "Resample" in text and "`nnunetv2_grcsf mae-train -d Dataset067_Coarse`" in text
    # a warning, not an error: the data set is written
    assert (nnunet_env["nnUNet_raw"] / "Dataset068_Coarse" / "dataset.json").is_file()
    # folder mode warns the same way
    lines.clear()
    make_residual_folder(src / "imagesTr", tmp_path / "out", mae_3d, **{**QUIET, "log": lines.append})
    assert len([line for line in lines if line.startswith("warning:") and "'case_000' (3 x 3)" in line]) == 1
    # a checkpoint from before the spacing was recorded skips the check
    old = load_checkpoint(mae_3d)
    del old["data"]["in_slice_spacing"]
    torch.save(old, tmp_path / "old.pth")
    lines.clear()
    result = make_residual_folder(src / "imagesTr", tmp_path / "out_old", tmp_path / "old.pth",
                                  **{**QUIET, "log": lines.append})
    assert result["spacing_warning"] is None and not [line for line in lines if line.startswith("warning:")]


# ---- slices smaller than a patch ------------------------------------------------------------------------
def test_mae_train_refuses_slices_smaller_than_a_patch(nnunet_env, tmp_path):
    folder = make_raw_dataset(nnunet_env["nnUNet_raw"], 70, "Thin", num_cases=3, shape=VOLUME, ending=".nii.gz",
                              geometry=AT_1MM)
    write_image(folder / "imagesTr" / "case_001_0000.nii.gz", np.ones((4, 6, 32)) * np.arange(32), ".nii.gz",
                **AT_1MM)
    with pytest.raises(MAEIncompatibleError, match=r"case 'imagesTr/case_001' .*has slices of 6 x 32 voxels \(volume "
                                                   r"of 4 x 6 x 32 voxels cut along axis 0.*smaller than the MAE "
                                                   r"patch size 8 \(model_config.patch_size: --patch-size.*preset"):
        train_mae(70, tmp_path / "mae", tiny_model_config(img_size=32), TrainConfig(steps=1), **QUIET)
    assert not (tmp_path / "mae" / "checkpoint_final.pth").exists()
    png = make_raw_dataset(nnunet_env["nnUNet_raw"], 71, "Strip", num_cases=2, shape=(32, 40))
    write_image(png / "imagesTr" / "case_000_0000.png", np.tile(np.arange(40.0), (5, 1)), ".png")
    with pytest.raises(MAEIncompatibleError, match=r"case 'imagesTr/case_000' .*slices of 5 x 40 voxels, smaller "
                                                   r"than the MAE patch size 8"):
        train_mae(71, tmp_path / "mae2", tiny_model_config(img_size=32), TrainConfig(steps=1), **QUIET)


def test_residuals_refuse_slices_smaller_than_a_patch(nnunet_env, mae_3d, mae_2d, tmp_path):
    raw = nnunet_env["nnUNet_raw"]
    folder = make_raw_dataset(raw, 72, "Thin", num_cases=2, shape=VOLUME, ending=".nii.gz", geometry=AT_1MM)
    write_image(folder / "imagesTr" / "case_001_0000.nii.gz", np.ones((4, 32, 7)) * np.arange(7), ".nii.gz",
                **AT_1MM)
    before = snapshot(raw)
    with pytest.raises(MAEIncompatibleError, match=rf"case 'case_001' .*slices of 32 x 7 voxels.*smaller than the MAE "
                                                   rf"patch size 8 \(model_config.patch_size of the MAE checkpoint "
                                                   rf"{re.escape(str(mae_3d.resolve()))}\).*--patch-size N"):
        make_residual_dataset(72, 73, checkpoint=mae_3d, **QUIET)
    assert snapshot(raw) == before
    strip = tmp_path / "strip"
    write_image(strip / "a_0000.png", np.tile(np.arange(40.0), (4, 1)), ".png")
    with pytest.raises(MAEIncompatibleError, match=r"case 'a' .*slices of 4 x 40 voxels.*patch size 8"):
        make_residual_folder(strip, tmp_path / "out", mae_2d, **QUIET)
    assert not (tmp_path / "out").exists()


# ---- geometry of residual data sets ----------------------------------------------------------------------
def _set_geometry(path, **geometry):
    """Rewrite one .nii.gz file with the same voxels and changed spacing / origin."""
    image = sitk.ReadImage(str(path))
    for key, value in geometry.items():
        getattr(image, f"Set{key.capitalize()}")(value)
    sitk.WriteImage(image, str(path))


def test_residual_dataset_geometry_check_and_doctor(nnunet_env, mae_3d, capsys):
    raw = nnunet_env["nnUNet_raw"]
    geometry = dict(spacing=(0.8, 0.9, 3.0), origin=(12.5, -4.0, 30.0),
                    direction=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
    make_raw_dataset(raw, 80, "Vol", num_cases=3, num_test=1, shape=VOLUME, ending=".nii.gz", geometry=geometry)
    make_residual_dataset(80, 81, checkpoint=mae_3d, **QUIET)
    assert verify_residual_dataset(81) == []
    check_residual_dataset(81)
    report = Report()
    _check_dataset(report, "81")
    out = capsys.readouterr().out
    assert report.failures == 0 and "[ok]   residual channel geometry" in out and "source Dataset080_Vol" in out
    assert verify_residual_dataset(80) == []  # not made by `residuals`: nothing to check

    # a copy of both data sets (the originals stay as they are); the copy's source is the copied source
    shutil.copytree(raw / "Dataset080_Vol", raw / "Dataset082_VolSource")
    shutil.copytree(raw / "Dataset081_Vol", raw / "Dataset083_VolCopy")
    dataset_json_path = raw / "Dataset083_VolCopy" / "dataset.json"
    dataset_json = json.loads(dataset_json_path.read_text())
    dataset_json["nnunetv2_grcsf"]["source_dataset"] = "Dataset082_VolSource"
    dataset_json_path.write_text(json.dumps(dataset_json))
    before = snapshot(raw / "Dataset080_Vol"), snapshot(raw / "Dataset081_Vol")
    assert verify_residual_dataset(83) == []

    copy = raw / "Dataset083_VolCopy" / "imagesTr"
    _set_geometry(copy / "case_001_0001.nii.gz", spacing=(0.8, 0.9, 6.0))
    _set_geometry(copy / "case_002_0001.nii.gz", origin=(12.5, -4.0, 31.0))
    _set_geometry(raw / "Dataset082_VolSource" / "imagesTr" / "case_000_0000.nii.gz", spacing=(1.6, 1.8, 3.0))
    (raw / "Dataset082_VolSource" / "imagesTs" / "case_003_0000.nii.gz").unlink()
    (raw / "Dataset083_VolCopy" / "imagesTs" / "case_003_0001.nii.gz").unlink()
    problems = verify_residual_dataset(83)
    by_case = {p.split(":")[0]: p for p in problems}
    assert len(problems) == 5, problems
    assert "case_001_0001.nii.gz (residual channel)" in by_case["imagesTr/case_001"]
    assert "spacing (0.8, 0.9, 6) vs (0.8, 0.9, 3)" not in by_case["imagesTr/case_001"]  # reference first
    assert "spacing (0.8, 0.9, 3) vs (0.8, 0.9, 6)" in by_case["imagesTr/case_001"]
    assert "origin (12.5, -4, 30) vs (12.5, -4, 31)" in by_case["imagesTr/case_002"]
    assert "differs from the source's" in by_case["imagesTr/case_000"]
    assert "spacing (1.6, 1.8, 3) vs (0.8, 0.9, 3)" in by_case["imagesTr/case_000"]
    test_problems = [p for p in problems if p.startswith("imagesTs/case_003")]
    assert any("case_003_0001.nii.gz missing" in p for p in test_problems)
    assert "imagesTs/case_003: not in the source Dataset082_VolSource" in test_problems

    with pytest.raises(MAEGeometryError, match=r"(?s)Dataset083_VolCopy: 5 problem.*imagesTr/case_000.*"
                                               r"nnunetv2_grcsf residuals -d Dataset082_VolSource -o "
                                               r"Dataset083_VolCopy -m .*--overwrite"):
        check_residual_dataset(83)
    report = Report()
    _check_dataset(report, "83")
    out = capsys.readouterr().out
    assert report.failures == 1 and "[FAIL] residual channel geometry: 5 problem(s)" in out
    assert "imagesTr/case_001" in out
    assert "nnunetv2_grcsf residuals -d Dataset082_VolSource -o Dataset083_VolCopy" in out
    assert (snapshot(raw / "Dataset080_Vol"), snapshot(raw / "Dataset081_Vol")) == before
    assert verify_residual_dataset(81) == []

    # a source that is no longer in nnUNet_raw: compared within the data set only
    shutil.rmtree(raw / "Dataset082_VolSource")
    assert len(verify_residual_dataset(83)) == 3
    _check_dataset(Report(), "83")
    assert "Dataset082_VolSource is not in nnUNet_raw" in capsys.readouterr().out


def test_png_residual_dataset_compares_shapes(nnunet_env, mae_2d):
    raw = nnunet_env["nnUNet_raw"]
    make_raw_dataset(raw, 84, "Png", num_cases=2, shape=(32, 40))
    make_residual_dataset(84, 85, checkpoint=mae_2d, **QUIET)
    assert verify_residual_dataset(85) == []
    write_image(raw / "Dataset085_Png" / "imagesTr" / "case_001_0001.png", np.zeros((32, 41)), ".png")
    (problem,) = verify_residual_dataset(85)
    assert problem.startswith("imagesTr/case_001: case_001_0001.png (residual channel)")
    assert "size (1, 32, 40) vs (1, 32, 41)" in problem


def test_doctor_on_a_dataset_without_residual_channels(nnunet_env, capsys):
    make_raw_dataset(nnunet_env["nnUNet_raw"], 86, "Plain", num_cases=1)
    report = Report()
    _check_dataset(report, "86")
    assert report.failures == 0 and "MAE residual channels: none" in capsys.readouterr().out
