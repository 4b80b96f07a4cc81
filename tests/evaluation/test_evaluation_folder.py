"""Folder evaluation (nnunetv2_grcsf.evaluation.evaluate): outputs, known numbers, and bad input."""
import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_grcsf.evaluation.evaluate import EvaluationError, evaluate_folders, format_table

SHAPE = (6, 16, 16)  # z, y, x (nnU-Net / numpy order)
SPACING_XYZ = (1.0, 1.0, 3.0)  # SimpleITK order: axis 0 of the array (z) is 3 mm
DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "lesion": 1, "edema": 2},
                "numTraining": 4, "file_ending": ".nii.gz"}


def write_nifti(path, array, spacing_xyz=SPACING_XYZ):
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.uint8))
    image.SetSpacing(spacing_xyz)
    sitk.WriteImage(image, str(path))


def box(z, y, x, value=1, shape=SHAPE):
    a = np.zeros(shape, dtype=np.uint8)
    a[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = value
    return a


def make_dataset(tmp_path, dataset_json_in="raw"):
    """raw/labelsTr (reference), pred/ (prediction), raw/imagesTr; dataset.json in raw/ (or pred/, or nowhere).

    c1: two lesions, one missed; c2: perfect; c3: both empty; c4: empty reference, one false positive.
    """
    raw, pred, images = tmp_path / "raw", tmp_path / "pred", tmp_path / "raw" / "imagesTr"
    ref = raw / "labelsTr"
    for d in (ref, pred, images):
        d.mkdir(parents=True, exist_ok=True)
    lesion_a, lesion_b = box((1, 3), (2, 5), (2, 5)), box((1, 3), (10, 13), (10, 13))
    cases = {
        "c1": (lesion_a + lesion_b, lesion_a),
        "c2": (lesion_a, lesion_a),
        "c3": (np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)),
        "c4": (np.zeros(SHAPE, np.uint8), box((4, 5), (0, 2), (0, 2))),
    }
    rng = np.random.default_rng(0)
    for name, (r, p) in cases.items():
        write_nifti(ref / f"{name}.nii.gz", r)
        write_nifti(pred / f"{name}.nii.gz", p)
        write_nifti(images / f"{name}_0000.nii.gz", rng.integers(0, 200, SHAPE))
    if dataset_json_in == "raw":
        (raw / "dataset.json").write_text(json.dumps(DATASET_JSON))
    elif dataset_json_in == "pred":
        (pred / "dataset.json").write_text(json.dumps(DATASET_JSON))
    return ref, pred, images


def per_case(summary, label="1"):
    return {r["case"]: r["metrics"][label] for r in summary["metric_per_case"]}


def test_known_numbers_json_and_csv(tmp_path):
    ref, pred, _ = make_dataset(tmp_path)
    out = tmp_path / "results" / "eval.json"
    summary = evaluate_folders(ref, pred, output_json=out, labels=[1])
    m = per_case(summary)
    assert set(m) == {"c1", "c2", "c3", "c4"}
    # c1: ref 2 x 18 voxels, pred 18 of them: Dice = 2*18 / (18 + 36) = 2/3; one of two lesions found
    assert m["c1"]["Dice"] == pytest.approx(2 / 3)
    assert (m["c1"]["lesion_recall"], m["c1"]["lesion_precision"], m["c1"]["lesion_F1"]) == \
        pytest.approx((0.5, 1.0, 2 / 3))
    assert m["c1"]["AVD"] == pytest.approx(18 * 3.0)  # 18 voxels of 3 mm^3
    assert m["c2"]["Dice"] == 1.0 and m["c2"]["HD95"] == 0.0
    # both empty: Dice 1 (nnU-Net would say NaN), HD95 0, F1 1
    assert (m["c3"]["Dice"], m["c3"]["HD95"], m["c3"]["lesion_F1"]) == (1.0, 0.0, 1.0)
    # empty reference + 4-voxel false positive: Dice 0, HD95 = image diagonal in mm, AVD 12 mm^3
    assert m["c4"]["Dice"] == 0.0
    assert m["c4"]["HD95"] == pytest.approx(math.sqrt((6 * 3.0) ** 2 + 16 ** 2 + 16 ** 2))
    assert m["c4"]["AVD"] == pytest.approx(12.0)
    assert m["c4"]["lesion_FP"] == 1 and m["c4"]["lesion_precision"] == 0.0 and math.isnan(m["c4"]["lesion_recall"])

    mean = summary["mean"]["1"]
    assert mean["Dice"] == pytest.approx((2 / 3 + 1 + 1 + 0) / 4)
    assert mean["n_cases"] == 4
    assert mean["lesion_recall"] == pytest.approx((0.5 + 1 + 1) / 3)  # NaN recall of c4 left out
    pooled = summary["pooled"]["1"]  # over lesions: TP 1+1, FP 1, FN 1
    assert (pooled["lesion_TP"], pooled["lesion_FP"], pooled["lesion_FN"]) == (2, 1, 1)
    assert pooled["lesion_F1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert summary["settings"]["iou_threshold"] == 0.0 and summary["settings"]["empty"] == "lesion"

    written = json.loads(out.read_text())
    assert {r["case"] for r in written["metric_per_case"]} == {"c1", "c2", "c3", "c4"}
    assert written["metric_per_case"][3]["metrics"]["1"]["lesion_recall"] is None  # NaN -> null
    assert written["mean"]["1"]["Dice"] == pytest.approx(mean["Dice"])
    assert written["metric_per_case"][0]["spacing"] == [3.0, 1.0, 1.0]

    rows = list(csv.DictReader((tmp_path / "results" / "eval.csv").open()))
    assert [r["case"] for r in rows] == ["c1", "c2", "c3", "c4", "MEAN", "POOLED"]
    assert all(r["label"] == "1" and r["label_name"] == "lesion" for r in rows)
    assert float(rows[0]["Dice"]) == pytest.approx(2 / 3)
    assert rows[3]["lesion_recall"] == ""
    assert float(rows[4]["Dice"]) == pytest.approx(mean["Dice"])
    assert rows[5]["lesion_TP"] == "2" and rows[5]["Dice"] == ""

    table = format_table(summary)
    assert "lesion" in table and "0.6667" not in table.splitlines()[0]
    assert "lowest Dice: c4 (0.000)" in table


def test_dice_is_nnunets(tmp_path):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    ref, pred, _ = make_dataset(tmp_path)
    summary = evaluate_folders(ref, pred, output_json=tmp_path / "e.json", empty="nan")
    for r in summary["metric_per_case"]:
        expected = compute_metrics(r["reference_file"], r["prediction_file"], SimpleITKIO(), [1, 2])["metrics"]
        for label in (1, 2):
            ours, theirs = r["metrics"][str(label)]["Dice"], expected[label]["Dice"]
            assert (math.isnan(ours) and math.isnan(theirs)) or ours == pytest.approx(theirs)
    assert math.isnan(per_case(summary)["c3"]["Dice"])  # nan convention keeps nnU-Net's NaN
    assert math.isnan(per_case(summary)["c3"]["HD95"]) and math.isnan(per_case(summary)["c4"]["HD95"])
    # all labels of the dataset.json by default, with nnU-Net's keys; label 2 is empty everywhere
    assert set(summary["mean"]) == {"1", "2"}
    assert math.isnan(summary["mean"]["2"]["Dice"])


def test_refuses_to_overwrite(tmp_path):
    ref, pred, _ = make_dataset(tmp_path)
    out = tmp_path / "e.json"
    evaluate_folders(ref, pred, output_json=out)
    before = out.read_text()
    out.write_text("keep me")
    with pytest.raises(EvaluationError, match="overwrite") as e:
        evaluate_folders(ref, pred, output_json=out)
    assert str(out) in str(e.value)
    assert out.read_text() == "keep me"
    evaluate_folders(ref, pred, output_json=out, overwrite=True)
    assert json.loads(out.read_text())["mean"] == json.loads(before)["mean"]
    # a CSV left behind counts too
    (tmp_path / "f.csv").write_text("x")
    with pytest.raises(EvaluationError, match="f.csv"):
        evaluate_folders(ref, pred, output_json=tmp_path / "f.json")
    assert not (tmp_path / "f.json").exists()


def test_default_output_next_to_predictions_and_dataset_json_there(tmp_path):
    ref, pred, _ = make_dataset(tmp_path, dataset_json_in="pred")
    summary = evaluate_folders(ref, pred)
    assert (pred / "summary_lesions.json").is_file() and (pred / "summary_lesions.csv").is_file()
    assert summary["settings"]["dataset_json"] == str((pred / "dataset.json").resolve())


def test_without_dataset_json_needs_labels(tmp_path):
    ref, pred, _ = make_dataset(tmp_path, dataset_json_in=None)
    with pytest.raises(EvaluationError, match="-djfile"):
        evaluate_folders(ref, pred, output_json=tmp_path / "e.json")
    summary = evaluate_folders(ref, pred, output_json=tmp_path / "e.json", labels=[1])
    assert per_case(summary)["c1"]["Dice"] == pytest.approx(2 / 3)
    assert summary["settings"]["file_ending"] == ".nii.gz"


def test_missing_and_extra_cases_are_named(tmp_path):
    ref, pred, _ = make_dataset(tmp_path)
    (pred / "c2.nii.gz").unlink()
    with pytest.raises(EvaluationError, match=r"no prediction.*c2.*--chill"):
        evaluate_folders(ref, pred, output_json=tmp_path / "e.json")
    assert not (tmp_path / "e.json").exists()
    summary = evaluate_folders(ref, pred, output_json=tmp_path / "e.json", chill=True)
    assert set(per_case(summary)) == {"c1", "c3", "c4"}
    assert summary["settings"]["skipped_reference_cases"] == ["c2"]
    write_nifti(pred / "zz_extra.nii.gz", np.zeros(SHAPE))
    with pytest.raises(EvaluationError, match="no reference file.*zz_extra"):
        evaluate_folders(ref, pred, output_json=tmp_path / "f.json", chill=True)


def test_shape_and_spacing_mismatch_name_the_cases(tmp_path):
    ref, pred, _ = make_dataset(tmp_path)
    write_nifti(pred / "c2.nii.gz", np.zeros((6, 16, 15)))
    write_nifti(pred / "c3.nii.gz", np.zeros(SHAPE), spacing_xyz=(1.0, 1.0, 2.0))
    with pytest.raises(EvaluationError) as e:
        evaluate_folders(ref, pred, output_json=tmp_path / "e.json")
    message = str(e.value)
    assert "shape" in message and "c2" in message and "(6, 16, 16)" in message and "(6, 16, 15)" in message
    assert "spacing" in message and "c3" in message
    assert "c1" not in message and "c4" not in message
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "e.csv").exists()


def test_unknown_labels_are_named_with_the_valid_ones(tmp_path):
    ref, pred, _ = make_dataset(tmp_path)
    with pytest.raises(EvaluationError) as e:
        evaluate_folders(ref, pred, output_json=tmp_path / "e.json", labels=[1, 5, 7])
    message = str(e.value)
    assert "5, 7" in message and "1 (lesion)" in message and "2 (edema)" in message
    with pytest.raises(EvaluationError, match="0"):
        evaluate_folders(ref, pred, output_json=tmp_path / "e.json", labels=[0])


def test_bad_settings_and_folders(tmp_path):
    ref, pred, _ = make_dataset(tmp_path)
    with pytest.raises(EvaluationError, match="iou_threshold"):
        evaluate_folders(ref, pred, output_json=tmp_path / "e.json", iou_threshold=1.5)
    with pytest.raises(EvaluationError, match="not found"):
        evaluate_folders(ref, tmp_path / "nope", output_json=tmp_path / "e.json")
    with pytest.raises(EvaluationError, match=".json"):
        evaluate_folders(ref, pred, output_json=tmp_path / "e.txt")


def test_iou_threshold_setting_reaches_the_cases(tmp_path):
    ref, pred, _ = make_dataset(tmp_path)
    # c5: a prediction that touches the reference lesion with 1 voxel of 18 + 17 outside: IoU 1/35
    r = box((1, 3), (2, 5), (2, 5))
    p = np.zeros(SHAPE, np.uint8)
    p[1, 4, 4] = 1
    p[1, 4, 5:15] = 1
    p[1, 5, 5:12] = 1
    write_nifti(ref / "c5.nii.gz", r)
    write_nifti(pred / "c5.nii.gz", p)
    loose = per_case(evaluate_folders(ref, pred, output_json=tmp_path / "a.json"))["c5"]
    strict = per_case(evaluate_folders(ref, pred, output_json=tmp_path / "b.json", iou_threshold=0.1))["c5"]
    assert (loose["lesion_TP"], loose["lesion_FP"]) == (1, 0)
    assert (strict["lesion_TP"], strict["lesion_FP"], strict["lesion_FN"]) == (0, 1, 1)


def test_png_of_best_and_worst(tmp_path):
    ref, pred, images = make_dataset(tmp_path)
    summary = evaluate_folders(ref, pred, output_json=tmp_path / "e.json", images_folder=images, png_cases=2)
    for key in ("png_worst", "png_best"):
        path = tmp_path / f"e_{key[4:]}.png"
        assert summary["files"][key] == str(path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # without images: masks alone
    evaluate_folders(ref, pred, output_json=tmp_path / "m.json", png=True)
    assert (tmp_path / "m_worst.png").is_file() and (tmp_path / "m_best.png").is_file()


def test_2d_png_dataset(tmp_path):
    from PIL import Image

    ref, pred = tmp_path / "labelsTr", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "us"}, "labels": {"background": 0, "lesion": 1}, "numTraining": 1,
         "file_ending": ".png"}))
    r = np.zeros((12, 12), np.uint8)
    r[2:5, 2:5] = 1
    p = np.zeros((12, 12), np.uint8)
    p[2:5, 6:9] = 1  # shifted by 4 pixels: no overlap
    Image.fromarray(r).save(ref / "a.png")
    Image.fromarray(p).save(pred / "a.png")
    m = per_case(evaluate_folders(ref, pred, output_json=tmp_path / "e.json", png=True))["a"]
    assert m["Dice"] == 0.0
    assert m["HD95"] == pytest.approx(4.0)  # pixels; nnU-Net's 999 placeholder spacing ignored
    assert m["volume_ref"] == 9.0 and m["AVD"] == 0.0  # areas in pixels
    assert (m["lesion_TP"], m["lesion_FP"], m["lesion_FN"]) == (0, 1, 1)
    assert (tmp_path / "e_worst.png").is_file()
