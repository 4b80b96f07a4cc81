"""MAE residual maps and the data sets / folders that carry them as extra input channels.

Residual definition (ours; GRCSF's abstract only says "pixel-wise difference between an MAE
reconstruction and the image"):

1. The image is normalized with the MAE's own stored normalization (:mod:`.data`), cut to its foreground
   box if the MAE was trained so (``crop_to_foreground``, mae-train's default: outside the box the residual
   is 0), cut into slices along its lowest-resolution axis and each slice resized-and-padded to the model input.
2. For a mask ratio ``r = m / K`` the slice is reconstructed in ``K`` passes with **complementary
   masks** (:func:`~nnunetv2_grcsf.mae.model.complementary_masks`): the visible patches of the ``K``
   passes partition the image, so every patch is removed in exactly ``m`` passes (3 of 4 at 0.75, 1
   of 2 at 0.5), and a pixel's reconstruction is the mean of the ``m`` predictions made while its
   patch was removed. Visible patches, which the decoder merely copies, never contribute. With an MAE of
   channel tokens (mae-train's default for several channels) the masks partition the tokens, each channel of
   each patch, and the channels of a patch are staggered over the passes, so a channel's patch is predicted
   while the other channels show the same place as often as the ratio allows (always, at 0.5 with two).
3. Residual = ``|x - x_hat|`` per pixel, averaged over the image channels, in units of the
   normalized intensity (image standard deviations); optionally smoothed with a Gaussian of
   ``smoothing_sigma`` model-grid pixels (default 2, chosen with ``benchmarks/mae_busi256.py``, whose
   figures are in ``benchmarks/results``: smoothing removes speckle-level noise in single pixels, which
   carries no lesion information, and a small sigma keeps the map's edges, which the segmentation
   network needs); then the padding is cropped and the map resized back to the slice's own grid
   (bilinear). We resize-and-back rather than tile at full resolution because the MAE is
   trained on whole images at the model's scale: tiles would show it a scale and a field of view it
   never saw. The price is a residual at the model's resolution (e.g. half resolution for 256-pixel
   images at the default 128 input); use a larger ``--image-size`` on a GPU for finer maps.
4. Encoding in the written file: ``uint8 = round(255 * clip(residual / scale, 0, 1))`` where
   ``scale`` is fixed per MAE checkpoint (1.5 x the 99.9th percentile of training residuals, see
   :func:`~nnunetv2_grcsf.mae.train.calibrate_residual_scale`). It is written with nnU-Net's own
   writer for the data set's format (``write_seg`` of the class nnU-Net picks for the file ending),
   with the properties read from the same case's image, so spacing / origin / direction (or the
   NIfTI affine) are the image's. 8 bits because nnU-Net's writers write integer maps and PNG
   holds nothing else; 256 levels are ample for a residual.
5. Channel name ``rgb_to_0_1``: nnU-Net maps it to ``RGBTo01Normalization``, i.e. value / 255, the
   same fixed scaling for every image, so the network sees ``clip(residual / scale, 0, 1)``.
   nnU-Net's default z-score (any other channel name) would rescale every residual map by its own
   mean and standard deviation and erase what matters: whether an image reconstructs well overall
   (low residual everywhere) or not. ``noNorm`` would feed the raw 0..255 integers.

The new data set's ``dataset.json`` records the residual channels under the ``nnunetv2_grcsf`` key
(see :mod:`nnunetv2_grcsf.residual_channels`) plus ``residual_definition`` (the settings above) and
``mae_sha256`` (the SHA-256 of the checkpoint file), so a prediction folder can be given identical
residual channels (``residuals -i ... --from-dataset``), and a checkpoint changed since (retrained with
``mae-train --overwrite``, copied from elsewhere) is caught there and by ``doctor -d``
(:func:`recorded_mae_problem`; data sets made before the hash was recorded compare the residual scale).

Both modes build their output in a hidden sibling folder and rename it when complete
(:mod:`nnunetv2_grcsf.interruption`): Ctrl-C and SIGTERM leave nothing that looks finished.

Checks on the images (:class:`InputChecks`, every case, in data set and folder mode alike):

- errors (:class:`~nnunetv2_grcsf.mae.MAEIncompatibleError`, naming the case and what to run): a
  channel count or dimensionality other than the checkpoint's (a 2D MAE on volumes or a 3D MAE on 2D
  images: the two are sliced differently), and slices smaller than the checkpoint's ``patch_size``
  along either axis;
- a warning, printed once per run after the last case (the first few cases and a count): cases whose
  in-slice spacing (:func:`~nnunetv2_grcsf.mae.data.in_slice_spacing`) differs, along either axis of
  the slice plane, from the median of the MAE's training images (checkpoint ``data.in_slice_spacing``)
  by more than a factor ``SPACING_WARNING_FACTOR`` (2.0). The MAE then sees anatomy at a scale it was
  not trained on and marks normal structure as unusual; resample such images to a similar spacing or
  train an MAE on them. Checkpoints written before the spacing was recorded skip this check.

After writing, ``nnunetv2_grcsf doctor -d NEW_ID`` checks that every residual file still lies on its
image's grid and that the images still equal the source's (:mod:`.geometry`).
"""

import functools
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nnunetv2_grcsf.datasets import nnunet_folder
from nnunetv2_grcsf.interruption import incomplete_folder, sigterm_raises, stale_incomplete_folders
from nnunetv2_grcsf.mae import (MAEDatasetError, MAEError, MAEIncompatibleError, MAEOutputExistsError)
from nnunetv2_grcsf.mae import data as mdata
from nnunetv2_grcsf.mae.model import complementary_masks, masked_reconstruction, patch_mask_to_pixels
from nnunetv2_grcsf.mae.report import ResidualReport, format_comparison
from nnunetv2_grcsf.mae.train import (TrainConfig, autocast_context, find_latest_checkpoint, load_checkpoint,
                                      model_from_checkpoint, resolve_device, torch_threads, untrained_checkpoint)
from nnunetv2_grcsf.residual_channels import DATASET_JSON_KEY

RESIDUAL_CHANNEL_NAME = "rgb_to_0_1"
#: Key (inside dataset.json's ``nnunetv2_grcsf`` entry) of the MAE checkpoint file's SHA-256 hex digest.
MAE_SHA256_KEY = "mae_sha256"
REPORT_SUBFOLDER = "nnunetv2_grcsf_residual_report"
#: In-slice spacings further than this factor (along either axis) from the MAE's training spacing get a warning.
SPACING_WARNING_FACTOR = 2.0
#: Cases named in that warning; the others are counted.
SPACING_WARNING_MAX_CASES = 5
#: Gaussian sigma, in MAE patches, of the report's interpolation baseline (:func:`interpolated_reconstruction`).
INTERPOLATION_SIGMA_PATCHES = 0.5
#: What ``x_hat`` is: the MAE's reconstruction, or the model-free interpolation from the visible pixels (a control).
RECONSTRUCTIONS = ("mae", "interpolation")


@dataclass
class ResidualSettings:
    """How residual maps are made (recorded in the new dataset.json).

    ``reconstruction``: ``"mae"`` (the residual definition above) or ``"interpolation"``, a control that asks
    whether the MAE is needed at all: ``x_hat`` is :func:`interpolated_reconstruction` with the same masks, so the
    residual marks what the visible pixels around a patch do not predict, with no model of the images. The MAE
    checkpoint still gives the normalization, the geometry and the residual scale, so both kinds of channel are
    encoded alike.
    """

    mask_ratios: tuple = (0.75,)
    smoothing_sigma: float = 2.0
    repeats: int = 1
    seed: int = 0
    reconstruction: str = "mae"

    def __post_init__(self):
        self.mask_ratios = tuple(float(r) for r in self.mask_ratios)
        if not self.mask_ratios:
            raise MAEError("give at least one mask ratio")
        for r in self.mask_ratios:
            if not 0.0 < r < 1.0:
                raise MAEError(f"mask ratio {r} must be between 0 and 1 (exclusive)")
        if len(set(self.mask_ratios)) != len(self.mask_ratios):
            raise MAEError(f"mask ratios {list(self.mask_ratios)} repeat a value")
        if self.smoothing_sigma < 0 or self.repeats < 1:
            raise MAEError("smoothing sigma must be >= 0 and repeats >= 1")
        if self.reconstruction not in RECONSTRUCTIONS:
            raise MAEError(f"reconstruction {self.reconstruction!r}: choose one of {', '.join(RECONSTRUCTIONS)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mask_ratios"] = list(self.mask_ratios)
        return d


def gaussian_smooth(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of ``[N, K, H, W]`` with reflect padding (no-op for sigma 0)."""
    if sigma <= 0:
        return x
    radius = int(min(max(1, round(3 * sigma)), min(x.shape[-2:]) - 1))
    if radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    n, c, h, w = x.shape
    y = x.reshape(n * c, 1, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
    return y.reshape(n, c, h, w)


def interpolated_reconstruction(imgs: torch.Tensor, masks: torch.Tensor, patch_size: int,
                                tokens_per_patch: int = 1) -> torch.Tensor:
    """The report's model-free reconstruction ``[N, C, S, S]`` of ``imgs`` under token masks ``[P, N, T]``
    (``tokens_per_patch`` as the MAE's config: C with channel tokens, each channel masked on its own).

    As :func:`~nnunetv2_grcsf.mae.model.masked_reconstruction` (each pixel the mean of its predictions made
    while its token was removed), but each prediction is a Gaussian-weighted mean of the *visible* pixels
    (normalized convolution, sigma ``INTERPOLATION_SIGMA_PATCHES`` patches; where no visible pixel is near,
    the slice's visible mean): what the visible tissue around a patch tells without any learned model. An MAE
    that does not beat it has learned no more than interpolation.
    """
    sigma = INTERPOLATION_SIGMA_PATCHES * patch_size
    total = torch.zeros(imgs.shape, dtype=torch.float32, device=imgs.device)
    count = torch.zeros((imgs.shape[0], tokens_per_patch, *imgs.shape[2:]), dtype=torch.float32, device=imgs.device)
    for mask in masks.to(imgs.device):
        removed = patch_mask_to_pixels(mask, patch_size, tokens_per_patch)
        visible = 1.0 - removed
        weight = gaussian_smooth(visible, sigma)
        estimate = gaussian_smooth(imgs * visible, sigma) / weight.clamp_min(1e-6)
        # 0, the normalized image's mean level, for a channel a pass removes entirely (possible with channel tokens)
        visible_mean = ((imgs * visible).sum(dim=(2, 3), keepdim=True) /
                        visible.sum(dim=(2, 3), keepdim=True).clamp_min(1))
        total += torch.where(weight > 1e-3, estimate, visible_mean) * removed
        count += removed
    return total / count


class ResidualMapper:
    """Residual maps of whole images with one MAE checkpoint (see the module docstring for the definition)."""

    def __init__(self, checkpoint, settings: ResidualSettings = None, device: str = "auto", batch_size: int = 16):
        self.checkpoint_path = None if isinstance(checkpoint, dict) else Path(checkpoint).resolve()
        self.ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
        if not self.ckpt.get("complete", True) and self.checkpoint_path is not None:
            print(f"note: {self.checkpoint_path} is from an unfinished training (step {self.ckpt['step']})")
        self.settings = settings or ResidualSettings()
        self.device = resolve_device(device)
        self.batch_size = max(1, int(batch_size))
        self.model = model_from_checkpoint(self.ckpt, self.device)
        self.normalizer = mdata.IntensityNormalizer.from_dict(self.ckpt["normalization"])
        self.num_channels = int(self.ckpt["data"]["num_channels"])
        self.image_dim = int(self.ckpt["data"]["image_dim"])
        self.size = int(self.ckpt["model_config"]["img_size"])
        self.patch_size = int(self.ckpt["model_config"]["patch_size"])
        self.crop_to_foreground = TrainConfig.from_dict(self.ckpt["train_config"]).crop_to_foreground
        trained = self.ckpt["data"].get("in_slice_spacing")
        self.trained_in_slice_spacing = None if trained is None else tuple(float(v) for v in trained)
        self.scale = float(self.ckpt.get("residual_scale") or 3.0)

    def encode(self, residual: np.ndarray) -> np.ndarray:
        """Float residual -> uint8 ``round(255 * clip(residual / scale, 0, 1))``."""
        return np.round(255.0 * np.clip(residual / self.scale, 0.0, 1.0)).astype(np.uint8)

    @torch.no_grad()
    def compute(self, items, want_recon=()) -> list:
        """Residual maps for ``items`` = ``[(case_id, image [C, Z, Y, X], spacing), ...]``.

        Returns, per item, ``{"residuals": [R, Z, Y, X] float32, "axis": slice axis, and for case ids in
        want_recon "normalized": [C, Z, Y, X], "recon": [C, Z, Y, X] (first mask ratio), and the model-free
        baseline (:func:`interpolated_reconstruction`, same masks): "interpolated" like "recon" and
        "interpolation_residuals" like "residuals"}``. Slices of all items are batched together; masks depend
        only on the case id and the seed. An MAE trained with ``crop_to_foreground`` sees each image cut to its
        foreground box, as in training; outside the box (constant in every channel) the residuals are 0 and the
        reconstructions are the image.
        """
        s = self.settings
        length = self.model.config.num_tokens
        prepared, grids, masks = [], [], [[] for _ in s.mask_ratios]
        for case, image, spacing in items:
            norm = self.normalizer(image)
            axis = mdata.slice_axis(spacing, image.shape[1:])
            box = mdata.foreground_box(image, axis, self.patch_size) if self.crop_to_foreground else \
                tuple(slice(0, n) for n in image.shape[1:])
            sl = mdata.to_slices(norm[(slice(None), *box)], axis)
            grids.append(mdata.to_model_grid(sl, self.size))
            gen = torch.Generator().manual_seed(mdata.case_seed(case, s.seed))
            for j, ratio in enumerate(s.mask_ratios):
                masks[j].append(complementary_masks(sl.shape[0], length, ratio, s.repeats, gen,
                                                       self.model.config.tokens_per_patch))
            prepared.append((case, norm, axis, sl.shape, box))
        grid = torch.cat(grids)
        masks = [torch.cat(m, dim=1) for m in masks]
        res_grid = torch.empty((grid.shape[0], len(s.mask_ratios), self.size, self.size))
        rec_grid = torch.empty_like(grid)
        interp_res_grid = torch.empty_like(res_grid) if want_recon else None
        interp_grid = torch.empty_like(grid) if want_recon else None
        for start in range(0, grid.shape[0], self.batch_size):
            sel = slice(start, start + self.batch_size)
            x = grid[sel].to(self.device)
            for j, ratio in enumerate(s.mask_ratios):
                batch_masks = masks[j][:, sel]
                interp = None  # the control's reconstruction and the report's baseline: computed once for both
                if s.reconstruction == "interpolation" or interp_grid is not None:
                    interp = interpolated_reconstruction(x.float(), batch_masks, self.patch_size,
                                                         self.model.config.tokens_per_patch)
                if s.reconstruction == "interpolation":
                    recon = interp
                else:
                    with autocast_context(self.device):
                        recon = masked_reconstruction(self.model, x, masks=batch_masks.to(self.device))
                res_grid[sel, j] = (x - recon.float()).abs().mean(dim=1).cpu()
                if j == 0:
                    rec_grid[sel] = recon.float().cpu()
                if interp_grid is not None:
                    interp_res_grid[sel, j] = (x - interp).abs().mean(dim=1).cpu()
                    if j == 0:
                        interp_grid[sel] = interp.cpu()
        out, start = [], 0
        for case, norm, axis, shape, box in prepared:
            n, _, h, w = shape
            nh, nw = mdata.content_size(h, w, self.size)

            def on_image_grid(part: torch.Tensor, fill) -> np.ndarray:
                """This case's ``[n, K, size, size]`` model-grid slices back on the image's grid, ``fill`` outside
                the box."""
                part = mdata.from_model_grid(part, h, w).numpy()
                return mdata.uncropped(mdata.from_slices(part, axis), box, norm.shape[1:], fill)

            def residual(source: torch.Tensor) -> np.ndarray:
                r = gaussian_smooth(source[start:start + n, :, :nh, :nw], s.smoothing_sigma)
                return on_image_grid(F.pad(r, (0, self.size - nw, 0, self.size - nh)).clamp_min(0), 0.0)

            entry = {"residuals": residual(res_grid).astype(np.float32), "axis": axis}
            if case in want_recon:
                entry.update(normalized=norm, recon=on_image_grid(rec_grid[start:start + n], norm),
                             interpolated=on_image_grid(interp_grid[start:start + n], norm),
                             interpolation_residuals=residual(interp_res_grid).astype(np.float32))
            out.append(entry)
            start += n
        return out


class InputChecks:
    """The checks of one run's images against a :class:`ResidualMapper`'s checkpoint (see the module docstring).

    ``train_command``: the ``nnunetv2_grcsf mae-train`` command line the messages suggest. Calling the
    object raises for an unusable case and notes its in-slice spacing; :meth:`spacing_warning` then
    sums the spacing mismatches up once.
    """

    def __init__(self, mapper: ResidualMapper, train_command: str):
        self.mapper = mapper
        self.train_command = train_command
        self.spacing_mismatches = []  # [(case, (a, b))]

    def __call__(self, case: str, first_file, image: np.ndarray, spacing) -> None:
        """Check one case's ``[C, Z, Y, X]`` image with nnU-Net ``spacing`` (``[Z, Y, X]`` order)."""
        m = self.mapper
        where = f"case {case!r} ({first_file})"
        checkpoint = f" {m.checkpoint_path}" if m.checkpoint_path else ""
        mdata.check_image_compatible(image, m.num_channels, m.image_dim, where,
                                     f"train an MAE on images like these (`{self.train_command}`) and use its "
                                     f"checkpoint (-m).")
        mdata.check_slices_fit_patch(image.shape[1:], spacing, m.patch_size, where,
                                     f"model_config.patch_size of the MAE checkpoint{checkpoint}",
                                     f"remove the case, or train an MAE with a smaller patch on images like these "
                                     f"(`{self.train_command} --patch-size N`, N a divisor of --image-size) and use "
                                     f"its checkpoint (-m).")
        spacing_in_slice = mdata.in_slice_spacing(spacing, image.shape[1:])
        trained = m.trained_in_slice_spacing
        if trained is not None and any(max(s / t, t / s) > SPACING_WARNING_FACTOR
                                       for s, t in zip(spacing_in_slice, trained)):
            self.spacing_mismatches.append((case, spacing_in_slice))

    def spacing_warning(self):
        """One warning naming the first few cases whose in-slice spacing is far from the MAE's, or None."""
        if not self.spacing_mismatches:
            return None
        trained = " x ".join(f"{v:g}" for v in self.mapper.trained_in_slice_spacing)
        named = ", ".join(f"{case!r} ({' x '.join(f'{v:g}' for v in spacing)})"
                          for case, spacing in self.spacing_mismatches[:SPACING_WARNING_MAX_CASES])
        more = len(self.spacing_mismatches) - SPACING_WARNING_MAX_CASES
        return (f"warning: {len(self.spacing_mismatches)} case(s) have an in-slice spacing more than "
                f"{SPACING_WARNING_FACTOR:g}x away from the {trained} the MAE was trained on (median of its training "
                f"images): {named}{f' and {more} more' if more > 0 else ''}. The MAE sees them at a scale it was not "
                f"trained on, so their residual maps mark normal structure as unusual. Resample these images to a "
                f"spacing near {trained}, or train an MAE on them (`{self.train_command}`) and use its checkpoint "
                f"(-m).")


# ---- helpers for writing ------------------------------------------------------------------------------
def _sidecar(path: Path, ending: str) -> Path:
    """Tiff3DIO keeps spacing in ``<file without ending>.json`` next to the image."""
    return path.with_name(path.name[:-len(ending)] + ".json")


def _copy_with_sidecar(src: Path, dst: Path, ending: str) -> None:
    shutil.copyfile(src, dst)
    side = _sidecar(src, ending)
    if side.is_file():
        shutil.copyfile(side, _sidecar(dst, ending))


def _write_residual_channels(writer, encoded: np.ndarray, out_folder: Path, case: str, first_index: int,
                             ending: str, props: dict) -> list:
    paths = []
    for j in range(encoded.shape[0]):
        path = out_folder / f"{case}_{first_index + j:04d}{ending}"
        writer.write_seg(encoded[j], str(path), props)
        paths.append(path)
    return paths


def _chunks(cases: dict, reader, mapper: ResidualMapper, checks: InputChecks, labels_folder=None, ending=None):
    """Yield lists of ``(case, files, image, props, label_mask)`` holding about ``batch_size`` slices."""
    chunk, n_slices = [], 0
    for case, files in cases.items():
        image, props = mdata.read_case(reader, files, case)
        checks(case, files[0], image, props["spacing"])
        mask = None
        if labels_folder is not None:
            label_file = Path(labels_folder) / f"{case}{ending}"
            if label_file.is_file():
                mask = mdata.read_label_mask(reader, label_file)
        chunk.append((case, files, image, props, mask))
        axis = mdata.slice_axis(props["spacing"], image.shape[1:])
        n_slices += image.shape[1 + axis]
        if n_slices >= mapper.batch_size:
            yield chunk
            chunk, n_slices = [], 0
    if chunk:
        yield chunk


def _process_cases(cases: dict, reader, mapper: ResidualMapper, checks: InputChecks, out_images: Path, ending: str,
                   report: ResidualReport = None, labels_folder=None, progress=True, desc="residuals") -> dict:
    """Copy channels + write residual channel(s) for ``cases`` into ``out_images``; returns timing figures."""
    from tqdm import tqdm

    out_images.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(cases), desc=desc, unit="case", disable=not progress)
    t_compute, n_done, t0 = 0.0, 0, time.time()
    for chunk in _chunks(cases, reader, mapper, checks, labels_folder if report else None, ending):
        want = {c for c, _, _, _, mask in chunk if report is not None and report.wants_images(mask)}
        t = time.time()
        results = mapper.compute([(c, img, props["spacing"]) for c, _, img, props, _ in chunk], want_recon=want)
        t_compute += time.time() - t
        untrained = [{}] * len(chunk)
        if report is not None and getattr(report, "untrained_mapper", None) is not None:  # the report's baseline
            untrained = report.untrained_mapper.compute([(c, img, props["spacing"]) for c, _, img, props, _ in chunk])
        for (case, files, image, props, mask), res, res_untrained in zip(chunk, results, untrained):
            for f in files:
                _copy_with_sidecar(f, out_images / f.name, ending)
            _write_residual_channels(reader, mapper.encode(res["residuals"]), out_images, case, image.shape[0],
                                     ending, props)
            if report is not None:
                report.add_case(case, res["residuals"], mask, res.get("normalized"), res.get("recon"), res["axis"],
                                foreground=mdata.foreground_mask(image),
                                untrained_residuals=res_untrained.get("residuals"),
                                interpolated=res.get("interpolated"),
                                interpolation_residuals=res.get("interpolation_residuals"))
            n_done += 1
            bar.update(1)
    bar.close()
    total = time.time() - t0
    return {"num_images": n_done, "seconds_total": round(total, 2), "seconds_compute": round(t_compute, 2),
            "images_per_second": round(n_done / total, 3) if total > 0 else None,
            "images_per_second_compute": round(n_done / t_compute, 3) if t_compute > 0 else None}


def residual_definition(mapper: ResidualMapper) -> dict:
    return {**mapper.settings.to_dict(), "scale": mapper.scale, "channel_name": RESIDUAL_CHANNEL_NAME,
            "encoding": "uint8 = round(255 * clip(r / scale, 0, 1)), r = mean over channels of |x - x_hat| in "
                        "normalized intensity units, x_hat from complementary masks (every patch reconstructed "
                        "only while masked), Gaussian smoothing sigma in model-grid pixels",
            "image_size": mapper.size}


# ---- which MAE made a residual data set ------------------------------------------------------------------
def checkpoint_sha256(path) -> str:
    """SHA-256 hex digest of a checkpoint file's bytes (recorded as ``nnunetv2_grcsf.mae_sha256``)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def recorded_mae_problem(dataset_json: dict, dataset_name: str, checkpoint) -> tuple:
    """``(problem, fix, note)``: does MAE ``checkpoint`` (a path) still make the residuals of residual data set
    ``dataset_name`` (its ``dataset_json``)?

    Compares the file's SHA-256 with the recorded ``mae_sha256``; data sets made before the hash was recorded
    compare the checkpoint's residual scale with the recorded one instead (a retrained MAE calibrates another
    scale). ``problem`` says what differs and ``fix`` what to run (both None if nothing differs); ``note``
    says that only the scale could be compared, or is None.
    """
    from nnunetv2_grcsf.mae.geometry import rerun_command

    recorded = dataset_json.get(DATASET_JSON_KEY, {})
    if recorded.get(MAE_SHA256_KEY) and checkpoint_sha256(checkpoint) == recorded[MAE_SHA256_KEY]:
        return None, None, None
    with_this_mae = {**dataset_json, DATASET_JSON_KEY: {**recorded, "mae_checkpoint": str(Path(checkpoint).resolve())}}
    recorded_scale = recorded.get("residual_definition", {}).get("scale")
    scale = float(load_checkpoint(checkpoint).get("residual_scale") or 3.0)  # as ResidualMapper reads it
    scale_differs = recorded_scale is not None and not np.isclose(scale, float(recorded_scale), rtol=1e-9, atol=0)
    scales = f"residual scale {scale:.4g}, recorded {float(recorded_scale):.4g}" if scale_differs else ""
    if recorded.get(MAE_SHA256_KEY):
        differs, note = f"its SHA-256 differs from the recorded one{f' ({scales})' if scales else ''}", None
    else:
        note = (f"{dataset_name} records no MAE hash ({DATASET_JSON_KEY}.{MAE_SHA256_KEY}; made by an older "
                f"nnunetv2_grcsf): only the residual scale of {checkpoint} could be compared")
        if not scale_differs:
            return None, None, note + ("" if recorded_scale is not None else ", and it is not recorded either")
        differs = f"the data set records no MAE hash, and the {scales}"
    problem = (f"MAE checkpoint {checkpoint} is not the one {dataset_name} was made with: {differs} (retrained with "
               f"`mae-train --overwrite` since?); its residuals are not those a model trained on {dataset_name} saw")
    fix = (f"put the original checkpoint back (or pass a copy of it with -m to `residuals -i`), or remake the data set with this MAE and retrain: "
           f"`{rerun_command(with_this_mae, dataset_name)}`, then nnUNetv2_plan_and_preprocess and nnUNetv2_train")
    return problem, fix, note


def test_images_warning(checkpoint, name, source: str = "SOURCE") -> tuple:
    """``(saw, warning, fix)``: whether MAE ``checkpoint`` (a path or a loaded checkpoint, called ``name``) was
    trained on test images (imagesTs; None: unknown, a checkpoint from before this was recorded), what that
    means and what to run (None, None if it was not)."""
    from nnunetv2_grcsf.mae import checkpoint_saw_test_images

    saw = checkpoint_saw_test_images(checkpoint)
    if saw is False:
        return saw, None, None
    how = ("was trained on the test images (imagesTs) too" if saw else
           "may have been trained on the test images (imagesTs): it does not record which images it saw, and older "
           "versions of mae-train read imagesTs too")
    return saw, (f"the MAE {name} {how}. Residuals of images an MAE has seen are lower than those of new "
                 f"images, so figures on those test images are optimistic"), \
        (f"retrain the MAE on imagesTr only (nnunetv2_grcsf mae-train -d {source} --overwrite), then remake the "
         f"residuals (residuals ... --overwrite)")


def trained_models(dataset_name: str) -> list:
    """nnU-Net model folders (``TRAINER__PLANS__CONFIGURATION`` holding a ``fold_*/checkpoint_*.pth``) under
    ``$nnUNet_results/<dataset_name>``."""
    results = os.environ.get("nnUNet_results")
    base = Path(results) / dataset_name if results else None
    if base is None or not base.is_dir():
        return []
    return sorted(d for d in base.iterdir()
                  if d.is_dir() and d.name.count("__") == 2 and any(d.glob("fold_*/checkpoint_*.pth")))


def _stale_note(parent: Path, name: str) -> str:
    """A note naming the build folders of ``parent/name`` that killed runs left behind, or ''."""
    stale = stale_incomplete_folders(parent, name)
    if not stale:
        return ""
    return (f"note: {len(stale)} unfinished build folder(s) of {parent / name} left by a killed run: "
            f"{', '.join(str(p) for p in stale)}; delete them (rm -r {' '.join(str(p) for p in stale)})")


def _with_torch_threads(fn):
    """Adds a ``num_threads`` keyword: torch CPU threads during the call (restored afterwards)."""
    @functools.wraps(fn)
    def wrapper(*args, num_threads: int = None, **kwargs):
        with torch_threads(num_threads):
            return fn(*args, **kwargs)
    return wrapper


# ---- a new raw data set -----------------------------------------------------------------------------------
def _folders_with_id(dataset_id: int) -> dict:
    """``{variable: [folders named DatasetXXX_*]}`` in nnUNet_raw / _preprocessed / _results."""
    found = {}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        base = os.environ.get(var)
        if base and os.path.isdir(base):
            found[var] = sorted(Path(base) / d for d in os.listdir(base) if d.startswith(f"Dataset{dataset_id:03d}_"))
        else:
            found[var] = []
    return found


def _control_note(settings: ResidualSettings) -> str:
    return "" if settings.reconstruction == "mae" else \
        " (control: residual of the interpolation from the visible pixels, not of the MAE's reconstruction)"


def _is_same_or_inside(a: Path, b: Path) -> bool:
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or b in a.parents or a in b.parents


def _trained_models_warning(dst_folder: Path, dst_id: int, mae_sha256: str, mapper: ResidualMapper) -> str:
    """A warning naming the nnU-Net models trained on the data set ``dst_folder`` is about to replace, if the new
    residual channels may differ from the old ones (another MAE or other settings), else ''."""
    models = trained_models(dst_folder.name)
    if not models or not (dst_folder / "dataset.json").is_file():
        return ""
    recorded = mdata.load_dataset_json(dst_folder).get(DATASET_JSON_KEY, {})
    same_definition = recorded.get("residual_definition") == residual_definition(mapper)
    if recorded.get(MAE_SHA256_KEY) == mae_sha256 and same_definition:
        return ""
    return (f"warning: {len(models)} model(s) were trained on the residual channel(s) that --overwrite now replaces "
            f"with another MAE or other settings: {', '.join(str(m) for m in models)}. They would get other inputs "
            f"than they were trained on: retrain them after this run (nnUNetv2_plan_and_preprocess -d {dst_id}, "
            f"then nnUNetv2_train), or stop now (Ctrl-C leaves {dst_folder} as it is).")


@_with_torch_threads
@sigterm_raises()
def make_residual_dataset(source, output_id, checkpoint=None, settings: ResidualSettings = None, name: str = None,
                          overwrite: bool = False, report: bool = False, report_dir=None, report_cases: int = 4,
                          device: str = "auto", batch_size: int = 16, progress: bool = True, log=print) -> dict:
    """Make raw data set ``Dataset<output_id>_<name>``: source channels + residual channel(s), labels, dataset.json.

    Built in a hidden temporary folder in ``$nnUNet_raw`` and renamed when complete, so a failure, Ctrl-C or
    SIGTERM leaves nothing behind; the source data set is only read. Replacing (``overwrite``) a data set
    from which nnU-Net models were trained under ``$nnUNet_results`` with another MAE or other settings
    warns, naming the model folders. Returns a dict with the paths and figures.
    """
    settings = settings or ResidualSettings()
    src_name, src_folder = mdata.resolve_raw_dataset(source)
    src_json = mdata.load_dataset_json(src_folder)
    ending = src_json["file_ending"]
    channel_names = mdata.channel_names_of(src_json)

    full = re.fullmatch(r"Dataset(\d{3})_(.+)", str(output_id).strip())
    if full:  # a full name DatasetXXX_Name is accepted too
        output_id, name = full.group(1), name or full.group(2)
    try:
        dst_id = int(output_id)
    except (TypeError, ValueError):
        raise MAEError(f"output data set id {output_id!r} must be an integer (e.g. 501) or a name "
                       f"DatasetXXX_Name") from None
    if not 1 <= dst_id <= 999:
        raise MAEError(f"output data set id {dst_id} must be between 1 and 999")
    base_name = name or re.sub(r"^Dataset\d{3}_", "", src_name)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-.]*", base_name):
        raise MAEError(f"data set name {base_name!r} may only contain letters, digits, '_', '-' and '.'")
    dst_name = f"Dataset{dst_id:03d}_{base_name}"
    raw = nnunet_folder("nnUNet_raw")
    dst_folder = raw / dst_name

    existing = _folders_with_id(dst_id)
    if dst_id == int(src_name[7:10]) or any(_is_same_or_inside(p, src_folder) for p in existing["nnUNet_raw"]):
        raise MAEOutputExistsError(f"output id {dst_id} is the id of the source data set {src_name}; choose another -o "
                                   f"(the source is never overwritten)")
    if existing["nnUNet_raw"]:
        if not overwrite:
            raise MAEOutputExistsError(f"data set id {dst_id} already exists: {existing['nnUNet_raw'][0]}. Choose "
                                       f"another -o, or pass --overwrite to replace it.")
        if [p.name for p in existing["nnUNet_raw"]] != [dst_name]:
            raise MAEOutputExistsError(f"data set id {dst_id} exists under another name ({existing['nnUNet_raw'][0]}); "
                                       f"--overwrite only replaces {dst_name}. Remove that folder yourself or choose "
                                       f"another -o.")
    for var in ("nnUNet_preprocessed", "nnUNet_results"):
        others = [p for p in existing[var] if p.name != dst_name]
        if others:
            raise MAEOutputExistsError(f"id {dst_id} is already used by {others[0]} ({var}); nnU-Net would then find two "
                                       f"names for one id. Choose another -o or remove that folder.")
        if any(p.name == dst_name for p in existing[var]) and var == "nnUNet_preprocessed":
            log(f"note: {var}/{dst_name} exists from an earlier run: rerun nnUNetv2_plan_and_preprocess -d {dst_id}")

    ckpt_path = Path(checkpoint) if checkpoint else find_latest_checkpoint(src_name)
    mapper = ResidualMapper(ckpt_path, settings, device, batch_size)
    mae_sha256 = checkpoint_sha256(ckpt_path)
    if len(channel_names) != mapper.num_channels:
        raise MAEIncompatibleError(f"{src_name} has {len(channel_names)} channel(s) ({channel_names}) but the MAE "
                                   f"checkpoint {ckpt_path} was trained on {mapper.num_channels} "
                                   f"({mapper.ckpt['data'].get('dataset_name')}); train an MAE on {src_name}.")
    trained_on = mapper.ckpt["data"].get("dataset_name")
    if trained_on != src_name:
        log(f"note: the MAE checkpoint was trained on {trained_on}, not on {src_name}")

    splits = {}
    for sub in ("imagesTr", "imagesTs"):
        cases = mdata.list_cases(src_folder / sub, ending)
        mdata.check_no_misnamed_files(src_folder / sub, ending)
        mdata.check_case_channels(cases, len(channel_names), src_folder / sub)
        if cases:
            splits[sub] = cases
    if "imagesTr" not in splits:
        raise MAEDatasetError(f"{src_folder / 'imagesTr'} has no images (CASE_XXXX{ending})")
    first = next(iter(splits["imagesTr"].values()))
    reader = mdata.reader_for(src_json, example_file=first[0])

    rep = None
    if report:
        rdir = Path(report_dir) if report_dir else (
            Path(os.environ["nnUNet_results"]) / dst_name / REPORT_SUBFOLDER if os.environ.get("nnUNet_results")
            else raw.parent / f"{dst_name}_residual_report")
        if _is_same_or_inside(rdir, src_folder):
            raise MAEError(f"report folder {rdir} would be inside the source data set; choose another --report-dir")
        rep = ResidualReport(rdir, settings.mask_ratios, mapper.scale, report_cases, with_untrained=True)
        rep.untrained_mapper = ResidualMapper(untrained_checkpoint(mapper.ckpt), settings, device, batch_size)

    C = len(channel_names)
    checks = InputChecks(mapper, f"nnunetv2_grcsf mae-train -d {src_name}")
    tmp = incomplete_folder(dst_folder)
    if tmp.exists():
        shutil.rmtree(tmp)
    for line in (_stale_note(raw, dst_name), _trained_models_warning(dst_folder, dst_id, mae_sha256, mapper)):
        if line:
            log(line)
    log(f"{src_name} -> {dst_name}: {sum(len(c) for c in splits.values())} cases, residual channel(s) "
        f"{list(range(C, C + len(settings.mask_ratios)))} at mask ratio(s) {list(settings.mask_ratios)}, "
        f"MAE {ckpt_path}{_control_note(settings)}, device {mapper.device}")
    try:
        tmp.mkdir(parents=True)
        figures = {}
        for sub, cases in splits.items():
            labels = src_folder / "labelsTr" if sub == "imagesTr" else None
            figures[sub] = _process_cases(cases, reader, mapper, checks, tmp / sub, ending, rep, labels, progress,
                                          desc=f"residuals {sub}")
        for labels_sub in ("labelsTr", "labelsTs"):  # labelsTs: the test labels many data sets keep beside imagesTs
            if (src_folder / labels_sub).is_dir():
                (tmp / labels_sub).mkdir()
                for f in sorted((src_folder / labels_sub).iterdir()):
                    if f.is_file() and (f.name.endswith(ending) or f.suffix == ".json"):
                        shutil.copyfile(f, tmp / labels_sub / f.name)
        dst_json = {k: v for k, v in src_json.items() if k != "modality"}
        dst_json["channel_names"] = {**{str(k): v for k, v in channel_names.items()},
                                     **{str(C + j): RESIDUAL_CHANNEL_NAME for j in range(len(settings.mask_ratios))}}
        dst_json["name"] = f"{src_json.get('name', src_name)} + MAE residuals"
        dst_json[DATASET_JSON_KEY] = {
            "residual_channels": list(range(C, C + len(settings.mask_ratios))),
            "mae_checkpoint": str(Path(ckpt_path).resolve()),
            "mask_ratios": list(settings.mask_ratios),
            MAE_SHA256_KEY: mae_sha256,
            "source_dataset": src_name,
            "residual_definition": residual_definition(mapper),
        }
        (tmp / "dataset.json").write_text(json.dumps(dst_json, indent=2))
        if dst_folder.is_symlink():  # --overwrite checked above; never the source
            dst_folder.unlink()
        replaced = dst_folder.parent / f".{dst_name}.replaced-{os.getpid()}"
        if dst_folder.exists():  # renamed away, not deleted, until the new data set is in place
            os.replace(dst_folder, replaced)
        os.replace(tmp, dst_folder)
        shutil.rmtree(replaced, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = {"dataset": dst_name, "folder": str(dst_folder), "checkpoint": str(Path(ckpt_path).resolve()),
              "figures": figures, "spacing_warning": checks.spacing_warning()}
    if rep is not None:
        _write_report(rep, mapper, result, {"source_dataset": src_name, "dataset": dst_name}, log, src_name)
    if result["spacing_warning"]:
        log(result["spacing_warning"])
    tr = figures["imagesTr"]
    log(f"wrote {dst_folder} ({tr['num_images']} training images, {tr['images_per_second']} images/s). Next: "
        f"nnUNetv2_plan_and_preprocess -d {dst_id}")
    return result


def _write_report(rep: ResidualReport, mapper: ResidualMapper, result: dict, fields: dict, log,
                  source: str = "SOURCE") -> None:
    """Write ``rep``'s report with ``fields`` and what the MAE ``result["checkpoint"]`` was trained on, log it
    (with a warning if the MAE saw test images; ``source`` names the data set in its fix) and add "report" and
    "report_folder" to ``result``."""
    saw_test_images, test_warning, test_fix = test_images_warning(mapper.ckpt, result["checkpoint"], source)
    result["report"] = rep.write({**fields, "mae_checkpoint": result["checkpoint"],
                                  "mae_saw_test_images": saw_test_images,
                                  "mae_skipped_labelled_patches": bool(
                                      mapper.ckpt["train_config"].get("skip_labelled_patches")),
                                  "residual_definition": residual_definition(mapper)})
    result["report_folder"] = str(rep.folder)
    _log_report(result["report"], rep.folder, log)
    if test_warning:
        log(f"warning: {test_warning}. Fix: {test_fix}.")


def _log_report(summary: dict, folder: Path, log) -> None:
    def value(x):
        return "n/a" if x is None else f"{x:.3f}"

    for ratio, o in summary["overall"].items():
        log(f"residual AUROC for lesion pixels at mask ratio {ratio}: pooled {value(o['pooled_auroc'])}, mean per "
            f"case {value(o['mean_case_auroc'])}; foreground only (any channel above its case minimum): pooled "
            f"{value(o['pooled_auroc_foreground'])}, mean per case {value(o['mean_case_auroc_foreground'])} "
            f"({o['cases_with_lesion']} cases with lesion)")
    for line in format_comparison(summary):  # the residual against maps that need no (trained) MAE; PSNR gap
        log(line)
    saw = summary.get("mae_saw_test_images")
    saw = "unknown (an older checkpoint: it may have)" if saw is None else "yes" if saw else "no"
    log(f"the MAE saw test images (imagesTs) in training: {saw}")
    if "mae_skipped_labelled_patches" in summary:
        log(f"the MAE's loss left out patches labelled in labelsTr (it modelled normal tissue only): "
            f"{'yes' if summary['mae_skipped_labelled_patches'] else 'no'}")
    log(f"report: {folder / 'report.json'} and {len(summary['panels'])} PNG panel(s)")


# ---- a folder of prediction inputs -----------------------------------------------------------------------
def settings_from_block(block: dict) -> ResidualSettings:
    """The :class:`ResidualSettings` recorded in a residual data set's ``nnunetv2_grcsf`` dataset.json block
    (settings it does not record take their defaults)."""
    definition, defaults = block.get("residual_definition", {}), ResidualSettings()
    return ResidualSettings(mask_ratios=tuple(block.get("mask_ratios", defaults.mask_ratios)),
                            smoothing_sigma=definition.get("smoothing_sigma", defaults.smoothing_sigma),
                            repeats=definition.get("repeats", defaults.repeats),
                            seed=definition.get("seed", defaults.seed),
                            reconstruction=definition.get("reconstruction", defaults.reconstruction))


def settings_from_dataset(dataset) -> tuple:
    """``(checkpoint, ResidualSettings)`` recorded in the dataset.json of a data set made by ``residuals -d``."""
    name, folder = mdata.resolve_raw_dataset(dataset)
    d = mdata.load_dataset_json(folder).get(DATASET_JSON_KEY)
    if not d or "mae_checkpoint" not in d:
        raise MAEDatasetError(f"{folder / 'dataset.json'} has no '{DATASET_JSON_KEY}' entry: {name} was not made by "
                              f"`nnunetv2_grcsf residuals -d`; pass -m and --mask-ratios instead")
    return Path(d["mae_checkpoint"]), settings_from_block(d)


def checkpoint_for_dataset(dataset, checkpoint=None, log=print) -> tuple:
    """``(checkpoint, ResidualSettings)`` that remake the residual channels of data set ``dataset`` (made by
    ``residuals -d``) for new images: the recorded checkpoint, or ``checkpoint`` (e.g. a copy shipped with a
    model), checked against the recorded hash (:func:`recorded_mae_problem`, :class:`MAEError` naming what to do).
    """
    recorded, settings = settings_from_dataset(dataset)
    name, folder = mdata.resolve_raw_dataset(dataset)
    dataset_json = mdata.load_dataset_json(folder)
    if checkpoint is None:
        if not recorded.is_file():
            digest = dataset_json[DATASET_JSON_KEY].get(MAE_SHA256_KEY)
            raise MAEError(f"the MAE checkpoint recorded in {name}, {recorded}"
                           f"{f' (SHA-256 {digest})' if digest else ''}, does not exist: copy that file there or pass "
                           f"it with -m PATH (its hash is checked). A newly trained MAE would make other residuals "
                           f"than the model was trained on.")
        checkpoint = recorded
    problem, fix, note = recorded_mae_problem(dataset_json, name, checkpoint)
    if problem:
        raise MAEError(f"{problem}. Fix: {fix}.")
    if note:
        log(f"note: {note}")
    return Path(checkpoint), settings


@_with_torch_threads
@sigterm_raises()
def make_residual_folder(input_folder, output_folder, checkpoint, settings: ResidualSettings = None,
                         file_ending: str = None, overwrite: bool = False, labels_folder=None, report_dir=None,
                         report_cases: int = 4, device: str = "auto", batch_size: int = 16, progress: bool = True,
                         log=print) -> dict:
    """Prediction inputs ``CASE_XXXX<ending>`` in ``input_folder`` -> copies + residual channel(s) in ``output_folder``.

    The input folder is only read. An existing non-empty output folder is refused unless ``overwrite``
    (then files of the same names are replaced, nothing is deleted). The files are written into a hidden
    sibling ``.<output>.incomplete-<pid>`` first and moved into ``output_folder`` at the end, so a failure,
    Ctrl-C or SIGTERM leaves the output folder as it was (absent, or with its old files only). With
    ``labels_folder`` (files ``CASE<ending>``) a report is written to ``report_dir`` (default
    ``<output_folder>_residual_report``).
    """
    settings = settings or ResidualSettings()
    inp, out = Path(input_folder), Path(output_folder)
    if not inp.is_dir():
        raise MAEDatasetError(f"input folder {inp} does not exist")
    if _is_same_or_inside(out, inp):
        raise MAEOutputExistsError(f"output folder {out} is the input folder {inp} or inside/around it; choose a separate "
                                   f"output folder (inputs are never overwritten)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MAEOutputExistsError(f"output folder {out} exists and is not empty; choose another one or pass --overwrite")
    mapper = ResidualMapper(checkpoint, settings, device, batch_size)
    ending = file_ending or mapper.ckpt["data"].get("file_ending")
    if not ending:
        raise MAEError("no file ending: pass --file-ending (e.g. .nii.gz)")
    cases = mdata.list_cases(inp, ending)
    if not cases:
        raise MAEDatasetError(mdata.describe_no_cases(inp, ending))
    mdata.check_no_misnamed_files(inp, ending)
    mdata.check_case_channels(cases, mapper.num_channels, inp)
    reader = mdata.reader_for(None, file_ending=ending, example_file=next(iter(cases.values()))[0])
    rep = None
    if labels_folder is not None:
        if not Path(labels_folder).is_dir():
            raise MAEDatasetError(f"labels folder {labels_folder} does not exist")
        rdir = Path(report_dir) if report_dir else out.with_name(out.name + "_residual_report")
        rep = ResidualReport(rdir, settings.mask_ratios, mapper.scale, report_cases, with_untrained=True)
        rep.untrained_mapper = ResidualMapper(untrained_checkpoint(mapper.ckpt), settings, device, batch_size)
    checks = InputChecks(mapper, "nnunetv2_grcsf mae-train -d DATASET")
    stale = _stale_note(out.parent, out.name)
    if stale:
        log(stale)
    log(f"{inp} -> {out}: {len(cases)} cases, residual channel(s) "
        f"{list(range(mapper.num_channels, mapper.num_channels + len(settings.mask_ratios)))} at mask ratio(s) "
        f"{list(settings.mask_ratios)}{_control_note(settings)}, device {mapper.device}")
    tmp = incomplete_folder(out)
    try:
        figures = _process_cases(cases, reader, mapper, checks, tmp, ending, rep, labels_folder, progress)
        if out.is_dir():  # --overwrite (or empty): same names are replaced, other files stay
            for f in sorted(tmp.iterdir()):
                os.replace(f, out / f.name)
            tmp.rmdir()
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = {"folder": str(out), "checkpoint": str(mapper.checkpoint_path), "figures": figures,
              "residual_definition": residual_definition(mapper), "spacing_warning": checks.spacing_warning()}
    if rep is not None:
        _write_report(rep, mapper, result, {"input_folder": str(inp)}, log)
    if result["spacing_warning"]:
        log(result["spacing_warning"])
    log(f"wrote {figures['num_images']} cases to {out} ({figures['images_per_second']} images/s)")
    return result
