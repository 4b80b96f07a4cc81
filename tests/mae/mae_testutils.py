"""Helpers and fixtures for the MAE tests: tiny nnU-Net raw data sets generated in tmp folders, tiny MAEs.

A module with a unique name (not a ``conftest.py``: a second module named ``conftest`` would shadow
``tests/conftest.py`` for modules that import from it). Test modules import the fixtures they use.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from nnunet_runs import set_nnunet_folders


def smooth_background(rng, shape):
    """A smooth image: a random linear ramp plus a few broad Gaussian bumps, values about 60..160."""
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    img = 110 + sum(rng.uniform(-25, 25) * g for g in grids)
    for _ in range(3):
        centre = [rng.uniform(-1, 1) for _ in shape]
        width = rng.uniform(0.4, 0.9)
        img += rng.uniform(-20, 20) * np.exp(-sum((g - c) ** 2 for g, c in zip(grids, centre)) / (2 * width ** 2))
    return img + rng.normal(0, 1.0, shape)


def blob_mask(shape, centre, radius):
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre)) <= radius ** 2


def make_case(rng, shape, blob: bool):
    img = smooth_background(rng, shape)
    label = np.zeros(shape, dtype=np.uint8)
    if blob:
        radius = min(rng.uniform(4, 7), min(shape) / 5)
        centre = [rng.uniform(min(radius + 2, s / 2), max(s - radius - 2, s / 2)) for s in shape]
        label = blob_mask(shape, centre, radius).astype(np.uint8)
        img = img + 70.0 * label
    return img, label


def write_image(path: Path, array, ending: str, spacing=None, origin=None, direction=None, dtype=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if ending == ".png":
        from skimage import io
        io.imsave(str(path), np.clip(np.round(array), 0, 255).astype(np.uint8), check_contrast=False)
    else:
        import SimpleITK as sitk
        im = sitk.GetImageFromArray(np.asarray(array, dtype=dtype or np.float32))
        if spacing is not None:
            im.SetSpacing(spacing)
        if origin is not None:
            im.SetOrigin(origin)
        if direction is not None:
            im.SetDirection(direction)
        sitk.WriteImage(im, str(path))


def make_raw_dataset(raw: Path, dataset_id: int, name: str = "Blobs", num_cases: int = 12, shape=(48, 56),
                     ending: str = ".png", blobs: bool = True, channels: int = 1, num_test: int = 0, seed: int = 0,
                     geometry: dict = None, channel_name: str = "ultrasound") -> Path:
    """An nnU-Net raw data set with smooth images, half of them with a bright blob (label 1)."""
    rng = np.random.default_rng(seed)
    folder = Path(raw) / f"Dataset{dataset_id:03d}_{name}"
    geometry = geometry or {}
    for i in range(num_cases + num_test):
        split = "Tr" if i < num_cases else "Ts"
        case = f"case_{i:03d}"
        img, label = make_case(rng, shape, blobs and i % 2 == 0)
        for c in range(channels):
            write_image(folder / f"images{split}" / f"{case}_{c:04d}{ending}", img if c == 0 else 255 - img, ending,
                        **geometry)
        if split == "Tr":
            write_image(folder / "labelsTr" / f"{case}{ending}", label, ending, dtype=np.uint8, **geometry)
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {str(c): channel_name for c in range(channels)}, "labels": {"background": 0, "blob": 1},
        "numTraining": num_cases, "file_ending": ending, "name": name}))
    return folder


def tiny_model_config(in_channels=1, img_size=64):
    from nnunetv2_grcsf.mae.model import MAEConfig
    return MAEConfig(in_channels=in_channels, img_size=img_size, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                     decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    """nnUNet_raw / _preprocessed / _results pointing to fresh tmp folders; returns them as Paths."""
    return set_nnunet_folders(monkeypatch, tmp_path)


def snapshot(folder) -> dict:
    """``{relative path: (size, mtime_ns)}`` of every file under ``folder`` (to prove nothing changed)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_command(module_name: str, argv) -> int:
    """Parse ``argv`` with one command module's parser (as nnunetv2_grcsf's cli does) and run it."""
    import argparse
    import importlib

    module = importlib.import_module(f"nnunetv2_grcsf.commands.{module_name}")
    parser = argparse.ArgumentParser(prog="nnunetv2_grcsf")
    module.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([a for a in argv])
    return args.func(args)


_TRAINED = {}


@pytest.fixture(scope="session")
def blob_free_mae(tmp_path_factory):
    """A tiny MAE trained briefly (1 CPU thread) on 16 blob-free smooth 2D PNG images (once per session).

    Returns ``{"checkpoint": Path, "root": Path}``; the checkpoint is independent of any test's env.
    """
    if "blob_free" not in _TRAINED:
        _TRAINED["blob_free"] = _train_blob_free(tmp_path_factory)
    return _TRAINED["blob_free"]


def _train_blob_free(tmp_path_factory):
    from nnunetv2_grcsf.mae.train import TrainConfig, train_mae

    root = tmp_path_factory.mktemp("blob_free_mae")
    with pytest.MonkeyPatch.context() as mp:
        set_nnunet_folders(mp, root)
        make_raw_dataset(root / "nnUNet_raw", 1, "Smooth", num_cases=16, blobs=False, seed=1)
        ckpt = train_mae(1, model_config=tiny_model_config(), train_config=TrainConfig(steps=80, batch_size=8),
                         progress=False, num_threads=1, log=lambda *a: None)
    return {"checkpoint": ckpt, "root": root}


@pytest.fixture
def one_thread():
    """torch on one CPU thread during the test (much faster than two on a busy 2-core machine)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
