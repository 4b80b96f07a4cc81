"""Lesion metrics on hand-made masks with known answers (nnunetv2_grcsf.evaluation.metrics)."""
import math

import numpy as np
import pytest

from nnunetv2_grcsf.evaluation.metrics import (EMPTY_CONVENTIONS, LesionDetection, absolute_volume_difference,
                                               connected_components, get_empty_convention, hd95, image_diagonal,
                                               lesion_detection, lesion_metrics, surface, volume)


def cube(shape, z, y, x):
    """Boolean array with ones in the half-open box z=(z0, z1), y=(y0, y1), x=(x0, x1)."""
    m = np.zeros(shape, dtype=bool)
    m[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = True
    return m


SHAPE = (10, 20, 20)


# --------------------------------------------------------------------------------- detection
def test_two_lesions_one_missed():
    ref = cube(SHAPE, (2, 5), (2, 6), (2, 6)) | cube(SHAPE, (2, 5), (12, 16), (12, 16))
    pred = cube(SHAPE, (2, 5), (3, 6), (3, 7))  # overlaps the first lesion only
    det = lesion_detection(ref, pred)
    assert (det.n_reference, det.n_predicted, det.tp, det.fp, det.fn) == (2, 1, 1, 0, 1)
    assert det.recall() == pytest.approx(0.5)
    assert det.precision() == pytest.approx(1.0)
    assert det.f1() == pytest.approx(2 / 3)
    m = lesion_metrics(ref, pred)
    assert (m["lesion_recall"], m["lesion_precision"], m["lesion_F1"]) == pytest.approx((0.5, 1.0, 2 / 3))


def test_false_positive_component():
    ref = cube(SHAPE, (2, 5), (2, 6), (2, 6))
    pred = ref | cube(SHAPE, (6, 8), (14, 17), (14, 17))
    det = lesion_detection(ref, pred)
    assert (det.tp, det.fp, det.fn) == (1, 1, 0)
    assert det.precision() == pytest.approx(0.5)
    assert det.recall() == pytest.approx(1.0)
    assert det.f1() == pytest.approx(2 / 3)


def test_merged_and_split_components_are_not_penalized():
    ref = cube(SHAPE, (2, 5), (2, 6), (2, 6)) | cube(SHAPE, (2, 5), (2, 6), (10, 14))
    merged = cube(SHAPE, (2, 5), (2, 6), (2, 14))  # one component over both lesions
    det = lesion_detection(ref, merged)
    assert (det.n_predicted, det.tp, det.fp, det.fn) == (1, 2, 0, 0)
    one = cube(SHAPE, (2, 5), (2, 6), (2, 14))
    split = cube(SHAPE, (2, 5), (2, 6), (2, 6)) | cube(SHAPE, (2, 5), (2, 6), (9, 14))
    det = lesion_detection(one, split)
    assert (det.n_reference, det.n_predicted, det.tp, det.fp, det.fn) == (1, 2, 1, 0, 0)


def test_iou_threshold_is_the_overlap_rule():
    ref = cube(SHAPE, (0, 1), (0, 1), (0, 10))  # 10 voxels
    pred = cube(SHAPE, (0, 1), (0, 1), (9, 19))  # 10 voxels, 1 shared: IoU = 1/19
    assert lesion_detection(ref, pred, iou_threshold=0.0).tp == 1  # any overlap
    assert lesion_detection(ref, pred, iou_threshold=0.05).tp == 1  # 1/19 = 0.0526 > 0.05
    det = lesion_detection(ref, pred, iou_threshold=0.1)
    assert (det.tp, det.fp, det.fn) == (0, 1, 1)
    with pytest.raises(ValueError):
        lesion_detection(ref, pred, iou_threshold=1.0)


def test_connectivity_and_min_lesion_size():
    m = np.zeros((5, 5, 5), dtype=bool)
    m[1, 1, 1] = m[2, 2, 2] = True  # touch at a corner only
    assert connected_components(m, "full")[1] == 1
    assert connected_components(m, "face")[1] == 2
    ref = cube(SHAPE, (2, 5), (2, 6), (2, 6))
    pred = ref.copy()
    pred[8, 18, 18] = True  # a one-voxel false positive
    assert lesion_detection(ref, pred).fp == 1
    assert lesion_detection(ref, pred, min_lesion_voxels=2).fp == 0
    labels, n = connected_components(pred, min_lesion_voxels=2)
    assert n == 1 and labels.max() == 1 and labels[8, 18, 18] == 0


def test_2d_connectivity_on_nnunet_2d_layout():
    m = np.zeros((1, 6, 6), dtype=bool)  # nnU-Net stores 2D as 1 x H x W
    m[0, 1, 1] = m[0, 2, 2] = True
    assert connected_components(m, "full")[1] == 1  # 8-neighbourhood
    assert connected_components(m, "face")[1] == 2  # 4-neighbourhood


def test_pooled_counts():
    total = LesionDetection(2, 1, 1, 0, 1) + LesionDetection(1, 2, 1, 1, 0)
    assert (total.tp, total.fp, total.fn) == (2, 1, 1)
    assert total.f1() == pytest.approx(4 / 6)
    assert total.precision() == pytest.approx(2 / 3) and total.recall() == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------- HD95
def test_hd95_anisotropic_shift_along_each_axis():
    spacing = (3.0, 1.0, 1.0)  # axis 0 is 3 mm
    ref = cube(SHAPE, (2, 3), (5, 10), (5, 10))  # a one-slice slab: every voxel is surface
    shifted_z = cube(SHAPE, (4, 5), (5, 10), (5, 10))  # 2 slices along axis 0 = 6 mm
    assert hd95(ref, shifted_z, spacing) == pytest.approx(6.0)
    assert hd95(shifted_z, ref, spacing) == pytest.approx(6.0)
    thin = cube(SHAPE, (2, 7), (5, 10), (5, 6))  # a one-column slab in x
    shifted_x = cube(SHAPE, (2, 7), (5, 10), (7, 8))  # 2 voxels along axis 2 = 2 mm
    assert hd95(thin, shifted_x, spacing) == pytest.approx(2.0)
    assert hd95(ref, shifted_z) == pytest.approx(2.0)  # no spacing: voxel units


def test_hd95_is_max_of_directed_95th_percentiles():
    ref = np.zeros(SHAPE, dtype=bool)
    ref[1, 1, 1] = True
    pred = ref.copy()
    pred[3, 1, 1] = True  # 2 slices away along axis 0: 6 mm
    # ref -> pred: [0]; pred -> ref: [0, 6] -> 95th percentile (linear) = 5.7; max = 5.7
    # (percentile of the pooled distances [0, 0, 6] would give 5.4, the plain Hausdorff distance 6)
    assert hd95(ref, pred, (3.0, 1.0, 1.0)) == pytest.approx(5.7)


def test_hd95_identical_masks_is_zero_and_surface_is_the_boundary():
    ref = cube(SHAPE, (2, 6), (2, 6), (2, 6))
    assert hd95(ref, ref, (3.0, 1.0, 1.0)) == 0.0
    assert surface(ref).sum() == 4 * 4 * 4 - 2 * 2 * 2  # face-connected boundary of a 4^3 cube


def test_hd95_2d_in_nnunet_layout_ignores_placeholder_axis():
    ref = np.zeros((1, 12, 12), dtype=bool)
    ref[0, 2:5, 2:5] = True
    pred = np.zeros_like(ref)
    pred[0, 2:5, 6:9] = True  # shifted by 4 pixels along x
    # the 999 placeholder spacing of nnU-Net's 2D layout must not matter
    assert hd95(ref, pred, (999.0, 0.5, 0.5)) == pytest.approx(2.0)


def test_hd95_raw_empty_values():
    empty = np.zeros(SHAPE, dtype=bool)
    some = cube(SHAPE, (1, 2), (1, 2), (1, 2))
    assert math.isnan(hd95(empty, empty))
    assert math.isinf(hd95(empty, some)) and math.isinf(hd95(some, empty))


# ------------------------------------------------------------------------------------- volumes
def test_absolute_volume_difference_in_physical_units():
    spacing = (3.0, 1.0, 1.0)  # 3 mm^3 voxels
    ref = cube(SHAPE, (0, 2), (0, 2), (0, 2))  # 8 voxels = 24 mm^3
    pred = cube(SHAPE, (0, 3), (0, 2), (0, 2))  # 12 voxels = 36 mm^3
    assert volume(ref, spacing) == pytest.approx(24.0)
    assert absolute_volume_difference(ref, pred, spacing) == pytest.approx(12.0)
    assert absolute_volume_difference(pred, ref, spacing) == pytest.approx(12.0)
    m = lesion_metrics(ref, pred, spacing)
    assert (m["volume_ref"], m["volume_pred"], m["AVD"]) == pytest.approx((24.0, 36.0, 12.0))


def test_2d_volume_is_an_area():
    m = np.zeros((1, 8, 8), dtype=bool)
    m[0, :2, :2] = True
    assert volume(m, (999.0, 0.5, 0.5)) == pytest.approx(1.0)  # 4 pixels of 0.25 mm^2


# --------------------------------------------------------------------------------- empty cases
def test_empty_reference_with_false_positive():
    spacing = (3.0, 1.0, 1.0)
    shape = (4, 5, 6)
    ref = np.zeros(shape, dtype=bool)
    pred = cube(shape, (0, 1), (0, 2), (0, 2))  # 4 voxels = 12 mm^3
    m = lesion_metrics(ref, pred, spacing)
    assert m["HD95"] == pytest.approx(math.sqrt(12 ** 2 + 5 ** 2 + 6 ** 2))  # image diagonal, mm
    assert m["HD95"] == pytest.approx(image_diagonal(shape, spacing))
    assert m["AVD"] == pytest.approx(12.0)
    assert (m["lesions_ref"], m["lesions_pred"], m["lesion_FP"]) == (0, 1, 1)
    assert m["lesion_precision"] == 0.0 and m["lesion_F1"] == 0.0
    assert math.isnan(m["lesion_recall"])  # no lesion to find: undefined
    n = lesion_metrics(ref, pred, spacing, empty="nan")
    assert math.isnan(n["HD95"]) and n["lesion_F1"] == 0.0


def test_missed_everything():
    ref = cube(SHAPE, (2, 5), (2, 6), (2, 6))
    m = lesion_metrics(ref, np.zeros(SHAPE, dtype=bool), (1.0, 1.0, 1.0))
    assert m["HD95"] == pytest.approx(math.sqrt(10 ** 2 + 20 ** 2 + 20 ** 2))
    assert m["lesion_recall"] == 0.0 and m["lesion_F1"] == 0.0 and math.isnan(m["lesion_precision"])
    assert m["AVD"] == pytest.approx(48.0)


def test_both_empty_conventions():
    empty = np.zeros(SHAPE, dtype=bool)
    m = lesion_metrics(empty, empty, (3.0, 1.0, 1.0), empty="lesion")
    assert m["HD95"] == 0.0 and m["AVD"] == 0.0
    assert (m["lesion_precision"], m["lesion_recall"], m["lesion_F1"]) == (1.0, 1.0, 1.0)
    assert get_empty_convention("lesion").dice(math.nan) == 1.0
    assert get_empty_convention("lesion").dice(0.25) == 0.25
    n = lesion_metrics(empty, empty, (3.0, 1.0, 1.0), empty="nan")
    assert all(math.isnan(n[k]) for k in ("HD95", "lesion_precision", "lesion_recall", "lesion_F1"))
    assert n["AVD"] == 0.0
    assert math.isnan(get_empty_convention("nan").dice(math.nan))
    assert set(EMPTY_CONVENTIONS) == {"lesion", "nan"}
    with pytest.raises(ValueError, match="lesion"):
        get_empty_convention("zero")


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        lesion_metrics(np.zeros((2, 3, 4), bool), np.zeros((2, 3, 5), bool))


def test_cropping_to_the_masks_changes_nothing():
    """hd95 / lesion_detection work on the masks' bounding box; results must equal the full-array ones."""
    from scipy import ndimage

    from nnunetv2_grcsf.evaluation.metrics import directed_surface_distances

    rng = np.random.default_rng(0)
    for _ in range(20):
        shape = (9, 11, 13)
        ref = ndimage.binary_dilation(rng.random(shape) < 0.01)  # blobs, some touching the border
        pred = ndimage.binary_dilation(rng.random(shape) < 0.01)
        if not ref.any() or not pred.any():
            continue
        spacing = rng.uniform(0.5, 3.0, 3)
        full = max(np.percentile(directed_surface_distances(ref, pred, spacing), 95),
                   np.percentile(directed_surface_distances(pred, ref, spacing), 95))
        assert hd95(ref, pred, spacing) == pytest.approx(full)
        det = lesion_detection(ref, pred)
        assert det.n_reference == connected_components(ref)[1] and det.n_predicted == connected_components(pred)[1]
