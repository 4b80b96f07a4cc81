"""Overlay PNGs: image | ground truth | prediction, for 2D images and one slice of 3D volumes.

Small and self-contained (numpy + matplotlib's object API, no pyplot state, no nnU-Net), so the evaluation
command and the demo both draw with it::

    save_overlay_png(image, reference, prediction, "case.png", title="case_001  Dice 0.83")
    save_overlay_grid([OverlayCase(image, ref, pred, title="a"), OverlayCase(None, ref2, pred2, title="b")],
                      "cases.png")

Arrays: ``reference`` and ``prediction`` are label maps (0 = background, each label id its own colour) of
the same shape, 2D or 3D, in nnU-Net's axis order; axes of length 1 are dropped (nnU-Net's ``1 x H x W``
2D layout and a leading channel axis of 1 both work). ``image`` has the same shape, or one more leading
channel axis (``channel`` picks one), or is ``None``: then the masks are drawn alone on black.
For 3D data the slice along ``axis`` (default 0, nnU-Net's first spatial axis) with the most reference
foreground is shown (the most predicted foreground if the reference is empty, the middle slice if both are);
``slice_index`` forces one. ``spacing`` (one value per axis of the arrays as given) sets the pixel aspect.

Panels: the image in grey (0.5-99.5 percentile window); the ground truth filled in colour; the prediction
filled in colour with the ground-truth outline drawn over it in white, so misses and false positives show.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]
_ALPHA = 0.45
_PANEL_INCHES = 3.0


@dataclass
class OverlayCase:
    """One row of an overlay grid."""

    image: Optional[np.ndarray]
    reference: np.ndarray
    prediction: np.ndarray
    title: str = ""
    spacing: Optional[Sequence[float]] = None
    slice_index: Optional[int] = None


def save_overlay_png(image: Optional[np.ndarray], reference: np.ndarray, prediction: np.ndarray, path: PathLike,
                     title: str = "", spacing: Optional[Sequence[float]] = None, axis: int = 0,
                     slice_index: Optional[int] = None, channel: int = 0, dpi: int = 100) -> Path:
    """Write one row, image | ground truth | prediction, to ``path`` (PNG). Returns the path."""
    case = OverlayCase(image, reference, prediction, title=title, spacing=spacing, slice_index=slice_index)
    return save_overlay_grid([case], path, axis=axis, channel=channel, dpi=dpi)


def save_overlay_grid(cases: Iterable[Union[OverlayCase, Mapping]], path: PathLike, title: str = "",
                      axis: int = 0, channel: int = 0, dpi: int = 100) -> Path:
    """Write one row per case (an :class:`OverlayCase` or a dict with the same keys) to ``path`` (PNG).

    The image column is left out when no case has an image. Returns the path.
    """
    from matplotlib.figure import Figure  # lazy: keeps `import nnunetv2_grcsf.evaluation` light

    rows = [_as_case(c) for c in cases]
    if not rows:
        raise ValueError("save_overlay_grid needs at least one case")
    slices = [overlay_slices(c.image, c.reference, c.prediction, c.spacing, axis, c.slice_index, channel)
              for c in rows]
    with_image = any(s[0] is not None for s in slices)
    columns = (["image"] if with_image else []) + ["ground truth", "prediction (white: ground truth)"]
    max_label = max(int(max(s[1].max(initial=0), s[2].max(initial=0))) for s in slices)

    fig = Figure(figsize=(_PANEL_INCHES * len(columns), _PANEL_INCHES * len(rows) + (0.4 if title else 0.0)))
    axes = np.asarray(fig.subplots(len(rows), len(columns), squeeze=False))
    for r, (case, (img, ref, pred, aspect, where)) in enumerate(zip(rows, slices)):
        background = img if img is not None else np.zeros(ref.shape, dtype=np.float32)
        panels = ([("image", None, False)] if with_image else []) + [("ground truth", ref, False),
                                                                     ("prediction", pred, True)]
        for c, ((name, mask, outline_reference), header) in enumerate(zip(panels, columns)):
            ax = axes[r, c]
            _show_gray(ax, background if (img is not None or name != "image") else None, aspect)
            if mask is not None:
                alpha = _ALPHA if img is not None else 0.85  # masks alone: nearly opaque on black
                ax.imshow(_label_rgba(mask, max_label, alpha), aspect=aspect, interpolation="nearest")
            if outline_reference and ref.any():
                ax.contour(ref > 0, levels=[0.5], colors="white", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(header, fontsize=10)
        row_label = case.title + (f"\n{where}" if where else "")
        if row_label:
            axes[r, 0].set_ylabel(row_label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def overlay_slices(image: Optional[np.ndarray], reference: np.ndarray, prediction: np.ndarray,
                   spacing: Optional[Sequence[float]] = None, axis: int = 0, slice_index: Optional[int] = None,
                   channel: int = 0) -> Tuple[Optional[np.ndarray], np.ndarray, np.ndarray, float, str]:
    """The 2D planes drawn for one case: ``(image, reference, prediction, aspect, where)``.

    ``aspect`` is the pixel height/width ratio from the spacing; ``where`` describes the slice for 3D data
    (``"slice 12/40 (axis 0)"``) and is empty for 2D data.
    """
    reference = np.asarray(reference)
    prediction = np.asarray(prediction)
    if reference.shape != prediction.shape:
        raise ValueError(f"reference and prediction differ in shape: {reference.shape} vs {prediction.shape}")
    if image is not None:
        image = np.asarray(image)
        if image.ndim == reference.ndim + 1:
            image = image[channel]
        if image.shape != reference.shape:
            raise ValueError(f"image shape {image.shape} does not match the masks' shape {reference.shape}")
    keep = [i for i, n in enumerate(reference.shape) if n != 1]
    if len(keep) < 2:
        raise ValueError(f"cannot draw masks of shape {reference.shape}: need at least 2 axes longer than 1")
    if len(keep) > 3:
        raise ValueError(f"cannot draw masks of shape {reference.shape}: more than 3 spatial axes")
    new_shape = [reference.shape[i] for i in keep]
    reference, prediction = reference.reshape(new_shape), prediction.reshape(new_shape)
    image = image.reshape(new_shape) if image is not None else None
    sp = np.asarray(spacing, dtype=float)[keep] if spacing is not None else np.ones(len(keep))

    where = ""
    if len(keep) == 3:
        if not 0 <= axis < 3:
            raise ValueError(f"axis must be 0, 1 or 2 for 3D data, got {axis}")
        index = select_slice(reference, prediction, axis) if slice_index is None else int(slice_index)
        if not 0 <= index < reference.shape[axis]:
            raise ValueError(f"slice_index {index} out of range for {reference.shape[axis]} slices along axis {axis}")
        take = lambda a: np.take(a, index, axis=axis)  # noqa: E731
        reference, prediction = take(reference), take(prediction)
        image = take(image) if image is not None else None
        sp = np.delete(sp, axis)
        where = f"slice {index}/{new_shape[axis]} (axis {axis})"
    return image, reference, prediction, float(sp[0] / sp[1]), where


def select_slice(reference: np.ndarray, prediction: Optional[np.ndarray] = None, axis: int = 0) -> int:
    """Index along ``axis`` of the slice with the most reference foreground (ties: the first).

    Falls back to the prediction's foreground when the reference is empty, and to the middle slice when
    both are empty.
    """
    for mask in (reference, prediction):
        if mask is None:
            continue
        fg = np.asarray(mask) > 0
        if fg.any():
            other_axes = tuple(i for i in range(fg.ndim) if i != axis)
            return int(np.argmax(fg.sum(axis=other_axes)))
    return int(np.asarray(reference).shape[axis] // 2)


def label_colour(label: int) -> Tuple[float, float, float]:
    """RGB colour of a label id: 1 red, 2 blue, 3 green, then more of matplotlib's tab10 (cycling)."""
    from matplotlib import colormaps

    palette = [(0.89, 0.10, 0.11), (0.12, 0.47, 0.71), (0.20, 0.63, 0.17)] + \
        [tuple(colormaps["tab10"](i)[:3]) for i in (1, 4, 5, 6, 8, 9)]
    return palette[(int(label) - 1) % len(palette)]


def _label_rgba(mask: np.ndarray, max_label: int, alpha: float = _ALPHA) -> np.ndarray:
    rgba = np.zeros(mask.shape + (4,), dtype=np.float32)
    for label in range(1, max_label + 1):
        where = mask == label
        if where.any():
            rgba[where, :3] = label_colour(label)
            rgba[where, 3] = alpha
    return rgba


def _show_gray(ax, plane: Optional[np.ndarray], aspect: float) -> None:
    if plane is None:
        ax.set_facecolor("black")
        ax.text(0.5, 0.5, "no image", color="white", ha="center", va="center", transform=ax.transAxes)
        return
    plane = np.asarray(plane, dtype=np.float32)
    lo, hi = (np.percentile(plane, (0.5, 99.5)) if plane.size else (0.0, 1.0))
    if hi <= lo:
        hi = lo + 1.0
    ax.imshow(plane, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")


def _as_case(case: Union[OverlayCase, Mapping]) -> OverlayCase:
    if isinstance(case, OverlayCase):
        return case
    if isinstance(case, Mapping):
        unknown = set(case) - {"image", "reference", "prediction", "title", "spacing", "slice_index"}
        if unknown:
            raise ValueError(f"unknown overlay case keys {sorted(unknown)}")
        return OverlayCase(image=case.get("image"), reference=case["reference"], prediction=case["prediction"],
                           title=case.get("title", ""), spacing=case.get("spacing"),
                           slice_index=case.get("slice_index"))
    raise TypeError(f"an overlay case must be an OverlayCase or a mapping, got {type(case).__name__}")


__all__: List[str] = ["OverlayCase", "save_overlay_png", "save_overlay_grid", "overlay_slices", "select_slice",
                      "label_colour"]
