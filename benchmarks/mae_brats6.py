"""Benchmark: MAE residual maps on real 3D glioma MRI (Dataset805_BraTS6), held-out volumes, on this CPU.

Runs the real commands in a fresh work folder (``benchmarks/work/NAME``, see Usage: its own nnUNet_raw /
_preprocessed / _results; the shared volumes linked, never modified), each in its own process:

1. The work folder's raw data set holds volumes 1-4 in ``imagesTr`` / ``labelsTr`` and the held-out volumes
   5 and 6 in ``imagesTs`` / ``labelsTs``.
2. ``nnunetv2_grcsf mae-train -d 805`` (preset tiny, the command's defaults unless ``--steps``): reads
   ``imagesTr`` only (checked in the checkpoint). Measured: wall seconds of the command.
3. ``nnunetv2_grcsf residuals -i imagesTs -o OUT --labels labelsTs --report --mask-ratios 0.5 0.75``: the
   held-out volumes with their residual channels, and the report: voxel AUROC of the residual for tumour
   (label > 0), per volume and pooled, over the whole volume and over the brain (the report's foreground:
   voxels where any channel is above its volume minimum), beside the same AUROC of the baselines (FLAIR / T1c
   intensity, better sign; |x - median|; |x - Gaussian(4 voxels) * x|; an untrained MAE of the same
   settings; the residual of interpolating each masked patch from the visible voxels), and the reconstruction
   PSNR on tumour-free brain voxels against the PSNR of the mean image and of that interpolation.

Panel: the report's first panel (FLAIR as the MAE sees it | reconstruction | residual | tumour).

Usage: python benchmarks/mae_brats6.py [--steps N] [--threads N] [--mae-train-args ARGS] [--output NAME]
Needs ../shared/data/Dataset805_BraTS6 (or $GRCSF_SHARED_DATA/Dataset805_BraTS6); exits with a message if
absent. Results: benchmarks/results/NAME.json and benchmarks/results/NAME_panel.png (NAME: mae_brats6 unless
``--output``); work folder benchmarks/work/NAME.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from nnunet_workspace import shared_dataset

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK_ROOT = ROOT / "benchmarks" / "work"
DEFAULT_OUTPUT = "mae_brats6"
DATASET = "Dataset805_BraTS6"
SOURCE_ID = 805
MASK_RATIOS = (0.5, 0.75)
HELD_OUT = ("brats_pat0005", "brats_pat0006")


def setup_env(work: Path) -> Path:
    """A fresh work folder: volumes 1-4 as imagesTr/labelsTr, the held-out ones as imagesTs/labelsTs (links)."""
    src = shared_dataset(DATASET, None)
    if work.exists():
        shutil.rmtree(work)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / var).mkdir(parents=True)
        os.environ[var] = str(work / var)
    dst = work / "nnUNet_raw" / DATASET
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (dst / sub).mkdir(parents=True)
    for f in sorted((src / "imagesTr").iterdir()):
        case = f.name[:-len("_0000.nii.gz")]
        split = "Ts" if case in HELD_OUT else "Tr"
        (dst / f"images{split}" / f.name).symlink_to(f)
        label = src / "labelsTr" / f"{case}.nii.gz"
        if not (dst / f"labels{split}" / label.name).exists():
            (dst / f"labels{split}" / label.name).symlink_to(label)
    dj = json.loads((src / "dataset.json").read_text())
    dj["numTraining"] = len(list((dst / "labelsTr").iterdir()))
    (dst / "dataset.json").write_text(json.dumps(dj))
    return dst


def run_command(args: list) -> float:
    """Run ``nnunetv2_grcsf ARGS`` (the console script's ``main``) in a new process; returns its wall seconds."""
    argv = [sys.executable, "-m", "nnunetv2_grcsf.cli", *args]
    print("$ nnunetv2_grcsf " + " ".join(args), flush=True)
    t0 = time.time()
    subprocess.run(argv, check=True, env=os.environ.copy())
    return time.time() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="MAE training steps (default: the command's own)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for both commands (default 1)")
    parser.add_argument("--mae-train-args", default="", help="more mae-train arguments, e.g. \"--max-shift 3\"")
    parser.add_argument("--output", default=DEFAULT_OUTPUT,
                        help=f"name of the results and of the work folder (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    if Path(args.output).name != args.output or args.output in (".", ".."):
        parser.error(f"--output {args.output!r}: give a plain name (it names benchmarks/work/NAME, which the run "
                     f"deletes and makes anew, and results/NAME.json)")
    work = WORK_ROOT / args.output

    import nnunetv2_grcsf
    from nnunetv2_grcsf.mae import checkpoint_saw_test_images
    from nnunetv2_grcsf.mae.report import format_comparison

    raw = setup_env(work)
    load_start = os.getloadavg()
    print(f"work folder {work}; torch threads {args.threads}; load average {load_start}", flush=True)
    train_args = ["mae-train", "-d", str(SOURCE_ID), "--num-threads", str(args.threads), "--quiet"]
    if args.steps is not None:
        train_args += ["--steps", str(args.steps)]
    train_args += shlex.split(args.mae_train_args)
    train_wall = run_command(train_args)
    mae_folder = work / "nnUNet_results" / DATASET / "nnunetv2_grcsf_mae"
    log = json.loads((mae_folder / "training_log.json").read_text())
    checkpoint = mae_folder / "checkpoint_final.pth"
    assert checkpoint_saw_test_images(checkpoint) is False, "the benchmark MAE must not see the held-out volumes"

    out_folder, report_folder = work / "held_out_with_residuals", work / "held_out_report"
    residual_args = ["residuals", "-i", str(raw / "imagesTs"), "-o", str(out_folder), "-m", str(checkpoint),
                     "--labels", str(raw / "labelsTs"), "--report", "--report-dir", str(report_folder),
                     "--report-cases", "1", "--mask-ratios", *[f"{r:g}" for r in MASK_RATIOS],
                     "--num-threads", str(args.threads), "--quiet"]
    residual_wall = run_command(residual_args)
    report = json.loads((report_folder / "report.json").read_text())

    RESULTS.mkdir(parents=True, exist_ok=True)
    if report["panels"]:
        shutil.copyfile(report["panels"][0], RESULTS / f"{args.output}_panel.png")
    out = {"dataset": DATASET, "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "nnunetv2_grcsf": nnunetv2_grcsf.__version__, "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "load_average_start": load_start, "load_average_end": os.getloadavg(), "torch_threads": args.threads,
           "train_volumes": sorted(p.name for p in (raw / "labelsTr").iterdir()), "held_out_volumes": list(HELD_OUT),
           "mae_train": {"command": "nnunetv2_grcsf " + " ".join(train_args), "command_seconds": round(train_wall, 1),
                         "train_seconds_loop": log["train_seconds"], "steps": log["steps"],
                         "training_splits": log["training_splits"], "num_slices": log["num_slices"],
                         "final_loss_ema": round(log["final_loss_ema"], 4), "model_config": log["model_config"],
                         "train_config": log["train_config"], "reconstruction_check": log["reconstruction_check"]},
           "residuals_command": {"command": "nnunetv2_grcsf " + " ".join(residual_args),
                                 "seconds": round(residual_wall, 1)},
           "held_out": {k: report[k] for k in ("overall", "baselines", "reconstruction", "cases")},
           "panel": f"benchmarks/results/{args.output}_panel.png" if report["panels"] else None}
    (RESULTS / f"{args.output}.json").write_text(json.dumps(out, indent=2))
    print(f"\nheld-out volumes {', '.join(HELD_OUT)}; MAE {log['steps']} steps, mae-train {train_wall:.0f} s wall; "
          f"residuals -i (+ report, incl. the untrained MAE) {residual_wall:.0f} s")
    for line in format_comparison(report):
        print(line)
    print(f"results: {RESULTS / args.output}.json")


if __name__ == "__main__":
    main()
