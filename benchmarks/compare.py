"""Every network side by side in one table: cost (speed.py) and accuracy (accuracy_busi256.py), one command.

Runs, in order, each as its own process and each resumable:

1. ``speed.py --dims 2d 3d`` (2d BUSI256 plans and 3d plans of a generated volume data set): train step,
   sliding-window inference, peak memory and parameters of PlainConvUNet, ResEncUNet-M and the network of
   every trainer, as ratios to PlainConvUNet. ``--reuse-speed`` keeps an existing results file instead.
2. ``accuracy_busi256.py``: every row at one equal budget and several seeds on the held-out test images of
   Dataset802_BUSI256, scored by ``nnunetv2_grcsf evaluate`` (Dice, HD95, lesion F1; mean over seeds and the
   paired interval to nnUNetTrainer); runs already scored are not run again. Its PNG plots Dice against the
   training-step time of step 1.
3. This script joins the two per row (a row takes the cost of its trainer's network: an optimizer variant such
   as FIASTrainerAdamW that of its network's row, nnUNetTrainer that of PlainConvUNet) and writes
   ``results/comparison.json`` and ``.md``.

    python benchmarks/compare.py                      # everything (hours on a 2-core CPU; resumable)
    python benchmarks/compare.py --reuse-speed        # keep results/speed_<device>.json, fill in the accuracy
    python benchmarks/compare.py --table-only         # only rejoin the existing results files
    python benchmarks/compare.py --table-only --speed benchmarks/results/speed_cpu_busi256_hippocampus.json
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

from accuracy_busi256 import row_summaries, speed_row_name, speed_rows
from nnunet_workspace import BENCHMARKS

RESULTS = BENCHMARKS / "results"
COST_KEYS = ("params", "train_step_ratio", "inference_ratio", "peak_tensors_train_mb_ratio",
             "peak_memory_train_mb_ratio")


def join(speed: dict, accuracy: dict, speed_file: str) -> dict:
    """Per row of the accuracy results: its scores (means over seeds, the interval to nnUNetTrainer) and the cost
    of its trainer's network on each speed case (``speed`` read from results file ``speed_file``)."""
    cases = [c["case"]["name"] for c in speed["cases"]]
    rows = {case: speed_rows(speed, case) for case in cases}
    summaries = row_summaries(accuracy)
    trainers = {}
    for name, runs in accuracy["rows"].items():
        summary = summaries.get(name)
        scores = None
        if summary:
            scores = {k: summary[k]["mean"] for k in ("Dice", "pooled_Dice", "HD95", "lesion_F1", "lesion_precision",
                                                      "lesion_recall")}
            scores.update(seeds=summary["seeds"], Dice_sd=summary["Dice"]["sd"], vs_baseline=summary["vs_baseline"])
        trainer = next(iter(runs.values()))["trainer"]
        entry = {"scores": scores, "speed_row": speed_row_name(trainer), "cost": {}}
        for case in cases:
            row = rows[case].get(entry["speed_row"])
            entry["cost"][case] = {k: row.get(k) for k in COST_KEYS} if row else None
        trainers[name] = entry
    return {"speed_settings": speed["settings"], "speed_date": speed["date"], "speed_file": speed_file,
            "device": speed["settings"]["device"],
            "accuracy_settings": accuracy["settings"], "cases": cases, "trainers": trainers}


def _ratio(value) -> str:
    return "" if value is None else f"{value:.2f}x"


def format_table(report: dict) -> str:
    """Markdown: one row per trainer, accuracy on BUSI256 and cost ratios per speed case."""
    s = report["accuracy_settings"]
    memory = "tensors" if report["device"] == "cpu" else "memory"
    clocks = ("CPU time, memory the peak of live tensors" if report["device"] == "cpu" else
              "wall time with AMP, memory CUDA's peak")
    header = ["row", "Dice", "ΔDice vs nnUNetTrainer [95 % CI]", "HD95 (px)", "lesion F1", "params (M)"]
    for case in report["cases"]:
        header += [f"{case}: train step", f"{case}: inference", f"{case}: train {memory}"]
    lines = ["# Every network side by side", "",
             f"Accuracy: BUSI256, {s['test_split']['test_count']} held-out test images, schedule `{s['budget']}`, "
             f"`{s['configuration']}`, fold {s['fold']}, mean over seeds, scored by `nnunetv2_grcsf evaluate` "
             f"(results/accuracy_busi256_heldout.md). Cost: ratios to PlainConvUNet "
             f"(nnU-Net's default) on the same plans, {report['device']}, {report['speed_date']} "
             f"(results/{Path(report['speed_file']).with_suffix('.md').name}: times are {clocks}); a row costs "
             "what its trainer's network does.", "",
             "| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for name, t in report["trainers"].items():
        scores = t["scores"]
        difference = scores and scores["vs_baseline"]
        cells = [name] + ([f"{scores['Dice']:.3f}",
                           f"{difference['mean_difference']:+.3f} [{difference['low']:+.3f}, {difference['high']:+.3f}]"
                           if difference else "", f"{scores['HD95']:.0f}", f"{scores['lesion_F1']:.2f}"]
                          if scores else ["not scored", "", "", ""])
        first = next((c for c in t["cost"].values() if c), None)
        cells.append(f"{first['params'] / 1e6:.1f}" if first else "")
        for case in report["cases"]:
            cost = t["cost"][case] or {}
            memory_ratio = cost.get("peak_tensors_train_mb_ratio") or cost.get("peak_memory_train_mb_ratio")
            cells += [_ratio(cost.get("train_step_ratio")), _ratio(cost.get("inference_ratio")), _ratio(memory_ratio)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(command: list) -> None:
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--reuse-speed", action="store_true", help="keep an existing results/speed_<device>.json")
    parser.add_argument("--table-only", action="store_true", help="run nothing; join the existing results")
    parser.add_argument("--speed", default=None, metavar="RESULTS_JSON",
                        help="the speed results to join (default results/speed_<device>.json, which the full run "
                             "writes), e.g. results/speed_cpu_busi256_hippocampus.json")
    parser.add_argument("--accuracy-args", nargs=argparse.REMAINDER, default=[],
                        help="passed on to accuracy_busi256.py (e.g. --rows ... --seeds ... --budget ...)")
    args = parser.parse_args(argv)
    speed_file = Path(args.speed) if args.speed else RESULTS / f"speed_{args.device}.json"
    accuracy_file = RESULTS / "accuracy_busi256_heldout.json"
    if not args.table_only:
        if not (args.reuse_speed and speed_file.is_file()):
            run([sys.executable, str(BENCHMARKS / "speed.py"), "--device", args.device, "--dims", "2d", "3d",
                 "--output", str(speed_file.with_suffix(""))])
        run([sys.executable, str(BENCHMARKS / "accuracy_busi256.py"), "--device", args.device, "--speed",
             str(speed_file), *args.accuracy_args])
    missing = [str(f) for f in (speed_file, accuracy_file) if not f.is_file()]
    if missing:
        raise SystemExit(f"no results to join: {', '.join(missing)} missing (run without --table-only)")
    report = join(json.loads(speed_file.read_text()), json.loads(accuracy_file.read_text()), speed_file.name)
    output = RESULTS / "comparison"
    output.with_suffix(".json").write_text(json.dumps(report, indent=2))
    table = format_table(report)
    output.with_suffix(".md").write_text(table)
    print("\n" + table + f"\nwrote {output.with_suffix('.json')} and {output.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
