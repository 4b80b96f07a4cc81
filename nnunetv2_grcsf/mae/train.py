"""Training the MAE on an nnU-Net raw data set's images (``nnunetv2_grcsf mae-train``), and its checkpoints.

What is trained on: every image of ``imagesTr``. ``imagesTs`` only with ``include_test_images``
(``--include-test-images``): an MAE that has seen the test images reconstructs them better than new images,
so figures on them would be optimistic. By default (``TrainConfig.skip_labelled_patches``; off with
``--no-skip-labelled-patches``) the loss leaves out every removed patch that holds a labelled voxel of the
case's ``labelsTr`` file: the MAE then learns to reconstruct normal tissue only, so that a lesion is what
it cannot reconstruct, in training images as in new ones (an MAE trained on the lesions of the training
images reconstructs them better than the lesions of new images). The labels serve nothing else; test
images' labels are never read (``imagesTs`` cases added by ``--include-test-images`` keep the full loss).
Ours, after a third-party reading of GRCSF whose MAE is trained on lesion-free patches; the paper's abstract
says only that the MAE models the data set's images. The checkpoint records the folders
read (``training_splits``; :func:`nnunetv2_grcsf.mae.checkpoint_saw_test_images`). Images are read with
nnU-Net's reader, normalized (:class:`~nnunetv2_grcsf.mae.data.IntensityNormalizer`, fitted here and stored in the
checkpoint), cut to their foreground box (``crop_to_foreground``, :func:`~nnunetv2_grcsf.mae.data.foreground_box`),
cut into slices along the lowest-resolution axis, resized-and-padded to the model input.
The slices are kept in memory as float16 (``N * C * img_size^2 * 2`` bytes; use ``max_slices_per_case``
for large 3D data sets). A case whose slices are smaller than one patch (``patch_size`` voxels) along
either axis is refused. The checkpoint's ``data`` records the median in-slice spacing of the training
images (``in_slice_spacing``: the two spacings of the slice plane, in slice-array order), against which
:mod:`.residuals` compares the images it is given.

Optimization (ours, for short budgets; the paper trains 800-1600 epochs): AdamW (betas 0.9/0.95,
weight decay 0.05 on weight matrices only, as in MAE), learning rate with linear warm-up (5 % of the
steps) then cosine decay to 0; random horizontal flips (and, with ``max_shift_patches``, random shifts by whole
patches: :func:`random_shifts`); batches from a per-epoch random permutation;
each step masks at one of ``mask_ratios`` (default 0.5 and 0.75, the ratios the residual maps use),
taken in turn.
All randomness of step ``t`` comes from generators seeded by ``(seed, t)`` (and the permutation from
``(seed, epoch)``), so a resumed run continues exactly like an uninterrupted one. AMP on CUDA
(bfloat16 where supported, else float16 with a gradient scaler).

Output folder (never inside the raw data set): ``$nnUNet_results/<DatasetXXX_Name>/nnunetv2_grcsf_mae/``
unless given. It holds ``checkpoint_latest.pth`` (every ``save_every`` steps and on Ctrl-C),
``checkpoint_final.pth`` (at the end) and ``training_log.json``. Checkpoints are written to a temporary
file and renamed, so an interrupted save never leaves a truncated checkpoint behind.

After training, :func:`calibrate_residual_scale` fixes the residual scale stored in the checkpoint (see
:mod:`.residuals`) and :func:`reconstruction_check` measures, on a few training slices, how much better
than each slice's mean intensity the MAE reconstructs masked patches (PSNR gap, stored in the checkpoint;
a warning under ``PSNR_GAP_WARNING_DB``).

Arguments are checked before anything is read or written (:meth:`TrainConfig.check`); the output folder
is created with the first checkpoint, so a run that fails before it leaves no folder behind.
"""

import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from nnunetv2_grcsf import __version__
from nnunetv2_grcsf.mae import (CHANNEL_TOKEN_TRAINING, DEFAULT_STEPS, DEFAULT_TRAINING, DEFAULT_TRAINING_SPLITS,
                                PRESETS, TRAINING_SPLITS_KEY, MAECheckpointError, MAEDatasetError, MAEError,
                                MAEOutputExistsError)
from nnunetv2_grcsf.mae import data as mdata
from nnunetv2_grcsf.mae.model import (DictRoundTrip, MAEConfig, MaskedAutoencoder, complementary_masks,
                                      convert_state_dict, masked_reconstruction, random_mask)

CHECKPOINT_FORMAT = "nnunetv2_grcsf.mae"
CHECKPOINT_VERSION = 1
DEFAULT_SUBFOLDER = "nnunetv2_grcsf_mae"
LATEST = "checkpoint_latest.pth"
FINAL = "checkpoint_final.pth"
CALIBRATION_RATIO = 0.75
CALIBRATION_MAX_SLICES = 64
#: mae-train warns when its reconstruction beats the mean image by less than this many dB (PSNR).
PSNR_GAP_WARNING_DB = 1.0
RECONSTRUCTION_CHECK_SLICES = 32


@dataclass
class TrainConfig(DictRoundTrip):
    """Optimization settings (stored in the checkpoint). ``steps`` wins over ``epochs``. ``steps``, ``lr`` and
    ``max_shift_patches`` left ``None`` take the defaults of the MAE they train (:meth:`with_defaults`)."""

    steps: int = None
    epochs: float = None
    batch_size: int = 16
    lr: float = None
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    mask_ratios: tuple = (0.5, 0.75)
    seed: int = 0
    save_every: int = 100
    flip: bool = True
    max_slices_per_case: int = None
    skip_labelled_patches: bool = True
    max_shift_patches: int = None
    crop_to_foreground: bool = True

    def __post_init__(self):
        self.mask_ratios = tuple(float(r) for r in self.mask_ratios)

    def with_defaults(self, channel_tokens: bool) -> "TrainConfig":
        """A copy whose unset ``steps``, ``lr`` and ``max_shift_patches`` take mae-train's defaults: for an MAE with
        channel tokens :data:`~nnunetv2_grcsf.mae.CHANNEL_TOKEN_TRAINING`, else
        :data:`~nnunetv2_grcsf.mae.DEFAULT_TRAINING` (``steps`` stays unset when ``epochs`` is given)."""
        defaults = CHANNEL_TOKEN_TRAINING if channel_tokens else DEFAULT_TRAINING
        return replace(self, **{name: value for name, value in defaults.items() if getattr(self, name) is None
                                and not (name == "steps" and self.epochs is not None)})

    @classmethod
    def from_dict(cls, d: dict):
        if "mask_ratios" not in d and "mask_ratio" in d:  # checkpoints of version 1 trained at one ratio
            d = {**d, "mask_ratios": [d["mask_ratio"]]}
        # older checkpoints trained on every patch, without shifts, on whole images
        return super().from_dict({"skip_labelled_patches": False, "max_shift_patches": 0, "crop_to_foreground": False,
                                  **d})

    def check(self) -> None:
        """:class:`MAEError` naming the command-line option of the first setting out of range."""
        problems = []
        if self.steps is not None and self.steps < 1:
            problems.append(f"--steps {self.steps}: give at least 1 optimizer step")
        if self.epochs is not None and not self.epochs > 0:
            problems.append(f"--epochs {self.epochs}: give a positive number of passes")
        if self.batch_size < 1:
            problems.append(f"--batch-size {self.batch_size}: give at least 1 slice per step")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"--lr {self.lr}: the learning rate must be a positive number (e.g. 1e-3)")
        if not self.mask_ratios or any(not 0.0 < r < 1.0 for r in self.mask_ratios):
            problems.append(f"--mask-ratios {' '.join(f'{r:g}' for r in self.mask_ratios)}: each must be between 0 "
                            f"and 1 (exclusive)")
        if self.save_every < 1:
            problems.append(f"--save-every {self.save_every}: give at least 1")
        if self.max_shift_patches is not None and self.max_shift_patches < 0:
            problems.append(f"--max-shift {self.max_shift_patches}: give 0 (no shifts) or more patches")
        if self.max_slices_per_case is not None and self.max_slices_per_case < 1:
            problems.append(f"--max-slices-per-case {self.max_slices_per_case}: give at least 1")
        if problems:
            raise MAEError("invalid mae-train arguments: " + "; ".join(problems))


def model_config_from_preset(preset: str = "tiny", in_channels: int = 1, **overrides) -> MAEConfig:
    """An :class:`MAEConfig` from a named preset with ``None``-free overrides applied; channel tokens unless
    overridden when there are several channels."""
    if preset not in PRESETS:
        raise MAEError(f"unknown MAE preset {preset!r}; choose one of {sorted(PRESETS)}")
    kwargs = {**PRESETS[preset], "channel_tokens": in_channels > 1,
              **{k: v for k, v in overrides.items() if v is not None}, "in_channels": in_channels}
    try:
        return MAEConfig(**kwargs)
    except (TypeError, ValueError) as error:
        raise MAEError(f"invalid MAE architecture {kwargs}: {error}") from error


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> ``cuda`` if available else ``cpu``; checks that a requested CUDA device exists."""
    device = (device or "auto").lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as error:
        raise MAEError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from error
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MAEError(f"device {device!r} requested but CUDA is not available here; use --device cpu (or auto)")
    return dev


def auto_num_threads() -> int:
    """torch's CPU thread count, lowered to the cores that are idle now (1-minute load average), at least 1.

    On a shared machine whose load exceeds its cores, torch's default (one thread per core) makes
    the threads wait on each other: on the 2-core development machine under load 12, one MAE
    training step took 0.2 s with one thread and 1.8-3 s with two. Used by the command line when
    ``--num-threads`` is not given.
    """
    n = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return n
    idle = (os.cpu_count() or n) - load
    return max(1, min(n, int(math.floor(idle + 0.5))))


class torch_threads:
    """Context manager: ``torch.set_num_threads(n)`` inside, the previous count restored after (no-op for None)."""

    def __init__(self, n):
        self.n = int(n) if n else None

    def __enter__(self):
        self.previous = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        if self.n:
            torch.set_num_threads(self.previous)
        return False


def autocast_context(device: torch.device):
    """bfloat16/float16 autocast on CUDA, nothing elsewhere."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


# ---- checkpoints ------------------------------------------------------------------------------------
def save_checkpoint(state: dict, path) -> None:
    """Write atomically: a temporary file in the same folder, flushed to disk, then renamed over ``path``.

    An interruption (Ctrl-C, SIGTERM turned into an exception, a full disk) removes the temporary file and
    leaves ``path`` as it was. Creates the folder if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load and check an MAE checkpoint; :class:`MAECheckpointError` if it is not ours or is damaged."""
    path = Path(path)
    if not path.is_file():
        raise MAECheckpointError(f"MAE checkpoint {path} does not exist. Train one with `nnunetv2_grcsf mae-train -d "
                                 f"DATASET` (it writes .../nnunetv2_grcsf_mae/{FINAL}) or give the right path.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, pickle of foreign objects, not a torch file at all
        raise MAECheckpointError(f"{path} cannot be loaded as an nnunetv2_grcsf MAE checkpoint "
                                 f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
                                 f"It is truncated, corrupt or not a checkpoint written by `nnunetv2_grcsf mae-train`; "
                                 f"retrain or use another checkpoint.") from error
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise MAECheckpointError(f"{path} is not an nnunetv2_grcsf MAE checkpoint (no '{CHECKPOINT_FORMAT}' format "
                                 f"marker; an nnU-Net model checkpoint or another MAE will not do). Train one with "
                                 f"`nnunetv2_grcsf mae-train -d DATASET`.")
    if ckpt.get("format_version", 0) > CHECKPOINT_VERSION:
        raise MAECheckpointError(f"{path} was written by a newer nnunetv2_grcsf (checkpoint format "
                                 f"{ckpt.get('format_version')}); upgrade nnunetv2-grcsf.")
    missing = [k for k in ("model_config", "model_state", "normalization", "data", "step") if k not in ckpt]
    if missing:
        raise MAECheckpointError(f"{path} is an incomplete MAE checkpoint (missing {missing}); retrain.")
    return ckpt


def model_from_checkpoint(ckpt: dict, device="cpu") -> MaskedAutoencoder:
    """The :class:`MaskedAutoencoder` of a loaded checkpoint, in eval mode (older parameter names converted)."""
    model = MaskedAutoencoder(MAEConfig.from_dict(ckpt["model_config"]))
    state = convert_state_dict(ckpt["model_state"])
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or mismatched:
        details = "; ".join(f"{what} {len(keys)} (e.g. {keys[0]})" for what, keys in
                            (("missing", missing), ("unexpected", unexpected), ("other shape", mismatched)) if keys)
        raise MAECheckpointError(f"the MAE checkpoint's weights do not fit its own architecture ({details}); retrain "
                                 f"it with `nnunetv2_grcsf mae-train -d DATASET --overwrite`")
    model.load_state_dict(state)
    return model.to(device).eval()


def untrained_checkpoint(ckpt: dict, seed: int = 0) -> dict:
    """A copy of ``ckpt`` whose weights are a fresh initialization (seeded) of the same architecture.

    Its residuals are the "untrained MAE" baseline of the report: same settings, nothing learned.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MaskedAutoencoder(MAEConfig.from_dict(ckpt["model_config"]))
    return {**ckpt, "model_state": model.state_dict(), "step": 0, "optimizer_state": None}


def default_output_folder(dataset_name: str) -> Path:
    results = os.environ.get("nnUNet_results")
    if not results:
        raise MAEError("nnUNet_results is not set, so there is no default place for the MAE checkpoint: set it "
                       "(`export nnUNet_results=/data/nnUNet_results`) or pass -o OUTPUT_FOLDER.")
    return Path(results) / dataset_name / DEFAULT_SUBFOLDER


# ---- schedule and sampling ----------------------------------------------------------------------------
def learning_rate(step: int, total: int, base_lr: float, warmup_fraction: float) -> float:
    warmup = max(1, int(round(total * warmup_fraction)))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _step_generator(seed: int, key: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(key)) % (2 ** 63))


def batch_indices(step: int, num_slices: int, batch_size: int, seed: int, _cache={}) -> torch.Tensor:
    """Indices of the slices in batch ``step``: consecutive chunks of a per-epoch random permutation."""
    per_epoch = max(1, num_slices // batch_size)
    epoch, i = divmod(step, per_epoch)
    key = (seed, num_slices, epoch)
    if key not in _cache:
        _cache.clear()
        _cache[key] = torch.randperm(num_slices, generator=_step_generator(seed, -1 - epoch))
    return _cache[key][i * batch_size:(i + 1) * batch_size]


def total_steps(config: TrainConfig, num_slices: int) -> int:
    if config.steps:
        return int(config.steps)
    if config.epochs:
        return max(1, int(round(config.epochs * max(1, num_slices // config.batch_size))))
    return DEFAULT_STEPS


# ---- data -------------------------------------------------------------------------------------------
def training_splits(include_test_images: bool = False) -> tuple:
    """The raw data set folders mae-train reads: ``imagesTr``, plus ``imagesTs`` if ``include_test_images``."""
    return DEFAULT_TRAINING_SPLITS + (("imagesTs",) if include_test_images else ())


def dataset_images(dataset, splits=DEFAULT_TRAINING_SPLITS) -> tuple:
    """``(name, folder, dataset_json, cases {id: files}, reader)`` for training on the folders ``splits``."""
    name, folder = mdata.resolve_raw_dataset(dataset)
    dataset_json = mdata.load_dataset_json(folder)
    ending = dataset_json["file_ending"]
    cases = {}
    for sub in splits:
        mdata.check_no_misnamed_files(folder / sub, ending)
        found = mdata.list_cases(folder / sub, ending)
        mdata.check_case_channels(found, len(mdata.channel_names_of(dataset_json)), folder / sub)
        cases.update({f"{sub}/{k}": v for k, v in found.items()})
    if not cases:
        raise MAEDatasetError(f"{folder} has no images (CASE_XXXX{ending}) in {' or '.join(splits)}")
    reader = mdata.reader_for(dataset_json, example_file=next(iter(cases.values()))[0])
    return name, folder, dataset_json, cases, reader


def training_label_files(folder: Path, cases: dict, file_ending: str) -> dict:
    """``{case: labelsTr file}`` for the ``imagesTr`` cases of ``cases`` (keys ``split/id``); ``None`` for others.

    Only ``labelsTr`` is ever read: test images' labels never reach the MAE. A missing label is an error.
    """
    files = {}
    for case in cases:
        split, case_id = case.split("/", 1)
        files[case] = folder / "labelsTr" / f"{case_id}{file_ending}" if split == "imagesTr" else None
        if files[case] is not None and not files[case].is_file():
            raise MAEDatasetError(f"mae-train leaves labelled patches out of its loss and needs the label of every "
                                  f"training image, but {files[case]} is missing: add it (nnU-Net expects one per "
                                  f"imagesTr case), or train on every patch with --no-skip-labelled-patches")
    return files


def load_training_slices(cases: dict, reader, normalizer: mdata.IntensityNormalizer, img_size: int, patch_size: int,
                         num_channels: int, max_slices_per_case=None, fit: bool = True, progress: bool = True,
                         label_files: dict = None, crop_to_foreground: bool = False):
    """Read every case, fit the normalizer's global channels (if ``fit``), return slices and metadata.

    With ``crop_to_foreground`` each image is cut to its :func:`~.data.foreground_box` after normalizing.

    Returns ``(slices [N, C, img_size, img_size] float16, sizes [(h, w)] per slice, image dim 2 or 3,
    median in-slice spacing (a, b), labelled [N, L] bool or None)``: ``labelled`` (with ``label_files``, see
    :func:`training_label_files`) marks the MAE patches holding a labelled voxel (:func:`~.data.labelled_patches`;
    none for cases whose label file is ``None``). Refuses cases whose slices are smaller than ``patch_size``.
    """
    from tqdm import tqdm

    images = []
    dims = set()
    for case, files in tqdm(cases.items(), desc="reading images", unit="case", disable=not progress):
        image, props = mdata.read_case(reader, files, case)
        if image.shape[0] != num_channels:
            raise MAEDatasetError(f"case {case} has {image.shape[0]} channels, dataset.json declares {num_channels}")
        mdata.check_slices_fit_patch(
            image.shape[1:], props["spacing"], patch_size, f"case {case!r} ({files[0]})",
            "model_config.patch_size: --patch-size, or the --preset's patch_size",
            f"remove the case, or train with a smaller --patch-size (it must divide --image-size {img_size})")
        label_file = (label_files or {}).get(case)
        label = mdata.read_label_mask(reader, label_file) if label_file is not None else None
        if label is not None and label.shape != image.shape[1:]:
            raise MAEDatasetError(f"{label_file} has shape {label.shape}, its image {files[0]} {image.shape[1:]}: "
                                  f"fix the label, or train on every patch with --no-skip-labelled-patches")
        dims.add(mdata.image_dim(image))
        images.append((image, props["spacing"], label))
    if len(dims) > 1:
        raise MAEDatasetError("the data set mixes 2D and 3D images; the MAE needs one kind")
    if fit:
        step = max(1, len(images) // mdata.GLOBAL_FIT_MAX_CASES)
        normalizer.fit(img for img, _, _ in images[::step])
    slices, sizes, labelled = [], [], []
    num_patches = (img_size // patch_size) ** 2
    for image, spacing, label in images:
        box = mdata.foreground_box(image, mdata.slice_axis(spacing, image.shape[1:]), patch_size) \
            if crop_to_foreground else None
        s, hw, kept = mdata.training_slices(image, normalizer, spacing, img_size, max_slices_per_case, box)
        slices.append(s)
        sizes += [hw] * s.shape[0]
        if label_files:
            labelled.append(mdata.labelled_patches(label, spacing, kept, img_size, patch_size, box)
                            if label is not None else torch.zeros(s.shape[0], num_patches, dtype=torch.bool))
    slices = torch.cat(slices)
    if slices.shape[0] == 0:
        raise MAEDatasetError("no image of the data set has any non-constant slice to train on")
    spacing = np.median([mdata.in_slice_spacing(sp, img.shape[1:]) for img, sp, _ in images], axis=0)
    return slices, sizes, dims.pop(), tuple(float(v) for v in spacing), torch.cat(labelled) if label_files else None


# ---- calibration --------------------------------------------------------------------------------------
@torch.no_grad()
def calibrate_residual_scale(model: MaskedAutoencoder, slices: torch.Tensor, sizes, device, seed: int = 0,
                             batch_size: int = 16) -> float:
    """The residual scale stored in the checkpoint: 1.5 x the 99.9th percentile of residuals on training slices.

    Residual as in :mod:`.residuals` (channel mean of ``|x - x_hat|`` with complementary masks at mask
    ratio 0.75, no smoothing), over the image content (padding excluded) of up to 64 evenly spaced slices.
    """
    model.eval()
    n = slices.shape[0]
    idx = np.unique(np.linspace(0, n - 1, min(n, CALIBRATION_MAX_SLICES)).round().astype(int))
    values = []
    gen = _step_generator(seed, -(10 ** 9))
    for start in range(0, len(idx), batch_size):
        chunk = idx[start:start + batch_size]
        x = slices[torch.as_tensor(chunk)].float().to(device)
        with autocast_context(device):
            recon = masked_reconstruction(model, x, CALIBRATION_RATIO, generator=gen)
        res = (x - recon).abs().mean(dim=1).cpu()
        for j, i in enumerate(chunk):
            h, w = sizes[i]
            values.append(res[j][mdata.content_mask(h, w, x.shape[-1])].numpy())
    v = np.concatenate(values)
    return float(max(1.5 * np.percentile(v, 99.9), 1e-3))


@torch.no_grad()
def reconstruction_check(model: MaskedAutoencoder, slices: torch.Tensor, sizes, device, mask_ratio: float,
                         seed: int = 0) -> dict:
    """How much better than the mean image the MAE reconstructs masked patches, on a few training slices.

    Up to ``RECONSTRUCTION_CHECK_SLICES`` evenly spaced slices; per slice the PSNR (peak: the slice's range)
    of the reconstruction (every pixel predicted while masked, :func:`masked_reconstruction`) and of the
    slice's per-channel mean, over the slice's foreground (content pixels where any channel is above its
    minimum, so that the constant background around a skull-stripped brain does not count). Returns the
    medians and the median gap in dB, and the same for interpolating the masked patches from the visible pixels
    (:func:`~.residuals.interpolated_reconstruction`, same masks).
    """
    from nnunetv2_grcsf.mae.report import reconstruction_psnr
    from nnunetv2_grcsf.mae.residuals import interpolated_reconstruction

    model.eval()
    n = slices.shape[0]
    idx = np.unique(np.linspace(0, n - 1, min(n, RECONSTRUCTION_CHECK_SLICES)).round().astype(int))
    x = slices[torch.as_tensor(idx)].float().to(device)
    masks = complementary_masks(len(idx), model.config.num_tokens, mask_ratio,
                                generator=_step_generator(seed, -(10 ** 9) - 1),
                                tokens_per_patch=model.config.tokens_per_patch)
    with autocast_context(device):
        recon = masked_reconstruction(model, x, masks=masks)
    interpolated = interpolated_reconstruction(x, masks, model.config.patch_size,
                                               model.config.tokens_per_patch).cpu().numpy()
    x, recon = x.cpu().numpy(), recon.float().cpu().numpy()
    triples = []
    for j, i in enumerate(idx):
        where = mdata.content_mask(*sizes[i], x.shape[-1]).numpy() & mdata.foreground_mask(x[j])
        pair = reconstruction_psnr(x[j], recon[j], where)
        if pair is not None:
            triples.append((*pair, reconstruction_psnr(x[j], interpolated[j], where)[0]))
    if not triples:
        return {}
    rec, mean, interpolation = np.array(triples).T
    return {"slices": len(triples), "mask_ratio": mask_ratio, "median_psnr_reconstruction": float(np.median(rec)),
            "median_psnr_mean_image": float(np.median(mean)), "median_psnr_gap_db": float(np.median(rec - mean)),
            "median_psnr_interpolation": float(np.median(interpolation)),
            "median_interpolation_gap_db": float(np.median(interpolation - mean))}


def reconstruction_warning(check: dict, dataset_name: str):
    """A warning (str) when the reconstruction gains less than ``PSNR_GAP_WARNING_DB`` over the mean image."""
    gap = check.get("median_psnr_gap_db")
    if gap is None or gap >= PSNR_GAP_WARNING_DB:
        return None
    interpolation = check.get("median_interpolation_gap_db")
    beside = "" if interpolation is None else \
        f"; interpolating them from the visible pixels, with no model, gains {interpolation:+.2f} dB"
    return (f"warning: the MAE reconstructs masked patches of its training slices only {gap:+.2f} dB (PSNR, median) "
            f"better than each slice's mean intensity (under {PSNR_GAP_WARNING_DB:g} dB{beside}): it has learned "
            f"little more than the mean, and its residual maps will mostly show |image - mean|. Train longer "
            f"(`nnunetv2_grcsf mae-train -d {dataset_name} --resume --steps N` with a larger N), with the tiny "
            f"preset's --pixel-loss, or with a larger --preset on a GPU")


# ---- training -----------------------------------------------------------------------------------------
def random_flips(x: torch.Tensor, excluded, generator: torch.Generator) -> tuple:
    """Flip each slice of ``x`` ``[N, C, S, S]`` left-right with probability 0.5, and its patch flags ``excluded``
    (``[N, L]`` bool in the model's row-major patch order, or ``None``) alike."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if excluded is not None:
        grid = excluded.reshape(excluded.shape[0], -1, math.isqrt(excluded.shape[1]))
        excluded = torch.where(flip[:, None, None], grid.flip(-1), grid).flatten(1)
    return x, excluded


def random_shifts(x: torch.Tensor, excluded, max_shift: int, patch_size: int, generator: torch.Generator) -> tuple:
    """Shift each slice of ``x`` ``[N, C, S, S]`` by a random whole number of patches, up to ``max_shift`` per axis,
    filling with the slice's per-channel minimum (the model grid's background, :func:`~.data.to_model_grid`), and
    its patch flags ``excluded`` (``[N, L]`` bool, or ``None``) alike (patches shifted in are not excluded).
    Whole patches keep the patch grid on the content, so the flags stay exact."""
    if max_shift < 1:
        return x, excluded
    shifts = torch.randint(-max_shift, max_shift + 1, (x.shape[0], 2), generator=generator).tolist()

    def shifted(t: torch.Tensor, unit: int, fill: torch.Tensor) -> torch.Tensor:
        """``t`` ``[N, ..., S, S]`` with slice i moved by ``shifts[i]`` units of ``unit`` pixels, ``fill`` around."""
        margin, size = max_shift * unit, t.shape[-1]
        padded = fill.expand(*t.shape[:-2], size + 2 * margin, size + 2 * margin).clone()
        padded[..., margin:-margin, margin:-margin] = t
        return torch.stack([padded[i, ..., margin - dy * unit:margin - dy * unit + size,
                                   margin - dx * unit:margin - dx * unit + size] for i, (dy, dx) in enumerate(shifts)])

    x = shifted(x, patch_size, x.amin(dim=(2, 3), keepdim=True))
    if excluded is not None:
        side = math.isqrt(excluded.shape[1])
        excluded = shifted(excluded.reshape(-1, side, side), 1, excluded.new_zeros(())).flatten(1)
    return x, excluded


def _param_groups(model, weight_decay):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name.endswith(("cls_token", "mask_token")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def prepare_output_folder(output_folder: Path, raw_dataset_folder: Path, resume: bool, overwrite: bool) -> tuple:
    """Refuse folders inside the raw data set and existing checkpoints (unless resume/overwrite).

    Returns ``(folder, replaced)``: ``replaced`` lists the checkpoints ``overwrite`` will remove once the new
    run has written its first checkpoint (so a run that fails early leaves the old ones in place). Creates
    nothing: :func:`save_checkpoint` creates the folder.
    """
    out = Path(output_folder).resolve()
    raw = Path(raw_dataset_folder).resolve()
    if out == raw or raw in out.parents:
        raise MAEError(f"the MAE output folder {out} is inside the raw data set {raw}; never write there. "
                       f"Use the default ($nnUNet_results/...) or another -o.")
    if out.exists() and not out.is_dir():
        raise MAEError(f"the MAE output folder {out} is a file; choose another -o")
    existing = [p for p in (out / LATEST, out / FINAL) if p.exists()]
    if existing and not resume and not overwrite:
        raise MAEOutputExistsError(f"{out} already holds an MAE checkpoint ({existing[0].name}). Pass --resume to "
                                   f"continue training, --overwrite to start over, or choose another -o.")
    return out, ([] if resume else existing)


def train_mae(dataset, output_folder=None, model_config: MAEConfig = None, train_config: TrainConfig = None,
              device: str = "auto", resume: bool = False, overwrite: bool = False, progress: bool = True,
              num_threads: int = None, stop_after_steps: int = None, log=print, include_test_images: bool = False,
              check_reconstruction: bool = True) -> Path:
    """Train an MAE on the images of raw data set ``dataset`` (id or name); returns the final checkpoint path.

    ``model_config``: architecture (default preset ``tiny`` with the data set's channel count).
    ``resume``: continue from ``checkpoint_latest.pth`` (architecture, normalization and settings from the
    checkpoint; ``train_config.steps``/``epochs``, if set, may extend the run). ``stop_after_steps``
    stops (with a checkpoint) after that many steps in this call: for tests of resuming.
    ``num_threads``: torch CPU threads during this call (restored afterwards). ``include_test_images``: read
    ``imagesTs`` too (recorded in the checkpoint; a resumed run keeps the folders of the run it continues).
    ``check_reconstruction``: run :func:`reconstruction_check` at the end (and warn if the gap is small).
    """
    if train_config is not None:
        train_config.check()
    if num_threads is not None and num_threads < 1:
        raise MAEError(f"--num-threads {num_threads}: give at least 1")
    with torch_threads(num_threads):
        return _train_mae(dataset, output_folder, model_config, train_config, device, resume, overwrite, progress,
                          stop_after_steps, log, include_test_images, check_reconstruction)


def _train_mae(dataset, output_folder, model_config, train_config, device, resume, overwrite, progress,
               stop_after_steps, log, include_test_images, check_reconstruction) -> Path:
    dev = resolve_device(device)
    name, raw_folder = mdata.resolve_raw_dataset(dataset)
    out, replaced = prepare_output_folder(Path(output_folder) if output_folder else default_output_folder(name),
                                          raw_folder, resume, overwrite)

    ckpt = None
    if resume:
        src = out / LATEST if (out / LATEST).exists() else out / FINAL
        if src.exists():
            ckpt = load_checkpoint(src)
            if ckpt["data"].get("dataset_name") != name:
                raise MAEError(f"{src} was trained on {ckpt['data'].get('dataset_name')}, not {name}; "
                               f"resume with the same data set or choose another -o")
            log(f"resuming from {src} at step {ckpt['step']}")
        else:
            log(f"nothing to resume in {out}: starting a new training")
    splits = tuple(ckpt.get(TRAINING_SPLITS_KEY) or training_splits(True)) if ckpt is not None else \
        training_splits(include_test_images)
    if ckpt is not None and include_test_images and "imagesTs" not in splits:
        raise MAEError(f"{out} holds a training on {', '.join(splits)} only; --include-test-images cannot be added "
                       f"when resuming (start over with --overwrite, or drop the flag)")
    name, raw_folder, dataset_json, cases, reader = dataset_images(dataset, splits)
    num_channels = len(mdata.channel_names_of(dataset_json))
    if ckpt is not None:
        model_config = MAEConfig.from_dict(ckpt["model_config"])
        stored = TrainConfig.from_dict(ckpt["train_config"])
        if train_config is not None and (train_config.steps or train_config.epochs):
            stored.steps, stored.epochs = train_config.steps, train_config.epochs
        train_config = stored
        normalizer = mdata.IntensityNormalizer.from_dict(ckpt["normalization"])
    else:
        model_config = model_config or model_config_from_preset("tiny", num_channels)
        train_config = (train_config or TrainConfig()).with_defaults(model_config.channel_tokens)
        normalizer = mdata.IntensityNormalizer(mdata.IntensityNormalizer.auto_modes(mdata.channel_names_of(dataset_json)))
    if model_config.in_channels != num_channels:
        raise MAEError(f"the MAE architecture has {model_config.in_channels} input channels but {name} has "
                       f"{num_channels}")

    label_files = training_label_files(raw_folder, cases, dataset_json["file_ending"]) \
        if train_config.skip_labelled_patches else None
    slices, sizes, dim, spacing, labelled = load_training_slices(
        cases, reader, normalizer, model_config.img_size, model_config.patch_size, num_channels,
        train_config.max_slices_per_case, fit=ckpt is None, progress=progress, label_files=label_files,
        crop_to_foreground=train_config.crop_to_foreground)
    n = slices.shape[0]
    total = total_steps(train_config, n)
    labelled_share = float(labelled.float().mean()) if labelled is not None else None
    log(f"MAE on {name} ({' + '.join(splits)}): {len(cases)} images ({dim}D), {n} training slices of "
        f"{model_config.img_size}^2, {total} steps of batch {train_config.batch_size} at lr {train_config.lr:g}, "
        f"{'channel tokens, ' if model_config.channel_tokens else ''}"
        f"{f'shifts up to {train_config.max_shift_patches} patches, ' if train_config.max_shift_patches else ''}"
        f"mask ratios {' and '.join(f'{r:g}' for r in train_config.mask_ratios)}, "
        f"{'' if labelled is None else f'loss outside labelled regions ({labelled_share:.1%} of patches left out), '}"
        f"device {dev}"
        f"{f' ({torch.get_num_threads()} CPU thread(s))' if dev.type == 'cpu' else ''}; "
        f"output {out}")

    torch.manual_seed(train_config.seed)
    model = MaskedAutoencoder(model_config).to(dev)
    optimizer = torch.optim.AdamW(_param_groups(model, train_config.weight_decay), lr=train_config.lr,
                                  betas=(0.9, 0.95))
    use_scaler = dev.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    step, history, elapsed = 0, [], 0.0
    if ckpt is not None:
        model.load_state_dict(convert_state_dict(ckpt["model_state"]))
        if "optimizer_state" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer_state"])
        step, history, elapsed = int(ckpt["step"]), list(ckpt.get("loss_history", [])), float(ckpt.get("train_seconds", 0))

    data_info = {"dataset_name": name, "file_ending": dataset_json["file_ending"], "num_channels": num_channels,
                 "channel_names": mdata.channel_names_of(dataset_json), "image_dim": dim, "num_cases": len(cases),
                 "num_slices": n, "reader_writer": type(reader).__name__, "in_slice_spacing": list(spacing),
                 "labelled_patch_share": labelled_share}

    def state(complete: bool, residual_scale=None) -> dict:
        return {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                "nnunetv2_grcsf_version": __version__, "model_config": model_config.to_dict(),
                "model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
                "train_config": {**train_config.to_dict(), "total_steps": total}, "normalization": normalizer.to_dict(),
                "data": data_info, TRAINING_SPLITS_KEY: list(splits), "step": step, "complete": complete,
                "loss_history": history, "train_seconds": elapsed, "residual_scale": residual_scale,
                "reconstruction_check": check}

    def save(complete: bool, path: Path, residual_scale=None) -> None:
        save_checkpoint(state(complete, residual_scale), path)
        while replaced:  # --overwrite: the old checkpoints go once the new run has one of its own
            old = replaced.pop()
            if old != path:
                old.unlink(missing_ok=True)

    check = ckpt.get("reconstruction_check") if ckpt is not None else None

    from tqdm import tqdm

    bar = tqdm(total=total, initial=min(step, total), desc="MAE training", unit="step", disable=not progress)
    run_start, ema, steps_this_call = time.time(), None, 0
    model.train()
    try:
        while step < total:
            if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                save(False, out / LATEST)
                bar.close()
                log(f"stopped after {steps_this_call} steps (step {step} of {total}); resume with --resume")
                return out / LATEST
            gen = _step_generator(train_config.seed, step)
            idx = batch_indices(step, n, train_config.batch_size, train_config.seed)
            x = slices[idx].float()
            excluded = labelled[idx] if labelled is not None else None
            if train_config.flip:
                x, excluded = random_flips(x, excluded, gen)
            x, excluded = random_shifts(x, excluded, train_config.max_shift_patches, model_config.patch_size, gen)
            if excluded is not None:
                excluded = excluded.to(dev)
            ratio = train_config.mask_ratios[step % len(train_config.mask_ratios)]
            mask = random_mask(x.shape[0], model_config.num_tokens, ratio, generator=gen,
                               tokens_per_patch=model_config.tokens_per_patch)
            x, mask = x.to(dev, non_blocking=True), mask.to(dev)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total, train_config.lr, train_config.warmup_fraction)
            with autocast_context(dev):
                loss = model(x, mask=mask, excluded=excluded)["loss"]
            if not torch.isfinite(loss):
                raise MAEError(f"MAE training diverged at step {step} (loss {loss.item()}); lower --lr")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            step += 1
            steps_this_call += 1
            value = float(loss.detach())
            ema = value if ema is None else 0.95 * ema + 0.05 * value
            history.append([step, value])
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.4f}")
            if step % max(1, train_config.save_every) == 0 and step < total:
                elapsed_now = elapsed + time.time() - run_start
                elapsed, run_start = elapsed_now, time.time()
                save(False, out / LATEST)
    except KeyboardInterrupt:
        elapsed += time.time() - run_start
        save(False, out / LATEST)
        bar.close()
        log(f"interrupted: saved {out / LATEST} at step {step}; continue with --resume")
        raise
    bar.close()
    elapsed += time.time() - run_start

    scale = calibrate_residual_scale(model, slices, sizes, dev, train_config.seed, train_config.batch_size)
    if check_reconstruction:
        check = reconstruction_check(model, slices, sizes, dev, train_config.mask_ratios[-1], train_config.seed)
    save(True, out / FINAL, scale)
    save(True, out / LATEST, scale)
    log_data = {"dataset": name, TRAINING_SPLITS_KEY: list(splits), "steps": step, "train_seconds": round(elapsed, 1),
                "final_loss_ema": ema, "residual_scale": scale, "reconstruction_check": check, "num_slices": n,
                "device": str(dev), "checkpoint": str(out / FINAL), "model_config": model_config.to_dict(),
                "train_config": {**train_config.to_dict(), "total_steps": total}}
    tmp_log = out / ".training_log.json.tmp"
    tmp_log.write_text(json.dumps(log_data, indent=2))
    os.replace(tmp_log, out / "training_log.json")
    gap = (check or {}).get("median_psnr_gap_db")
    interpolation = (check or {}).get("median_interpolation_gap_db")
    versus = "" if gap is None else f", reconstruction {gap:+.2f} dB over the mean image" + (
        "" if interpolation is None else f" (interpolation from the visible pixels: {interpolation:+.2f} dB)")
    log(f"done: {step} steps in {elapsed:.0f} s, loss {ema if ema is not None else float('nan'):.4f}, residual scale "
        f"{scale:.3f}{versus}; checkpoint {out / FINAL}")
    warning = reconstruction_warning(check or {}, name)
    if warning:
        log(warning)
    return out / FINAL


def find_latest_checkpoint(dataset_name: str) -> Path:
    """The newest ``checkpoint_final.pth`` under ``$nnUNet_results/<dataset_name>/nnunetv2_grcsf_mae*/``."""
    results = os.environ.get("nnUNet_results")
    where = Path(results) / dataset_name if results else None
    found = sorted(where.glob(f"{DEFAULT_SUBFOLDER}*/{FINAL}"), key=lambda p: p.stat().st_mtime) if where and where.is_dir() else []
    if not found:
        unfinished = sorted(where.glob(f"{DEFAULT_SUBFOLDER}*/{LATEST}")) if where and where.is_dir() else []
        hint = (f" There is an unfinished training ({unfinished[-1]}): finish it with `nnunetv2_grcsf mae-train -d "
                f"{dataset_name} --resume` or pass it with -m." if unfinished else "")
        raise MAECheckpointError(f"no MAE checkpoint for {dataset_name}: nothing matches {where or '$nnUNet_results (unset)'}"
                                 f"/{DEFAULT_SUBFOLDER}*/{FINAL}.{hint} Train one with `nnunetv2_grcsf mae-train -d "
                                 f"{dataset_name}` or pass -m CHECKPOINT.")
    return found[-1]
