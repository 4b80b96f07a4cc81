"""Lesion-aware segmentation metrics on binary masks: pure numpy/scipy, no nnU-Net, no torch.

Dice is *not* computed here: the folder evaluation (:mod:`nnunetv2_grcsf.evaluation.evaluate`) takes it
from nnU-Net's own ``nnunetv2.evaluation.evaluate_predictions.compute_metrics`` so that our numbers agree
with nnU-Net's ``summary.json``. This module adds what lesion work needs beside it: surface distance
(HD95), absolute volume difference and lesion-wise detection. All of it is our design (neither GRCSF nor
FIAS publish an evaluation protocol); the conventions below follow the lesion-segmentation challenges
(BraTS, ISLES 2022, ATLAS v2.0) and MONAI / DeepMind ``surface-distance`` where they agree.

Geometry
    Masks are numpy arrays in nnU-Net's axis order, ``spacing`` one physical size per axis (mm for NIfTI;
    pixels for PNG). Axes of length 1 are dropped before any measurement: nnU-Net stores a 2D image as
    ``1 x H x W`` with a placeholder spacing of 999 on the first axis, and that axis must neither turn
    every pixel into a surface pixel nor multiply areas by 999. So 2D images give areas (units^2) and
    in-plane distances, 3D images volumes (units^3).

HD95 (:func:`hd95`)
    Surface voxels of a mask are its voxels with at least one face neighbour (6-neighbourhood in 3D,
    4 in 2D) outside the mask; the image border counts as outside. The distance of a surface voxel to
    the other mask's surface is the Euclidean distance between voxel centres in physical units
    (``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``). HD95 is the larger of the two
    directed 95th percentiles (reference->prediction and prediction->reference), as in MONAI's
    ``compute_hausdorff_distance(percentile=95)`` and DeepMind's ``compute_robust_hausdorff`` (without
    surfel-area weights). Percentiles use numpy's default linear interpolation.
    Raw values for empty masks: NaN when both are empty, +inf when exactly one is empty (the distance to
    an empty set); :class:`EmptyConvention` turns those into reportable numbers.

Lesion-wise detection (:func:`lesion_detection`)
    Lesions are the connected components of each mask (``scipy.ndimage.label``; ``connectivity='full'``:
    26-neighbourhood in 3D, 8 in 2D, as BraTS and ISLES use; ``'face'``: 6 / 4). Components smaller than
    ``min_lesion_voxels`` are dropped from both masks first. A reference lesion and a predicted component
    *match* when their IoU is greater than ``iou_threshold``; the default 0 means "they share at least one
    voxel" (ISLES 2022 / ATLAS lesion-wise F1). Then
    TP = reference lesions matched by at least one predicted component, FN = reference lesions matched by
    none, FP = predicted components that match no reference lesion; precision = TP/(TP+FP),
    recall = TP/(TP+FN), F1 = 2TP/(2TP+FP+FN). A predicted component covering two lesions gives two TPs,
    and a lesion split into two predicted pieces gives one TP and no FP: merges and splits are not
    penalized (the ISLES convention); raise ``iou_threshold`` (e.g. 0.1) to demand real overlap.

Volumes (:func:`absolute_volume_difference`)
    ``|V_pred - V_ref|`` with V = voxel count x voxel volume (product of the kept axes' spacing).

Empty cases (:class:`EmptyConvention`, chosen by name, ``'lesion'`` by default)
    ``'lesion'`` (BraTS 2021-2023, ISLES 2022): a correctly empty prediction is a perfect answer. Both
    empty: Dice 1 (and IoU 1), HD95 0, lesion precision = recall = F1 = 1. Exactly one empty: Dice 0 (nnU-Net's
    formula already gives it), HD95 = the image diagonal in physical units (the largest distance in the
    image, BraTS's 373.13 mm penalty for 240x240x155), lesion F1 0; recall is NaN when there is no
    reference lesion and precision is NaN when there is no predicted component (0/0: not defined, left
    out of means). Every Dice and HD95 is then finite, and means over cases penalize missed and phantom
    lesions.
    ``'nan'`` (nnU-Net, Metrics Reloaded): whatever is 0/0 is NaN and left out of means: Dice NaN when
    both are empty (as nnU-Net's ``summary.json``), HD95 NaN whenever either mask is empty, precision /
    recall / F1 NaN when they are 0/0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

CONNECTIVITIES = ("full", "face")


# ----------------------------------------------------------------------------------------- geometry
def squeeze_geometry(mask: np.ndarray, spacing: Optional[Sequence[float]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Drop axes of length 1 (with their spacing). Returns ``(mask, spacing)``; spacing defaults to 1s."""
    mask = np.asarray(mask)
    if spacing is None:
        spacing = np.ones(mask.ndim)
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (mask.ndim,):
        raise ValueError(f"spacing {tuple(spacing)} does not match an array of {mask.ndim} axes (shape {mask.shape})")
    if np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
        raise ValueError(f"spacing must be positive and finite, got {tuple(spacing)}")
    keep = [i for i, n in enumerate(mask.shape) if n != 1]
    if not keep:  # a single voxel: keep one axis so that the array stays an array
        keep = [mask.ndim - 1]
    return mask.reshape([mask.shape[i] for i in keep]), spacing[keep]


def image_diagonal(shape: Sequence[int], spacing: Optional[Sequence[float]] = None) -> float:
    """Length of the image diagonal in physical units, ``sqrt(sum((n_i * s_i)^2))`` over axes longer than 1."""
    m, sp = squeeze_geometry(np.zeros(tuple(shape), dtype=bool), spacing)
    return float(np.sqrt(np.sum((np.asarray(m.shape) * sp) ** 2)))


def volume(mask: np.ndarray, spacing: Optional[Sequence[float]] = None) -> float:
    """Physical volume of a binary mask (area for 2D images)."""
    m, sp = squeeze_geometry(np.asarray(mask, dtype=bool), spacing)
    return float(np.count_nonzero(m) * np.prod(sp))


def absolute_volume_difference(reference: np.ndarray, prediction: np.ndarray,
                               spacing: Optional[Sequence[float]] = None) -> float:
    """``|V_pred - V_ref|`` in physical units (units^3, or units^2 for 2D)."""
    _check_same_shape(reference, prediction)
    return abs(volume(prediction, spacing) - volume(reference, spacing))


# -------------------------------------------------------------------------------- surface distance
def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: in the mask, with a face neighbour outside it (the image border counts as outside)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return mask & ~eroded


def directed_surface_distances(from_mask: np.ndarray, to_mask: np.ndarray,
                               spacing: Optional[Sequence[float]] = None) -> np.ndarray:
    """Distances (physical units) from each surface voxel of ``from_mask`` to the surface of ``to_mask``.

    Both masks must be non-empty. Axes of length 1 are dropped first.
    """
    _check_same_shape(from_mask, to_mask)
    a, sp = squeeze_geometry(np.asarray(from_mask, dtype=bool), spacing)
    b, _ = squeeze_geometry(np.asarray(to_mask, dtype=bool), spacing)
    if not a.any() or not b.any():
        raise ValueError("directed_surface_distances needs two non-empty masks")
    surface_b = surface(b)
    distance_to_b = ndimage.distance_transform_edt(~surface_b, sampling=sp)
    return distance_to_b[surface(a)]


def hd95(reference: np.ndarray, prediction: np.ndarray, spacing: Optional[Sequence[float]] = None,
         percentile: float = 95.0) -> float:
    """95th-percentile Hausdorff distance in physical units (see the module docstring).

    Raw empty-mask values: NaN when both masks are empty, +inf when exactly one is.
    """
    _check_same_shape(reference, prediction)
    ref = np.asarray(reference, dtype=bool)
    pred = np.asarray(prediction, dtype=bool)
    has_ref, has_pred = bool(ref.any()), bool(pred.any())
    if not has_ref and not has_pred:
        return math.nan
    if has_ref != has_pred:
        return math.inf
    ref, pred = _crop_to_foreground(ref, pred)  # same distances, far less work on large volumes
    d_ref_to_pred = directed_surface_distances(ref, pred, spacing)
    d_pred_to_ref = directed_surface_distances(pred, ref, spacing)
    return float(max(np.percentile(d_ref_to_pred, percentile), np.percentile(d_pred_to_ref, percentile)))


# -------------------------------------------------------------------------------- lesion detection
def connected_components(mask: np.ndarray, connectivity: str = "full",
                         min_lesion_voxels: int = 1) -> Tuple[np.ndarray, int]:
    """Label the connected components of a binary mask; components below ``min_lesion_voxels`` are dropped.

    Returns ``(labels, n)`` with labels 1..n (consecutive) and 0 for background, shape as the input.
    """
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be one of {CONNECTIVITIES}, got {connectivity!r}")
    mask = np.asarray(mask, dtype=bool)
    squeezed, _ = squeeze_geometry(mask)
    structure = ndimage.generate_binary_structure(squeezed.ndim, squeezed.ndim if connectivity == "full" else 1)
    labels, n = ndimage.label(squeezed, structure=structure)
    if min_lesion_voxels > 1 and n > 0:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= min_lesion_voxels
        keep[0] = False
        relabel = np.zeros(n + 1, dtype=labels.dtype)
        relabel[keep] = np.arange(1, int(keep.sum()) + 1, dtype=labels.dtype)
        labels = relabel[labels]
        n = int(keep.sum())
    return labels.reshape(mask.shape), int(n)


@dataclass(frozen=True)
class LesionDetection:
    """Lesion counts of one case (one label). See the module docstring for the matching rule."""

    n_reference: int  # reference lesions (connected components)
    n_predicted: int  # predicted components
    tp: int  # reference lesions matched by a predicted component
    fp: int  # predicted components that match no reference lesion
    fn: int  # reference lesions matched by no predicted component

    def precision(self, empty_value: float = math.nan) -> float:
        """TP/(TP+FP); ``empty_value`` when there are neither reference lesions nor predicted components.

        With predicted components but no reference lesions it is 0; with reference lesions but no
        predicted component it is 0/0 and NaN.
        """
        if self.tp + self.fp > 0:
            return self.tp / (self.tp + self.fp)
        return empty_value if self.n_reference == 0 else math.nan

    def recall(self, empty_value: float = math.nan) -> float:
        """TP/(TP+FN); ``empty_value`` when both are empty, NaN when there is no reference lesion only."""
        if self.tp + self.fn > 0:
            return self.tp / (self.tp + self.fn)
        return empty_value if self.n_predicted == 0 else math.nan

    def f1(self, empty_value: float = math.nan) -> float:
        """2TP/(2TP+FP+FN); ``empty_value`` when both are empty (0/0)."""
        denominator = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denominator if denominator > 0 else empty_value

    def __add__(self, other: "LesionDetection") -> "LesionDetection":
        """Pool counts over cases (or labels)."""
        return LesionDetection(self.n_reference + other.n_reference, self.n_predicted + other.n_predicted,
                               self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)


def lesion_detection(reference: np.ndarray, prediction: np.ndarray, iou_threshold: float = 0.0,
                     connectivity: str = "full", min_lesion_voxels: int = 1) -> LesionDetection:
    """Lesion-wise TP/FP/FN: a pair (reference lesion, predicted component) matches when IoU > ``iou_threshold``.

    ``iou_threshold=0`` (default): any overlap of at least one voxel.
    """
    if not 0.0 <= iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold}")
    _check_same_shape(reference, prediction)
    reference, prediction = _crop_to_foreground(np.asarray(reference, dtype=bool), np.asarray(prediction, dtype=bool))
    ref_labels, n_ref = connected_components(reference, connectivity, min_lesion_voxels)
    pred_labels, n_pred = connected_components(prediction, connectivity, min_lesion_voxels)
    if n_ref == 0 or n_pred == 0:
        return LesionDetection(n_ref, n_pred, tp=0, fp=n_pred, fn=n_ref)
    ref_sizes = np.bincount(ref_labels.ravel(), minlength=n_ref + 1)
    pred_sizes = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)
    both = (ref_labels > 0) & (pred_labels > 0)
    pair_ids, intersections = np.unique(ref_labels[both].astype(np.int64) * (n_pred + 1) + pred_labels[both],
                                        return_counts=True)
    pair_ref, pair_pred = pair_ids // (n_pred + 1), pair_ids % (n_pred + 1)
    unions = ref_sizes[pair_ref] + pred_sizes[pair_pred] - intersections
    matched = intersections / unions > iou_threshold
    tp = len(np.unique(pair_ref[matched]))
    matched_pred = len(np.unique(pair_pred[matched]))
    return LesionDetection(n_ref, n_pred, tp=tp, fp=n_pred - matched_pred, fn=n_ref - tp)


# ------------------------------------------------------------------------------- empty conventions
@dataclass(frozen=True)
class EmptyConvention:
    """How empty reference / prediction masks are reported (see the module docstring)."""

    name: str
    dice_both_empty: float  # replaces nnU-Net's NaN Dice when both masks are empty
    hd95_both_empty: float
    hd95_one_empty: Optional[float]  # None: the image diagonal in physical units
    detection_both_empty: float  # lesion precision, recall and F1 when there are no lesions at all

    def hd95(self, raw: float, shape: Sequence[int], spacing: Optional[Sequence[float]]) -> float:
        """Turn a raw :func:`hd95` value (NaN both empty, inf one empty) into the reported one."""
        if math.isnan(raw):
            return self.hd95_both_empty
        if math.isinf(raw):
            return image_diagonal(shape, spacing) if self.hd95_one_empty is None else self.hd95_one_empty
        return raw

    def dice(self, nnunet_dice: float) -> float:
        """nnU-Net's Dice with the both-empty NaN replaced (a NaN Dice from nnU-Net means both are empty)."""
        return self.dice_both_empty if math.isnan(nnunet_dice) else nnunet_dice


EMPTY_CONVENTIONS: Dict[str, EmptyConvention] = {
    "lesion": EmptyConvention("lesion", dice_both_empty=1.0, hd95_both_empty=0.0, hd95_one_empty=None,
                              detection_both_empty=1.0),
    "nan": EmptyConvention("nan", dice_both_empty=math.nan, hd95_both_empty=math.nan, hd95_one_empty=math.nan,
                           detection_both_empty=math.nan),
}


def get_empty_convention(name_or_convention) -> EmptyConvention:
    """An :class:`EmptyConvention` by name (``'lesion'`` or ``'nan'``), or the one given."""
    if isinstance(name_or_convention, EmptyConvention):
        return name_or_convention
    try:
        return EMPTY_CONVENTIONS[name_or_convention]
    except KeyError:
        raise ValueError(f"unknown empty-case convention {name_or_convention!r}; "
                         f"choose one of {sorted(EMPTY_CONVENTIONS)}") from None


# ------------------------------------------------------------------------------------- one case
def lesion_metrics(reference: np.ndarray, prediction: np.ndarray, spacing: Optional[Sequence[float]] = None,
                   iou_threshold: float = 0.0, connectivity: str = "full", min_lesion_voxels: int = 1,
                   empty="lesion") -> dict:
    """Everything but Dice for one binary reference / prediction pair, as a flat dict of numbers.

    Keys: ``HD95``, ``volume_ref``, ``volume_pred``, ``AVD`` (absolute volume difference),
    ``lesions_ref``, ``lesions_pred``, ``lesion_TP``, ``lesion_FP``, ``lesion_FN``,
    ``lesion_precision``, ``lesion_recall``, ``lesion_F1``. Distances in the spacing's unit, volumes in
    its cube (square for 2D images). ``empty``: an :class:`EmptyConvention` or its name.
    """
    convention = get_empty_convention(empty)
    _check_same_shape(reference, prediction)
    ref = np.asarray(reference, dtype=bool)
    pred = np.asarray(prediction, dtype=bool)
    detection = lesion_detection(ref, pred, iou_threshold, connectivity, min_lesion_voxels)
    volume_ref, volume_pred = volume(ref, spacing), volume(pred, spacing)
    return {
        "HD95": convention.hd95(hd95(ref, pred, spacing), ref.shape, spacing),
        "volume_ref": volume_ref,
        "volume_pred": volume_pred,
        "AVD": abs(volume_pred - volume_ref),
        **detection_metrics(detection, convention),
    }


def detection_metrics(detection: LesionDetection, empty="lesion") -> dict:
    """The ``lesion_*`` entries of :func:`lesion_metrics` for (possibly pooled) lesion counts."""
    convention = get_empty_convention(empty)
    e = convention.detection_both_empty
    return {
        "lesions_ref": detection.n_reference,
        "lesions_pred": detection.n_predicted,
        "lesion_TP": detection.tp,
        "lesion_FP": detection.fp,
        "lesion_FN": detection.fn,
        "lesion_precision": detection.precision(e),
        "lesion_recall": detection.recall(e),
        "lesion_F1": detection.f1(e),
    }


def _crop_to_foreground(a: np.ndarray, b: np.ndarray, pad: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of their union plus ``pad`` voxels (clipped at the image border).

    Surfaces, surface distances and connected components inside are those of the full arrays: a pad of one
    voxel keeps the background around every surface voxel, and the image border stays where it was.
    """
    union = a | b
    if not union.any():
        return a, b
    box = []
    for axis in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != axis)
        hits = np.flatnonzero(union.any(axis=other))
        box.append(slice(max(int(hits[0]) - pad, 0), min(int(hits[-1]) + pad + 1, union.shape[axis])))
    return a[tuple(box)], b[tuple(box)]


def _check_same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if np.shape(a) != np.shape(b):
        raise ValueError(f"reference and prediction differ in shape: {np.shape(a)} vs {np.shape(b)}")
