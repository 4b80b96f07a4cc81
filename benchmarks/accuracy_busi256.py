"""Accuracy side by side on real data: BUSI256 fold 0, every trainer at one equal CPU budget.

Each trainer is trained by nnU-Net's own ``nnUNetv2_train DATASET 2d_bs<B> FOLD -tr <Trainer>_<budget>
-device cpu`` on the same nnU-Net plans and the same fold split, and its fold-0 validation predictions
(``fold_0/validation``, written by nnU-Net at the end of training) are scored against the raw labels with
``nnunetv2_grcsf evaluate``: Dice, HD95, lesion-wise F1 (and nnU-Net's own validation Dice beside them).

- Data: ../shared/data/Dataset802_BUSI256 (or $GRCSF_SHARED_DATA), linked (never modified) into the work
  folder's own nnUNet_raw; all nnU-Net folders live below ``--work-dir``.
- Budget: configuration ``2d_bs<B>`` = nnU-Net's 2d plans with batch size B, added by plans inheritance
  (``{"inherits_from": "2d", "batch_size": B}``) to the work folder's copy of nnUNetPlans.json, and the
  schedule ``<budget>`` of nnunetv2_grcsf.trainers.schedules (default 10epochs_25iters: 10 epochs of 25
  iterations, 5 validation iterations). The baseline ``nnUNetTrainer`` gets the same schedule from
  benchmarks/trainers/ (passed to nnU-Net through nnUNet_extTrainer).
- GRCSF trainers with the Region Compensation Unit need the MAE residual channel: ``nnunetv2_grcsf mae-train
  -d 802`` and ``nnunetv2_grcsf residuals -d 802 -o 803`` make Dataset803 (same cases + residual channel),
  planned and preprocessed by nnU-Net. nnU-Net's fold split is seeded on the sorted case names, which the two
  data sets share, so every trainer validates on the same cases (checked: the table says so if not).
- Resumable: a trainer whose result is in the output JSON is skipped (``--overwrite`` to redo); an
  interrupted training continues from nnU-Net's latest checkpoint (``--c``). One trainer at a time, in the
  background: ``nohup python benchmarks/accuracy_busi256.py --trainers FIASTrainer > fias.log 2>&1 &``.

    python benchmarks/accuracy_busi256.py                              # all default trainers (~10 min each here)
    python benchmarks/accuracy_busi256.py --trainers GRCSFTrainer_noRCU  # one of them
    python benchmarks/accuracy_busi256.py --smoke                      # 2epochs_4iters on 24 cases: minutes

Writes <output>.json, <output>.md and <output>.png (Dice vs training-step time; step times from
results/speed_cpu.json when present, else from this run's epoch times).
"""
import argparse
import json
import sys
import time
from pathlib import Path
from subprocess import CalledProcessError
from typing import List, Optional, Tuple

from nnunet_workspace import (BENCHMARKS, Workspace, epoch_times, error_row, evaluate_lesions, finished_trainers,
                              link_dataset, locked, make_residual_dataset, needs_residuals, plan_and_preprocess,
                              record_result, shared_dataset, subset_cases, train)

RESULTS = BENCHMARKS / "results"
SOURCE_ID, RESIDUAL_ID, DATASET_NAME = 802, 803, "BUSI256"
DEFAULT_TRAINERS = ["nnUNetTrainer", "GRCSFTrainer", "FIASTrainer", "GRCSF_FIASTrainer", "GRCSFTrainer_noRCU",
                    "GRCSFTrainer_noGCU", "FIASTrainerAdamW", "GRCSF_FIASTrainerAdamW"]
SMOKE = {"budget": "2epochs_4iters", "num_cases": 24, "batch_size": 2, "mae_steps": 10,
         "work_dir": BENCHMARKS / "work" / "accuracy_smoke", "output": RESULTS / "accuracy_busi256_smoke"}
__all__ = ["subset_cases", "format_table", "plot", "main"]


# ------------------------------------------------------------------------------------------ train and score
def score(workspace: Workspace, dataset_id: int, folder: Path, trainer: str, schedule: dict) -> dict:
    """Dice, HD95, lesion F1 (ours), nnU-Net's validation Dice and the training time of one trained trainer."""
    summary = evaluate_lesions(workspace, folder / "validation", workspace.dataset_folder(dataset_id) / "labelsTr",
                               trainer)
    mean, pooled = summary["mean"]["1"], summary["pooled"]["1"]
    nnunet = json.loads((folder / "validation" / "summary.json").read_text())
    epochs = epoch_times(folder)
    iterations = schedule["num_iterations_per_epoch"] + schedule["num_val_iterations_per_epoch"]
    return {"dataset": workspace.folder_name(dataset_id), "fold_folder": str(folder),
            "validation_cases": mean["n_cases"],
            "validation_case_ids": [c["case"] for c in summary["metric_per_case"]],
            "Dice": mean["Dice"], "HD95": mean["HD95"],
            "lesion_F1": pooled["lesion_F1"], "lesion_precision": pooled["lesion_precision"],
            "lesion_recall": pooled["lesion_recall"], "nnunet_validation_dice": nnunet["foreground_mean"]["Dice"],
            "train_time_s": sum(epochs), "epochs_done": len(epochs),
            "seconds_per_iteration": sum(epochs) / (len(epochs) * iterations) if epochs else None,
            "evaluation": summary["files"]["json"]}


def run_trainer(workspace: Workspace, args, trainer: str, configurations: dict) -> dict:
    """Train and score one trainer at the budget; an error (e.g. a missing command) is returned, not raised."""
    from nnunetv2_grcsf.trainers.schedules import SCHEDULES

    dataset_id = RESIDUAL_ID if needs_residuals(trainer) else SOURCE_ID
    full_name = f"{trainer}_{args.budget}"
    started = time.perf_counter()
    try:
        if dataset_id not in configurations:
            raise RuntimeError(f"Dataset{dataset_id} could not be prepared (see {workspace.logs})")
        folder = train(workspace, dataset_id, full_name, configurations[dataset_id], args.fold, args.device)
        result = {"status": "ok", **score(workspace, dataset_id, folder, full_name, SCHEDULES[args.budget])}
    except (RuntimeError, CalledProcessError, OSError) as error:
        result = {"status": "error", "error": f"{type(error).__name__}: {error}"}
    return {"trainer": trainer, "trained_as": full_name, "wall_s": time.perf_counter() - started, **result}


def prepare(workspace: Workspace, args, trainers: List[str]) -> dict:
    """The data sets the trainers need, planned and preprocessed: ``{dataset_id: configuration}``."""
    configurations = {}
    with locked(workspace.root / ".prepare.lock"):
        link_dataset(workspace, shared_dataset(f"Dataset{SOURCE_ID}_{DATASET_NAME}", args.data), SOURCE_ID,
                     args.num_cases)
        configurations[SOURCE_ID] = plan_and_preprocess(workspace, SOURCE_ID, "2d", args.batch_size)
        if any(needs_residuals(t) for t in trainers):
            try:
                make_residual_dataset(workspace, SOURCE_ID, RESIDUAL_ID, args.mae_steps, args.device)
                configurations[RESIDUAL_ID] = plan_and_preprocess(workspace, RESIDUAL_ID, "2d", args.batch_size)
            except RuntimeError as error:
                print(f"  the residual data set could not be made: {error}", flush=True)
    return configurations


# ------------------------------------------------------------------------------------------ report
def speed_row_name(trainer: str) -> str:
    """The speed.py row that measures a trainer's network: its own, an optimizer variant's network trainer
    (FIASTrainerAdamW: FIASTrainer), nnUNetTrainer's PlainConvUNet row (keyed nnUNetTrainer here)."""
    import nnunetv2_grcsf.trainers as trainers

    cls = getattr(trainers, trainer, None)
    return next((c.__name__ for c in cls.__mro__ if c in trainers.BASE_TRAINERS), trainer) if cls else trainer


def speed_rows(speed: dict, case_name: str) -> dict:
    """``{row key: row}`` of one case of a speed.py report: the measured rows of the default plans (not
    ResEncUNet-M's), keyed by their trainer (nnUNetTrainer for PlainConvUNet)."""
    for case in speed["cases"]:
        if case["case"]["name"] == case_name:
            return {("nnUNetTrainer" if r["name"] == "PlainConvUNet" else r["name"]): r for r in case["rows"]
                    if r["status"] == "ok" and r["plans"] == "default"}
    return {}


def speed_step_times(speed_file: Path) -> Tuple[dict, str]:
    """``({trainer: train-step seconds}, "CPU" or "wall")`` of the 2d BUSI256 case of a speed.py results file
    (CPU time for a CPU run, as its ratios); nnUNetTrainer is its PlainConvUNet row."""
    if not speed_file.is_file():
        return {}, ""
    report = json.loads(speed_file.read_text())
    clock = "_cpu" if report["settings"]["device"] == "cpu" else ""
    rows = speed_rows(report, "busi256")
    return {name: r[f"train_step{clock}_median_s"] for name, r in rows.items()}, "CPU" if clock else "wall"


def format_table(report: dict) -> str:
    """Markdown table of the trainers' scores at the stated budget."""
    s = report["settings"]
    lines = [f"# Accuracy on BUSI256, fold {s['fold']} validation",
             "", f"Budget: schedule `{s['budget']}` ({s['schedule']}), configuration `{s['configuration']}` "
                 f"(nnU-Net's 2d plans, batch {s['batch_size']}), device {s['device']}, "
                 f"{'all' if not s['num_cases'] else s['num_cases']} training cases. Dice, HD95 (pixels): mean "
                 "over validation cases, `nnunetv2_grcsf evaluate` conventions (a normal case with empty reference "
                 "and empty prediction scores Dice 1); lesion F1 pooled over all lesions; nnU-Net Dice: nnU-Net's "
                 "own validation summary (empty cases left out). Training time: wall time of each run as it happened, "
                 "on a machine that other jobs may have shared; compare costs with `speed.py`'s figures.", "",
             "| trainer | trained as | data set | cases | Dice | HD95 | lesion F1 | nnU-Net Dice "
             "| train wall time (min) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in report["trainers"].items():
        if r["status"] != "ok":
            lines.append(error_row([name, r["trained_as"], "", ""], r["error"], 9))
            continue
        lines.append(f"| {name} | {r['trained_as']} | {r['dataset']} | {r['validation_cases']} | {r['Dice']:.4f} "
                     f"| {r['HD95']:.1f} | {r['lesion_F1']:.3f} | {r['nnunet_validation_dice']:.4f} "
                     f"| {r['train_time_s'] / 60:.1f} |")
    case_sets = {tuple(r["validation_case_ids"]) for r in report["trainers"].values() if r["status"] == "ok"}
    if len(case_sets) > 1:
        lines += ["", "**Warning: the trainers were validated on different cases** (different data sets or splits)."]
    return "\n".join(lines) + "\n"


def plot(report: dict, speed_file: Path, png: Path) -> Optional[Path]:
    """Dice vs training-step time, one point per scored trainer; None when nothing is scored."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = {n: r for n, r in report["trainers"].items() if r["status"] == "ok"}
    if not scored:
        return None
    speed, clock = speed_step_times(speed_file)
    from_speed = all(speed_row_name(n) in speed for n in scored)
    figure, axes = plt.subplots(figsize=(8, 5))
    markers = "osD^vP*X"
    for i, (name, r) in enumerate(scored.items()):  # a legend, not labels: close points stay readable
        x = speed[speed_row_name(name)] if from_speed else r["seconds_per_iteration"]
        axes.scatter(x, r["Dice"], marker=markers[i % len(markers)], s=50, label=name)
    axes.legend(fontsize=8, loc="best")
    axes.set_xlabel(f"training step time, {clock} s ({speed_file.name}, 2d BUSI256)" if from_speed
                    else "training time per iteration in this run, wall s")
    axes.set_ylabel(f"Dice, fold {report['settings']['fold']} validation")
    axes.set_title(f"BUSI256, budget {report['settings']['budget']}, batch {report['settings']['batch_size']}")
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    plt.close(figure)
    return png


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--trainers", nargs="+", default=DEFAULT_TRAINERS,
                        help="base trainer names (nnUNetTrainer or one of nnunetv2_grcsf.trainers)")
    parser.add_argument("--budget", default="10epochs_25iters", help="schedule suffix (trainers/schedules.py)")
    parser.add_argument("--batch-size", type=int, default=2, help="batch size of the 2d_bs<B> configuration")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-cases", type=int, default=None, help="train on a subset of this many cases")
    parser.add_argument("--mae-steps", type=int, default=None, help="mae-train --steps (default: its own)")
    parser.add_argument("--n-proc-da", type=int, default=2, help="nnUNet_n_proc_DA for training")
    parser.add_argument("--data", default=None, help="folder holding Dataset802_BUSI256 (default ../shared/data)")
    parser.add_argument("--work-dir", default=str(BENCHMARKS / "work" / "accuracy"))
    parser.add_argument("--output", default=str(RESULTS / "accuracy_busi256"), help="output path without suffix")
    parser.add_argument("--speed", default=str(RESULTS / "speed_cpu.json"), help="speed results for the plot")
    parser.add_argument("--overwrite", action="store_true", help="redo trainers whose results exist")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny end-to-end check: " + ", ".join(f"{k}={v}" for k, v in SMOKE.items()
                                                                   if k not in ("work_dir", "output")))
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update({k: str(v) if isinstance(v, Path) else v for k, v in SMOKE.items()})
    return args


def main(argv=None) -> int:
    from nnunetv2_grcsf.trainers.schedules import SCHEDULES

    import nnunetv2_grcsf.trainers as trainers

    args = parse_args(argv)
    if args.budget not in SCHEDULES:
        raise SystemExit(f"unknown budget {args.budget}; choose from {sorted(SCHEDULES)}")
    known = ["nnUNetTrainer"] + [t.__name__ for t in trainers.BASE_TRAINERS + trainers.OPTIMIZER_VARIANTS]
    unknown = [t for t in args.trainers if t not in known]
    if unknown:
        raise SystemExit(f"unknown trainer(s) {unknown}; choose from {', '.join(known)} (the budget's schedule "
                         f"suffix is added)")
    workspace = Workspace(Path(args.work_dir), DATASET_NAME, args.n_proc_da)
    output = Path(args.output)
    results_file = output.with_suffix(".json")
    settings = {"budget": args.budget, "schedule": SCHEDULES[args.budget], "batch_size": args.batch_size,
                "configuration": f"2d_bs{args.batch_size}", "fold": args.fold, "device": args.device,
                "num_cases": args.num_cases, "work_dir": str(workspace.root)}
    done = finished_trainers(workspace, results_file, settings)
    todo = [t for t in args.trainers if args.overwrite or done.get(t, {}).get("status") != "ok"]
    print(f"trainers to run: {todo or 'none'} (skipped, results exist: "
          f"{[t for t in args.trainers if t not in todo] or 'none'})", flush=True)
    configurations = prepare(workspace, args, todo) if todo else {}
    for trainer in todo:
        print(f"[{trainer}] {trainer}_{args.budget} on {settings['configuration']}, fold {args.fold}", flush=True)
        result = run_trainer(workspace, args, trainer, configurations)
        print(f"[{trainer}] " + (f"Dice {result['Dice']:.4f}, HD95 {result['HD95']:.1f}, lesion F1 "
                                 f"{result['lesion_F1']:.3f}" if result["status"] == "ok" else result["error"]),
              flush=True)
        record_result(workspace, results_file, settings, trainer, result)
    if not results_file.is_file():
        return 1
    report = json.loads(results_file.read_text())
    table = format_table(report)
    output.with_suffix(".md").write_text(table)
    png = plot(report, Path(args.speed), output.with_suffix(".png"))
    print("\n" + table + f"\nwrote {results_file}, {output.with_suffix('.md')}" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
