"""Accuracy side by side on real data: BUSI256, a held-out test set, every row at several seeds, one CPU budget.

Each row's trainer is trained by nnU-Net's own ``nnUNetv2_train DATASET 2d_bs<B> 0 -tr <Trainer>_<budget>
-device cpu`` once per seed (``NNUNETV2_GRCSF_SEED``, each seed in its own ``nnUNet_results``), on the same
nnU-Net plans and fold split; the held-out test images are predicted by ``nnUNetv2_predict`` and scored against
their labels by ``nnunetv2_grcsf evaluate``.

- Data: ../shared/data/Dataset802_BUSI256 (or $GRCSF_SHARED_DATA), linked (never modified) into the work
  folder's own nnUNet_raw; all nnU-Net folders live below ``--work-dir``.
- Test split: ``--test-fraction`` (default 0.2) of the cases, chosen by scikit-learn's ``train_test_split``
  with ``random_state=--split-seed`` (default 0) stratified by empty / non-empty lesion mask, in ``imagesTs`` /
  ``labelsTs``. Nothing trained sees them: ``nnunetv2_grcsf mae-train`` reads ``imagesTr`` only (checked on
  the checkpoint), and the trainers train on nnU-Net's fold 0 of the other cases (4/5 train, 1/5 validation).
  Fold 0, not ``all``: at this budget (500 steps of batch 2 = 1000 patches) the network sees about two
  patches per training image either way, and nnU-Net's end-of-training validation of fold 0 (1/5 of the
  training cases) costs a fraction of fold ``all``'s (every training case).
- Residual channel: ``mae-train -d 802`` and ``residuals -d 802 -o 803`` make Dataset803 (same cases + residual
  channel) for the rows that read it; the test images get theirs as a user's new images do:
  ``nnunetv2_grcsf residuals -i imagesTs -o OUT --from-dataset 803``. One MAE for every seed (the seeds vary
  the segmentation training only).
- Budget: configuration ``2d_bs<B>`` = nnU-Net's 2d plans with batch size B (plans inheritance), schedule
  ``<budget>`` of nnunetv2_grcsf.trainers.schedules (default 20epochs_25iters); the baseline ``nnUNetTrainer``
  gets the same schedule from benchmarks/trainers/ (through nnUNet_extTrainer). Not 10 epochs: there, whether nnU-Net
  starts predicting lesions before the end depends on the seed (results/accuracy_busi256_heldout_10epochs.md),
  so the rows would compare when training took off, not the networks.
- Rows (``--rows``): a trainer name, ``TRAINER+residual`` (trained and tested on the residual data set;
  ``nnUNetTrainer+residual`` is the plain-extra-channel control) or ``TRAINER+shuffled_residual`` (the models
  trained on the residual data set, of ``TRAINER``'s row, or of ``TRAINER+residual``'s for nnUNetTrainer, tested
  with each test image's residual replaced by the residual of another test image:
  a fixed derangement, ``benchmark_statistics.derangement`` with ``--split-seed``, the partner's residual
  resampled to the image's size; it costs predictions only), or ``nnUNetTrainer+zero_channel`` (trained and tested
  on the residual data set with its residual channel all zeros, Dataset809: a second input channel without
  information), or ``TRAINER+interpolation_residual`` (trained and tested on Dataset810, whose residual channel is
  that of interpolating each masked patch from the visible pixels, ``residuals --reconstruction interpolation``
  with the same MAE checkpoint and mask ratios: the residual without the MAE; is the MAE needed?).
- Statistics: per row the mean and standard deviation over seeds of the mean per-image Dice, pooled Dice, HD95
  and lesion F1, and the paired bootstrap 95 % interval of the per-image Dice difference to ``nnUNetTrainer``
  (each image's Dice averaged over the seeds of each row first; 10000 resamples over images, seeded):
  ``benchmark_statistics.summarize_rows``.
- Resumable per (row, seed): a result in the output JSON is kept (``--overwrite`` to redo), an interrupted
  training continues from nnU-Net's latest checkpoint; a results file made with other settings is refused.

    python benchmarks/accuracy_busi256.py                          # every default row at seeds 0 1 2 (hours)
    python benchmarks/accuracy_busi256.py --rows GRCSFTrainer --seeds 3   # one more seed of one row
    python benchmarks/accuracy_busi256.py --smoke                  # 2epochs_4iters on 24 cases, 2 seeds

Writes <output>.json, <output>.md and <output>.png (Dice vs training-step time; step times from
results/speed_cpu_busi256_hippocampus.json (the networks as they are now) when present, else from this run's
epoch times).
"""
import json
import sys
import time
from pathlib import Path
from subprocess import CalledProcessError
from typing import List, Optional, Tuple

from benchmark_statistics import DEFAULT_SEED, paired_comparisons, summarize_rows
from nnunet_workspace import (BENCHMARKS, SEED_VARIABLE, Row, Workspace, budget_sentence, error_row, every_run_section,
                              finished_results, held_out_test_split, link_dataset, locked, parse_with_smoke_settings,
                              plan_and_preprocess, prepare_residual_rows, record_result, run_argument_parser,
                              seed_statistics_cells, shared_dataset, subset_cases, train_and_score)

RESULTS = BENCHMARKS / "results"
SOURCE_ID, RESIDUAL_ID, DATASET_NAME, FILE_ENDING = 802, 803, "BUSI256", ".png"
ZERO_CHANNEL_ID = 809  # the residual data set with its residual channel all zeros (Row zero_channel)
INTERPOLATION_ID = 810  # residual of the interpolation from the visible pixels (Row interpolation_residual)
DATASET_IDS = (SOURCE_ID, RESIDUAL_ID, ZERO_CHANNEL_ID, INTERPOLATION_ID)
BASELINE = "nnUNetTrainer"
DEFAULT_ROWS = ["nnUNetTrainer", "nnUNetTrainer+residual", "GRCSFTrainer", "GRCSFTrainer_noRCU", "GRCSFTrainer_noGCU",
                "GRCSFTrainer+shuffled_residual", "GRCSFTrainer_residualInEncoder", "GRCSFTrainer_rcuEveryScale",
                "GRCSFTrainer_noRCU_gcuZeroProjection", "FIASTrainer", "FIASTrainerAdamW", "GRCSF_FIASTrainerAdamW"]
ROW_NOTES = {"nnUNetTrainer+residual": "residual as a plain extra input channel",
             "GRCSFTrainer_noRCU": "GCU only", "GRCSFTrainer_noGCU": "RCU only",
             "GRCSFTrainer+shuffled_residual": "GRCSFTrainer's models, each test image with another's residual",
             "nnUNetTrainer+shuffled_residual": "the plain channel's models, each test image with another's residual",
             "nnUNetTrainer+zero_channel": "nnU-Net, an extra input channel of zeros",
             "GRCSFTrainer_residualInEncoder": "GRCSF, its encoder also reading the residual",
             "GRCSFTrainer_rcuEveryScale": "GRCSF, an RCU at every decoder scale the token patch allows",
             "GRCSFTrainer_noRCU_gcuZeroProjection": "GCU only, starting by a zero-initialized projection",
             "GRCSFTrainer+interpolation_residual": "GRCSF reading the residual of the interpolation from the visible "
                                                    "pixels instead of the MAE's",
             "nnUNetTrainer+interpolation_residual": "the interpolation's residual as a plain extra input channel"}
#: (row, reference, what the paired difference row - reference answers): the controls an expert reads against
#: the trainer rather than against nnU-Net; shown for the pairs whose two rows have runs.
CONTROL_COMPARISONS = [
    ("GRCSFTrainer", "nnUNetTrainer+residual", "GRCSF against the residual as a plain extra input channel"),
    ("GRCSFTrainer_noGCU", "nnUNetTrainer+residual", "the RCU against the plain channel"),
    ("GRCSFTrainer", "GRCSFTrainer+shuffled_residual", "the same models given each image's own residual rather "
                                                       "than another image's: is the residual read?"),
    ("nnUNetTrainer+residual", "nnUNetTrainer+shuffled_residual", "the plain channel's models given each image's own "
                                                                    "residual rather than another image's"),
    ("nnUNetTrainer+residual", "nnUNetTrainer+zero_channel", "the plain channel against an extra channel of zeros: "
                                                               "its content, or a second input channel at all?"),
    ("GRCSFTrainer", "nnUNetTrainer+zero_channel", "GRCSF against nnU-Net given an extra channel of zeros"),
    ("GRCSFTrainer", "GRCSFTrainer_noRCU", "what the RCU adds to the GCU"),
    ("GRCSFTrainer", "GRCSFTrainer_noGCU", "what the GCU adds to the RCU"),
    ("GRCSFTrainer_residualInEncoder", "nnUNetTrainer+residual", "GRCSF with the residual in its encoder too, against "
                                                                  "the plain channel"),
    ("GRCSFTrainer_residualInEncoder", "GRCSFTrainer", "what reading the residual in the encoder too adds to GRCSF"),
    ("GRCSFTrainer_rcuEveryScale", "nnUNetTrainer+residual", "GRCSF with RCUs at every token scale, against the plain "
                                                              "channel"),
    ("GRCSFTrainer_rcuEveryScale", "GRCSFTrainer", "what RCUs at the coarser decoder stages add to GRCSF"),
    ("GRCSFTrainer_noRCU_gcuZeroProjection", "GRCSFTrainer_noRCU", "the GCU started by a zero projection rather "
                                                                   "than a zero scale"),
    ("GRCSFTrainer", "GRCSFTrainer+interpolation_residual", "the MAE's residual against the interpolation's: is "
                                                            "the MAE needed?"),
    ("nnUNetTrainer+residual", "nnUNetTrainer+interpolation_residual", "the plain channel: the MAE's residual "
                                                                       "against the interpolation's")]
DEFAULT_SEEDS = [0, 1, 2]
BOOTSTRAP_RESAMPLES = 10000
#: The whole pipeline in small (minutes): every kind of row (the reference, the plain-channel control, a residual
#: trainer and its shuffled-residual control) at two seeds; other rows run the same code (``--smoke --rows ...``).
SMOKE = {"budget": "2epochs_4iters", "num_cases": 24, "batch_size": 2, "mae_steps": 10, "seeds": [0, 1],
         "rows": ["nnUNetTrainer", "GRCSFTrainer", "GRCSFTrainer+shuffled_residual", "nnUNetTrainer+residual"],
         "work_dir": BENCHMARKS / "work" / "accuracy_heldout_smoke",
         "output": RESULTS / "accuracy_busi256_heldout_smoke"}
__all__ = ["subset_cases", "format_table", "plot", "interval", "report_seeds", "row_summaries", "main"]


# ------------------------------------------------------------------------------------------ prepare
def prepare(workspace: Workspace, args, rows: List[Row]) -> Tuple[dict, dict, dict]:
    """The data sets and test inputs the rows need: ``({dataset_id: configuration}, {"source" | "residual" |
    "shuffled" | "zero": test input folder}, MAE record)``."""
    configurations, inputs, mae = {}, {}, {}
    with locked(workspace.root / ".prepare.lock"):
        link_dataset(workspace, shared_dataset(f"Dataset{SOURCE_ID}_{DATASET_NAME}", args.data), SOURCE_ID,
                     args.num_cases, args.test_fraction, args.split_seed)
        configurations[SOURCE_ID] = plan_and_preprocess(workspace, SOURCE_ID, "2d", args.batch_size)
        inputs["source"] = workspace.dataset_folder(SOURCE_ID) / "imagesTs"
        if any(row.residual_data for row in rows):
            try:
                mae = prepare_residual_rows(workspace, rows, DATASET_IDS, "2d",
                                            args, FILE_ENDING, configurations, inputs)
            except RuntimeError as error:  # the other rows still run; these report the error
                print(f"  the residual data set could not be made: {error}", flush=True)
    return configurations, inputs, mae


def run_row(workspace: Workspace, args, row: Row, seed: int, configurations: dict, inputs: dict) -> dict:
    """Train (or reuse), predict the test images and score one row at one seed; an error is returned, not raised."""
    dataset_id = row.dataset_id(*DATASET_IDS)
    full_name = f"{row.trainer}_{args.budget}"
    kind = row.test_inputs_kind()
    started = time.perf_counter()
    result = {"trainer": row.trainer, "trained_as": full_name, "test_inputs_kind": kind}
    try:
        if dataset_id not in configurations or kind not in inputs:
            raise RuntimeError(f"Dataset{dataset_id} or its test inputs could not be prepared (see {workspace.logs})")
        result.update(status="ok", **train_and_score(
            workspace, dataset_id, full_name, configurations[dataset_id], args.fold, args.device, seed, inputs[kind],
            f"{full_name}_{kind}", workspace.dataset_folder(SOURCE_ID) / "labelsTs"))
    except (RuntimeError, CalledProcessError, OSError, KeyError) as error:
        result.update(status="error", error=f"{type(error).__name__}: {error}")
    result["wall_s"] = time.perf_counter() - started
    return result


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


def speed_step_ratios(speed_file: Path) -> Tuple[dict, str]:
    """``({trainer: train-step time / PlainConvUNet's}, "CPU" or "wall")`` of the 2d BUSI256 case of a speed.py
    results file (the ratio speed.py reports: CPU time for a CPU run); nnUNetTrainer is its PlainConvUNet row."""
    if not speed_file.is_file():
        return {}, ""
    report = json.loads(speed_file.read_text())
    rows = speed_rows(report, "busi256")
    return ({name: r["train_step_ratio"] for name, r in rows.items()},
            "CPU" if report["settings"]["device"] == "cpu" else "wall")


def interval(summary: dict) -> str:
    d = summary["vs_baseline"]
    return "(reference)" if d is None else f"{d['mean_difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def report_seeds(report: dict) -> List[int]:
    """Every seed that some row of a results report was run with."""
    return sorted({int(seed) for runs in report["rows"].values() for seed in runs})


def row_summaries(report: dict) -> dict:
    """:func:`benchmark_statistics.summarize_rows` of a results report (bootstrap seeded as the report says)."""
    s = report["settings"]
    return summarize_rows(report["rows"], BASELINE, s["bootstrap"]["n_resamples"], s["bootstrap"]["seed"])


def control_section(report: dict) -> List[str]:
    """Markdown lines: the paired per-image Dice interval of each of :data:`CONTROL_COMPARISONS` that has runs."""
    b = report["settings"]["bootstrap"]
    comparisons = paired_comparisons(report["rows"], [(row, reference) for row, reference, _ in CONTROL_COMPARISONS],
                                     b["n_resamples"], b["seed"])
    if not comparisons:
        return []
    questions = {(row, reference): question for row, reference, question in CONTROL_COMPARISONS}
    lines = ["", "## The trainer against its controls", "",
             "Paired as ΔDice above (each image's Dice averaged over a row's seeds, bootstrap over the test images), "
             "with the control as the reference.", "",
             "| row | reference | seeds | question | ΔDice [95 % CI] |", "| --- | --- | ---: | --- | ---: |"]
    for c in comparisons:
        lines.append(f"| {c['row']} | {c['reference']} | {c['seeds'][0]}, {c['seeds'][1]} "
                     f"| {questions[(c['row'], c['reference'])]} "
                     f"| {c['mean_difference']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] |")
    return lines


def format_table(report: dict) -> str:
    """Markdown: the rows' test scores over seeds with the paired interval to nnUNetTrainer, then every run."""
    s = report["settings"]
    split, summaries = s["test_split"], row_summaries(report)
    lines = [f"# Accuracy on BUSI256: held-out test images, seeds {report_seeds(report)}", "",
             budget_sentence(s, "2d plans") + f" Training: fold {s['fold']} of the {split['training_count']} "
             f"training cases. Test: {split['test_count']} held-out images "
             f"({split['test_cases_with_empty_reference']} without lesion), "
             f"{split['rule']}; never seen by the MAE (trained on {s['mae'].get('trained_on_images', '-')} images, "
             f"`imagesTr`, loss {s['mae'].get('loss', 'on every patch')}) nor by any segmentation model. Dice: mean "
             "over test images of the per-image Dice (an image with empty reference and empty prediction scores 1); "
             "pooled Dice: 2TP / (2TP + FP + FN) over all test pixels; HD95 (pixels): mean over images; lesion F1: "
             "pooled over all lesions; each as mean ± standard deviation over seeds. ΔDice: mean per-image Dice "
             "difference to nnUNetTrainer, each image's Dice first "
             f"averaged over the row's seeds, with its paired bootstrap 95 % interval over the test images "
             f"({s['bootstrap']['n_resamples']} resamples, seed {s['bootstrap']['seed']}, percentile); it "
             "measures which images were drawn, the ± the spread between runs. Shuffled residual: "
             f"{s['shuffled_residual']}. Train time: wall minutes per run as it happened on a machine other jobs "
             "may have shared (compare costs with `speed.py`).", "",
             "| row | control | data set | seeds | Dice | pooled Dice | HD95 | lesion F1 | lesion precision "
             "| ΔDice vs nnUNetTrainer [95 % CI] | train min/run |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, runs in report["rows"].items():
        summary = summaries.get(name)
        if summary is None:
            failed = next(iter(runs.values()))
            lines.append(error_row([name, ROW_NOTES.get(name, ""), "", "0"], failed.get("error", "no run"), 11))
            continue
        first = runs[summary["seeds"][0]]
        train = summary["train_time_s"]
        lines.append(f"| {name} | {ROW_NOTES.get(name, '')} | {first['dataset']} | {len(summary['seeds'])} "
                     + seed_statistics_cells(summary, [("Dice", 3), ("pooled_Dice", 3), ("HD95", 1),
                                                       ("lesion_F1", 3), ("lesion_precision", 3)])
                     + f"| {interval(summary)} | {train['mean'] / 60:.1f} |")
    lines += control_section(report)
    lines += every_run_section(report, ["Dice", "pooled Dice", "HD95", "lesion F1", "nnU-Net fold validation Dice",
                                        "train min"],
                               lambda r: f"| {r['Dice']:.4f} | {r['pooled_Dice']:.4f} | {r['HD95']:.1f} "
                                         f"| {r['lesion_F1']:.3f} | {r['validation_dice']:.4f} "
                                         f"| {r['train_time_s'] / 60:.1f} |")
    unlogged = [f"{n} seed {s}" for n, runs in report["rows"].items() for s, r in runs.items()
                if r["status"] == "ok" and r["seed_in_training_log"] != int(s)]
    if unlogged:
        lines += ["", f"**Warning: the training logs of {', '.join(unlogged)} do not record the seed they were run "
                      f"with** (trainers that do not read `{SEED_VARIABLE}`: those runs are not seeded)."]
    return "\n".join(lines) + "\n"


def speed_positions(report: dict, summaries: dict, speed_file: Path) -> Tuple[dict, str]:
    """``({row: x}, x-axis label)`` of the plot: each row's train-step ratio to PlainConvUNet from ``speed_file``
    when it measures the row's network (rows it does not measure are left out and named in the label), or, when it
    measures none, the runs' own wall time per iteration."""
    speed, clock = speed_step_ratios(speed_file)
    ratios = {name: speed.get(speed_row_name(report["rows"][name][s["seeds"][0]]["trainer"]))
              for name, s in summaries.items()}
    if any(ratio is not None for ratio in ratios.values()):
        unmeasured = [name for name, ratio in ratios.items() if ratio is None]
        label = f"training step {clock} time / PlainConvUNet's (2d BUSI256, {speed_file.name})" + (
            f"\nnot plotted, not in {speed_file.name}: {', '.join(unmeasured)}" if unmeasured else "")
        return {name: ratio for name, ratio in ratios.items() if ratio is not None}, label
    iterations = report["settings"]["iterations_per_epoch"]
    return {name: sum(report["rows"][name][seed]["train_time_s"] for seed in s["seeds"]) /
            sum(report["rows"][name][seed]["epochs_done"] * iterations for seed in s["seeds"])
            for name, s in summaries.items()}, "training time per iteration in this run, wall s"


def plot(report: dict, speed_file: Path, png: Path) -> Optional[Path]:
    """Dice (mean ± sd over seeds) vs training-step time (:func:`speed_positions`), one point per row placed
    there; None when nothing is scored."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = row_summaries(report)
    if not summaries:
        return None
    positions, x_label = speed_positions(report, summaries, speed_file)
    figure, axes = plt.subplots(figsize=(8, 5))
    markers = "osD^vP*X<>"
    for i, (name, s) in enumerate(summaries.items()):  # a legend, not labels: close points stay readable
        if name in positions:
            axes.errorbar(positions[name], s["Dice"]["mean"], yerr=s["Dice"]["sd"], marker=markers[i % len(markers)],
                          ms=7, capsize=3, linestyle="none", label=name)
    axes.legend(fontsize=8, loc="best")
    axes.set_xlabel(x_label)
    axes.set_ylabel("Dice on the held-out test images (mean ± sd over seeds)")
    axes.set_title(f"BUSI256, budget {report['settings']['budget']}, batch {report['settings']['batch_size']}, "
                   f"seeds {report_seeds(report)}")
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    plt.close(figure)
    return png


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    parser = run_argument_parser(
        __doc__.split("\n\n")[0], rows=DEFAULT_ROWS, seeds=DEFAULT_SEEDS, budget="20epochs_25iters", configuration="2d",
        dataset_folder=f"Dataset{SOURCE_ID}_{DATASET_NAME}", work_dir=BENCHMARKS / "work" / "accuracy_heldout",
        output=RESULTS / "accuracy_busi256_heldout", split_seed_help="seed of the test split and of the "
                                                                     "shuffled-residual pairing",
        rows_help="TRAINER, TRAINER+residual, TRAINER+shuffled_residual, TRAINER+zero_channel or "
                  "TRAINER+interpolation_residual (TRAINER: nnUNetTrainer or one of nnunetv2_grcsf.trainers, without "
                  "the budget suffix)")
    parser.add_argument("--num-cases", type=int, default=None, help="use an evenly spread subset of this many cases")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="fraction of the cases held out for testing")
    parser.add_argument("--speed", default=str(RESULTS / "speed_cpu_busi256_hippocampus.json"),
                        help="speed results for the plot")
    return parse_with_smoke_settings(parser, argv, SMOKE)


def check_rows(names: List[str]) -> List[Row]:
    """The rows, parsed; unknown trainers are refused naming the known ones."""
    import nnunetv2_grcsf.trainers as trainers

    known = ["nnUNetTrainer"] + [t.__name__ for t in trainers.BASE_TRAINERS + trainers.OPTIMIZER_VARIANTS]
    unknown = [n for n in names if n.partition("+")[0] not in known]
    if unknown:
        raise SystemExit(f"unknown trainer(s) in {unknown}; choose from {', '.join(known)} (the budget's schedule "
                         f"suffix is added)")
    return [Row.parse(n) for n in names]


def run_settings(args, workspace: Workspace, split: dict) -> dict:
    """What every result of one results file shares (checked on resuming) and what the report states."""
    from nnunetv2_grcsf.trainers.schedules import SCHEDULES

    schedule = SCHEDULES[args.budget]
    return {"budget": args.budget, "schedule": schedule, "batch_size": args.batch_size,
            "iterations_per_epoch": schedule["num_iterations_per_epoch"] + schedule["num_val_iterations_per_epoch"],
            "configuration": f"2d_bs{args.batch_size}", "fold": args.fold, "device": args.device,
            "num_cases": args.num_cases, "work_dir": str(workspace.root),
            "data": str(shared_dataset(f"Dataset{SOURCE_ID}_{DATASET_NAME}", args.data)),
            "test_split": {"rule": split["rule"], "seed": split["seed"], "fraction": args.test_fraction,
                           "training_count": len(split["training_cases"]), "test_count": len(split["test_cases"]),
                           "test_cases_with_empty_reference": split["test_cases_with_empty_reference"],
                           "test_cases": split["test_cases"]},
            "shuffled_residual": f"benchmark_statistics.derangement(n_test, seed={args.split_seed}) over the sorted "
                                 f"test cases (a seeded cyclic shift: no image keeps its own residual); the partner's "
                                 f"residual resampled (linear) to the image's size; pairs in the work folder's "
                                 f"test_inputs/*_shuffled/pairing.json",
            "commands": commands(args),
            "bootstrap": {"n_resamples": BOOTSTRAP_RESAMPLES, "seed": DEFAULT_SEED, "confidence": 0.95,
                          "method": "percentile, over test images, per-image Dice averaged over each row's seeds"}}


def main(argv=None) -> int:
    from nnunetv2_grcsf.trainers.schedules import SCHEDULES

    args = parse_args(argv)
    if args.budget not in SCHEDULES:
        raise SystemExit(f"unknown budget {args.budget}; choose from {sorted(SCHEDULES)}")
    rows = check_rows(args.rows)
    workspace = Workspace(Path(args.work_dir), DATASET_NAME, args.n_proc_da)
    output = Path(args.output)
    results_file = output.with_suffix(".json")
    split = held_out_test_split(shared_dataset(f"Dataset{SOURCE_ID}_{DATASET_NAME}", args.data), args.num_cases,
                                args.test_fraction, args.split_seed)
    settings = run_settings(args, workspace, split)
    done = finished_results(workspace, results_file, settings)
    if results_file.is_file():  # the MAE of earlier runs (the same work folder keeps it) stays recorded
        settings["mae"] = json.loads(results_file.read_text())["settings"].get("mae", {})
    todo = [(row, seed) for row in rows for seed in args.seeds
            if args.overwrite or done.get(row.name, {}).get(str(seed), {}).get("status") != "ok"]
    print(f"runs to do: {[f'{r.name} seed {s}' for r, s in todo] or 'none'}", flush=True)
    if todo:
        configurations, inputs, mae = prepare(workspace, args, [row for row, _ in todo])
        settings["mae"] = mae or settings.get("mae", {})
        for row, seed in todo:
            print(f"[{row.name} seed {seed}] {row.trainer}_{args.budget} on {settings['configuration']}, "
                  f"fold {args.fold}", flush=True)
            result = run_row(workspace, args, row, seed, configurations, inputs)
            print(f"[{row.name} seed {seed}] " + (f"Dice {result['Dice']:.4f}, pooled Dice {result['pooled_Dice']:.4f}"
                                                  if result["status"] == "ok" else result["error"]), flush=True)
            record_result(workspace, results_file, settings, row.name, seed, result)
    if not results_file.is_file():
        return 1
    report = json.loads(results_file.read_text())
    table = format_table(report)
    output.with_suffix(".md").write_text(table)
    png = plot(report, Path(args.speed), output.with_suffix(".png"))
    print("\n" + table + f"\nwrote {results_file}, {output.with_suffix('.md')}" + (f", {png}" if png else ""))
    return 0


def commands(args) -> List[str]:
    """The commands each run is made of (as the logs under the work folder's logs/ show them in full)."""
    return ["nnunetv2_grcsf mae-train -d 802 --device DEVICE (imagesTr only)", "nnunetv2_grcsf residuals -d 802 -o 803",
            "nnUNetv2_plan_and_preprocess -d 802|803 -c 2d; 2d_bs<B> added by plans inheritance",
            "nnunetv2_grcsf residuals -i Dataset802/imagesTs -o test_inputs/Dataset803_BUSI256 --from-dataset 803",
            f"{SEED_VARIABLE}=S nnUNet_results=seeds/seed_S/nnUNet_results nnUNetv2_train 802|803 "
            f"2d_bs{args.batch_size} {args.fold} -tr TRAINER_{args.budget} -device {args.device}",
            f"nnUNetv2_predict -i TEST_INPUTS -o predictions/seed_S/... -d 802|803 -c 2d_bs{args.batch_size} "
            f"-tr TRAINER_{args.budget} -f {args.fold}",
            "nnunetv2_grcsf evaluate -ref Dataset802/labelsTs -pred PREDICTIONS"]


if __name__ == "__main__":
    sys.exit(main())
