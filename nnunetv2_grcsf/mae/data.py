"""Images for the MAE: nnU-Net raw data sets read with nnU-Net's own reader/writer classes.

- Data sets are resolved like nnU-Net does (id or ``DatasetXXX_Name``, via
  ``nnunetv2.utilities.dataset_name_id_conversion.maybe_convert_to_dataset_name``) and must exist in
  ``$nnUNet_raw``. Images are listed like nnU-Net lists them (``CASE_XXXX<file_ending>``, one file per
  channel) and read with the reader that ``determine_reader_writer_from_dataset_json`` picks, so every
  format nnU-Net reads (PNG, NIfTI, NRRD, MHA, TIFF) works, and the same reader later writes the
  residual channel in the image's own geometry. Labels are read only for training cases, and only to keep
  their labelled regions out of the MAE's loss (:func:`read_label_mask`, :func:`labelled_patches`). Before
  reading, every file is checked for truncation (:func:`check_file_complete`: SimpleITK would fill a
  cut-off ``.nii.gz`` with zeros); :func:`check_no_misnamed_files` refuses, by name, files that end with the
  file ending but lack the channel suffix (which listing skips); channels of one case on different grids are
  named as such.
- nnU-Net readers return ``[C, Z, Y, X]`` arrays for both 2D (``Z = 1``) and 3D images, with the spacing
  in array-axis order (2D images get a dummy 999 spacing on the first axis). The MAE is 2D: every image
  is cut into slices along its **lowest-resolution axis** (largest spacing; the first such axis on
  ties, i.e. axis 0 of isotropic volumes; the dummy axis of 2D images, so a 2D image is one slice).
  The two other axes are the slice plane: its spacing (:func:`in_slice_spacing`) is what the MAE's
  training spacing is compared with, and its size must span one MAE patch along both axes.
- Intensity normalization (ours; stored in the checkpoint, so residuals use exactly the training
  normalization), per channel, chosen like nnU-Net chooses per channel name
  (``map_channel_name_to_normalization``):

  * ``per_image`` for channels nnU-Net z-scores (MRI, ultrasound, any unknown name): the image is
    clipped to its own 0.5 / 99.5 percentiles and z-scored with its own mean and std (MR and
    ultrasound gain differ between scans);
  * ``per_image_foreground`` instead of ``per_image`` where the training images are mostly constant
    background (median foreground share under ``FOREGROUND_NORMALIZATION_SHARE``, decided when fitting, as
    nnU-Net z-scores within the non-zero region when cropping to it shrinks the images by a quarter or more):
    percentiles, mean and std are those of the image's foreground (:func:`foreground_mask`) and the background
    is set to the clipped foreground's lowest value. Otherwise the share of background (e.g. 80 % of a brain
    MRI volume, differing between scans) would set the scale, and the same tissue would get different values
    in different images;
  * ``global`` for ``CT``, ``noNorm``, ``rgb_to_0_1``: clipped to the data set's 0.5 / 99.5 percentiles
    and z-scored with the data set's mean and std (fitted on up to 64 training cases).

- With ``crop_to_foreground`` (mae-train's default; checkpoints from before it read as off) every image is
  first cut to the bounding box of its foreground (:func:`foreground_box`: voxels where any channel is above
  its minimum, e.g. the brain of a skull-stripped MRI), as nnU-Net crops to the non-zero region before
  planning. Outside the box every channel is constant, so nothing is lost there; inside it, the anatomy fills
  the model's input instead of a fraction of it. Images without constant margins (ultrasound, MRI crops)
  are their own box.
- Slices go to the model's square input (``img_size``) by **resize-and-pad**: the long side is
  resized to ``img_size`` (bilinear, antialiased when shrinking), keeping the aspect ratio in pixels,
  and the short side is padded with the slice's minimum (per channel), i.e. with "background". The
  same mapping, undone (crop the padding, resize back), brings residual maps to the image's grid.
"""

import os
import re
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nnunetv2_grcsf.datasets import find_raw_dataset
from nnunetv2_grcsf.mae import MAEDatasetError, MAEImageReadError, MAEIncompatibleError

PERCENTILES = (0.5, 99.5)
#: ``per_image`` channels are normalized over the foreground when the training images' median foreground share
#: is below this (nnU-Net's threshold for normalizing within the non-zero mask).
FOREGROUND_NORMALIZATION_SHARE = 0.75
GLOBAL_FIT_MAX_CASES = 64


# ---- data sets and files ------------------------------------------------------------------------------
def resolve_raw_dataset(dataset) -> tuple:
    """``(name, folder)`` of a raw data set given by id or name (see nnunetv2_grcsf.datasets.find_raw_dataset)."""
    folder = find_raw_dataset(dataset)
    return folder.name, folder


def load_dataset_json(folder) -> dict:
    """The dataset.json of a raw data set folder, checked for the keys the MAE needs."""
    import json

    path = Path(folder) / "dataset.json"
    try:
        dataset_json = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise MAEDatasetError(f"{path} cannot be read as JSON ({error}); fix or recreate it") from error
    for key in ("channel_names", "file_ending"):
        if key not in dataset_json and not (key == "channel_names" and "modality" in dataset_json):
            raise MAEDatasetError(f"{path} has no '{key}' (required by nnU-Net v2, see documentation/dataset_format.md)")
    if "dataset" in dataset_json:
        raise MAEDatasetError(f"{path} lists its files under a 'dataset' key; nnunetv2_grcsf supports only the "
                              f"imagesTr/labelsTr folder layout (CASE_XXXX{dataset_json['file_ending']}).")
    return dataset_json


def channel_names_of(dataset_json: dict) -> dict:
    return dict(dataset_json.get("channel_names", dataset_json.get("modality", {})))


def list_cases(folder, file_ending: str) -> dict:
    """``{case_id: [channel files in channel order]}`` for ``CASE_XXXX<file_ending>`` files in ``folder``.

    Same naming rule as nnU-Net (``create_lists_from_splitted_dataset_folder``), without its process pool.
    Returns an empty dict when the folder does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(file_ending) + r"$")
    cases = {}
    for f in sorted(os.listdir(folder)):
        m = pattern.fullmatch(f)
        if m:
            cases.setdefault(m.group(1), []).append((int(m.group(2)), folder / f))
    return {case: [p for _, p in sorted(files)] for case, files in sorted(cases.items())}


def check_case_channels(cases: dict, num_channels: int, where) -> None:
    """Every case must have channel files ``_0000`` .. ``_{num_channels-1:04d}``."""
    for case, files in cases.items():
        indices = [int(f.name[len(case) + 1:len(case) + 5]) for f in files]
        if indices != list(range(num_channels)):
            raise MAEIncompatibleError(
                f"case {case!r} in {where} has channel files {[f.name for f in files]}, expected channels "
                f"_0000.._{num_channels - 1:04d} ({num_channels} channel(s)). Fix the file names or the channel count.")


def misnamed_files(folder, file_ending: str) -> list:
    """Files in ``folder`` that end with ``file_ending`` but lack nnU-Net's channel suffix ``_XXXX`` (skipped by
    :func:`list_cases`, as by nnU-Net)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(file_ending) + r"$")
    return [folder / f for f in sorted(os.listdir(folder)) if f.endswith(file_ending) and not pattern.fullmatch(f)]


def check_no_misnamed_files(folder, file_ending: str) -> None:
    """Refuse files that end with ``file_ending`` but are not named ``CASE_XXXX<file_ending>`` (naming them)."""
    misnamed = misnamed_files(folder, file_ending)
    if misnamed:
        listed = ", ".join(p.name for p in misnamed[:5]) + (f" and {len(misnamed) - 5} more" if len(misnamed) > 5
                                                            else "")
        raise MAEDatasetError(f"{folder}: {len(misnamed)} file(s) lack nnU-Net's channel suffix _XXXX: {listed}. Name "
                              f"them CASE_0000{file_ending} (one file per channel: _0000, _0001, ...) or move them "
                              f"out of the folder.")


def describe_no_cases(folder, file_ending: str) -> str:
    """Why ``folder`` has no ``CASE_XXXX<file_ending>`` files: other endings there, or files without ``_XXXX``."""
    folder = Path(folder)
    files = sorted(f for f in os.listdir(folder) if (folder / f).is_file() and not f.startswith(".")) \
        if folder.is_dir() else []
    if not files:
        return f"{folder} holds no image files"
    endings = sorted({m.group(1) for f in files if (m := re.search(r"(\.[A-Za-z0-9]+(?:\.gz)?)$", f))})
    if not any(f.endswith(file_ending) for f in files):
        return (f"{folder} has no *{file_ending} files (it holds {', '.join(endings) or 'files without an ending'}); "
                f"pass the right --file-ending")
    example = next(f for f in files if f.endswith(file_ending))
    return (f"{folder} has *{file_ending} files but none named CASE_XXXX{file_ending} (e.g. {example}): nnU-Net "
            f"needs the channel suffix _0000 (one file per channel: _0000, _0001, ...); rename the files")


def reader_for(dataset_json: dict = None, file_ending: str = None, example_file=None):
    """An instance of the nnU-Net reader/writer class for the data set (or the file ending)."""
    from nnunetv2.imageio.reader_writer_registry import (determine_reader_writer_from_dataset_json,
                                                         determine_reader_writer_from_file_ending)
    example = None if example_file is None else str(example_file)
    try:
        if dataset_json is not None:
            cls = determine_reader_writer_from_dataset_json(dataset_json, example, verbose=False)
        else:
            cls = determine_reader_writer_from_file_ending(file_ending, example, verbose=False)
    except RuntimeError as error:
        raise MAEImageReadError(f"no nnU-Net reader can read {example or file_ending}: {error}. If the file is "
                                f"corrupt, replace or remove that case.") from error
    return cls()


def check_file_complete(path) -> None:
    """Refuse an image file whose data end early (:class:`~nnunetv2_grcsf.mae.MAEImageReadError` naming it).

    SimpleITK reads a truncated ``.nii.gz`` (or ``.nii``) without complaint and fills the missing voxels
    with zeros. So a gzip file (any ``*.gz``) is decompressed to its end, which must be the gzip stream's
    end-of-stream marker, and a NIfTI file must hold the ``vox_offset + voxels x bytes per voxel`` bytes its
    header declares (read with nibabel, which nnU-Net installs). Other formats are left to their readers.
    """
    import gzip

    path = Path(path)
    name = path.name.lower()
    fix = "Copy or export the file again, or remove the case."
    if name.endswith(".gz"):
        size = 0
        try:
            with gzip.open(path, "rb") as stream:
                while chunk := stream.read(1 << 24):
                    size += len(chunk)
        except (EOFError, OSError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
            raise MAEImageReadError(f"{path} is truncated or corrupt: its gzip stream does not end properly "
                                    f"({type(error).__name__}: {error}). {fix}") from error
    else:
        size = path.stat().st_size
    if name.endswith((".nii", ".nii.gz")):
        import nibabel

        try:
            header = nibabel.load(str(path)).header
            expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * \
                header.get_data_dtype().itemsize
        except Exception:  # not a NIfTI nibabel can parse: the reader will say what is wrong
            return
        if size < expected:
            raise MAEImageReadError(f"{path} is truncated: it holds {size} bytes of the {expected} its NIfTI header "
                                    f"declares. {fix}")


def _read_quietly(reader, files) -> tuple:
    """``reader.read_images(files)`` with nnU-Net's own printing captured; returns ``(image, props, printed)``."""
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        image, props = reader.read_images([str(f) for f in files])
    return image, props, printed.getvalue()


def read_case(reader, files, case: str = None) -> tuple:
    """``(image float32 [C, Z, Y, X], properties)`` of one case's channel files, read with ``reader``.

    Every file is first checked for truncation (:func:`check_file_complete`). When nnU-Net's reader refuses
    a multi-channel case, each file is read alone to say which: a corrupt file, or channels of different
    shape / spacing.
    """
    for f in files:
        check_file_complete(f)
    where = f" (case {case!r})" if case else ""
    try:
        image, props, printed = _read_quietly(reader, files)
    except Exception as error:  # readers raise anything from OSError to RuntimeError / AssertionError
        if len(files) > 1:
            _explain_channel_mismatch(reader, files, where)
        raise MAEImageReadError(f"cannot read image {', '.join(str(f) for f in files)}{where}: "
                                f"{type(error).__name__}: {error}. The file is corrupt or not a valid image of this "
                                f"format: replace it or remove the case.") from error
    if printed:  # nnU-Net's warnings (e.g. channels with different origins) stay visible
        print(printed, end="")
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 4:
        raise MAEImageReadError(f"{files[0]}: nnU-Net's reader returned an array of shape {image.shape}; expected "
                                f"[channels, z, y, x]")
    if not np.all(np.isfinite(image)):
        raise MAEImageReadError(f"{files[0]} contains NaN or infinite values; fix the image")
    return image, props


def _explain_channel_mismatch(reader, files, where: str) -> None:
    """Raise the precise error for a multi-channel case nnU-Net's reader refused; return if it is not found."""
    grids = []
    for f in files:
        try:
            image, props, _ = _read_quietly(reader, [f])
        except Exception as error:
            raise MAEImageReadError(f"cannot read image {f}{where}: {type(error).__name__}: {error}. The file is "
                                    f"corrupt or not a valid image of this format: replace it or remove the "
                                    f"case.") from error
        spacing = props.get("sitk_stuff", {}).get("spacing", props.get("spacing"))
        grids.append((Path(f).name, tuple(np.shape(image)[1:]), tuple(float(v) for v in spacing)))
    for field, index in (("shape", 1), ("spacing", 2)):
        values = [grid[index] for grid in grids]
        if len(set(values)) > 1:
            listed = ", ".join(f"{grid[0]} {' x '.join(f'{v:g}' for v in value)}" for grid, value in zip(grids, values))
            raise MAEImageReadError(f"the channel files{where} differ in {field}: {listed}. All channels of a case "
                                    f"must lie on one grid (nnU-Net requires it): resample them onto the grid of "
                                    f"{grids[0][0]}.")


def image_dim(image: np.ndarray) -> int:
    """2 for nnU-Net's 2D arrays ``[C, 1, X, Y]``, 3 for volumes."""
    return 2 if image.shape[1] == 1 else 3


def slice_axis(spacing, shape) -> int:
    """The spatial axis (0, 1 or 2 of ``[Z, Y, X]``) to slice along: the lowest-resolution one.

    Largest spacing; the first such axis on ties. For nnU-Net's 2D arrays (a size-1 first axis with
    dummy spacing 999) that is axis 0, so a 2D image is one slice.
    """
    if shape[0] == 1:
        return 0
    spacing = np.asarray(spacing, dtype=float)
    return int(np.flatnonzero(spacing >= spacing.max() * (1 - 1e-6))[0])


def in_slice_spacing(spacing, shape) -> tuple:
    """``(a, b)``: the spacing of the slice plane of an image of spatial ``shape`` ``[Z, Y, X]``.

    In slice-array order (the two axes that :func:`to_slices` keeps, see :func:`slice_axis`); for
    nnU-Net's 2D arrays the spacing of the two real axes.
    """
    axis = slice_axis(spacing, shape)
    return tuple(float(s) for i, s in enumerate(spacing) if i != axis)


def slice_size(spacing, shape) -> tuple:
    """``(h, w)``: the size in voxels of the slices of an image of spatial ``shape`` ``[Z, Y, X]``."""
    axis = slice_axis(spacing, shape)
    return tuple(int(n) for i, n in enumerate(shape) if i != axis)


def check_image_compatible(image: np.ndarray, num_channels: int, dim: int, where, fix: str) -> None:
    """Channel count and 2D/3D of ``[C, Z, Y, X]`` must match the MAE checkpoint's; ``fix`` ends the message."""
    if image.shape[0] != num_channels:
        raise MAEIncompatibleError(f"{where} has {image.shape[0]} channel(s) but the MAE checkpoint was trained on "
                                   f"{num_channels}; {fix}")
    if image_dim(image) != dim:
        raise MAEIncompatibleError(f"{where} is a {image_dim(image)}D image but the MAE checkpoint was trained on "
                                   f"{dim}D images (a 2D image is one slice, a volume is cut into slices along its "
                                   f"lowest-resolution axis: the MAE has never seen the other kind); {fix}")


def check_slices_fit_patch(shape, spacing, patch_size: int, where, setting: str, fix: str) -> None:
    """The slices of an image of spatial ``shape`` ``[Z, Y, X]`` must span one MAE patch along both axes.

    A smaller slice holds less than one patch of real content along an axis: resizing it to the model
    input would invent the detail the MAE reconstructs. ``setting`` names where the patch size comes
    from; ``fix`` ends the message.
    """
    h, w = slice_size(spacing, shape)
    if h < patch_size or w < patch_size:
        cut = "" if shape[0] == 1 else (f" (volume of {' x '.join(str(n) for n in shape)} voxels cut along axis "
                                        f"{slice_axis(spacing, shape)}, its lowest-resolution axis)")
        raise MAEIncompatibleError(f"{where} has slices of {h} x {w} voxels{cut}, smaller than the MAE patch size "
                                   f"{patch_size} ({setting}); {fix}")


def case_seed(case: str, seed: int) -> int:
    """A deterministic per-case seed (masks of a case do not depend on batching or order)."""
    return (zlib.crc32(case.encode()) ^ (int(seed) * 2654435761)) % (2 ** 31)


# ---- intensity normalization --------------------------------------------------------------------------
class IntensityNormalizer:
    """Per-channel ``global``, ``per_image`` or ``per_image_foreground`` clip-and-z-score (see module docstring);
    serializable."""

    def __init__(self, modes, stats=None):
        self.modes = list(modes)
        self.stats = stats or [None] * len(self.modes)  # per channel: {"low", "high", "mean", "std"} for global

    @staticmethod
    def auto_modes(channel_names: dict) -> list:
        """Per channel: ``per_image`` where nnU-Net would z-score (or min-max) per image, else ``global``."""
        from nnunetv2.preprocessing.normalization.default_normalization_schemes import (RescaleTo01Normalization,
                                                                                        ZScoreNormalization)
        from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import get_normalization_scheme
        modes = []
        for key in sorted(channel_names, key=int):
            scheme = get_normalization_scheme(str(channel_names[key]))
            modes.append("per_image" if scheme in (ZScoreNormalization, RescaleTo01Normalization) else "global")
        return modes

    def fit(self, images) -> "IntensityNormalizer":
        """Fit the ``global`` channels on an iterable of ``[C, ...]`` images (subsampled voxels), and turn the
        ``per_image`` channels to ``per_image_foreground`` if the images are mostly background."""
        rng = np.random.default_rng(0)
        samples = [[] for _ in self.modes]
        foreground_shares = []
        for image in images:
            foreground_shares.append(float(foreground_mask(image).mean()))
            for c, mode in enumerate(self.modes):
                if mode == "global":
                    v = image[c].ravel()
                    if v.size > 200_000:
                        v = v[rng.integers(0, v.size, 200_000)]
                    samples[c].append(v.astype(np.float64))
        if foreground_shares and np.median(foreground_shares) < FOREGROUND_NORMALIZATION_SHARE:
            self.modes = ["per_image_foreground" if mode == "per_image" else mode for mode in self.modes]
        for c, mode in enumerate(self.modes):
            if mode == "global":
                v = np.concatenate(samples[c])
                low, high = np.percentile(v, PERCENTILES)
                v = np.clip(v, low, high)
                self.stats[c] = {"low": float(low), "high": float(high), "mean": float(v.mean()),
                                 "std": float(max(v.std(), 1e-8))}
        return self

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Normalize a ``[C, ...]`` float image (returns a new float32 array)."""
        out = np.empty(image.shape, dtype=np.float32)
        foreground = foreground_mask(image) if "per_image_foreground" in self.modes else None
        if foreground is not None and not foreground.any():
            foreground = np.ones_like(foreground)
        for c, mode in enumerate(self.modes):
            x = image[c].astype(np.float32)
            if mode == "global":
                s = self.stats[c]
                out[c] = (np.clip(x, s["low"], s["high"]) - s["mean"]) / s["std"]
                continue
            region = foreground if mode == "per_image_foreground" else Ellipsis  # the voxels that set the scale
            low, high = np.percentile(x[region], PERCENTILES)
            clipped = np.clip(x, low, high)
            kept = clipped[region]
            mean, std = float(kept.mean()), max(float(kept.std()), 1e-8)
            out[c] = (clipped - mean) / std
            if mode == "per_image_foreground":
                out[c][~foreground] = (low - mean) / std
        return out

    def to_dict(self) -> dict:
        return {"modes": list(self.modes), "stats": list(self.stats), "percentiles": list(PERCENTILES)}

    @classmethod
    def from_dict(cls, d: dict) -> "IntensityNormalizer":
        return cls(d["modes"], d.get("stats"))


# ---- slices and the model's input grid ------------------------------------------------------------------
def foreground_mask(image: np.ndarray) -> np.ndarray:
    """``image [C, *S]`` -> bool ``[*S]``: where any channel is above its minimum over the case."""
    image = np.asarray(image)
    minima = image.reshape(len(image), -1).min(axis=1).reshape(-1, *[1] * (image.ndim - 1))
    return (image > minima).any(axis=0)


def foreground_box(image: np.ndarray, axis: int, min_size: int = 1) -> tuple:
    """Spatial slices ``(z, y, x)`` of the bounding box of :func:`foreground_mask` of ``image [C, Z, Y, X]``.

    Along the two in-slice axes (all but the slice ``axis``) the box is widened around its centre to at least
    ``min_size`` voxels where the image allows (an MAE patch must fit); an image without foreground is its own box.
    """
    mask = foreground_mask(image)
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    box = []
    for a, n in enumerate(mask.shape):
        hits = np.flatnonzero(mask.any(axis=tuple(b for b in range(mask.ndim) if b != a)))
        low, high = int(hits[0]), int(hits[-1]) + 1
        if a != axis and high - low < min(min_size, n):
            grow = min(min_size, n) - (high - low)
            low = min(max(0, low - grow // 2), n - min(min_size, n))
            high = low + min(min_size, n)
        box.append(slice(low, high))
    return tuple(box)


def uncropped(cropped: np.ndarray, box: tuple, shape: tuple, fill) -> np.ndarray:
    """``cropped [K, *box]`` placed into a ``[K, *shape]`` array that holds ``fill`` (broadcast to it) elsewhere."""
    out = np.empty((cropped.shape[0], *shape), dtype=cropped.dtype)
    out[...] = fill
    out[(slice(None), *box)] = cropped
    return out


def to_slices(image: np.ndarray, axis: int) -> np.ndarray:
    """``[C, Z, Y, X]`` -> ``[S, C, A, B]`` slices along spatial ``axis``."""
    return np.moveaxis(image, 1 + axis, 0)


def from_slices(slices: np.ndarray, axis: int) -> np.ndarray:
    """``[S, K, A, B]`` -> ``[K, Z, Y, X]`` (inverse of :func:`to_slices`)."""
    return np.moveaxis(slices, 0, 1 + axis)


def content_size(h: int, w: int, size: int) -> tuple:
    """Size ``(nh, nw)`` of an ``h x w`` slice inside the ``size x size`` model input (long side = size)."""
    f = size / max(h, w)
    return max(1, int(round(h * f))), max(1, int(round(w * f)))


def to_model_grid(slices, size: int) -> torch.Tensor:
    """Resize-and-pad ``[S, C, h, w]`` slices (numpy or tensor) to ``[S, C, size, size]`` float32.

    Content occupies the top-left ``content_size(h, w, size)`` corner; the rest is the per-slice,
    per-channel minimum.
    """
    x = torch.as_tensor(np.ascontiguousarray(slices) if isinstance(slices, np.ndarray) else slices).float()
    s, c, h, w = x.shape
    nh, nw = content_size(h, w, size)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=nh < h or nw < w)
    fill = x.amin(dim=(2, 3), keepdim=True)
    out = fill.expand(s, c, size, size).clone()
    out[:, :, :nh, :nw] = x
    return out


def from_model_grid(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Crop the content of ``[S, K, size, size]`` (see :func:`to_model_grid`) and resize it back to ``h x w``."""
    nh, nw = content_size(h, w, x.shape[-1])
    x = x[:, :, :nh, :nw]
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=nh > h or nw > w)
    return x


def content_mask(h: int, w: int, size: int) -> torch.Tensor:
    """Boolean ``[size, size]``: True where a ``h x w`` slice's content lies on the model grid."""
    nh, nw = content_size(h, w, size)
    m = torch.zeros(size, size, dtype=torch.bool)
    m[:nh, :nw] = True
    return m


def training_slices(image: np.ndarray, normalizer: IntensityNormalizer, spacing, size: int,
                    max_slices: int = None, box: tuple = None) -> tuple:
    """``(slices [S, C, size, size] float16, (h, w), kept)``: normalized model-grid slices of one image for training.

    ``box``: spatial slices to cut the image to after normalizing (:func:`foreground_box`), None for all of it.
    ``(h, w)`` is the slices' size before resizing. Slices without content (constant in every channel,
    e.g. empty slices around a brain) are skipped; with ``max_slices`` an evenly spaced subset is kept.
    ``kept`` lists the indices of the slices kept, along the slice axis (for :func:`labelled_patches`).
    """
    norm = normalizer(image)
    if box is not None:
        norm = norm[(slice(None), *box)]
    sl = to_slices(norm, slice_axis(spacing, image.shape[1:]))
    keep = [i for i in range(sl.shape[0]) if float(sl[i].std(axis=(1, 2)).max()) > 1e-6]
    if max_slices and len(keep) > max_slices:
        keep = [keep[int(i)] for i in np.linspace(0, len(keep) - 1, max_slices).round()]
    hw = tuple(sl.shape[2:])
    if not keep:
        return torch.zeros((0, image.shape[0], size, size), dtype=torch.float16), hw, keep
    return to_model_grid(sl[keep], size).half(), hw, keep


def read_label_mask(reader, label_file) -> np.ndarray:
    """Boolean ``[Z, Y, X]``: where the segmentation ``label_file`` (read with ``reader``) is foreground (label > 0)."""
    check_file_complete(label_file)
    try:
        seg, _ = reader.read_seg(str(label_file))
    except Exception as error:  # readers raise anything from OSError to RuntimeError / AssertionError
        raise MAEImageReadError(f"cannot read label {label_file}: {type(error).__name__}: {error}. Replace the file or "
                                f"remove the case.") from error
    return np.asarray(seg[0]) > 0


def labelled_patches(label_mask: np.ndarray, spacing, kept, size: int, patch_size: int,
                     box: tuple = None) -> torch.Tensor:
    """Boolean ``[S, L]``: which MAE patches of the training slices ``kept`` (see :func:`training_slices`, cut to
    the same ``box``) hold a labelled voxel of ``label_mask`` (``[Z, Y, X]``), ``L = (size / patch_size)^2`` in the
    model's row-major order.

    The mask goes to the model grid like the image (resize-and-pad; padding is unlabelled); a patch counts as
    labelled if any of its pixels is touched by the resized foreground, so a lesion's border stays out too.
    """
    axis = slice_axis(spacing, label_mask.shape)
    if box is not None:
        label_mask = label_mask[box]
    sl = to_slices(label_mask[None].astype(np.float32), axis)[kept]
    h, w = sl.shape[2:]
    nh, nw = content_size(h, w, size)
    grid = torch.zeros(len(kept), 1, size, size)
    grid[:, :, :nh, :nw] = F.adaptive_max_pool2d(torch.from_numpy(np.ascontiguousarray(sl)), (nh, nw))
    return (F.max_pool2d(grid, patch_size) > 0).flatten(1)
