"""How well do residual maps single out lesions? Pixel-level AUROC and PNG panels.

- Per case (where a label exists and has both lesion and background pixels): the AUROC of the residual
  map (as a score) for "lesion" = any label > 0, over all pixels/voxels of the case, exact (Mann-Whitney
  with mid-ranks for ties).
- Overall: the **pooled** AUROC over all pixels of all labelled cases, from 4096-bin histograms of
  the residual on ``[0, 4 * scale]`` (values beyond clipped into the last bin; ties within a bin count
  one half), plus the mean of the per-case AUROCs. Pooling rewards maps whose level is comparable
  across images (as the network sees them); the per-case mean measures localization within an image.
- Foreground: the same figures over the case's foreground only, the pixels/voxels where any image channel is
  above its minimum in that case (``foreground_mask``). The constant background of a skull-stripped MRI
  volume (83 % of the BraTS6 voxels) or the black frame of an ultrasound image has a low residual and is
  never lesion, so counting it inflates the AUROC (BraTS6: 0.85 over all voxels against 0.72 inside the brain).
- AUROC is computed on the float residual before its 8-bit encoding.
- Panels (matplotlib, Agg backend): image | MAE reconstruction | residual | lesion mask, for the first
  few cases with a lesion; for 3D the slice (along the slice axis) with the largest lesion area.
- ``report.json``: per-case and overall figures per mask ratio.
"""

import json
from pathlib import Path

import numpy as np

HIST_BINS = 4096


def auroc(scores: np.ndarray, labels: np.ndarray):
    """Exact AUROC of ``scores`` for boolean ``labels`` (mid-ranks for ties); ``None`` if one class is absent."""
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


class PooledAUROC:
    """AUROC over many cases from fixed-range histograms (constant memory)."""

    def __init__(self, high: float, bins: int = HIST_BINS):
        self.edges = np.linspace(0.0, float(high), bins + 1)
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


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """``image [C, *S]`` -> bool ``[*S]``: where any channel is above its minimum over the case."""
    image = np.asarray(image)
    minima = image.reshape(len(image), -1).min(axis=1).reshape(-1, *[1] * (image.ndim - 1))
    return (image > minima).any(axis=0)


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
    """Collects per-case AUROC and panels; :meth:`write` saves ``report.json``."""

    def __init__(self, folder, mask_ratios, scale: float, max_panels: int = 4):
        self.folder = Path(folder)
        self.mask_ratios = [float(r) for r in mask_ratios]
        self.scale = float(scale)
        self.max_panels = int(max_panels)
        self.cases = {}
        self.pooled = [PooledAUROC(4.0 * self.scale) for _ in self.mask_ratios]
        self.pooled_foreground = [PooledAUROC(4.0 * self.scale) for _ in self.mask_ratios]
        self.panels = []
        self.cases_without_label = 0

    def wants_panel(self, mask) -> bool:
        return mask is not None and len(self.panels) < self.max_panels and bool(np.any(mask))

    def add_case(self, case: str, residuals: np.ndarray, mask, image=None, recon=None, axis: int = 0,
                 foreground=None) -> None:
        """``residuals [R, Z, Y, X]`` float; ``mask [Z, Y, X]`` bool or None; image/recon ``[C, Z, Y, X]`` for a
        panel; ``foreground [Z, Y, X]`` bool (``foreground_mask`` of the raw image) for the foreground figures."""
        if mask is None:
            self.cases_without_label += 1
            return
        entry = {"lesion_pixels": int(mask.sum()), "pixels": int(mask.size)}
        if foreground is not None:
            entry["foreground_pixels"] = int(foreground.sum())
        for j, ratio in enumerate(self.mask_ratios):
            entry[f"auroc@{ratio:g}"] = auroc(residuals[j], mask)
            self.pooled[j].add(residuals[j], mask)
            if foreground is not None:
                entry[f"auroc_foreground@{ratio:g}"] = auroc(residuals[j][foreground], mask[foreground])
                self.pooled_foreground[j].add(residuals[j][foreground], mask[foreground])
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

    def summary(self) -> dict:
        overall = {}
        for j, ratio in enumerate(self.mask_ratios):
            per_case = [e[f"auroc@{ratio:g}"] for e in self.cases.values() if e[f"auroc@{ratio:g}"] is not None]
            per_case_foreground = [e[f"auroc_foreground@{ratio:g}"] for e in self.cases.values()
                                   if e.get(f"auroc_foreground@{ratio:g}") is not None]
            overall[f"{ratio:g}"] = {"pooled_auroc": self.pooled[j].value(),
                                     "mean_case_auroc": float(np.mean(per_case)) if per_case else None,
                                     "cases_with_lesion": len(per_case),
                                     "pooled_auroc_foreground": self.pooled_foreground[j].value(),
                                     "mean_case_auroc_foreground": (float(np.mean(per_case_foreground))
                                                                    if per_case_foreground else None)}
        return {"mask_ratios": self.mask_ratios, "overall": overall, "num_labelled_cases": len(self.cases),
                "num_cases_without_label": self.cases_without_label, "panels": self.panels,
                "definition": "pixel-level AUROC of the float residual map for label > 0; pooled over all pixels of "
                              "all labelled cases (histograms) and mean over cases with lesion pixels; "
                              "*_foreground: the same over the pixels where any image channel is above its case "
                              "minimum",
                "cases": self.cases}

    def write(self, extra: dict = None) -> dict:
        self.folder.mkdir(parents=True, exist_ok=True)
        summary = {**(extra or {}), **self.summary()}
        (self.folder / "report.json").write_text(json.dumps(summary, indent=2))
        return summary
