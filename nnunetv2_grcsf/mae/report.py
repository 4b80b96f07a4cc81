"""How well do residual maps single out lesions, and does the MAE reconstruct? AUROC against baselines, PSNR, panels.

- Per case (where a label exists and has both lesion and background pixels): the AUROC of the residual
  map (as a score) for "lesion" = any label > 0, over all pixels/voxels of the case (scikit-learn's
  ``roc_auc_score``).
- Overall: the **pooled** AUROC over all pixels of all labelled cases, from 4096-bin histograms of
  each map on a fixed range (values beyond clipped into the end bins; ties within a bin count one half),
  plus the mean of the per-case AUROCs. Pooling rewards maps whose level is comparable across images
  (as the network sees them); the per-case mean measures localization within an image.
- Foreground: the same figures over the case's foreground only, the pixels/voxels where any image channel
  is above its minimum in that case (:func:`~.data.foreground_mask`). The constant background of a skull-stripped MRI
  volume or the black frame of an ultrasound image has a low residual and is never lesion, so counting it
  inflates the AUROC.
- Baselines, the same figures for maps that need no MAE, computed per channel of the normalized image the
  MAE sees (the best channel is reported): the intensity itself (the better of both signs, per figure),
  ``|x - median(x)|`` (per-case median) and ``|x - G_sigma * x|`` (Gaussian smoothing, ``BASELINE_SIGMA``
  voxels, in 3D for volumes), each also smoothed (``BASELINE_POST_SMOOTHING``) as the residual is; and, where
  given, the residual of an *untrained* MAE of the same settings
  (what the architecture and the complementary masks give without learning anything), and the residual of
  interpolating each masked patch from the visible pixels around it (``interpolation@r``: what the visible
  context gives without a model of the images; an MAE that models normal tissue should beat it on lesions).
- Reconstruction: per labelled case, the PSNR of the MAE's reconstruction (every pixel predicted while
  its patch was masked, first mask ratio) on the lesion-free foreground pixels, against the PSNR of
  predicting each channel's mean there; the gap (dB) is ``10 log10(MSE_mean / MSE_reconstruction)``.
  A gap near 0 means the MAE predicts little more than the mean intensity. Beside it, the same PSNR of the
  interpolation from the visible pixels (same masks).
- AUROC is computed on the float residual before its 8-bit encoding.
- Panels (matplotlib, Agg backend): image | MAE reconstruction | residual | lesion mask, for the first
  few cases with a lesion; for 3D the slice (along the slice axis) with the largest lesion area.
- ``report.json``: per-case and overall figures per mask ratio, baselines and reconstruction figures.
"""

import json
from pathlib import Path

import numpy as np

HIST_BINS = 4096
#: Gaussian sigma (voxels of the image's own grid) of the ``|x - G_sigma * x|`` baseline.
BASELINE_SIGMA = 4.0
#: The residual maps are smoothed (``ResidualSettings.smoothing_sigma``), which alone removes speckle; so each
#: baseline is also reported smoothed with this sigma (voxels), as ``<name>_smoothed``.
BASELINE_POST_SMOOTHING = 2.0
#: Histogram ranges of the pooled AUROC of the baselines (normalized intensities are z-scores clipped at
#: percentiles, so these cover them) and of an untrained MAE's residual.
INTENSITY_RANGE = (-16.0, 16.0)
DIFFERENCE_RANGE = (0.0, 32.0)
BASELINES = ("intensity", "abs_minus_median", "abs_minus_smoothed", "intensity_smoothed", "abs_minus_median_smoothed",
             "abs_minus_smoothed_smoothed")


def auroc(scores: np.ndarray, labels: np.ndarray):
    """AUROC of ``scores`` for boolean ``labels`` (scikit-learn); ``None`` if one class is absent."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels, dtype=bool).ravel()
    if labels.all() or not labels.any():
        return None
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64).ravel()))


class PooledAUROC:
    """AUROC over many cases from fixed-range histograms on ``[low, high]`` (constant memory)."""

    def __init__(self, high: float, bins: int = HIST_BINS, low: float = 0.0):
        self.edges = np.linspace(float(low), float(high), bins + 1)
        self.pos = np.zeros(bins, dtype=np.int64)
        self.neg = np.zeros(bins, dtype=np.int64)

    def add(self, scores: np.ndarray, labels: np.ndarray) -> None:
        scores = np.clip(np.asarray(scores, dtype=np.float64).ravel(), self.edges[0], self.edges[-1])
        labels = np.asarray(labels, dtype=bool).ravel()
        self.pos += np.histogram(scores[labels], self.edges)[0]
        self.neg += np.histogram(scores[~labels], self.edges)[0]

    def value(self):
        n_pos, n_neg = self.pos.sum(), self.neg.sum()
        if n_pos == 0 or n_neg == 0:
            return None
        neg_below = np.cumsum(self.neg) - self.neg  # negatives in lower bins
        return float(((self.pos * neg_below).sum() + 0.5 * (self.pos * self.neg).sum()) / (n_pos * n_neg))


def baseline_maps(normalized: np.ndarray, sigma: float = BASELINE_SIGMA) -> dict:
    """``normalized [C, *S]`` -> ``{baseline name: [C, *S] float32}`` (see the module docstring)."""
    from scipy.ndimage import gaussian_filter

    x = np.asarray(normalized, dtype=np.float32)
    median = np.median(x.reshape(len(x), -1), axis=1).reshape(-1, *[1] * (x.ndim - 1))
    def smooth(a, s):
        return np.stack([gaussian_filter(c, s, mode="reflect") for c in a])

    maps = {"intensity": x, "abs_minus_median": np.abs(x - median), "abs_minus_smoothed": np.abs(x - smooth(x, sigma))}
    return {**maps, **{f"{name}_smoothed": smooth(m, BASELINE_POST_SMOOTHING) for name, m in maps.items()}}


def reconstruction_psnr(normalized: np.ndarray, recon: np.ndarray, where: np.ndarray):
    """``(psnr_reconstruction, psnr_mean_image)`` in dB over the pixels ``where`` (bool ``[*S]``) of ``[C, *S]``.

    The peak is each image's intensity range over those pixels (channels pooled); the mean image predicts
    each channel's mean over them. ``None`` if fewer than two pixels or a constant image.
    """
    x = np.asarray(normalized, dtype=np.float64)[:, where]
    if x.shape[1] < 2:
        return None
    peak = float(x.max() - x.min())
    mse_recon = float(((x - np.asarray(recon, dtype=np.float64)[:, where]) ** 2).mean())
    mse_mean = float(((x - x.mean(axis=1, keepdims=True)) ** 2).mean())
    if peak <= 0 or mse_mean <= 0:
        return None
    psnr = lambda mse: 10.0 * np.log10(peak ** 2 / max(mse, 1e-12))  # noqa: E731
    return psnr(mse_recon), psnr(mse_mean)


class AUROCFigures:
    """Per-case AUROC and pooled histograms of one kind of map, over all pixels and over the foreground."""

    def __init__(self, low: float, high: float, two_sided: bool = False):
        self.pooled = PooledAUROC(high, low=low)
        self.pooled_foreground = PooledAUROC(high, low=low)
        self.two_sided = two_sided
        self.per_case, self.per_case_foreground = [], []

    def add(self, score: np.ndarray, mask: np.ndarray, foreground=None) -> tuple:
        a = auroc(score, mask)
        self.pooled.add(score, mask)
        if a is not None:
            self.per_case.append(a)
        af = None
        if foreground is not None:
            af = auroc(score[foreground], mask[foreground])
            self.pooled_foreground.add(score[foreground], mask[foreground])
            if af is not None:
                self.per_case_foreground.append(af)
        return a, af

    def summary(self) -> dict:
        def better(a):
            return None if a is None else max(a, 1.0 - a)

        def mean(v):
            return float(np.mean(v)) if v else None

        out = {"pooled_auroc": self.pooled.value(), "mean_case_auroc": mean(self.per_case),
               "pooled_auroc_foreground": self.pooled_foreground.value(),
               "mean_case_auroc_foreground": mean(self.per_case_foreground)}
        return {k: better(v) for k, v in out.items()} if self.two_sided else out


def _slice_for_panel(mask: np.ndarray, axis: int) -> int:
    """Index along ``axis`` of ``[Z, Y, X]`` with the largest lesion area (middle slice if no lesion)."""
    other = tuple(a for a in range(3) if a != axis)
    area = mask.sum(axis=other)
    return int(area.argmax()) if area.max() > 0 else mask.shape[axis] // 2


def save_panel(path, image: np.ndarray, recon: np.ndarray, residual: np.ndarray, mask: np.ndarray, title: str = "",
               residual_max: float = None) -> None:
    """One PNG: image | reconstruction | residual | mask (2D arrays; image and reconstruction share a scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = np.percentile(image, (1, 99))
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    panels = [("image", image, "gray", lo, hi), ("MAE reconstruction", recon, "gray", lo, hi),
              ("residual", residual, "magma", 0, residual_max or float(np.percentile(residual, 99.5)) or 1.0),
              ("lesion mask", (mask > 0).astype(float) if mask is not None else np.zeros_like(image), "gray", 0, 1)]
    for ax, (name, arr, cmap, vmin, vmax) in zip(axes, panels):
        im = ax.imshow(arr, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
        if name == "residual":
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


class ResidualReport:
    """Per-case AUROC (residual, baselines), reconstruction PSNR and panels; :meth:`write` saves ``report.json``.

    ``with_untrained``: :meth:`add_case` is given an untrained MAE's residuals too (``untrained_residuals``).
    """

    def __init__(self, folder, mask_ratios, scale: float, max_panels: int = 4, with_untrained: bool = False):
        self.folder = Path(folder)
        self.mask_ratios = [float(r) for r in mask_ratios]
        self.scale = float(scale)
        self.max_panels = int(max_panels)
        self.cases = {}
        self.residual = [AUROCFigures(0.0, 4.0 * self.scale) for _ in self.mask_ratios]
        self.untrained = [AUROCFigures(*DIFFERENCE_RANGE) for _ in self.mask_ratios] if with_untrained else None
        self.interpolation = [AUROCFigures(*DIFFERENCE_RANGE) for _ in self.mask_ratios]
        self.baselines = {}  # (name, channel) -> AUROCFigures
        self.psnr = []  # [(case, psnr_reconstruction, psnr_mean, psnr_interpolation or nan)]
        self.panels = []
        self.cases_without_label = 0

    def wants_panel(self, mask) -> bool:
        return mask is not None and len(self.panels) < self.max_panels and bool(np.any(mask))

    def wants_images(self, mask) -> bool:
        """Whether :meth:`add_case` needs the normalized image and reconstruction of a case (labelled ones)."""
        return mask is not None

    def add_case(self, case: str, residuals: np.ndarray, mask, image=None, recon=None, axis: int = 0,
                 foreground=None, untrained_residuals=None, interpolated=None, interpolation_residuals=None) -> None:
        """``residuals [R, Z, Y, X]`` float; ``mask [Z, Y, X]`` bool or None; ``image`` (normalized, as the MAE
        sees it) and ``recon`` ``[C, Z, Y, X]`` for the baselines, the PSNR and a panel; ``foreground [Z, Y, X]``
        bool (:func:`~.data.foreground_mask` of the raw image) for the foreground figures; ``untrained_residuals`` like
        ``residuals``, from an untrained MAE of the same settings; ``interpolated`` like ``recon`` and
        ``interpolation_residuals`` like ``residuals``: the model-free reconstruction from the visible patches
        (:func:`~.residuals.interpolated_reconstruction`) and its residual."""
        if mask is None:
            self.cases_without_label += 1
            return
        mask = np.asarray(mask, dtype=bool)
        entry = {"lesion_pixels": int(mask.sum()), "pixels": int(mask.size)}
        if foreground is not None:
            entry["foreground_pixels"] = int(foreground.sum())
        for j, ratio in enumerate(self.mask_ratios):
            a, af = self.residual[j].add(residuals[j], mask, foreground)
            entry[f"auroc@{ratio:g}"] = a
            if foreground is not None:
                entry[f"auroc_foreground@{ratio:g}"] = af
            if untrained_residuals is not None and self.untrained is not None:
                entry[f"untrained_auroc@{ratio:g}"] = self.untrained[j].add(untrained_residuals[j], mask, foreground)[0]
            if interpolation_residuals is not None:
                entry[f"interpolation_auroc@{ratio:g}"] = self.interpolation[j].add(interpolation_residuals[j], mask,
                                                                                    foreground)[0]
        if image is not None:
            for name, maps in baseline_maps(image).items():
                for c, score in enumerate(maps):
                    if (name, c) not in self.baselines:
                        low_high = INTENSITY_RANGE if name.startswith("intensity") else DIFFERENCE_RANGE
                        self.baselines[(name, c)] = AUROCFigures(*low_high, two_sided=name.startswith("intensity"))
                    self.baselines[(name, c)].add(score, mask, foreground)
        if image is not None and recon is not None:
            where = ~mask if foreground is None else (~mask & foreground)
            psnr = reconstruction_psnr(image, recon, where)
            if psnr is not None:
                entry["psnr_reconstruction"], entry["psnr_mean_image"] = psnr
                interpolation = reconstruction_psnr(image, interpolated, where)[0] if interpolated is not None \
                    else float("nan")
                entry["psnr_interpolation"] = interpolation
                self.psnr.append((case, *psnr, interpolation))
        self.cases[case] = entry
        if image is not None and recon is not None and self.wants_panel(mask):
            self.folder.mkdir(parents=True, exist_ok=True)
            k = _slice_for_panel(mask, axis)
            take = lambda a: np.take(a, k, axis=a.ndim - 3 + axis)  # noqa: E731
            path = self.folder / f"panel_{case.replace('/', '_')}.png"
            au = entry[f"auroc@{self.mask_ratios[0]:g}"]
            save_panel(path, take(image)[0], take(recon)[0], take(residuals)[0], take(mask),
                       f"{case}  (mask ratio {self.mask_ratios[0]:g}, case AUROC "
                       f"{'n/a' if au is None else f'{au:.3f}'})", residual_max=self.scale)
            self.panels.append(str(path))

    def baseline_summary(self) -> dict:
        """Per baseline: the figures of its best channel (by mean per-case AUROC, foreground if known)."""
        out = {}
        for name in BASELINES:
            channels = {c: fig.summary() for (n, c), fig in self.baselines.items() if n == name}
            if not channels:
                continue

            def rank(c):
                f = channels[c]
                v = f["mean_case_auroc_foreground"]
                v = f["mean_case_auroc"] if v is None else v
                return -1.0 if v is None else v

            best = max(channels, key=rank)
            out[name] = {**channels[best], "channel": best}
        if self.untrained is not None:
            for j, ratio in enumerate(self.mask_ratios):
                out[f"untrained_mae@{ratio:g}"] = self.untrained[j].summary()
        for j, ratio in enumerate(self.mask_ratios):
            if self.interpolation[j].per_case:
                out[f"interpolation@{ratio:g}"] = self.interpolation[j].summary()
        return out

    def reconstruction_summary(self) -> dict:
        if not self.psnr:
            return {}
        rec, mean, interpolation = np.array([v[1:] for v in self.psnr], dtype=np.float64).T
        gap = rec - mean
        out = {"cases": len(self.psnr), "median_psnr_reconstruction": float(np.median(rec)),
               "median_psnr_mean_image": float(np.median(mean)), "median_psnr_gap_db": float(np.median(gap)),
               "mean_psnr_gap_db": float(gap.mean()), "share_of_cases_gap_below_1db": float((gap < 1.0).mean()),
               "mask_ratio": self.mask_ratios[0],
               "definition": "PSNR (peak = the image's intensity range there) of the MAE reconstruction (each pixel "
                             "predicted while its patch was masked) on the lesion-free foreground pixels of the "
                             "normalized image, against predicting each channel's mean there, and against "
                             "interpolating each masked patch from the visible pixels around it (Gaussian-weighted "
                             "mean, same masks)"}
        if not np.isnan(interpolation).any():
            out["median_psnr_interpolation"] = float(np.median(interpolation))
            out["median_interpolation_gap_db"] = float(np.median(interpolation - mean))
        return out

    def summary(self) -> dict:
        overall = {}
        for j, ratio in enumerate(self.mask_ratios):
            fig = self.residual[j].summary()
            overall[f"{ratio:g}"] = {**fig, "cases_with_lesion": len(self.residual[j].per_case)}
        return {"mask_ratios": self.mask_ratios, "overall": overall, "baselines": self.baseline_summary(),
                "reconstruction": self.reconstruction_summary(), "num_labelled_cases": len(self.cases),
                "num_cases_without_label": self.cases_without_label, "panels": self.panels,
                "definition": "pixel-level AUROC of the float residual map for label > 0; pooled over all pixels of "
                              "all labelled cases (histograms) and mean over cases with lesion pixels; "
                              "*_foreground: the same over the pixels where any image channel is above its case "
                              "minimum; baselines: the same for maps without a trained MAE (intensity, better "
                              f"sign; |x - median|; |x - Gaussian(sigma {BASELINE_SIGMA:g}) * x|; best channel; "
                              "an untrained MAE's residual)",
                "cases": self.cases}

    def write(self, extra: dict = None) -> dict:
        self.folder.mkdir(parents=True, exist_ok=True)
        summary = {**(extra or {}), **self.summary()}
        (self.folder / "report.json").write_text(json.dumps(summary, indent=2))
        return summary


def format_comparison(summary: dict) -> list:
    """Lines comparing the residual's AUROC with each baseline's, and the reconstruction PSNR gap."""
    def value(x):
        return "n/a" if x is None else f"{x:.3f}"

    keys = ("pooled_auroc", "mean_case_auroc", "pooled_auroc_foreground", "mean_case_auroc_foreground")
    lines = [f"{'map':42s} {'pooled':>7s} {'per-case':>8s} {'pooled fg':>9s} {'per-case fg':>11s}"]
    for ratio, fig in summary["overall"].items():
        lines.append(f"{f'MAE residual @{ratio}':42s} " + " ".join(f"{value(fig[k]):>{w}s}"
                                                                   for k, w in zip(keys, (7, 8, 9, 11))))
    for name, fig in summary.get("baselines", {}).items():
        label = name + (f" (channel {fig['channel']})" if "channel" in fig else "")
        lines.append(f"{label:42s} " + " ".join(f"{value(fig[k]):>{w}s}" for k, w in zip(keys, (7, 8, 9, 11))))
    rec = summary.get("reconstruction") or {}
    if rec:
        lines.append(f"reconstruction PSNR on lesion-free pixels (mask ratio {rec['mask_ratio']:g}, median of "
                     f"{rec['cases']} cases): {rec['median_psnr_reconstruction']:.2f} dB against "
                     f"{rec['median_psnr_mean_image']:.2f} dB for the mean image "
                     f"(gap {rec['median_psnr_gap_db']:+.2f} dB)")
        if "median_psnr_interpolation" in rec:
            lines.append(f"  interpolating masked patches from the visible pixels (no model): "
                         f"{rec['median_psnr_interpolation']:.2f} dB "
                         f"(gap {rec['median_interpolation_gap_db']:+.2f} dB)")
    return lines
