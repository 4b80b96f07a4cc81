"""Residual maps and the data sets / folders that carry them."""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_grcsf.datasets import DatasetNotFoundError
from nnunetv2_grcsf.mae import (MAECheckpointError, MAEDatasetError, MAEError, MAEImageReadError,
                                MAEIncompatibleError, MAEOutputExistsError)
from nnunetv2_grcsf.mae.data import foreground_mask
from nnunetv2_grcsf.mae.report import PooledAUROC, ResidualReport, auroc
from nnunetv2_grcsf.mae.residuals import (RESIDUAL_CHANNEL_NAME, ResidualMapper, ResidualSettings, gaussian_smooth,
                                          make_residual_dataset, make_residual_folder)
from nnunetv2_grcsf.mae.train import TrainConfig, load_checkpoint, train_mae
from nnunetv2_grcsf.residual_channels import residual_channels_of_dataset

from mae_testutils import (blob_free_mae, blob_mask, make_raw_dataset, nnunet_env, run_command,  # noqa: F401
                           one_thread, smooth_background, snapshot, tiny_model_config)

QUIET = dict(progress=False, num_threads=1, log=lambda *a: None)
pytestmark = pytest.mark.usefixtures("one_thread")


def test_residual_is_higher_inside_a_planted_blob(blob_free_mae):
    """MAE trained on blob-free smooth images; a bright blob it never saw stands out in the residual."""
    mapper = ResidualMapper(blob_free_mae["checkpoint"], ResidualSettings(mask_ratios=(0.5, 0.75)), "cpu")
    rng = np.random.default_rng(123)
    for i in range(3):
        img = smooth_background(rng, (48, 56))
        mask = blob_mask((48, 56), (rng.uniform(12, 36), rng.uniform(12, 44)), 6)
        img = img + 70.0 * mask
        (res,) = mapper.compute([(f"blob{i}", img[None, None].astype(np.float32), (999, 1, 1))])
        r = res["residuals"]
        assert r.shape == (2, 1, 48, 56) and r.dtype == np.float32 and (r >= 0).all()
        for j in range(2):
            inside, outside = r[j, 0][mask].mean(), r[j, 0][~mask].mean()
            assert inside > 2 * outside, (i, j, inside, outside)  # measured: 4-5x
            assert auroc(r[j, 0], mask) > 0.95  # measured: > 0.999


def test_residuals_are_deterministic_per_case_and_independent_of_batching(blob_free_mae):
    mapper = ResidualMapper(blob_free_mae["checkpoint"], device="cpu", batch_size=1)
    big = ResidualMapper(blob_free_mae["checkpoint"], device="cpu", batch_size=8)
    rng = np.random.default_rng(0)
    items = [(f"c{i}", smooth_background(rng, (40, 40))[None, None].astype(np.float32), (999, 1, 1)) for i in range(3)]
    a = [r["residuals"] for r in mapper.compute(items)]
    b = [r["residuals"] for r in big.compute(items[::-1])][::-1]
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_an_mae_trained_on_foreground_boxes_reads_an_image_wherever_its_foreground_lies(blob_free_mae):
    """mae-train's default crops each image to its foreground box, and residuals crop alike: the same anatomy
    at two places of a constant canvas gets the same residual, 0 on the canvas; an MAE from before the crop
    (train_config without the key) sees the whole canvas, so there the place matters."""
    content = smooth_background(np.random.default_rng(5), (40, 48)).astype(np.float32)

    def on_canvas(top, left):
        canvas = np.full((1, 1, 72, 80), content.min() - 20.0, np.float32)
        canvas[0, 0, top:top + 40, left:left + 48] = content
        return canvas

    items = [("case", on_canvas(4, 6), (999, 1, 1)), ("case", on_canvas(30, 28), (999, 1, 1))]
    mapper = ResidualMapper(blob_free_mae["checkpoint"], device="cpu")
    assert mapper.crop_to_foreground
    a, b = mapper.compute(items[:1], want_recon=("case",)) + mapper.compute(items[1:])
    np.testing.assert_array_equal(a["residuals"][:, :, 4:44, 6:54], b["residuals"][:, :, 30:70, 28:76])
    outside = np.ones((72, 80), bool)
    outside[4:44, 6:54] = False
    assert a["residuals"][:, :, 4:44, 6:54].min() > 0 and not a["residuals"][:, :, outside].any()
    np.testing.assert_array_equal(a["recon"][0, 0][outside], a["normalized"][0, 0][outside])
    np.testing.assert_array_equal(a["interpolated"][0, 0][outside], a["normalized"][0, 0][outside])
    interpolation = a["interpolation_residuals"]  # the report's model-free baseline, made like the residual
    assert interpolation.shape == a["residuals"].shape and not interpolation[:, :, outside].any()
    assert interpolation[:, :, 4:44, 6:54].mean() > 0 and "interpolation_residuals" not in b

    ckpt = load_checkpoint(blob_free_mae["checkpoint"])
    ckpt["train_config"].pop("crop_to_foreground")
    whole = ResidualMapper(ckpt, device="cpu")
    assert not whole.crop_to_foreground
    a, b = (whole.compute([item])[0]["residuals"] for item in items)
    assert np.abs(a[:, :, 4:44, 6:54] - b[:, :, 30:70, 28:76]).max() > 0.05


def test_interpolation_baseline_predicts_a_patch_from_the_visible_pixels_only():
    from nnunetv2_grcsf.mae.model import complementary_masks
    from nnunetv2_grcsf.mae.residuals import interpolated_reconstruction

    masks = complementary_masks(2, 16, 0.5, generator=torch.Generator().manual_seed(0))  # 32 px, 8-px patches
    flat = torch.full((2, 2, 32, 32), 0.7)
    torch.testing.assert_close(interpolated_reconstruction(flat, masks, 8), flat)
    ramp = torch.linspace(-1, 1, 32).view(1, 1, 1, 32).expand(2, 2, 32, 32).contiguous()
    error = (interpolated_reconstruction(ramp, masks, 8) - ramp).abs()
    assert float(error.mean()) < 0.5 * float(ramp.abs().mean())  # at most half the error of the mean image (0)
    spiked = ramp.clone()
    spiked[:, :, 10:14, 18:22] += 5.0  # inside the patch at grid (1, 2): its own prediction must not see it
    a, b = interpolated_reconstruction(ramp, masks, 8), interpolated_reconstruction(spiked, masks, 8)
    torch.testing.assert_close(a[:, :, 8:16, 16:24], b[:, :, 8:16, 16:24])
    assert float((a - b).abs().max()) > 0.1  # while its neighbours, predicted from it when visible, do
    # with channel tokens (masks over C * L tokens) each channel is interpolated where it is removed, from its
    # own visible pixels
    token_masks = complementary_masks(2, 32, 0.5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(interpolated_reconstruction(flat, token_masks, 8, 2), flat)
    a, b = interpolated_reconstruction(ramp, token_masks, 8, 2), interpolated_reconstruction(spiked, token_masks, 8, 2)
    torch.testing.assert_close(a[:, :, 8:16, 16:24], b[:, :, 8:16, 16:24])
    one_channel_per_pass = torch.zeros(2, 2, 32, dtype=torch.bool)  # pass 0 removes all of channel 0, pass 1 of 1
    one_channel_per_pass[0, :, :16] = True
    one_channel_per_pass[1, :, 16:] = True
    assert interpolated_reconstruction(ramp, one_channel_per_pass, 8, 2).isfinite().all()


def test_the_interpolation_control_is_the_residual_of_the_interpolation_made_like_the_mae_residual(
        nnunet_env, blob_free_mae, tmp_path, capsys):
    """``--reconstruction interpolation``: the residual of the model-free interpolation (the report's baseline, same
    masks, smoothing and grid) in place of the MAE's; recorded, and followed by --from-dataset, the rerun command and
    doctor."""
    from nnunetv2_grcsf.commands import doctor
    from nnunetv2_grcsf.mae.geometry import rerun_command

    with pytest.raises(MAEError, match="reconstruction 'model'"):
        ResidualSettings(reconstruction="model")
    items = [("case", smooth_background(np.random.default_rng(2), (40, 48))[None, None].astype(np.float32),
              (999, 1, 1))]
    settings = ResidualSettings(mask_ratios=(0.5, 0.75))
    (mae,) = ResidualMapper(blob_free_mae["checkpoint"], settings, "cpu").compute(items, want_recon=("case",))
    control = ResidualSettings(mask_ratios=(0.5, 0.75), reconstruction="interpolation")
    (interpolation,) = ResidualMapper(blob_free_mae["checkpoint"], control, "cpu").compute(items, want_recon=("case",))
    np.testing.assert_array_equal(interpolation["residuals"], mae["interpolation_residuals"])
    np.testing.assert_array_equal(interpolation["interpolation_residuals"], interpolation["residuals"])
    assert np.abs(interpolation["residuals"] - mae["residuals"]).max() > 0.05

    src = make_raw_dataset(nnunet_env["nnUNet_raw"], 51, "Interp", num_cases=2)
    assert run_command("residuals", ["residuals", "-d", "51", "-o", "52", "-m", str(blob_free_mae["checkpoint"]),
                                     "--reconstruction", "interpolation", "--quiet", "--num-threads", "1"]) == 0
    dj = json.loads((nnunet_env["nnUNet_raw"] / "Dataset052_Interp" / "dataset.json").read_text())
    assert dj["nnunetv2_grcsf"]["residual_definition"]["reconstruction"] == "interpolation"
    assert rerun_command(dj, "Dataset052_Interp").endswith("--reconstruction interpolation --overwrite")
    report = doctor.Report()
    doctor._check_dataset(report, "52")
    assert "a control: |image - interpolation of the masked patches|" in capsys.readouterr().out
    out = tmp_path / "inputs"
    assert run_command("residuals", ["residuals", "-i", str(src / "imagesTr"), "-o", str(out), "--from-dataset", "52",
                                     "--quiet", "--num-threads", "1"]) == 0
    for f in out.iterdir():  # the data set's residual files, made again from its record
        assert f.read_bytes() == (nnunet_env["nnUNet_raw"] / "Dataset052_Interp" / "imagesTr" / f.name).read_bytes()
    with pytest.raises(MAEError, match="--reconstruction mae differs"):
        run_command("residuals", ["residuals", "-i", str(src / "imagesTr"), "-o", str(tmp_path / "o2"),
                                  "--from-dataset", "52", "--reconstruction", "mae"])


def test_gaussian_smooth():
    x = torch.zeros(1, 1, 11, 11)
    x[0, 0, 5, 5] = 1.0
    y = gaussian_smooth(x, 1.0)
    assert y.sum().item() == pytest.approx(1.0, abs=1e-4) and y[0, 0, 5, 5] < 0.2 and y[0, 0, 5, 6] > 0
    assert torch.equal(gaussian_smooth(x, 0), x)


def test_auroc():
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([1, 1, 1, 1]), np.array([0, 1, 0, 1])) == 0.5
    assert auroc(np.array([0.1, 0.2]), np.array([0, 0])) is None
    rng = np.random.default_rng(0)
    s, lab = rng.random(5000), rng.random(5000) < 0.3
    s = s + 0.3 * lab
    pooled = PooledAUROC(2.0)
    pooled.add(s[:2500], lab[:2500])
    pooled.add(s[2500:], lab[2500:])
    assert pooled.value() == pytest.approx(auroc(s, lab), abs=1e-3)


def test_foreground_auroc_leaves_out_the_constant_background(tmp_path):
    """A volume whose constant background (every channel at its minimum) has residual 0: counted, it lifts the
    AUROC; the foreground figure is the AUROC inside the body only."""
    image = np.zeros((2, 4, 6, 6), dtype=np.float32)  # [C, Z, Y, X]
    image[0, :, 1:5, 1:5] = 5.0  # the body in channel 0 only
    image[1, 1, 2, 2] = 3.0
    lesion = np.zeros((4, 6, 6), dtype=bool)
    lesion[1:3, 2:4, 2:4] = True
    residual = np.zeros((1, 4, 6, 6), dtype=np.float32)
    residual[0][image[0] > 0] = np.linspace(0.0, 1.0, int((image[0] > 0).sum()))  # uninformative inside the body
    foreground = foreground_mask(image)
    assert foreground.sum() == 64 and not foreground[:, 0].any()
    report = ResidualReport(tmp_path, [0.5], scale=1.0)
    report.add_case("case", residual, lesion, foreground=foreground)
    entry, overall = report.cases["case"], report.summary()["overall"]["0.5"]
    assert entry["auroc@0.5"] > 0.7  # the background's zeros rank below every lesion voxel
    assert entry["auroc_foreground@0.5"] == pytest.approx(auroc(residual[0][foreground], lesion[foreground]))
    assert entry["auroc_foreground@0.5"] < entry["auroc@0.5"] - 0.2
    assert overall["pooled_auroc_foreground"] == pytest.approx(entry["auroc_foreground@0.5"], abs=1e-3)
    assert entry["foreground_pixels"] == 64


def _install_checkpoint(nnunet_env, dataset_name, checkpoint):
    folder = nnunet_env["nnUNet_results"] / dataset_name / "nnunetv2_grcsf_mae"
    folder.mkdir(parents=True)
    shutil.copyfile(checkpoint, folder / "checkpoint_final.pth")
    return folder / "checkpoint_final.pth"


def test_new_dataset_layout_dataset_json_and_report(nnunet_env, blob_free_mae):
    src = make_raw_dataset(nnunet_env["nnUNet_raw"], 20, "Blobs", num_cases=6, num_test=2, seed=5)
    ckpt = _install_checkpoint(nnunet_env, "Dataset020_Blobs", blob_free_mae["checkpoint"])  # found as "latest"
    before = snapshot(src)
    result = make_residual_dataset(20, 21, settings=ResidualSettings(mask_ratios=(0.5, 0.75)), report=True,
                                   report_cases=2, **QUIET)
    assert snapshot(src) == before  # the source is only read
    dst = nnunet_env["nnUNet_raw"] / "Dataset021_Blobs"
    assert result["folder"] == str(dst)
    assert not [p for p in nnunet_env["nnUNet_raw"].iterdir() if p.name.startswith(".")]  # no temp folder left
    dj = json.loads((dst / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "ultrasound", "1": RESIDUAL_CHANNEL_NAME, "2": RESIDUAL_CHANNEL_NAME}
    assert dj["numTraining"] == 6 and dj["labels"] == {"background": 0, "blob": 1} and dj["file_ending"] == ".png"
    key = dj["nnunetv2_grcsf"]
    assert key["residual_channels"] == [1, 2] and key["mask_ratios"] == [0.5, 0.75]
    assert key["mae_checkpoint"] == str(ckpt.resolve()) and key["source_dataset"] == "Dataset020_Blobs"
    assert residual_channels_of_dataset(dj) == [1, 2]
    for split, n in (("imagesTr", 6), ("imagesTs", 2)):
        names = sorted(p.name for p in (dst / split).iterdir())
        assert len(names) == 3 * n
    assert sorted(p.name for p in (dst / "labelsTr").iterdir()) == sorted(p.name for p in (src / "labelsTr").iterdir())
    # source channel copied byte for byte; residual channel is 8-bit in the image's grid
    assert (dst / "imagesTr" / "case_000_0000.png").read_bytes() == (src / "imagesTr" / "case_000_0000.png").read_bytes()
    from skimage import io
    res = io.imread(dst / "imagesTr" / "case_000_0001.png")
    assert res.shape == (48, 56) and res.max() <= 255 and res.max() > res.min()
    # report: AUROC JSON and PNG panels
    report_dir = nnunet_env["nnUNet_results"] / "Dataset021_Blobs" / "nnunetv2_grcsf_residual_report"
    rep = json.loads((report_dir / "report.json").read_text())
    assert set(rep["overall"]) == {"0.5", "0.75"}
    assert rep["overall"]["0.75"]["pooled_auroc"] > 0.8 and rep["overall"]["0.75"]["cases_with_lesion"] == 3
    assert rep["num_labelled_cases"] == 6 and rep["num_cases_without_label"] == 2
    assert rep["cases"]["case_000"]["auroc@0.5"] > 0.8 and rep["cases"]["case_001"]["auroc@0.5"] is None
    assert rep["overall"]["0.75"]["pooled_auroc_foreground"] is not None
    pngs = sorted(report_dir.glob("panel_*.png"))
    assert len(pngs) == 2 and all(p.stat().st_size > 1000 for p in pngs)
    assert result["figures"]["imagesTr"]["images_per_second"] > 0


def test_geometry_of_3d_nifti_is_preserved(nnunet_env, tmp_path):
    """A 3D .nii.gz data set: slices along the thick axis; residual has the image's spacing/origin/direction."""
    geometry = dict(spacing=(0.8, 0.7, 3.0), origin=(12.5, -4.0, 30.0),
                    direction=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
    src = make_raw_dataset(nnunet_env["nnUNet_raw"], 30, "Vol", num_cases=3, shape=(5, 32, 40), ending=".nii.gz",
                           geometry=geometry, channel_name="MRI")
    ckpt = train_mae(30, tmp_path / "mae3d", tiny_model_config(img_size=32), TrainConfig(steps=3, batch_size=4),
                     **QUIET)
    assert load_checkpoint(ckpt)["data"]["image_dim"] == 3
    assert load_checkpoint(ckpt)["data"]["num_slices"] == 15  # 3 volumes x 5 slices along the 3 mm axis
    make_residual_dataset(30, 31, checkpoint=ckpt, **QUIET)
    dst = nnunet_env["nnUNet_raw"] / "Dataset031_Vol"
    for case in ("case_000", "case_002"):
        img = sitk.ReadImage(str(src / "imagesTr" / f"{case}_0000.nii.gz"))
        res = sitk.ReadImage(str(dst / "imagesTr" / f"{case}_0001.nii.gz"))
        assert res.GetSize() == img.GetSize() == (40, 32, 5)
        assert np.allclose(res.GetSpacing(), img.GetSpacing()) and np.allclose(res.GetSpacing(), geometry["spacing"])
        assert np.allclose(res.GetOrigin(), img.GetOrigin()) and np.allclose(res.GetOrigin(), geometry["origin"])
        assert np.allclose(res.GetDirection(), img.GetDirection())
        assert np.allclose(res.GetDirection(), geometry["direction"])
        assert sitk.GetArrayFromImage(res).dtype in (np.uint8, np.uint16)
    # a 2D MAE refuses these 3D images
    with pytest.raises(MAEIncompatibleError, match=r"case 'case_000'.*3D image.*trained on 2D"):
        pass_2d = tmp_path / "ckpt2d.pth"
        ck = load_checkpoint(ckpt)
        ck["data"]["image_dim"] = 2
        torch.save(ck, pass_2d)
        make_residual_dataset(30, 32, checkpoint=pass_2d, **QUIET)
    assert not (nnunet_env["nnUNet_raw"] / "Dataset032_Vol").exists()


def test_bad_inputs_fail_clearly_and_leave_files_untouched(nnunet_env, blob_free_mae, tmp_path):
    raw = nnunet_env["nnUNet_raw"]
    ckpt = blob_free_mae["checkpoint"]
    make_raw_dataset(raw, 40, "One", num_cases=3)
    make_raw_dataset(raw, 41, "Two", num_cases=3, channels=2)
    make_raw_dataset(raw, 42, "Taken", num_cases=1)
    before = snapshot(raw)
    # unknown source id: names the id and the folder searched
    with pytest.raises(DatasetNotFoundError, match=rf"'404' not found.*Dataset404_\*.*nnUNet_raw={raw}"):
        make_residual_dataset(404, 50, checkpoint=ckpt, **QUIET)
    # no checkpoint given and none trained
    with pytest.raises(MAECheckpointError, match="no MAE checkpoint for Dataset040_One.*mae-train -d"):
        make_residual_dataset(40, 50, **QUIET)
    # channel count differs from the MAE's
    with pytest.raises(MAEIncompatibleError, match="Dataset041_Two has 2 channel.*trained on 1"):
        make_residual_dataset(41, 50, checkpoint=ckpt, **QUIET)
    # checkpoint not ours / truncated
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": 1}, foreign)
    with pytest.raises(MAECheckpointError, match="foreign.pth is not an nnunetv2_grcsf MAE checkpoint"):
        make_residual_dataset(40, 50, checkpoint=foreign, **QUIET)
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes(ckpt.read_bytes()[:5000])
    with pytest.raises(MAECheckpointError, match="cut.pth cannot be loaded.*truncated"):
        make_residual_dataset(40, 50, checkpoint=truncated, **QUIET)
    # output id exists (another name), equals the source id
    with pytest.raises(MAEOutputExistsError, match="id 42 already exists.*Dataset042_Taken.*--overwrite"):
        make_residual_dataset(40, 42, checkpoint=ckpt, **QUIET)
    with pytest.raises(MAEOutputExistsError, match="exists under another name"):
        make_residual_dataset(40, 42, checkpoint=ckpt, overwrite=True, **QUIET)
    with pytest.raises(MAEOutputExistsError, match="source data set"):
        make_residual_dataset(40, 40, checkpoint=ckpt, overwrite=True, **QUIET)
    assert snapshot(raw) == before
    # a corrupt image: named, and no half-written output data set remains
    (raw / "Dataset040_One" / "imagesTr" / "case_002_0000.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    before = snapshot(raw)
    with pytest.raises(MAEImageReadError, match="case_002_0000.png.*corrupt"):
        make_residual_dataset(40, 50, checkpoint=ckpt, **QUIET)
    assert snapshot(raw) == before
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset040_One", "Dataset041_Two", "Dataset042_Taken"]


def test_overwrite_replaces_only_the_output(nnunet_env, blob_free_mae):
    raw = nnunet_env["nnUNet_raw"]
    src = make_raw_dataset(raw, 43, "Src", num_cases=2)
    ckpt = blob_free_mae["checkpoint"]
    make_residual_dataset(43, 44, checkpoint=ckpt, **QUIET)
    with pytest.raises(MAEOutputExistsError, match="Dataset044_Src"):
        make_residual_dataset(43, 44, checkpoint=ckpt, **QUIET)
    (raw / "Dataset044_Src" / "stale.txt").write_text("x")
    before = snapshot(src)
    make_residual_dataset(43, 44, checkpoint=ckpt, overwrite=True, settings=ResidualSettings(mask_ratios=(0.5,)),
                          **QUIET)
    assert snapshot(src) == before and not (raw / "Dataset044_Src" / "stale.txt").exists()
    dj = json.loads((raw / "Dataset044_Src" / "dataset.json").read_text())
    assert dj["nnunetv2_grcsf"]["mask_ratios"] == [0.5]


def test_input_folder_mode_matches_the_dataset_and_refuses_overwrites(nnunet_env, blob_free_mae, tmp_path):
    raw = nnunet_env["nnUNet_raw"]
    src = make_raw_dataset(raw, 45, "Pred", num_cases=3, seed=9)
    ckpt = blob_free_mae["checkpoint"]
    make_residual_dataset(45, 46, checkpoint=ckpt, settings=ResidualSettings(mask_ratios=(0.5, 0.75)), **QUIET)
    inp = src / "imagesTr"
    before = snapshot(inp)
    out = tmp_path / "pred_in"
    code = run_command("residuals", ["residuals", "-i", str(inp), "-o", str(out), "--from-dataset", "46",
                                     "--labels", str(src / "labelsTr"), "--report", "--quiet", "--num-threads", "1"])
    assert code == 0 and snapshot(inp) == before
    # identical files to the data set's (same checkpoint, settings and per-case masks)
    dst = raw / "Dataset046_Pred" / "imagesTr"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in dst.iterdir())
    for p in out.iterdir():
        assert p.read_bytes() == (dst / p.name).read_bytes(), p.name
    rep = json.loads((tmp_path / "pred_in_residual_report" / "report.json").read_text())
    assert rep["num_labelled_cases"] == 3 and list(rep["overall"]) == ["0.5", "0.75"]
    # refuses a non-empty output folder, the input folder itself, and settings that contradict the data set
    with pytest.raises(MAEOutputExistsError, match="not empty.*--overwrite"):
        make_residual_folder(inp, out, ckpt, **QUIET)
    with pytest.raises(MAEOutputExistsError, match="inputs are never overwritten"):
        make_residual_folder(inp, inp, ckpt, overwrite=True, **QUIET)
    with pytest.raises(MAEError, match="--mask-ratios.*differs"):
        run_command("residuals", ["residuals", "-i", str(inp), "-o", str(tmp_path / "o2"), "--from-dataset", "46",
                                  "--mask-ratios", "0.75"])
    with pytest.raises(MAEError, match="-m CHECKPOINT"):
        run_command("residuals", ["residuals", "-i", str(inp), "-o", str(tmp_path / "o3")])
    assert snapshot(inp) == before
    # a folder with the wrong channel count / file ending
    with pytest.raises(MAEDatasetError, match=r"no \*\.nii\.gz files \(it holds \.png\); pass the right --file-ending"):
        make_residual_folder(inp, tmp_path / "o4", ckpt, file_ending=".nii.gz", **QUIET)
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a_0000.png", "a_0001.png"):
        shutil.copyfile(inp / "case_000_0000.png", two / name)
    with pytest.raises(MAEIncompatibleError, match="case 'a'.*expected channels _0000.._0000"):
        make_residual_folder(two, tmp_path / "o5", ckpt, **QUIET)
    assert not (tmp_path / "o4").exists() and not (tmp_path / "o5").exists()


def test_cli_dataset_mode(nnunet_env, blob_free_mae):
    make_raw_dataset(nnunet_env["nnUNet_raw"], 47, "Cli", num_cases=2)
    code = run_command("residuals", ["residuals", "-d", "47", "-o", "48", "--name", "CliRes", "-m",
                                     str(blob_free_mae["checkpoint"]), "--mask-ratios", "0.5", "0.75", "--smoothing",
                                     "0", "--quiet", "--num-threads", "1"])
    assert code == 0
    dj = json.loads((nnunet_env["nnUNet_raw"] / "Dataset048_CliRes" / "dataset.json").read_text())
    assert dj["nnunetv2_grcsf"]["residual_channels"] == [1, 2]
    assert dj["nnunetv2_grcsf"]["residual_definition"]["smoothing_sigma"] == 0
    make_residual_dataset(47, "Dataset049_Named", checkpoint=blob_free_mae["checkpoint"], **QUIET)
    assert (nnunet_env["nnUNet_raw"] / "Dataset049_Named" / "dataset.json").is_file()
    with pytest.raises(MAEError, match="must be an integer"):
        make_residual_dataset(47, "fifty", checkpoint=blob_free_mae["checkpoint"], **QUIET)
    with pytest.raises(MAEError, match="--labels is for -i"):
        run_command("residuals", ["residuals", "-d", "47", "-o", "49", "--labels", "x"])
