"""Overlay PNGs (nnunetv2_grcsf.evaluation.overlay): slice choice, 2D layouts, and the files written."""
import numpy as np
import pytest

from nnunetv2_grcsf.evaluation.overlay import (OverlayCase, overlay_slices, save_overlay_grid, save_overlay_png,
                                               select_slice)


def read_png(path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(path)


def test_select_slice_most_foreground_then_prediction_then_middle():
    ref = np.zeros((8, 6, 6), np.uint8)
    ref[2, :2, :2] = 1  # 4 voxels
    ref[5, :3, :3] = 1  # 9 voxels
    assert select_slice(ref, None) == 5
    assert select_slice(ref, None, axis=1) == 0
    pred = np.zeros_like(ref)
    pred[6, 0, 0] = 1
    assert select_slice(np.zeros_like(ref), pred) == 6
    assert select_slice(np.zeros_like(ref), np.zeros_like(ref)) == 4


def test_overlay_slices_3d_with_channel_and_spacing():
    ref = np.zeros((8, 6, 10), np.uint8)
    ref[3, 1:3, 1:3] = 2
    image = np.random.default_rng(0).random((2, 8, 6, 10))  # channel first, nnU-Net style
    img, r, p, aspect, where = overlay_slices(image, ref, ref, spacing=(3.0, 2.0, 0.5), channel=1)
    assert r.shape == (6, 10) and img.shape == (6, 10) and r.max() == 2
    np.testing.assert_array_equal(img, image[1, 3])
    assert aspect == pytest.approx(4.0)  # 2.0 mm rows / 0.5 mm columns
    assert where == "slice 3/8 (axis 0)"


def test_overlay_slices_2d_nnunet_layout():
    ref = np.zeros((1, 1, 5, 7), np.uint8)  # channel + nnU-Net's 1 x H x W
    img, r, p, aspect, where = overlay_slices(None, ref, ref, spacing=(1, 999, 1, 1))
    assert img is None and r.shape == (5, 7) and aspect == 1.0 and where == ""
    with pytest.raises(ValueError, match="shape"):
        overlay_slices(None, ref, np.zeros((1, 1, 5, 6)))


def test_save_overlay_png_and_grid(tmp_path):
    ref = np.zeros((40, 50), np.uint8)
    ref[10:20, 10:25] = 1
    pred = np.roll(ref, 3, axis=1)
    image = np.random.default_rng(1).random((40, 50))
    one = read_png(save_overlay_png(image, ref, pred, tmp_path / "one.png", title="case a"))
    masks_only = read_png(save_overlay_png(None, ref, pred, tmp_path / "masks.png"))
    assert one.shape[1] > masks_only.shape[1]  # 3 panels vs 2
    vol_ref = np.zeros((6, 40, 50), np.uint8)
    vol_ref[2] = ref
    grid = read_png(save_overlay_grid(
        [OverlayCase(image, ref, pred, title="2d"),
         {"image": None, "reference": vol_ref, "prediction": vol_ref, "title": "3d, no image"}],
        tmp_path / "sub" / "grid.png", title="two cases"))
    assert grid.shape[0] > one.shape[0] * 1.5  # two rows
    # the prediction panel shows colour (red label 1) where the masks are
    assert (one[..., 0] - one[..., 2]).max() > 0.3
    with pytest.raises(ValueError):
        save_overlay_grid([], tmp_path / "none.png")
