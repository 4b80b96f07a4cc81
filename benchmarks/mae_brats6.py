"""Benchmark: MAE residual maps on real 3D glioma MRI (Dataset805_BraTS6), on this CPU.

Runs the real commands in a fresh work folder (``benchmarks/work/mae_brats6``: its own nnUNet_raw /
_preprocessed / _results, the shared data set linked, never modified), each in its own process:

1. ``nnunetv2_grcsf mae-train -d 805`` (preset tiny; ``--steps`` only if given here, else the command's
   default budget). Measured: wall-clock seconds of the command and the training-loop seconds it logs.
2. ``nnunetv2_grcsf residuals -d 805 -o 806 --report --mask-ratios 0.5 0.75``: Dataset806 = FLAIR, T1c +
   one uint8 residual channel per mask ratio. Measured: wall-clock seconds of the command (start-up,
   reading, residuals, writing NIfTI, report) as volumes/s and slices/s (axial slices: the MAE slices
   along the lowest-resolution axis, axis 0 of these isotropic volumes).

Then, in this process, with the checkpoint and residual settings recorded in Dataset806's dataset.json:

- the float residuals again (``ResidualMapper.compute``, the command's own code path), timed alone:
  the compute-only throughput (normalization, slicing, the MAE passes, resizing back);
- the voxel-level AUROC of the residual for tumour (label > 0) vs non-tumour **inside the brain**, per
  volume and pooled over the voxels of all six volumes (exact, Mann-Whitney with mid-ranks), per mask
  ratio; for the float residual and for the uint8 channel actually written to Dataset806 (clipped at the
  checkpoint's residual scale: what nnU-Net will see);
- the same AUROC for the FLAIR intensity itself as a baseline (tumour and oedema are bright in FLAIR;
  the volumes are z-scored inside the brain, so FLAIR values are comparable across volumes and pooled);
- for contrast, the whole-volume figures of the command's own report (background included).

Brain mask (checked on the data): the background of these volumes is not zero but a constant per
volume and channel, the channel's minimum (about 83 % of the voxels; z-scoring inside the brain moved
it below zero), so "any channel non-zero" would be every voxel. The brain is therefore the voxels where
any channel is above its own volume minimum. A handful of tumour voxels lie outside this mask (0 to 481
per volume); they are excluded and counted in the results.

Panel: FLAIR (as the MAE sees it, normalized) | MAE reconstruction | residual | tumour mask, on the axial
slice with most tumour voxels of one case (``--panel-case``), first mask ratio.

Usage: python benchmarks/mae_brats6.py [--steps N] [--threads N] [--panel-case brats_pat0001]
Needs ../shared/data/Dataset805_BraTS6 (or $GRCSF_SHARED_DATA/Dataset805_BraTS6); exits with a message if
absent. Results: benchmarks/results/mae_brats6.json and benchmarks/results/mae_brats6_panel.png.
About 10 minutes with the default 300 steps on a busy 2-core CPU (1500 steps: about 15).
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from nnunet_workspace import shared_dataset

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "work" / "mae_brats6"
DATASET = "Dataset805_BraTS6"
SOURCE_ID, OUTPUT_ID = 805, 806
MASK_RATIOS = (0.5, 0.75)
BRAIN_MASK_DEFINITION = ("voxels where any image channel is above its own volume minimum (the background is a "
                         "constant per volume and channel, equal to its minimum; it is not zero)")




def setup_env() -> None:
    """A fresh work folder with its own nnU-Net folders; the shared data set linked into nnUNet_raw."""
    src = shared_dataset(DATASET, None)
    if WORK.exists():
        shutil.rmtree(WORK)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (WORK / var).mkdir(parents=True)
        os.environ[var] = str(WORK / var)
    (WORK / "nnUNet_raw" / DATASET).symlink_to(src, target_is_directory=True)


def run_command(args: list) -> float:
    """Run ``nnunetv2_grcsf ARGS`` (the console script's ``main``) in a new process; returns its wall seconds."""
    argv = [sys.executable, "-m", "nnunetv2_grcsf.cli", *args]
    print("$ nnunetv2_grcsf " + " ".join(args), flush=True)
    t0 = time.time()
    subprocess.run(argv, check=True, env=os.environ.copy())
    return time.time() - t0


def brain_mask(image: np.ndarray) -> np.ndarray:
    """``[Z, Y, X]`` bool: voxels where any channel of ``image [C, Z, Y, X]`` is above its volume minimum."""
    minima = image.reshape(image.shape[0], -1).min(axis=1)
    return np.any(image > minima[:, None, None, None], axis=0)


def auroc_figures(per_case: dict, pooled_scores: list, pooled_labels: list) -> dict:
    """Per-case AUROCs, their mean, and the exact AUROC pooled over all voxels given."""
    from nnunetv2_grcsf.mae.report import auroc

    values = [v for v in per_case.values() if v is not None]
    return {"per_case": {k: None if v is None else round(v, 4) for k, v in per_case.items()},
            "mean_case_auroc": round(float(np.mean(values)), 4) if values else None,
            "pooled_auroc": round(auroc(np.concatenate(pooled_scores), np.concatenate(pooled_labels)), 4)}


def evaluate(ratios, panel_case: str, threads: int) -> dict:
    """Float residuals of every volume (timed), in-brain AUROCs (float, written uint8, FLAIR), panel arrays."""
    import torch

    from nnunetv2_grcsf.mae import data as mdata
    from nnunetv2_grcsf.mae.report import auroc
    from nnunetv2_grcsf.mae.residuals import ResidualMapper, settings_from_dataset

    torch.set_num_threads(threads)
    checkpoint, settings = settings_from_dataset(OUTPUT_ID)
    assert tuple(settings.mask_ratios) == tuple(ratios), settings
    mapper = ResidualMapper(checkpoint, settings, "cpu", batch_size=16)
    _, src = mdata.resolve_raw_dataset(SOURCE_ID)
    _, dst = mdata.resolve_raw_dataset(OUTPUT_ID)
    dataset_json = mdata.load_dataset_json(src)
    ending = dataset_json["file_ending"]
    cases = mdata.list_cases(src / "imagesTr", ending)
    written = mdata.list_cases(dst / "imagesTr", ending)
    reader = mdata.reader_for(dataset_json, example_file=next(iter(cases.values()))[0])
    num_channels = len(mdata.channel_names_of(dataset_json))

    keys = [f"residual@{r:g}" for r in ratios] + [f"written_uint8@{r:g}" for r in ratios] + ["flair_intensity"]
    per_case = {k: {} for k in keys}
    pooled = {k: [] for k in keys}
    pooled_labels, cases_info, panel, seconds, n_slices = [], {}, None, 0.0, 0
    for case, files in cases.items():
        image, props = mdata.read_case(reader, files, case)
        seg, _ = reader.read_seg(str(src / "labelsTr" / f"{case}{ending}"))
        tumour = seg[0] > 0
        t0 = time.time()
        res = mapper.compute([(case, image, props["spacing"])], want_recon={case} if case == panel_case else ())[0]
        seconds += time.time() - t0
        n_slices += image.shape[1 + res["axis"]]
        uint8, _ = reader.read_images([str(f) for f in written[case][num_channels:]])
        brain = brain_mask(image)
        labels = tumour[brain]
        scores = {**{f"residual@{r:g}": res["residuals"][j][brain] for j, r in enumerate(ratios)},
                  **{f"written_uint8@{r:g}": uint8[j][brain] for j, r in enumerate(ratios)},
                  "flair_intensity": image[0][brain]}
        for key, score in scores.items():
            per_case[key][case] = auroc(score, labels)
            pooled[key].append(score.astype(np.float32))
        pooled_labels.append(labels)
        cases_info[case] = {"voxels": int(tumour.size), "brain_voxels": int(brain.sum()),
                            "tumour_voxels_in_brain": int(labels.sum()),
                            "tumour_voxels_outside_brain_excluded": int((tumour & ~brain).sum())}
        if case == panel_case:
            panel = {"case": case, "axis": res["axis"], "image": res["normalized"][0], "recon": res["recon"][0],
                     "residual": res["residuals"][0], "tumour": tumour}
        print(f"{case}: " + ", ".join(f"{k} {per_case[k][case]:.3f}" for k in keys), flush=True)
    figures = {k: auroc_figures(per_case[k], pooled[k], pooled_labels) for k in keys}
    return {"checkpoint": str(checkpoint), "residual_settings": settings.to_dict(), "residual_scale": mapper.scale,
            "cases": cases_info, "auroc": figures, "panel": panel,
            "compute": {"seconds": round(seconds, 1), "volumes": len(cases), "slices": n_slices,
                        "volumes_per_second": round(len(cases) / seconds, 4),
                        "slices_per_second": round(n_slices / seconds, 2)}}


def save_case_panel(panel: dict, ratio: float, auroc_value: float, scale: float, path: Path) -> None:
    """FLAIR | reconstruction | residual | tumour on the slice (along the MAE's slice axis) with most tumour."""
    from nnunetv2_grcsf.evaluation.overlay import select_slice
    from nnunetv2_grcsf.mae.report import save_panel

    axis = panel["axis"]
    k = select_slice(panel["tumour"], axis=axis)
    take = lambda a: np.take(a, k, axis=axis)  # noqa: E731
    save_panel(path, take(panel["image"]), take(panel["recon"]), take(panel["residual"]), take(panel["tumour"]),
               f"{panel['case']} axial slice {k} (most tumour): FLAIR as the MAE sees it | reconstruction | residual "
               f"at mask ratio {ratio:g} (in-brain AUROC of the volume {auroc_value:.3f})", residual_max=scale)


def print_table(out: dict) -> None:
    """The AUROC table and the timings."""
    a = out["auroc_in_brain"]
    rows = [(f"residual, mask ratio {r:g} (float)", a[f"residual@{r:g}"]) for r in out["settings"]["mask_ratios"]]
    rows += [(f"residual, mask ratio {r:g} (written uint8)", a[f"written_uint8@{r:g}"])
             for r in out["settings"]["mask_ratios"]]
    rows.append(("baseline: FLAIR intensity", a["flair_intensity"]))
    cases = list(out["cases"])
    print(f"\nvoxel AUROC, tumour vs rest of the brain ({len(cases)} volumes)")
    print(f"{'score':42s} {'pooled':>7s} {'mean':>7s} " + " ".join(f"{c[-4:]:>6s}" for c in cases))
    for name, fig in rows:
        print(f"{name:42s} {fig['pooled_auroc']:7.3f} {fig['mean_case_auroc']:7.3f} "
              + " ".join(f"{fig['per_case'][c]:6.3f}" for c in cases))
    for r, o in out["residuals_command"]["report_whole_volume"].items():
        print(f"(command's report, whole volume incl. background, ratio {r}: pooled {o['pooled_auroc']:.3f}, "
              f"mean {o['mean_case_auroc']:.3f})")
    t, rc, c = out["mae_train"], out["residuals_command"], out["residual_compute_only"]
    print(f"\nmae-train: {t['steps']} steps in {t['train_seconds_loop']:.0f} s (loop), {t['command_seconds']:.0f} s "
          f"(command)")
    print(f"residuals -d {SOURCE_ID} -o {OUTPUT_ID} --report ({len(MASK_RATIOS)} ratios): {rc['seconds']:.0f} s, "
          f"{rc['volumes_per_second']:.3f} volumes/s, {rc['slices_per_second']:.1f} slices/s; compute only "
          f"{c['volumes_per_second']:.3f} volumes/s, {c['slices_per_second']:.1f} slices/s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="MAE training steps (default: the command's own)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for both commands and the "
                                                               "evaluation (default 1)")
    parser.add_argument("--panel-case", default="brats_pat0001", help="case of the PNG panel (default brats_pat0001)")
    args = parser.parse_args(argv)

    from importlib.metadata import version

    import torch

    import nnunetv2_grcsf

    setup_env()
    if not (WORK / "nnUNet_raw" / DATASET / "labelsTr" / f"{args.panel_case}.nii.gz").is_file():
        sys.exit(f"--panel-case {args.panel_case} is not a case of {DATASET}")
    load_start = os.getloadavg()
    print(f"work folder {WORK}; torch threads {args.threads}; load average {load_start}", flush=True)

    train_args = ["mae-train", "-d", str(SOURCE_ID), "--num-threads", str(args.threads), "--quiet"]
    if args.steps is not None:
        train_args += ["--steps", str(args.steps)]
    train_wall = run_command(train_args)
    mae_folder = WORK / "nnUNet_results" / DATASET / "nnunetv2_grcsf_mae"
    log = json.loads((mae_folder / "training_log.json").read_text())

    ratios = [f"{r:g}" for r in MASK_RATIOS]
    res_wall = run_command(["residuals", "-d", str(SOURCE_ID), "-o", str(OUTPUT_ID), "--report", "--mask-ratios",
                            *ratios, "--num-threads", str(args.threads), "--quiet"])
    report_folder = next((WORK / "nnUNet_results").glob(f"Dataset{OUTPUT_ID}_*/nnunetv2_grcsf_residual_report"))
    report = json.loads((report_folder / "report.json").read_text())

    ev = evaluate(MASK_RATIOS, args.panel_case, args.threads)
    n_volumes, n_slices = ev["compute"]["volumes"], ev["compute"]["slices"]
    out = {
        "dataset": DATASET, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "nnunetv2": version("nnunetv2"),
                     "nnunetv2_grcsf": nnunetv2_grcsf.__version__,
                     "python": platform.python_version()},
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "load_average_start": load_start,
        "settings": {"steps": log["steps"], "preset": "tiny", "torch_threads": args.threads,
                     "mask_ratios": list(MASK_RATIOS), "residual_settings": ev["residual_settings"],
                     "residual_scale": round(ev["residual_scale"], 4), "panel_case": args.panel_case,
                     "brain_mask": BRAIN_MASK_DEFINITION,
                     "auroc": "exact voxel AUROC (mid-ranks) of the score for label > 0 inside the brain mask; "
                              "per volume, mean over volumes, and pooled over the brain voxels of all volumes"},
        "mae_train": {"command": "nnunetv2_grcsf " + " ".join(train_args), "command_seconds": round(train_wall, 1),
                      "train_seconds_loop": log["train_seconds"], "steps": log["steps"],
                      "batch_size": log["train_config"]["batch_size"], "num_slices": log["num_slices"],
                      "final_loss_ema": round(log["final_loss_ema"], 4), "model_config": log["model_config"]},
        "residuals_command": {"command": f"nnunetv2_grcsf residuals -d {SOURCE_ID} -o {OUTPUT_ID} --report "
                                         f"--mask-ratios {' '.join(ratios)}",
                              "seconds": round(res_wall, 1), "volumes": n_volumes, "slices": n_slices,
                              "volumes_per_second": round(n_volumes / res_wall, 4),
                              "slices_per_second": round(n_slices / res_wall, 2),
                              "report_whole_volume": {r: {k: round(v, 4) if isinstance(v, float) else v
                                                          for k, v in o.items()}
                                                      for r, o in report["overall"].items()}},
        "residual_compute_only": ev["compute"],
        "auroc_in_brain": ev["auroc"],
        "cases": ev["cases"],
        "checkpoint": ev["checkpoint"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    first = f"residual@{MASK_RATIOS[0]:g}"
    save_case_panel(ev["panel"], MASK_RATIOS[0], ev["auroc"][first]["per_case"][args.panel_case],
                    ev["residual_scale"], RESULTS / "mae_brats6_panel.png")
    out["panel"] = str((RESULTS / "mae_brats6_panel.png").relative_to(ROOT))
    out["load_average_end"] = os.getloadavg()
    (RESULTS / "mae_brats6.json").write_text(json.dumps(out, indent=2))
    print_table(out)
    print(f"results: {RESULTS / 'mae_brats6.json'}")


if __name__ == "__main__":
    main()
