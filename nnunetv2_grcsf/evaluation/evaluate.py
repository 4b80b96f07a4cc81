"""Folder evaluation: nnU-Net's Dice plus HD95, volume difference and lesion-wise detection.

:func:`evaluate_folders` is what ``nnunetv2_grcsf evaluate`` runs. Per case it reads the reference and the
prediction once with the dataset's reader/writer (as ``nnUNetv2_evaluate_folder`` does), takes Dice, IoU and
the voxel TP/FP/FN/TN from nnU-Net's own ``nnunetv2.evaluation.evaluate_predictions.compute_metrics`` (so the
Dice is nnU-Net's, number for number), and adds the lesion metrics of
:mod:`nnunetv2_grcsf.evaluation.metrics` (whose docstring states every convention: HD95, lesion matching,
empty cases, units). Outputs, none written over without ``overwrite``:

- ``<output>.json``: settings, ``metric_per_case`` (per label), ``mean`` (per label: the mean over cases,
  NaN values left out), ``pooled`` (per label: lesion counts summed over all cases and the precision,
  recall and F1 of those totals: detection counted over lesions, not averaged over cases) and
  ``foreground_mean`` (the mean of the per-label means; pooled counts summed over labels). NaN is written
  as ``null``. Label keys are nnU-Net's (``"1"``, or ``"(1, 2)"`` for regions).
- ``<output>.csv``: one row per case and label, then rows ``MEAN`` and ``POOLED`` per label (and
  ``foreground_mean`` when there are several labels).
- with ``png``: ``<output>_worst.png`` and ``<output>_best.png``, overlays of the cases with the lowest and
  highest Dice (mean over the labels; ties: larger reference first), drawn with
  :mod:`nnunetv2_grcsf.evaluation.overlay`, with the images when an images folder is given.

Where the labels and the file format come from: a ``dataset.json`` (given; else the one that
``nnUNetv2_predict`` writes into the predictions folder; else the one in the reference folder's parent, i.e.
the raw dataset folder of ``labelsTr``). Without any, labels must be given and the reader/writer is
chosen from the reference files' ending, as ``nnUNetv2_evaluate_simple`` does.

When the dataset has an ignore label, its voxels are left out of nnU-Net's Dice (nnU-Net does that) and
removed from the predicted masks before the lesion metrics.
"""
from __future__ import annotations

import csv
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from nnunetv2_grcsf.errors import UserFacingError
from nnunetv2_grcsf.evaluation.metrics import (CONNECTIVITIES, EMPTY_CONVENTIONS, LesionDetection,
                                               detection_metrics, get_empty_convention, lesion_metrics)

PathLike = Union[str, os.PathLike]

DEFAULT_OUTPUT_NAME = "summary_lesions.json"
#: per-case metric keys, in CSV / table order
METRIC_KEYS = ("Dice", "IoU", "HD95", "AVD", "volume_ref", "volume_pred", "lesions_ref", "lesions_pred",
               "lesion_TP", "lesion_FP", "lesion_FN", "lesion_precision", "lesion_recall", "lesion_F1",
               "TP", "FP", "FN", "TN", "n_ref", "n_pred")
POOLED_KEYS = ("lesions_ref", "lesions_pred", "lesion_TP", "lesion_FP", "lesion_FN", "lesion_precision",
               "lesion_recall", "lesion_F1")
_SPACING_RTOL = 1e-4
_MAX_NAMED = 20


class EvaluationError(UserFacingError, ValueError):
    """Bad input to the evaluation (its message names the cases / labels / files and what to do).

    A :class:`~nnunetv2_grcsf.errors.UserFacingError`: the command line prints it as ``error: ...``, exit 2.
    """


@dataclass(frozen=True)
class LesionSettings:
    """How the lesion metrics are computed (see :mod:`nnunetv2_grcsf.evaluation.metrics`)."""

    iou_threshold: float = 0.0
    connectivity: str = "full"
    min_lesion_voxels: int = 1
    empty: str = "lesion"

    def __post_init__(self):
        if not 0.0 <= self.iou_threshold < 1.0:
            raise EvaluationError(f"iou_threshold must be in [0, 1), got {self.iou_threshold}")
        if self.connectivity not in CONNECTIVITIES:
            raise EvaluationError(f"connectivity must be one of {CONNECTIVITIES}, got {self.connectivity!r}")
        if self.min_lesion_voxels < 1:
            raise EvaluationError(f"min_lesion_voxels must be at least 1, got {self.min_lesion_voxels}")
        if self.empty not in EMPTY_CONVENTIONS:
            raise EvaluationError(f"empty-case convention must be one of {sorted(EMPTY_CONVENTIONS)}, "
                                  f"got {self.empty!r}")


# ------------------------------------------------------------------------------ inputs and checks
def find_dataset_json(reference_folder: PathLike, prediction_folder: PathLike,
                      dataset_json: Optional[PathLike] = None) -> Optional[Path]:
    """The dataset.json to use: the given one, else ``PRED/dataset.json``, else ``dirname(REF)/dataset.json``."""
    if dataset_json is not None:
        path = Path(dataset_json)
        if not path.is_file():
            raise EvaluationError(f"dataset.json not found: {path}")
        return path
    for candidate in (Path(prediction_folder) / "dataset.json", Path(reference_folder).resolve().parent / "dataset.json"):
        if candidate.is_file():
            return candidate
    return None


def resolve_labels(dataset_json: Optional[dict], labels: Optional[Sequence[int]] = None,
                   dataset_json_path: Optional[PathLike] = None):
    """``(labels_or_regions, names, ignore_label)`` to evaluate.

    Default: the dataset's foreground regions (region-based datasets) or foreground labels. ``labels``
    (label ids as stored in the files) must be foreground labels of the dataset.json when there is one.
    """
    if dataset_json is None:
        if not labels:
            raise EvaluationError("no dataset.json found (looked in the predictions folder and in the reference "
                                  "folder's parent): pass -djfile DATASET_JSON, or the labels to evaluate with -l")
        return [int(i) for i in labels], {int(i): "" for i in labels}, None

    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    where = f" ({dataset_json_path})" if dataset_json_path else ""
    if "labels" not in dataset_json:
        raise EvaluationError(f"dataset.json{where} has no 'labels' entry")
    try:
        manager = LabelManager(dataset_json["labels"], regions_class_order=dataset_json.get("regions_class_order"))
    except (AssertionError, RuntimeError) as e:
        raise EvaluationError(f"cannot read the labels of dataset.json{where}: {e}") from e
    names = {}
    for name, value in dataset_json["labels"].items():
        key = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else int(value)
        if isinstance(key, tuple) and len(key) == 1:
            key = key[0]
        names.setdefault(key, name)
    valid = [i for i in manager.all_labels if i != 0]
    if labels:
        unknown = [int(i) for i in labels if int(i) not in valid]
        if unknown:
            listing = ", ".join(f"{i} ({names.get(i, '')})".replace(" ()", "") for i in valid)
            raise EvaluationError(f"label id(s) {', '.join(map(str, unknown))} not in dataset.json{where}; "
                                  f"valid foreground labels: {listing or 'none'}")
        chosen = list(dict.fromkeys(int(i) for i in labels))
    else:
        chosen = list(manager.foreground_regions if manager.has_regions else manager.foreground_labels)
    chosen = [int(i) if not isinstance(i, (tuple, list)) else tuple(int(j) for j in i) for i in chosen]
    if not chosen:
        raise EvaluationError(f"dataset.json{where} defines no foreground label to evaluate")
    return chosen, {c: names.get(c, "") for c in chosen}, manager.ignore_label


def list_cases(folder: PathLike, file_ending: str) -> Dict[str, Path]:
    """``{case_id: file}`` of the files in ``folder`` ending in ``file_ending`` (sorted by case id)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(file_ending)
                   and not p.name.startswith("."))
    return {p.name[: -len(file_ending)]: p for p in files}


def match_cases(reference: Dict[str, Path], prediction: Dict[str, Path], reference_folder: PathLike,
                prediction_folder: PathLike, chill: bool = False) -> Tuple[List[str], List[str]]:
    """Case ids to evaluate and the reference cases skipped (``chill``); raises on mismatched case sets."""
    missing = sorted(set(reference) - set(prediction))
    extra = sorted(set(prediction) - set(reference))
    problems = []
    if extra:
        problems.append(f"{len(extra)} predicted case(s) have no reference file in {reference_folder}: "
                        f"{_name_some(extra)}")
    if missing and not chill:
        problems.append(f"{len(missing)} reference case(s) have no prediction in {prediction_folder}: "
                        f"{_name_some(missing)} (pass --chill to evaluate only the predicted cases)")
    if problems:
        raise EvaluationError("prediction and reference folders hold different cases: " + "; ".join(problems))
    cases = sorted(set(reference) & set(prediction))
    if not cases:
        raise EvaluationError(f"no case has both a reference in {reference_folder} and a prediction in "
                              f"{prediction_folder}")
    return cases, missing


def output_paths(output_json: PathLike, png: bool) -> Dict[str, Path]:
    """The files an evaluation writes for ``output_json`` (``.json``; ``.csv``, ``_worst.png``, ``_best.png``)."""
    output_json = Path(output_json)
    if output_json.suffix != ".json":
        raise EvaluationError(f"the output file must end with .json, got {output_json}")
    stem = output_json.with_suffix("")
    paths = {"json": output_json, "csv": stem.with_suffix(".csv")}
    if png:
        paths["png_worst"] = stem.parent / f"{stem.name}_worst.png"
        paths["png_best"] = stem.parent / f"{stem.name}_best.png"
    return paths


# ----------------------------------------------------------------------------------- one case
class _PreloadedSegmentations:
    """A reader that hands nnU-Net's ``compute_metrics`` segmentations already read (no second read)."""

    def __init__(self, segmentations: Dict[str, Tuple[np.ndarray, dict]]):
        self._segmentations = segmentations

    def read_seg(self, seg_fname: str):
        return self._segmentations[seg_fname]


def evaluate_case(case: str, reference_file: PathLike, prediction_file: PathLike, reader_writer,
                  labels_or_regions: Sequence, ignore_label: Optional[int] = None,
                  settings: LesionSettings = LesionSettings()) -> dict:
    """Metrics of one case, per label: ``{"case", "reference_file", "prediction_file", "shape", "spacing",
    "metrics": {label_key: {...}}}``; on a shape / spacing mismatch ``{"case", "error": message}`` instead.
    """
    from nnunetv2.evaluation.evaluate_predictions import (compute_metrics, label_or_region_to_key,
                                                          region_or_label_to_mask)

    reference_file, prediction_file = str(reference_file), str(prediction_file)
    seg_ref, props_ref = reader_writer.read_seg(reference_file)
    seg_pred, props_pred = reader_writer.read_seg(prediction_file)
    spacing_ref = [float(s) for s in props_ref["spacing"]]
    spacing_pred = [float(s) for s in props_pred["spacing"]]
    if seg_ref.shape != seg_pred.shape:
        return {"case": case, "error": "shape",
                "message": f"{case}: reference shape {tuple(seg_ref.shape[1:])} vs prediction shape "
                           f"{tuple(seg_pred.shape[1:])}"}
    if len(spacing_ref) != len(spacing_pred) or not np.allclose(spacing_ref, spacing_pred, rtol=_SPACING_RTOL,
                                                                atol=1e-6):
        return {"case": case, "error": "spacing",
                "message": f"{case}: reference spacing {tuple(spacing_ref)} vs prediction spacing "
                           f"{tuple(spacing_pred)}"}

    # nnU-Net's own Dice / IoU / voxel counts, on the arrays read above
    preloaded = _PreloadedSegmentations({reference_file: (seg_ref, props_ref),
                                         prediction_file: (seg_pred, props_pred)})
    nnunet = compute_metrics(reference_file, prediction_file, preloaded, list(labels_or_regions), ignore_label)

    convention = get_empty_convention(settings.empty)
    ref, pred = seg_ref[0], seg_pred[0]
    keep = (ref != ignore_label) if ignore_label is not None else None
    metrics = {}
    for r in labels_or_regions:
        m = {k: _py(v) for k, v in nnunet["metrics"][r].items()}
        m["Dice"] = convention.dice(m["Dice"])
        if math.isnan(m["IoU"]) and not math.isnan(convention.dice_both_empty):
            m["IoU"] = convention.dice_both_empty  # IoU and Dice agree on "both empty"
        mask_ref = region_or_label_to_mask(ref, r)
        mask_pred = region_or_label_to_mask(pred, r)
        if keep is not None:
            mask_pred &= keep
        m.update(lesion_metrics(mask_ref, mask_pred, spacing_ref, settings.iou_threshold, settings.connectivity,
                                settings.min_lesion_voxels, convention))
        metrics[label_or_region_to_key(r)] = {k: m[k] for k in METRIC_KEYS}
    return {"case": case, "reference_file": reference_file, "prediction_file": prediction_file,
            "shape": [int(s) for s in seg_ref.shape[1:]], "spacing": spacing_ref, "metrics": metrics}


def _evaluate_case_task(task):
    return evaluate_case(*task)


# -------------------------------------------------------------------------------- the folder
def evaluate_folders(reference_folder: PathLike, prediction_folder: PathLike,
                     output_json: Optional[PathLike] = None, labels: Optional[Sequence[int]] = None,
                     dataset_json: Optional[PathLike] = None, images_folder: Optional[PathLike] = None,
                     png: bool = False, png_cases: int = 4, overwrite: bool = False, chill: bool = False,
                     iou_threshold: float = 0.0, connectivity: str = "full", min_lesion_voxels: int = 1,
                     empty: str = "lesion", num_processes: int = 1, verbose: bool = False) -> dict:
    """Evaluate every prediction in ``prediction_folder`` against ``reference_folder``; write JSON + CSV (+ PNGs).

    ``output_json`` defaults to ``PRED/summary_lesions.json``. ``images_folder`` (nnU-Net naming,
    ``CASE_0000<ending>``) implies ``png``. Raises :class:`EvaluationError` on bad input, before writing
    anything. Returns the summary (as written to the JSON, but with NaN instead of null).
    """
    from nnunetv2.imageio.reader_writer_registry import (determine_reader_writer_from_dataset_json,
                                                         determine_reader_writer_from_file_ending)

    reference_folder, prediction_folder = Path(reference_folder), Path(prediction_folder)
    for name, folder in (("reference", reference_folder), ("predictions", prediction_folder),
                         ("images", images_folder)):
        if folder is not None and not Path(folder).is_dir():
            raise EvaluationError(f"{name} folder not found: {folder}")
    png = png or images_folder is not None
    if png_cases < 1:
        raise EvaluationError(f"png_cases must be at least 1, got {png_cases}")
    settings = LesionSettings(float(iou_threshold), connectivity, int(min_lesion_voxels), empty)

    # outputs: refuse to overwrite before doing any work
    paths = output_paths(output_json if output_json is not None else prediction_folder / DEFAULT_OUTPUT_NAME, png)
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise EvaluationError(f"result file(s) exist already: {', '.join(existing)}; pass --overwrite to replace "
                              f"them, or -o to write elsewhere")

    # dataset.json, file ending, reader/writer, labels
    dj_path = find_dataset_json(reference_folder, prediction_folder, dataset_json)
    dj = _load_json(dj_path) if dj_path is not None else None
    if dj is not None:
        if "file_ending" not in dj:
            raise EvaluationError(f"dataset.json ({dj_path}) has no 'file_ending' entry")
        file_ending = dj["file_ending"]
    else:
        file_ending = _guess_file_ending(reference_folder)
    labels_or_regions, names, ignore_label = resolve_labels(dj, labels, dj_path)

    reference_cases = list_cases(reference_folder, file_ending)
    prediction_cases = list_cases(prediction_folder, file_ending)
    if not reference_cases:
        raise EvaluationError(f"no reference files ending in {file_ending} in {reference_folder}")
    if not prediction_cases:
        raise EvaluationError(f"no prediction files ending in {file_ending} in {prediction_folder}")
    cases, skipped = match_cases(reference_cases, prediction_cases, reference_folder, prediction_folder, chill)

    example = str(reference_cases[cases[0]])
    try:
        if dj is not None:
            reader_writer = determine_reader_writer_from_dataset_json(dj, example, verbose=False)()
        else:  # as nnUNetv2_evaluate_simple, but readers made for this ending first
            try:
                reader_writer = determine_reader_writer_from_file_ending(file_ending, example, verbose=False)()
            except RuntimeError:
                reader_writer = determine_reader_writer_from_file_ending(
                    file_ending, example, allow_nonmatching_filename=True, verbose=False)()
    except RuntimeError as e:
        raise EvaluationError(f"cannot read {example}: {e}") from e

    # per case
    tasks = [(c, reference_cases[c], prediction_cases[c], reader_writer, labels_or_regions, ignore_label, settings)
             for c in cases]
    results = _map(_evaluate_case_task, tasks, num_processes, verbose)
    bad = [r for r in results if "error" in r]
    if bad:
        shapes = [r["message"] for r in bad if r["error"] == "shape"]
        spacings = [r["message"] for r in bad if r["error"] == "spacing"]
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} case(s) differ in shape: {_name_some(shapes, sep='; ')}")
        if spacings:
            parts.append(f"{len(spacings)} case(s) differ in spacing: {_name_some(spacings, sep='; ')}")
        raise EvaluationError("prediction and reference do not match: " + " | ".join(parts)
                              + ". Were the predictions made for these images (same resampling / cropping)?")

    metrics_summary = summarize(results, labels_or_regions, names, settings)
    summary = {"settings": {
        "reference_folder": str(reference_folder.resolve()),
        "prediction_folder": str(prediction_folder.resolve()),
        "dataset_json": str(dj_path.resolve()) if dj_path is not None else None,
        "file_ending": file_ending,
        "reader_writer": type(reader_writer).__name__,
        "labels": {_key(r): names.get(r, "") for r in labels_or_regions},
        "ignore_label": ignore_label,
        "skipped_reference_cases": skipped,
        **asdict(settings),
        "empty_convention": _CONVENTION_TEXT[settings.empty],
        "overlap_rule": (f"a reference lesion and a predicted component match when IoU > {settings.iou_threshold}"
                         + (" (any overlap)" if settings.iou_threshold == 0 else "")),
        "hd95": "max of the two directed 95th percentiles of surface distances, physical units",
        "units": "distances in the spacing's unit (mm for NIfTI, pixels for PNG); volumes in its cube, "
                 "areas (square) for 2D images",
    }, "files": {k: str(p) for k, p in paths.items()}, **metrics_summary}

    # write
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    with open(paths["json"], "w") as f:
        json.dump(_nan_to_none(summary), f, indent=2, sort_keys=False, allow_nan=False)
    write_csv(summary, paths["csv"])
    if png:
        _draw_best_and_worst(summary, paths, reader_writer, images_folder, file_ending, png_cases)
    return summary


def summarize(results: List[dict], labels_or_regions: Sequence, names: Optional[dict] = None,
              settings: LesionSettings = LesionSettings()) -> dict:
    """``metric_per_case``, ``mean``, ``pooled`` and ``foreground_mean`` from per-case results."""
    names = names or {}
    keys = [_key(r) for r in labels_or_regions]
    mean, pooled = {}, {}
    for k in keys:
        mean[k] = {m: _nanmean([r["metrics"][k][m] for r in results]) for m in METRIC_KEYS}
        mean[k]["n_cases"] = len(results)
        total = LesionDetection(0, 0, 0, 0, 0)
        for r in results:
            m = r["metrics"][k]
            total = total + LesionDetection(m["lesions_ref"], m["lesions_pred"], m["lesion_TP"], m["lesion_FP"],
                                            m["lesion_FN"])
        pooled[k] = detection_metrics(total, settings.empty)
    foreground_mean = {m: _nanmean([mean[k][m] for k in keys]) for m in METRIC_KEYS}
    foreground_mean["n_cases"] = len(results)
    total = LesionDetection(0, 0, 0, 0, 0)
    for k in keys:
        p = pooled[k]
        total = total + LesionDetection(p["lesions_ref"], p["lesions_pred"], p["lesion_TP"], p["lesion_FP"],
                                        p["lesion_FN"])
    return {"label_names": {_key(r): names.get(r, "") for r in labels_or_regions},
            "mean": mean, "pooled": pooled, "foreground_mean": foreground_mean,
            "foreground_pooled": detection_metrics(total, settings.empty), "metric_per_case": results}


def write_csv(summary: dict, path: PathLike) -> Path:
    """Per case and label rows, then ``MEAN`` and ``POOLED`` rows per label (and ``foreground_mean``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(summary["mean"].keys())
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "label", "label_name", *METRIC_KEYS])
        names = summary.get("label_names", {})
        for r in summary["metric_per_case"]:
            for k in keys:
                writer.writerow([r["case"], k, names.get(k, ""), *(_fmt(r["metrics"][k][m]) for m in METRIC_KEYS)])
        for k in keys:
            writer.writerow(["MEAN", k, names.get(k, ""), *(_fmt(summary["mean"][k][m]) for m in METRIC_KEYS)])
        for k in keys:
            writer.writerow(["POOLED", k, names.get(k, ""),
                             *(_fmt(summary["pooled"][k].get(m, "")) for m in METRIC_KEYS)])
        if len(keys) > 1:
            writer.writerow(["MEAN", "foreground_mean", "",
                             *(_fmt(summary["foreground_mean"][m]) for m in METRIC_KEYS)])
            writer.writerow(["POOLED", "foreground_mean", "",
                             *(_fmt(summary["foreground_pooled"].get(m, "")) for m in METRIC_KEYS)])
    return path


def format_table(summary: dict, worst: int = 5) -> str:
    """A plain-text table of the per-label means (and pooled lesion detection), plus the worst cases."""
    header = ["label", "cases", "Dice", "HD95", "AVD", "les.ref", "les.pred", "les.P", "les.R", "les.F1"]
    rows = []
    names = summary.get("label_names", {})
    keys = list(summary["mean"].keys())
    entries = [(f"{k} {names.get(k, '')}".strip(), summary["mean"][k], summary["pooled"][k]) for k in keys]
    if len(keys) > 1:
        entries.append(("foreground mean", summary["foreground_mean"], summary["foreground_pooled"]))
    for name, mean, pooled in entries:
        rows.append([name, str(mean["n_cases"]), _num(mean["Dice"], 4), _num(mean["HD95"], 2), _num(mean["AVD"], 1),
                     str(pooled["lesions_ref"]), str(pooled["lesions_pred"]), _num(pooled["lesion_precision"], 3),
                     _num(pooled["lesion_recall"], 3), _num(pooled["lesion_F1"], 3)])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    out = [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    out.append("Dice, HD95, AVD: mean over cases; lesion counts, P, R, F1: pooled over all lesions of all cases.")
    ranked = rank_cases(summary)
    if ranked and worst > 0:
        out.append("lowest Dice: " + ", ".join(f"{c} ({d:.3f})" for c, d in ranked[:worst]))
    return "\n".join(out)


def rank_cases(summary: dict) -> List[Tuple[str, float]]:
    """``[(case, Dice)]`` from worst to best: Dice averaged over the labels (NaN labels left out, cases whose
    Dice is NaN for every label dropped); ties put the case with more reference foreground first.
    """
    scored = []
    for r in summary["metric_per_case"]:
        dice = _nanmean([m["Dice"] for m in r["metrics"].values()])
        if not math.isnan(dice):
            scored.append((r["case"], dice, sum(m["n_ref"] for m in r["metrics"].values())))
    scored.sort(key=lambda t: (t[1], -t[2], t[0]))
    return [(c, d) for c, d, _ in scored]


def best_cases(summary: dict, n: int) -> List[Tuple[str, float]]:
    """The ``n`` highest-Dice cases, best first (ties: more reference foreground first)."""
    scored = []
    for r in summary["metric_per_case"]:
        dice = _nanmean([m["Dice"] for m in r["metrics"].values()])
        if not math.isnan(dice):
            scored.append((r["case"], dice, sum(m["n_ref"] for m in r["metrics"].values())))
    scored.sort(key=lambda t: (-t[1], -t[2], t[0]))
    return [(c, d) for c, d, _ in scored[:n]]


# ------------------------------------------------------------------------------------ pictures
def _draw_best_and_worst(summary, paths, reader_writer, images_folder, file_ending, n):
    from nnunetv2_grcsf.evaluation.overlay import OverlayCase, save_overlay_grid

    by_case = {r["case"]: r for r in summary["metric_per_case"]}
    missing_images = []

    def overlay_case(case, dice):
        r = by_case[case]
        ref, _ = reader_writer.read_seg(r["reference_file"])
        pred, _ = reader_writer.read_seg(r["prediction_file"])
        image = None
        if images_folder is not None:
            image_file = Path(images_folder) / f"{case}_0000{file_ending}"
            if image_file.is_file():
                image = reader_writer.read_images([str(image_file)])[0][0]
            else:
                missing_images.append(case)
        if len(r["metrics"]) == 1:
            m = next(iter(r["metrics"].values()))
            details = (f"HD95 {m['HD95']:.1f}, lesions found {m['lesion_TP']}/{m['lesions_ref']}, "
                       f"FP {m['lesion_FP']}")
        else:
            details = "  ".join(f"{k}: {m['Dice']:.3f}" for k, m in r["metrics"].items())
        title = f"{case}\nDice {dice:.3f}\n{details}"
        return OverlayCase(image, ref[0].astype(np.int16), pred[0].astype(np.int16), title=title,
                           spacing=r["spacing"])

    ranked = rank_cases(summary)
    if not ranked:
        warnings.warn("no case has a defined Dice: no PNG drawn")
        return
    for key, chosen, label in (("png_worst", ranked[:n], "lowest"), ("png_best", best_cases(summary, n), "highest")):
        save_overlay_grid([overlay_case(c, d) for c, d in chosen], paths[key],
                          title=f"{len(chosen)} case(s) with the {label} Dice")
    if missing_images:
        warnings.warn(f"no image CASE_0000{file_ending} in {images_folder} for {_name_some(sorted(set(missing_images)))}"
                      f": masks drawn alone")


# ------------------------------------------------------------------------------------- helpers
_CONVENTION_TEXT = {
    "lesion": "both empty: Dice 1, HD95 0, lesion P=R=F1=1; one empty: Dice 0, HD95 = image diagonal, lesion F1 0 "
              "(recall NaN without reference lesions, precision NaN without predicted components)",
    "nan": "0/0 is NaN and left out of means: Dice NaN when both empty (as nnU-Net), HD95 NaN when either is "
           "empty, lesion P/R/F1 NaN when 0/0",
}


def _map(function, tasks, num_processes, verbose):
    num_processes = max(1, min(int(num_processes), len(tasks)))
    from tqdm import tqdm

    if num_processes == 1:
        return [function(t) for t in tqdm(tasks, disable=not verbose, desc="evaluating")]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
        return list(tqdm(pool.imap(function, tasks), total=len(tasks), disable=not verbose, desc="evaluating"))


def _guess_file_ending(folder: Path) -> str:
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise EvaluationError(f"the reference folder {folder} is empty")
    for double in (".nii.gz", ".seg.nrrd"):
        if files[0].endswith(double):
            return double
    suffix = Path(files[0]).suffix
    if not suffix:
        raise EvaluationError(f"cannot tell the file ending of {files[0]} in {folder}: pass -djfile DATASET_JSON")
    return suffix


def _load_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise EvaluationError(f"cannot read dataset.json {path}: {e}") from e


def _key(label_or_region) -> str:
    from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key

    return label_or_region_to_key(label_or_region)


def _name_some(items: Sequence[str], sep: str = ", ") -> str:
    items = list(items)
    shown = sep.join(items[:_MAX_NAMED])
    return shown + (f"{sep}... ({len(items) - _MAX_NAMED} more)" if len(items) > _MAX_NAMED else "")


def _py(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value)
    return value


def _nanmean(values) -> float:
    values = np.asarray([v for v in values if v is not None and v != ""], dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def _nan_to_none(obj):
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _fmt(value) -> str:
    if value == "" or value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(round(value, 6))
    return str(value)


def _num(value: float, digits: int) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
