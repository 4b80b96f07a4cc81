"""Reading raw data sets for the MAE: listing, slicing, normalization, the model grid, data set lookup."""
import numpy as np
import pytest
import torch

from nnunetv2_grcsf.datasets import DatasetNotFoundError
from nnunetv2_grcsf.errors import UserFacingError
from nnunetv2_grcsf.mae import MAEDatasetError, MAEImageReadError, MAEIncompatibleError
from nnunetv2_grcsf.mae import data as mdata

from mae_testutils import make_raw_dataset, nnunet_env  # noqa: F401 (fixture)


def test_slice_axis_is_the_lowest_resolution_axis():
    assert mdata.slice_axis((999, 1, 1), (1, 40, 50)) == 0  # nnU-Net's 2D arrays: one slice
    assert mdata.slice_axis((3.0, 0.8, 0.8), (10, 64, 64)) == 0
    assert mdata.slice_axis((0.8, 0.8, 3.0), (64, 64, 10)) == 2
    assert mdata.slice_axis((1.0, 2.5, 1.0), (64, 10, 64)) == 1
    assert mdata.slice_axis((1.0, 1.0, 1.0), (30, 40, 50)) == 0  # isotropic: first axis


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slices_roundtrip(axis):
    img = np.random.rand(2, 5, 6, 7).astype(np.float32)
    sl = mdata.to_slices(img, axis)
    assert sl.shape[0] == img.shape[1 + axis] and sl.shape[1] == 2
    assert np.array_equal(mdata.from_slices(sl, axis), img)


@pytest.mark.parametrize("hw", [(48, 56), (128, 64), (200, 256), (32, 32)])
def test_model_grid_keeps_aspect_and_pads_with_minimum(hw):
    h, w = hw
    x = torch.rand(2, 1, h, w) + 1.0
    g = mdata.to_model_grid(x, 64)
    assert g.shape == (2, 1, 64, 64)
    nh, nw = mdata.content_size(h, w, 64)
    assert max(nh, nw) == 64 and abs(nh / nw - h / w) < 0.05
    fill = g[:, :, :nh, :nw].amin(dim=(2, 3), keepdim=True)  # padding = each slice's minimum
    assert torch.equal(g[:, :, nh:, :], fill.expand_as(g[:, :, nh:, :]))
    assert torch.equal(g[:, :, :, nw:], fill.expand_as(g[:, :, :, nw:]))
    back = mdata.from_model_grid(g, h, w)
    assert back.shape == (2, 1, h, w)
    smooth = torch.linspace(0, 1, w).repeat(1, 1, h, 1)
    assert torch.allclose(mdata.from_model_grid(mdata.to_model_grid(smooth, 64), h, w), smooth, atol=0.05)
    assert int(mdata.content_mask(h, w, 64).sum()) == nh * nw


def test_normalizer_modes_and_serialization():
    modes = mdata.IntensityNormalizer.auto_modes({"0": "T1", "1": "CT", "2": "noNorm", "3": "ultrasound"})
    assert modes == ["per_image", "global", "global", "per_image"]
    rng = np.random.default_rng(0)
    images = [np.stack([rng.normal(100, 10, (1, 20, 20)), rng.normal(-500, 200, (1, 20, 20))]).astype(np.float32)
              for _ in range(5)]
    norm = mdata.IntensityNormalizer(["per_image", "global"]).fit(images)
    out = norm(images[0])
    assert abs(out[0].mean()) < 1e-4 and abs(out[0].std() - 1) < 1e-3
    assert abs(out[1].mean()) < 0.5 and 0.5 < out[1].std() < 1.5
    again = mdata.IntensityNormalizer.from_dict(norm.to_dict())
    assert np.allclose(again(images[1]), norm(images[1]))
    # global: a uniformly brighter image stays brighter (per-image z-scoring would erase that)
    assert norm(images[0] + 1000)[1].mean() > out[1].mean() + 1


def test_images_mostly_background_are_normalized_over_their_foreground():
    """Skull-stripped MRI: the same tissue gets the same values whatever the extent and value of the constant
    background around it (a whole-image z-score would follow the background); images without margins keep the
    whole-image z-score."""
    rng = np.random.default_rng(0)
    tissue = rng.normal(0.0, 1.0, (2, 1, 12, 12)).astype(np.float32)

    def embedded(background: float, size: int) -> np.ndarray:
        image = np.full((2, 1, size, size), background, dtype=np.float32)
        image[:, :, 2:14, 3:15] = tissue
        return image

    images = [embedded(-6.0, 30), embedded(-9.0, 40)]
    norm = mdata.IntensityNormalizer(["per_image", "per_image"]).fit(images)
    assert norm.modes == ["per_image_foreground"] * 2
    small, large = norm(images[0]), norm(images[1])
    np.testing.assert_allclose(small[:, :, 2:14, 3:15], large[:, :, 2:14, 3:15], atol=1e-5)
    inside = small[:, :, 2:14, 3:15]
    assert np.abs(inside.mean(axis=(1, 2, 3))).max() < 0.02 and np.abs(inside.std(axis=(1, 2, 3)) - 1).max() < 0.05
    assert (small[:, 0, 0, 0] == small.reshape(2, -1).min(axis=1)).all()  # background: the tissue's lowest value
    assert not (mdata.foreground_mask(small) & ~mdata.foreground_mask(images[0])).any()  # still background
    plain = mdata.IntensityNormalizer(["per_image", "per_image"])
    assert plain(images[0])[0, 0, 5, 5] != plain(images[1])[0, 0, 5, 5]  # what it avoids
    assert mdata.IntensityNormalizer.from_dict(norm.to_dict()).modes == norm.modes
    no_margin = [rng.normal(5.0, 2.0, (1, 1, 16, 16)).astype(np.float32) for _ in range(3)]
    assert mdata.IntensityNormalizer(["per_image"]).fit(no_margin).modes == ["per_image"]


def test_list_cases_and_channel_check(tmp_path):
    folder = make_raw_dataset(tmp_path, 3, num_cases=3, channels=2)
    cases = mdata.list_cases(folder / "imagesTr", ".png")
    assert list(cases) == ["case_000", "case_001", "case_002"]
    assert [f.name for f in cases["case_001"]] == ["case_001_0000.png", "case_001_0001.png"]
    mdata.check_case_channels(cases, 2, folder)
    with pytest.raises(MAEIncompatibleError, match="case_000.*expected channels _0000.._0002"):
        mdata.check_case_channels(cases, 3, folder)
    assert mdata.list_cases(folder / "imagesTs", ".png") == {}


def test_read_case_and_corrupt_file(tmp_path):
    folder = make_raw_dataset(tmp_path, 3, num_cases=2, shape=(20, 24))
    cases = mdata.list_cases(folder / "imagesTr", ".png")
    reader = mdata.reader_for({"file_ending": ".png"}, example_file=cases["case_000"][0])
    image, props = mdata.read_case(reader, cases["case_000"], "case_000")
    assert image.shape == (1, 1, 20, 24) and mdata.image_dim(image) == 2
    cases["case_001"][0].write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(MAEImageReadError, match="case_001_0000.png.*corrupt"):
        mdata.read_case(reader, cases["case_001"], "case_001")


def test_resolve_dataset(nnunet_env):
    make_raw_dataset(nnunet_env["nnUNet_raw"], 7, "Seven", num_cases=1, shape=(16, 16))
    name, folder = mdata.resolve_raw_dataset("7")
    assert name == "Dataset007_Seven" and type(name) is str and folder == nnunet_env["nnUNet_raw"] / name
    assert mdata.resolve_raw_dataset("Dataset007_Seven")[0] == name
    with pytest.raises(DatasetNotFoundError, match=r"'42' not found.*Dataset042_\*.*nnUNet_raw=.*nnUNet_raw"):
        mdata.resolve_raw_dataset(42)
    with pytest.raises(DatasetNotFoundError, match="no folder"):
        mdata.resolve_raw_dataset("Dataset008_Missing")


def test_resolve_dataset_without_nnunet_raw(monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(UserFacingError, match="nnUNet_raw is not set"):
        mdata.resolve_raw_dataset(1)


def test_training_slices_of_a_volume_skip_empty_slices():
    vol = np.zeros((1, 6, 20, 30), dtype=np.float32)
    vol[0, 1:5] = np.random.rand(4, 20, 30)
    norm = mdata.IntensityNormalizer(["global"], [{"low": 0.0, "high": 1.0, "mean": 0.5, "std": 0.3}])
    slices, hw, kept = mdata.training_slices(vol, norm, (2.0, 1.0, 1.0), 32)
    assert slices.shape == (4, 1, 32, 32) and slices.dtype == torch.float16 and hw == (20, 30) and kept == [1, 2, 3, 4]
    slices, _, kept = mdata.training_slices(vol, norm, (2.0, 1.0, 1.0), 32, max_slices=2)
    assert slices.shape[0] == 2 and kept == [1, 4]


def _brain_in_a_box(shape=(6, 40, 50), box=(slice(1, 5), slice(8, 28), slice(10, 40)), seed=0):
    """A 2-channel volume, constant (a different value per channel) outside ``box``, random inside it."""
    vol = np.stack([np.full(shape, -1.5, np.float32), np.full(shape, 0.25, np.float32)])
    vol[(slice(None), *box)] = np.random.default_rng(seed).random((2, *[s.stop - s.start for s in box])) + 1
    return vol


def test_foreground_box_is_the_bounding_box_of_any_channel_above_its_minimum():
    box = (slice(1, 5), slice(8, 28), slice(10, 40))
    vol = _brain_in_a_box(box=box)
    assert mdata.foreground_box(vol, axis=0) == box
    vol[1, 3, 30, 45] = 5.0  # one voxel of the second channel widens the box
    assert mdata.foreground_box(vol, axis=0) == (slice(1, 5), slice(8, 31), slice(10, 46))
    # widened around its centre to a patch along the in-slice axes only, and kept inside the image
    tiny = np.zeros((1, 6, 40, 50), np.float32)
    tiny[0, 2, 38, 1] = 1.0
    assert mdata.foreground_box(tiny, axis=0, min_size=8) == (slice(2, 3), slice(32, 40), slice(0, 8))
    assert mdata.foreground_box(np.zeros((1, 1, 9, 9), np.float32), axis=0) == (slice(0, 1), slice(0, 9), slice(0, 9))


def test_uncropped_puts_the_box_back_into_the_image_grid():
    box = (slice(1, 3), slice(2, 5), slice(0, 4))
    inside = np.arange(2 * 2 * 3 * 4, dtype=np.float32).reshape(2, 2, 3, 4)
    full = mdata.uncropped(inside, box, (4, 6, 5), 0.0)
    assert full.shape == (2, 4, 6, 5) and np.array_equal(full[(slice(None), *box)], inside)
    assert full.sum() == inside.sum()  # zero elsewhere
    image = np.random.rand(2, 4, 6, 5).astype(np.float32)
    assert np.array_equal(mdata.uncropped(image[(slice(None), *box)], box, (4, 6, 5), image), image)


def test_training_slices_cut_to_the_foreground_box_fill_the_model_grid():
    box = (slice(1, 5), slice(8, 28), slice(10, 40))
    vol = _brain_in_a_box(box=box)
    norm = mdata.IntensityNormalizer(["global", "global"], [{"low": -2.0, "high": 3.0, "mean": 0.0, "std": 1.0}] * 2)
    whole, hw, kept = mdata.training_slices(vol, norm, (1.0, 1.0, 1.0), 32)
    assert hw == (40, 50) and kept == [1, 2, 3, 4]  # constant slices skipped either way
    cut, hw, kept = mdata.training_slices(vol, norm, (1.0, 1.0, 1.0), 32, box=mdata.foreground_box(vol, 0))
    assert hw == (20, 30) and kept == [0, 1, 2, 3] and cut.shape == (4, 2, 32, 32)
    nh, nw = mdata.content_size(20, 30, 32)
    assert bool((cut[:, 0, :nh, :nw] >= 0.9).all())  # the whole content is foreground (values 1..2)
    assert float((whole[:, 0] >= 0.9).float().mean()) < 0.4  # uncut, the foreground is a fraction of the grid
    label = np.zeros(vol.shape[1:], dtype=bool)
    label[2, 8:12, 10:14] = True  # the box's top-left corner: its first patch on the cut grid
    flags = mdata.labelled_patches(label, (1.0, 1.0, 1.0), kept, 32, 8, box=mdata.foreground_box(vol, 0))
    assert flags.shape == (4, 16) and flags.sum() == 1 and bool(flags[1, 0])


def test_labelled_patches_flag_the_patches_a_label_touches_on_the_model_grid():
    label = np.zeros((1, 64, 32), dtype=bool)  # 2D case: slice axis 0; long side 64 -> 32 px grid, content 32 x 16
    label[0, 20:28, 4:6] = True  # grid rows 10-13, col 2: patch row 1 (8-px patches), patch col 0
    flags = mdata.labelled_patches(label, (999.0, 1.0, 1.0), [0], 32, 8)
    assert flags.shape == (1, 16) and flags.dtype == torch.bool
    assert flags[0].reshape(4, 4).nonzero().tolist() == [[1, 0]]
    label[0] = True  # a fully labelled slice: its content patches (cols 0-15 of 32) only, never the padding
    assert mdata.labelled_patches(label, (999.0, 1.0, 1.0), [0], 32, 8)[0].reshape(4, 4)[:, :2].all()
    assert not mdata.labelled_patches(label, (999.0, 1.0, 1.0), [0], 32, 8)[0].reshape(4, 4)[:, 2:].any()
    # a one-voxel label still flags its patch when the slice is shrunk; kept slices of a volume are used in order
    vol = np.zeros((3, 16, 16), dtype=bool)
    vol[2, 15, 15] = True
    flags = mdata.labelled_patches(vol, (3.0, 1.0, 1.0), [0, 2], 8, 4)
    assert flags.shape == (2, 4) and flags[0].sum() == 0 and flags[1].tolist() == [False, False, False, True]


def _nifti(path, array):
    import SimpleITK as sitk
    sitk.WriteImage(sitk.GetImageFromArray(np.asarray(array, dtype=np.float32)), str(path))
    return path


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
def test_truncated_nifti_is_refused_naming_the_file(tmp_path, ending):
    """SimpleITK reads the first half of a .nii.gz / .nii as an image half zeros; we refuse it."""
    rng = np.random.default_rng(0)
    whole = _nifti(tmp_path / f"case_000_0000{ending}", rng.uniform(1, 2, (4, 40, 48)))
    cut = _nifti(tmp_path / f"case_001_0000{ending}", rng.uniform(1, 2, (4, 40, 48)))
    cut.write_bytes(cut.read_bytes()[:cut.stat().st_size // 2])
    reader = mdata.reader_for(None, file_ending=ending, example_file=whole)
    image, _ = mdata.read_case(reader, [whole], "case_000")
    assert image.shape == (1, 4, 40, 48) and image.min() >= 1
    with pytest.raises(MAEImageReadError, match=rf"case_001_0000{ending.replace('.', '[.]')} is truncated"):
        mdata.read_case(reader, [cut], "case_001")


def test_mae_training_refuses_a_truncated_image(nnunet_env):
    from nnunetv2_grcsf.mae.train import TrainConfig, train_mae

    from mae_testutils import tiny_model_config

    folder = make_raw_dataset(nnunet_env["nnUNet_raw"], 9, "Cut", num_cases=3, ending=".nii.gz", shape=(24, 24))
    cut = folder / "imagesTr" / "case_001_0000.nii.gz"
    cut.write_bytes(cut.read_bytes()[:cut.stat().st_size // 2])
    with pytest.raises(MAEImageReadError, match="case_001_0000.nii.gz is truncated"):
        train_mae(9, model_config=tiny_model_config(img_size=32), train_config=TrainConfig(steps=1, batch_size=2),
                  progress=False, num_threads=1, log=lambda *a: None)


@pytest.mark.parametrize("ending", [".nii.gz", ".png"])
def test_channels_of_different_shape_are_named_not_called_corrupt(tmp_path, ending):
    from mae_testutils import write_image

    write_image(tmp_path / f"a_0000{ending}", np.full((20, 24), 100.0), ending)
    write_image(tmp_path / f"a_0001{ending}", np.full((16, 24), 100.0), ending)
    files = [tmp_path / f"a_0000{ending}", tmp_path / f"a_0001{ending}"]
    reader = mdata.reader_for(None, file_ending=ending, example_file=files[0])
    with pytest.raises(MAEImageReadError, match=r"channel files \(case 'a'\) differ in shape: a_0000\S* 1 x 20 x 24, "
                                                r"a_0001\S* 1 x 16 x 24.*onto the grid of a_0000") as raised:
        mdata.read_case(reader, files, "a")
    assert "corrupt" not in str(raised.value)


def test_misnamed_files_and_missing_channel_suffix_are_named(tmp_path):
    folder = make_raw_dataset(tmp_path, 3, num_cases=2, shape=(20, 24))
    images = folder / "imagesTr"
    (images / "case_000_0000.png").rename(images / "stray.png")
    (images / "notes.txt").write_text("not an image")
    assert mdata.misnamed_files(images, ".png") == [images / "stray.png"]
    with pytest.raises(MAEDatasetError, match=r"1 file\(s\) lack nnU-Net's channel suffix _XXXX: stray.png"):
        mdata.check_no_misnamed_files(images, ".png")
    (images / "case_001_0000.png").rename(images / "other.png")
    assert "none named CASE_XXXX.png (e.g. other.png)" in mdata.describe_no_cases(images, ".png")
    assert "no *.nii.gz files (it holds .png, .txt); pass the right --file-ending" in \
        mdata.describe_no_cases(images, ".nii.gz")
