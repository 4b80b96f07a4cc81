"""A synthetic lesion data set in nnU-Net raw format, deterministic by seed (the demo's default data).

Each case is a structured background (smooth tissue bands with slowly varying brightness, a
low-frequency texture field and multiplicative speckle, as in ultrasound or MRI) with 0 to 3
lesion-like blobs of varied size, contrast (darker or brighter than their surroundings) and
internal texture, with irregular (noise-modulated) borders. About one case in six has no lesion,
as in real lesion data. Works for 2D (``shape=(H, W)``) and 3D (``shape=(D, H, W)``) from one code
path; images are written as ``.nii.gz`` with SimpleITK so nnU-Net reads spacing and geometry.
"""

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

LESION_LABEL = 1


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to zero mean and unit standard deviation, shape ``shape``."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return (field - field.mean()) / (field.std() + 1e-8)


def _background(rng: np.random.Generator, shape: Sequence[int]) -> np.ndarray:
    """Tissue layers along the first in-plane axis, a texture field and a brightness drift; mean ~0.5."""
    size = max(shape)
    depth_axis = np.linspace(0.0, 1.0, shape[-2]).reshape([-1 if a == len(shape) - 2 else 1 for a in range(len(shape))])
    n_layers = rng.integers(2, 5)
    boundaries = np.sort(rng.uniform(0.1, 0.9, n_layers))
    layer_levels = rng.uniform(0.3, 0.7, n_layers + 1)
    warp = 0.05 * _smooth_field(rng, shape, size / 6)
    layer_index = np.searchsorted(boundaries, np.clip(depth_axis + warp, 0, 1))
    image = layer_levels[layer_index]
    image = ndimage.gaussian_filter(image, 1.5)
    image += 0.06 * _smooth_field(rng, shape, size / 20) + 0.08 * _smooth_field(rng, shape, size / 4)
    return image


def _lesion_mask(rng: np.random.Generator, shape: Sequence[int], radius: float) -> np.ndarray:
    """One blob: an ellipsoid of mean radius ``radius`` (voxels) with a noise-modulated border, random position."""
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    margin = [min(radius * 1.3, s / 2 - 1) for s in shape]
    centre = [rng.uniform(m, s - m) for m, s in zip(margin, shape)]
    axes = radius * rng.uniform(0.6, 1.4, len(shape))
    distance = np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre, axes)))
    border = 1.0 + 0.15 * _smooth_field(rng, shape, max(radius / 2, 1.0))
    return distance < border


def make_lesion_case(rng: np.random.Generator, shape: Sequence[int]) -> tuple:
    """One synthetic case: ``(image float32 of shape `shape`, label uint8 of shape `shape`)``."""
    image = _background(rng, shape)
    label = np.zeros(shape, dtype=np.uint8)
    n_lesions = 0 if rng.random() < 1 / 6 else int(rng.integers(1, 4))
    for _ in range(n_lesions):
        radius = rng.uniform(0.04, 0.14) * min(shape)
        mask = _lesion_mask(rng, shape, radius)
        contrast = rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 0.4)
        texture = 0.08 * _smooth_field(rng, shape, max(radius / 4, 1.0))
        soft = ndimage.gaussian_filter(mask.astype(np.float32), 1.0)
        image = image + soft * (contrast + texture)
        label[mask] = LESION_LABEL
    speckle = rng.gamma(shape=12.0, scale=1 / 12.0, size=shape)
    image = np.clip(image * speckle, 0.0, None) * 100.0
    return image.astype(np.float32), label


def _write(array: np.ndarray, path: Path, spacing: Sequence[float]) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in reversed(spacing)])
    sitk.WriteImage(image, str(path), useCompression=True)


def write_synthetic_dataset(raw_folder, dataset_id: int, name: str = "SyntheticLesions", num_training: int = 40,
                            num_test: int = 10, shape: Sequence[int] = (128, 128), spacing: Sequence[float] = None,
                            seed: int = 0, progress: bool = True) -> Path:
    """Write ``Dataset<id>_<name>`` into ``raw_folder`` (imagesTr, labelsTr, imagesTs, labelsTs, dataset.json).

    ``labelsTs`` holds the test cases' references, for evaluating predictions of ``imagesTs``.
    Refuses to write into an existing data set folder. Returns the data set folder.
    """
    folder = Path(raw_folder) / f"Dataset{dataset_id:03d}_{name}"
    if folder.exists():
        raise FileExistsError(f"{folder} already exists; choose another data set id or remove it yourself")
    spacing = tuple(spacing) if spacing is not None else (1.0,) * len(shape)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    cases = [("imagesTr", "labelsTr", i) for i in range(num_training)]
    cases += [("imagesTs", "labelsTs", num_training + i) for i in range(num_test)]
    for images, labels, index in tqdm(cases, desc=f"writing {folder.name}", disable=not progress):
        image, label = make_lesion_case(rng, shape)
        case = f"{name.lower()}_{index:03d}"
        _write(image, folder / images / f"{case}_0000.nii.gz", spacing)
        _write(label, folder / labels / f"{case}.nii.gz", spacing)
    dataset_json = {
        "channel_names": {"0": "synthetic"},
        "labels": {"background": 0, "lesion": LESION_LABEL},
        "numTraining": num_training,
        "file_ending": ".nii.gz",
        "name": name,
        "description": f"synthetic lesions made by nnunetv2_grcsf.synthetic (seed {seed}, shape {tuple(shape)})",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return folder
