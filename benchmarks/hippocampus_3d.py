"""The 3D path on real volumes: Hippocampus 3d_fullres through nnU-Net's own commands, every 3D trainer, 2 seeds.

For each row and seed (``NNUNETV2_GRCSF_SEED``, each seed in its own ``nnUNet_results``), at one equal short
CPU budget: ``nnUNetv2_train 804|807 3d_fullres_bs<B> 0 -tr <Trainer>_<budget> -device cpu``, then
``nnUNetv2_predict`` of the held-out test cases and ``nnunetv2_grcsf evaluate`` (Dice per label, HD95 in mm,
lesion-wise F1, with best/worst overlay PNGs of the first seed).

- Data: ../shared/data/Dataset804_Hippocampus (208 T1 crops of about 35 x 50 x 35 voxels, labels 1 =
  anterior, 2 = posterior), linked (never modified) into the work folder's own nnUNet_raw. By default an
  evenly spread subset of 60 cases (``--num-cases``; 0 for all), of which ``--num-test`` (10) are held out as
  imagesTs/labelsTs by the rule of accuracy_busi256.py (scikit-learn ``train_test_split``, ``random_state=
  --split-seed``, stratified by empty / non-empty mask: here every mask has both labels, so a seeded random
  split), 50 are nnU-Net's training cases (fold 0 trains on 40, validates on 10). The subset keeps what the
  budget does not use off the clock: 250 steps of batch 2 see 500 patches, and nnU-Net's end-of-training
  validation (mirroring on) of 42 cases would cost more than the training.
- Residual channel: ``nnunetv2_grcsf mae-train -d 804`` (imagesTr only: checked on the checkpoint, so the MAE
  never sees a test case) and ``residuals -d 804 -o 807`` make Dataset807_Hippocampus for the rows that read
  the residual; their test cases get it by ``residuals -i imagesTs --from-dataset 807``, as a user's new images.
  ``nnUNetTrainer+residual`` is the control: nnU-Net's own network given the residual as a plain extra input channel.
  ``GRCSFTrainer+shuffled_residual``: GRCSFTrainer's models (no training of their own) predict the test cases with
  each case's residual taken from another test case, as in accuracy_busi256.py (a seeded derangement of the sorted
  test cases, ``--split-seed``; the partner's residual resampled (linear) to the case's grid; the pairs in the work
  folder's ``test_inputs/*_shuffled/pairing.json``): is the residual's content read?
  ``nnUNetTrainer+shuffled_residual``: the same for the plain channel's models (those of ``nnUNetTrainer+residual``).
  ``nnUNetTrainer+zero_channel``: nnU-Net trained and tested on Dataset808_Hippocampus, the residual data set with
  its residual channel all zeros (same channels, names and normalization): does a second input channel by itself
  change what 250 steps learn, or is it the residual's content? With an RCU trainer (``GRCSFTrainer_noGCU+zero_channel``)
  the RCU trains and predicts on that all-zero residual: what its architecture does without the residual.
  ``TRAINER+interpolation_residual``: trained and tested on Dataset811_Hippocampus, whose residual channel is that
  of interpolating each masked patch from the visible voxels (``residuals --reconstruction interpolation``, the same
  MAE checkpoint and mask ratios): the residual without the MAE.
- Budget: configuration ``3d_fullres_bs<B>`` (the planned batch 7 is far too slow for this CPU; added by
  nnU-Net's plans inheritance) and schedule ``<budget>`` (default 10epochs_25iters: 250 training steps; at
  5epochs_20iters, 100 steps, nnU-Net's own network still predicted nothing: Dice 0 on both labels).
  This is a functional run of the real 3D path, far from nnU-Net's 1000 epochs x 250 steps: its Dice is the
  Dice of 250 steps, not of the method.
- Statistics as accuracy_busi256.py: mean ± sd over seeds, paired bootstrap 95 % interval of the per-case Dice
  (mean of both labels) difference to nnUNetTrainer, and of each trainer against its controls (GRCSF against the
  plain channel, against the GCU alone and against its shuffled-residual self; the plain channel against its own).

    python benchmarks/hippocampus_3d.py                               # all rows at seeds 0 1 (hours)
    python benchmarks/hippocampus_3d.py --rows FIASTrainer --seeds 2  # one more run (results are merged)
    python benchmarks/hippocampus_3d.py --smoke                       # 12 cases, 2epochs_4iters, 3 rows

Writes results/hippocampus_3d_heldout.json and .md; resumable per (row, seed) like accuracy_busi256.py.
"""
import json
import sys
import time
from pathlib import Path
from subprocess import CalledProcessError

from accuracy_busi256 import check_rows, control_section, interval, report_seeds, row_summaries
from benchmark_statistics import DEFAULT_SEED
from nnunet_workspace import (BENCHMARKS, SEED_VARIABLE, Row, Workspace, budget_sentence, error_row, every_run_section,
                              finished_results, held_out_test_split, link_dataset, locked, parse_with_smoke_settings,
                              plan_and_preprocess, prepare_residual_rows, record_result, run_argument_parser,
                              seed_statistics_cells, shared_dataset, train_and_score)

RESULTS = BENCHMARKS / "results"
SOURCE_ID, RESIDUAL_ID, DATASET_NAME, FILE_ENDING = 804, 807, "Hippocampus", ".nii.gz"
ZERO_CHANNEL_ID = 808  # the residual data set with its residual channel all zeros (Row zero_channel)
INTERPOLATION_ID = 811  # residual of the interpolation from the visible pixels (Row interpolation_residual)
DATASET_IDS = (SOURCE_ID, RESIDUAL_ID, ZERO_CHANNEL_ID, INTERPOLATION_ID)
DEFAULT_ROWS = ["nnUNetTrainer", "nnUNetTrainer+residual", "GRCSFTrainer", "GRCSFTrainer+shuffled_residual",
                "GRCSFTrainer_noRCU", "FIASTrainerAdamW", "GRCSF_FIASTrainerAdamW", "FIASTrainer", "GRCSF_FIASTrainer"]
LABELS = {"1": "anterior", "2": "posterior"}
BOOTSTRAP_RESAMPLES = 10000
SMOKE = {"budget": "2epochs_4iters", "num_cases": 12, "num_test": 2, "mae_steps": 10, "seeds": [0, 1],
         "rows": ["nnUNetTrainer", "GRCSFTrainer", "GRCSFTrainer_noRCU"],
         "work_dir": BENCHMARKS / "work" / "hippocampus_3d_heldout_smoke",
         "output": RESULTS / "hippocampus_3d_heldout_smoke"}


def prepare(workspace: Workspace, args, rows) -> tuple:
    """``({dataset_id: configuration}, {"source" | "residual" | "shuffled" | "zero": test input folder}, MAE
    record)``."""
    configurations, inputs, mae = {}, {}, {}
    with locked(workspace.root / ".prepare.lock"):
        link_dataset(workspace, shared_dataset(f"Dataset{SOURCE_ID}_{DATASET_NAME}", args.data), SOURCE_ID,
                     args.num_cases, args.num_test, args.split_seed)
        configurations[SOURCE_ID] = plan_and_preprocess(workspace, SOURCE_ID, "3d_fullres", args.batch_size)
        inputs["source"] = workspace.dataset_folder(SOURCE_ID) / "imagesTs"
        if any(row.residual_data for row in rows):
            try:
                mae = prepare_residual_rows(workspace, rows, DATASET_IDS, "3d_fullres",
                                            args, FILE_ENDING, configurations, inputs)
            except RuntimeError as error:  # the other rows still run; these report the error
                print(f"  the residual data set could not be made: {error}", flush=True)
    return configurations, inputs, mae


def run_row(workspace: Workspace, args, row: Row, seed: int, configurations: dict, inputs: dict) -> dict:
    """Train (or reuse), predict the test cases and score one row at one seed; an error is returned, not raised."""
    dataset_id = row.dataset_id(*DATASET_IDS)
    full_name = f"{row.trainer}_{args.budget}"
    kind = row.test_inputs_kind()
    started = time.perf_counter()
    result = {"trainer": row.trainer, "trained_as": full_name, "test_inputs_kind": kind}
    try:
        if dataset_id not in configurations or kind not in inputs:
            raise RuntimeError(f"Dataset{dataset_id} or its test inputs could not be prepared (see {workspace.logs})")
        overlays = inputs[kind] if seed == args.seeds[0] else None
        prediction_name = f"{full_name}_{kind}"
        result.update(status="ok", **train_and_score(
            workspace, dataset_id, full_name, configurations[dataset_id], args.fold, args.device, seed, inputs[kind],
            prediction_name, workspace.dataset_folder(SOURCE_ID) / "labelsTs", overlays))
    except (RuntimeError, CalledProcessError, OSError, KeyError) as error:
        result.update(status="error", error=f"{type(error).__name__}: {error}")
    result["wall_s"] = time.perf_counter() - started
    return result


def format_table(report: dict) -> str:
    """Markdown table of the rows' test scores over seeds, the paired interval to nnUNetTrainer, then every run."""
    s = report["settings"]
    split, summaries = s["test_split"], row_summaries(report)
    lines = [f"# Hippocampus 3d_fullres on this CPU: held-out test cases, seeds {report_seeds(report)}", "",
             budget_sentence(s, f"3d_fullres plans, patch {s['patch_size']}") + f" Training: "
             f"{split['training_count']} cases (fold {s['fold']} trains on 4/5 of them). Test: {split['test_count']} "
             f"held-out test cases ({split['rule']}), never seen by the MAE "
             f"(trained on {s['mae'].get('trained_on_images', '-')} images, `imagesTr`, loss "
             f"{s['mae'].get('loss', 'on every patch')}) nor by any segmentation model, "
             "predicted by `nnUNetv2_predict` and scored by `nnunetv2_grcsf evaluate` (Dice, HD95 in mm). Dice: mean "
             "over test cases of the per-case Dice (mean of both labels); ± standard deviation over seeds; ΔDice: "
             "mean per-case Dice difference to nnUNetTrainer (each case averaged over the row's seeds first) with its "
             f"paired bootstrap 95 % interval over the test cases ({s['bootstrap']['n_resamples']} resamples, "
             f"percentile). A functional run: nnU-Net's published result on the full task (1000 epochs) is about "
             f"0.90 Dice. Train time: wall minutes per run as it happened, on a machine other jobs may have shared.",
             "", "| row | data set | seeds | Dice anterior | Dice posterior | Dice | pooled Dice | HD95 mm "
             "| ΔDice vs nnUNetTrainer [95 % CI] | fold-0 val Dice | train min/run |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, runs in report["rows"].items():
        summary = summaries.get(name)
        if summary is None:
            lines.append(error_row([name, "", "0"], next(iter(runs.values())).get("error", "no run"), 11))
            continue
        ok = [runs[seed] for seed in summary["seeds"]]
        label_dice = {k: sum(r["Dice_per_label"][k] for r in ok) / len(ok) for k in LABELS}
        validation = sum(r["validation_dice"] for r in ok) / len(ok)
        lines.append(f"| {name} | {ok[0]['dataset']} | {len(ok)} | {label_dice['1']:.3f} | {label_dice['2']:.3f} "
                     + seed_statistics_cells(summary, [("Dice", 3), ("pooled_Dice", 3), ("HD95", 1)])
                     + f"| {interval(summary)} | {validation:.3f} | {summary['train_time_s']['mean'] / 60:.1f} |")
    lines += control_section(report)
    lines += every_run_section(report, ["Dice", "pooled Dice", "HD95 mm", "fold-0 val Dice", "train min",
                                        "predict s"],
                               lambda r: f"| {r['Dice']:.4f} | {r['pooled_Dice']:.4f} | {r['HD95']:.1f} "
                                         f"| {r['validation_dice']:.4f} | {r['train_time_s'] / 60:.1f} "
                                         f"| {r['predict_wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = run_argument_parser(
        __doc__.split("\n\n")[0], rows=DEFAULT_ROWS, seeds=[0, 1], budget="10epochs_25iters",
        configuration="3d_fullres", dataset_folder="Dataset804_Hippocampus",
        work_dir=BENCHMARKS / "work" / "hippocampus_3d_heldout", output=RESULTS / "hippocampus_3d_heldout",
        split_seed_help="seed of the test split",
        rows_help="TRAINER or TRAINER+CONTROL (residual, shuffled_residual, zero_channel, interpolation_residual)")
    parser.add_argument("--num-cases", type=int, default=60, help="use this many cases (0: all 208)")
    parser.add_argument("--num-test", type=int, default=10, help="of which this many are held out as imagesTs")
    return parse_with_smoke_settings(parser, argv, SMOKE)


def main(argv=None) -> int:
    from nnunetv2_grcsf.trainers.schedules import SCHEDULES

    args = parse_args(argv)
    if args.budget not in SCHEDULES:
        raise SystemExit(f"unknown budget {args.budget}; choose from {sorted(SCHEDULES)}")
    rows = check_rows(args.rows)
    workspace = Workspace(Path(args.work_dir), DATASET_NAME, args.n_proc_da)
    output = Path(args.output)
    results_file = output.with_suffix(".json")
    shared = shared_dataset(f"Dataset{SOURCE_ID}_{DATASET_NAME}", args.data)
    split = held_out_test_split(shared, args.num_cases or None, args.num_test, args.split_seed)
    settings = {"budget": args.budget, "schedule": SCHEDULES[args.budget], "batch_size": args.batch_size,
                "configuration": f"3d_fullres_bs{args.batch_size}", "fold": args.fold, "device": args.device,
                "work_dir": str(workspace.root), "data": str(shared),
                "test_split": {"rule": split["rule"], "seed": split["seed"],
                               "training_count": len(split["training_cases"]), "test_count": len(split["test_cases"]),
                               "test_cases": split["test_cases"]},
                "bootstrap": {"n_resamples": BOOTSTRAP_RESAMPLES, "seed": DEFAULT_SEED, "confidence": 0.95,
                              "method": "percentile, over test cases, per-case Dice averaged over each row's seeds"},
                "commands": [f"{SEED_VARIABLE}=S nnUNet_results=seeds/seed_S/nnUNet_results nnUNetv2_train 804|807 "
                             f"3d_fullres_bs{args.batch_size} {args.fold} -tr TRAINER_{args.budget} -device "
                             f"{args.device}", "nnunetv2_grcsf residuals -i Dataset804/imagesTs -o "
                             "test_inputs/Dataset807_Hippocampus --from-dataset 807",
                             f"nnUNetv2_predict -i TEST_INPUTS -d 804|807 -c 3d_fullres_bs{args.batch_size} "
                             f"-tr TRAINER_{args.budget} -f {args.fold}",
                             "nnunetv2_grcsf evaluate -ref Dataset804/labelsTs -pred PREDICTIONS"]}
    done = finished_results(workspace, results_file, settings)
    if results_file.is_file():
        settings.update({k: v for k, v in json.loads(results_file.read_text())["settings"].items()
                         if k in ("mae", "patch_size")})
    todo = [(row, seed) for row in rows for seed in args.seeds
            if args.overwrite or done.get(row.name, {}).get(str(seed), {}).get("status") != "ok"]
    print(f"runs to do: {[f'{r.name} seed {s}' for r, s in todo] or 'none'}", flush=True)
    if todo:
        configurations, inputs, mae = prepare(workspace, args, [row for row, _ in todo])
        plans = json.loads(workspace.plans_file(SOURCE_ID).read_text())
        settings["patch_size"] = "x".join(map(str, plans["configurations"]["3d_fullres"]["patch_size"]))
        settings["mae"] = mae or settings.get("mae", {})
        for row, seed in todo:
            print(f"[{row.name} seed {seed}] {row.trainer}_{args.budget} on {settings['configuration']}", flush=True)
            result = run_row(workspace, args, row, seed, configurations, inputs)
            print(f"[{row.name} seed {seed}] " + (f"test Dice {result['Dice']:.4f}" if result["status"] == "ok"
                                                  else result["error"]), flush=True)
            record_result(workspace, results_file, settings, row.name, seed, result)
    if not results_file.is_file():
        return 1
    table = format_table(json.loads(results_file.read_text()))
    output.with_suffix(".md").write_text(table)
    print("\n" + table + f"\nwrote {results_file}, {output.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
