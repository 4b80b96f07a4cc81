"""The 3D path on real volumes: Hippocampus 3d_fullres through nnU-Net's own commands, every 3D trainer.

For each trainer, at one equal short CPU budget:
``nnUNetv2_train 804|807 3d_fullres_bs<B> 0 -tr <Trainer>_<budget> -device cpu``, then
``nnUNetv2_predict`` of held-out test cases, nnU-Net's ``nnUNetv2_evaluate_folder`` (Dice per label) and
``nnunetv2_grcsf evaluate`` (HD95 in mm, lesion-wise F1, with best/worst overlay PNGs).

- Data: ../shared/data/Dataset804_Hippocampus (208 T1 crops of about 35 x 50 x 35 voxels, labels 1 =
  anterior, 2 = posterior), linked (never modified) into the work folder's own nnUNet_raw. By default an
  evenly spread subset of 60 cases (``--num-cases``; 0 for all): 10 held out as imagesTs/labelsTs
  (``--num-test``), 50 as nnU-Net's training cases (5 folds: fold 0 trains on 40, validates on 10). The
  subset keeps what the budget does not use off the clock: 250 steps of batch 2 see 500 patches, and
  nnU-Net's end-of-training validation (mirroring on) of 42 cases would cost more than the training.
- Residual channel: ``nnunetv2_grcsf mae-train -d 804`` and ``residuals -d 804 -o 807`` make
  Dataset807_Hippocampus (same cases, training and test, + the MAE residual channel), which the trainers with the
  RCU (GRCSF...) train on and predict from; the others use Dataset804. Both are planned
  by nnU-Net (patch 40 x 56 x 40); the fold split is seeded on the shared case names, so all trainers
  validate and test on the same cases.
- Budget: configuration ``3d_fullres_bs<B>`` (the planned batch 7 is far too slow for this CPU; added by
  nnU-Net's plans inheritance) and schedule ``<budget>`` (default 10epochs_25iters: 250 training steps; at
  5epochs_20iters, 100 steps, nnU-Net's own network still predicted nothing: Dice 0 on both labels).
  This is a functional run of the real 3D path, far from nnU-Net's 1000 epochs x 250 steps: its Dice is the
  Dice of 250 steps, not of the method.

    python benchmarks/hippocampus_3d.py                         # all six trainers (~10 min each here)
    python benchmarks/hippocampus_3d.py --trainers FIASTrainer  # one of them (results are merged)

Writes results/hippocampus_3d.json and .md; resumable like accuracy_busi256.py.
"""
import argparse
import json
import sys
import time
from pathlib import Path
from subprocess import CalledProcessError

from nnunet_workspace import (BENCHMARKS, Workspace, epoch_times, error_row, evaluate_lesions, evaluate_nnunet,
                              finished_trainers, link_dataset, locked, make_residual_dataset, needs_residuals,
                              plan_and_preprocess, predict, record_result, shared_dataset, train)

RESULTS = BENCHMARKS / "results"
SOURCE_ID, RESIDUAL_ID, DATASET_NAME = 804, 807, "Hippocampus"
DEFAULT_TRAINERS = ["nnUNetTrainer", "GRCSFTrainer", "FIASTrainerAdamW", "GRCSF_FIASTrainerAdamW", "FIASTrainer",
                    "GRCSF_FIASTrainer"]
LABELS = {"1": "anterior", "2": "posterior"}


def prepare(workspace: Workspace, args, trainers) -> dict:
    """The data sets the trainers need, planned and preprocessed: ``{dataset_id: configuration}``."""
    configurations = {}
    with locked(workspace.root / ".prepare.lock"):
        link_dataset(workspace, shared_dataset(f"Dataset{SOURCE_ID}_{DATASET_NAME}", args.data), SOURCE_ID,
                     args.num_cases, args.num_test)
        configurations[SOURCE_ID] = plan_and_preprocess(workspace, SOURCE_ID, "3d_fullres", args.batch_size)
        if any(needs_residuals(t) for t in trainers):
            make_residual_dataset(workspace, SOURCE_ID, RESIDUAL_ID, args.mae_steps, args.device)
            configurations[RESIDUAL_ID] = plan_and_preprocess(workspace, RESIDUAL_ID, "3d_fullres", args.batch_size)
    return configurations


def run_trainer(workspace: Workspace, args, trainer: str, configurations: dict) -> dict:
    """Train, predict the test cases and score one trainer; an error is returned, not raised."""
    dataset_id = RESIDUAL_ID if needs_residuals(trainer) else SOURCE_ID
    full_name = f"{trainer}_{args.budget}"
    configuration = configurations[dataset_id]
    result = {"trainer": trainer, "trained_as": full_name, "dataset": workspace.folder_name(dataset_id),
              "configuration": configuration}
    try:
        folder = train(workspace, dataset_id, full_name, configuration, args.fold, args.device)
        started = time.perf_counter()
        predictions = predict(workspace, dataset_id, full_name, configuration, [args.fold], args.device)
        predict_s = time.perf_counter() - started
        labels = workspace.dataset_folder(dataset_id) / "labelsTs"
        nnunet = evaluate_nnunet(workspace, dataset_id, predictions, labels, workspace.plans_file(dataset_id))
        ours = evaluate_lesions(workspace, predictions, labels, full_name,
                                images=workspace.dataset_folder(dataset_id) / "imagesTs")
        validation = json.loads((folder / "validation" / "summary.json").read_text())
        epochs = epoch_times(folder)
        result.update({
            "status": "ok", "test_cases": len(nnunet["metric_per_case"]),
            "test_dice": {LABELS[k]: v["Dice"] for k, v in nnunet["mean"].items()},
            "test_dice_mean": nnunet["foreground_mean"]["Dice"],
            "test_hd95_mm": {LABELS[k]: ours["mean"][k]["HD95"] for k in LABELS},
            "validation_dice": {LABELS[k]: v["Dice"] for k, v in validation["mean"].items()},
            "validation_dice_mean": validation["foreground_mean"]["Dice"],
            "validation_cases": len(validation["metric_per_case"]),
            "train_time_s": sum(epochs), "epochs_done": len(epochs), "predict_wall_s": predict_s,
            "evaluation": ours["files"]["json"], "predictions": str(predictions)})
    except (RuntimeError, CalledProcessError, OSError, KeyError) as error:
        result.update({"status": "error", "error": f"{type(error).__name__}: {error}"})
    return result


def format_table(report: dict) -> str:
    """Markdown table of the trainers' test and validation Dice at the stated budget."""
    s = report["settings"]
    lines = ["# Hippocampus 3d_fullres on this CPU: every 3D trainer through nnU-Net's commands", "",
             f"Budget: schedule `{s['budget']}` ({s['schedule']}), configuration `{s['configuration']}` (nnU-Net's "
             f"3d_fullres plans, patch {s['patch_size']}, batch {s['batch_size']}), device {s['device']}; "
             f"{s['training_cases']} training cases (fold {s['fold']} trains on 4/5 of them), {s['test_cases']} "
             f"held-out test cases predicted by `nnUNetv2_predict` and scored by `nnUNetv2_evaluate_folder` "
             f"(Dice) and `nnunetv2_grcsf evaluate` (HD95, mm). A functional run: nnU-Net's published result on "
             f"the full task (1000 epochs) is about 0.90 Dice. Training time: wall time as it happened, on a machine "
             f"that other jobs may have shared (compare costs with `speed.py`).", "",
             "| trainer | data set | test Dice anterior | test Dice posterior | test Dice mean | HD95 mm (ant/post) "
             "| fold-0 val Dice | train wall time (min) | predict (s) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in report["trainers"].items():
        if r["status"] != "ok":
            lines.append(error_row([name, r["dataset"]], r["error"], 9))
            continue
        d, h = r["test_dice"], r["test_hd95_mm"]
        lines.append(f"| {name} | {r['dataset']} | {d['anterior']:.3f} | {d['posterior']:.3f} | "
                     f"{r['test_dice_mean']:.3f} | {h['anterior']:.1f} / {h['posterior']:.1f} | "
                     f"{r['validation_dice_mean']:.3f} | {r['train_time_s'] / 60:.1f} | {r['predict_wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--trainers", nargs="+", default=DEFAULT_TRAINERS)
    parser.add_argument("--budget", default="10epochs_25iters", help="schedule suffix (trainers/schedules.py)")
    parser.add_argument("--batch-size", type=int, default=2, help="batch size of the 3d_fullres_bs<B> configuration")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-cases", type=int, default=60, help="use this many cases (0: all 208)")
    parser.add_argument("--num-test", type=int, default=10, help="of which this many are held out as imagesTs")
    parser.add_argument("--mae-steps", type=int, default=None, help="mae-train --steps (default: its own)")
    parser.add_argument("--n-proc-da", type=int, default=2, help="nnUNet_n_proc_DA for training")
    parser.add_argument("--data", default=None, help="folder holding Dataset804_Hippocampus (default ../shared/data)")
    parser.add_argument("--work-dir", default=str(BENCHMARKS / "work" / "hippocampus_3d"))
    parser.add_argument("--output", default=str(RESULTS / "hippocampus_3d"), help="output path without suffix")
    parser.add_argument("--overwrite", action="store_true", help="redo trainers whose results exist")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from nnunetv2_grcsf.trainers.schedules import SCHEDULES

    args = parse_args(argv)
    if args.budget not in SCHEDULES:
        raise SystemExit(f"unknown budget {args.budget}; choose from {sorted(SCHEDULES)}")
    workspace = Workspace(Path(args.work_dir), DATASET_NAME, args.n_proc_da)
    output = Path(args.output)
    results_file = output.with_suffix(".json")
    done = finished_trainers(workspace, results_file, {"budget": args.budget, "batch_size": args.batch_size,
                                                       "fold": args.fold, "device": args.device})
    todo = [t for t in args.trainers if args.overwrite or done.get(t, {}).get("status") != "ok"]
    print(f"trainers to run: {todo or 'none'}", flush=True)
    configurations = prepare(workspace, args, todo) if todo else {}
    plans = json.loads(workspace.plans_file(SOURCE_ID).read_text())
    dataset = workspace.dataset_folder(SOURCE_ID)
    settings = {"budget": args.budget, "schedule": SCHEDULES[args.budget], "batch_size": args.batch_size,
                "configuration": f"3d_fullres_bs{args.batch_size}", "fold": args.fold, "device": args.device,
                "patch_size": "x".join(map(str, plans["configurations"]["3d_fullres"]["patch_size"])),
                "training_cases": len(list((dataset / "labelsTr").iterdir())),
                "test_cases": len(list((dataset / "labelsTs").iterdir())), "work_dir": str(workspace.root)}
    for trainer in todo:
        print(f"[{trainer}] {trainer}_{args.budget} on {settings['configuration']}, fold {args.fold}", flush=True)
        result = run_trainer(workspace, args, trainer, configurations)
        print(f"[{trainer}] " + (f"test Dice {result['test_dice']}" if result["status"] == "ok" else result["error"]),
              flush=True)
        record_result(workspace, results_file, settings, trainer, result)
    if not results_file.is_file():
        return 1
    table = format_table(json.loads(results_file.read_text()))
    output.with_suffix(".md").write_text(table)
    print("\n" + table + f"\nwrote {results_file}, {output.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
