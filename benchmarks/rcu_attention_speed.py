"""The RCU's two attention layouts side by side: SDPA (what CUDA runs) and keys first (the CPU default).

Builds GRCSFTrainer's network from the stored BUSI256 (2d) and Hippocampus (3d_fullres) plans, with one residual
channel as it trains, runs one forward pass on a random batch to catch each RCU's inputs, then times each RCU's
forward + backward (a random output gradient) with either layout, in pairs (SDPA then keys first), on this CPU.
Reports the medians and the median of the per-pair ratios; the results file keeps every pair.

    python benchmarks/rcu_attention_speed.py [--cases busi256 hippocampus] [--batch-size 2] [--pairs 7]
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from speed import with_residual_channel
from speed_cases import STORED_PLANS, load_json, minimal_dataset_json, nnunet_env
from speed_worker import build_trainer, paired_times, random_batch, timed

from nnunetv2_grcsf.architectures.blocks.rcu import RegionCompensationUnit

RESULTS = Path(__file__).resolve().parent / "results"
CASES = {"busi256": ("Dataset802_BUSI256", "2d", {"background": 0, "lesion": 1}),
         "hippocampus": ("Dataset804_Hippocampus", "3d_fullres", {"background": 0, "anterior": 1, "posterior": 2})}
LAYOUTS = {"sdpa": False, "keys_first": True}
CPU = torch.device("cpu")


def captured_rcu_inputs(case: str, batch_size: int):
    """[(name, rcu, (features, residual_map, global_features))] of GRCSFTrainer's network on ``case``'s plans."""
    dataset, configuration, labels = CASES[case]
    plans = load_json(STORED_PLANS / f"{dataset}_nnUNetPlans.json")
    spec = {"trainer": "GRCSFTrainer", "plans": plans, "configuration": configuration, "compile": False,
            "dataset_json": with_residual_channel(minimal_dataset_json(plans, labels))}
    trainer = build_trainer(spec, CPU)
    captured, hooks = [], []
    for name, module in trainer.network.named_modules():
        if isinstance(module, RegionCompensationUnit):
            hooks.append(module.register_forward_hook(
                lambda module, args, output, name=name: captured.append((name, module, [a.detach() for a in args]))))
    with torch.no_grad():
        trainer.network(random_batch(trainer, batch_size, CPU)["data"])
    for hook in hooks:
        hook.remove()
    return captured


def forward_backward(rcu: RegionCompensationUnit, inputs, output_gradient, keys_first: bool) -> None:
    rcu.keys_first = keys_first
    torch.autograd.grad(rcu(*inputs), [inputs[0], *rcu.parameters()], output_gradient)  # backward, nothing kept


def measure(case: str, batch_size: int, pairs: int) -> list:
    rows = []
    for name, rcu, inputs in captured_rcu_inputs(case, batch_size):
        inputs[0].requires_grad_()
        output_gradient = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(0))

        def cpu_seconds(keys_first: bool) -> float:
            return timed(lambda: forward_backward(rcu, inputs, output_gradient, keys_first), CPU)[1]

        for keys_first in LAYOUTS.values():  # warm-up
            forward_backward(rcu, inputs, output_gradient, keys_first)
        keys_first_times, sdpa_times = paired_times(lambda: cpu_seconds(True), lambda: cpu_seconds(False), pairs)
        times = {"sdpa": sdpa_times, "keys_first": keys_first_times}
        ratios = [k / s for s, k in zip(sdpa_times, keys_first_times)]
        rows.append({"case": case, "rcu": name, "features": list(inputs[0].shape), "residual_map":
                     list(inputs[1].shape), "times_s": times, "sdpa_median_s": statistics.median(sdpa_times),
                     "keys_first_median_s": statistics.median(keys_first_times),
                     "ratio_median": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)]})
        print(f"[{case}] {name} features {list(inputs[0].shape)}: SDPA {1e3 * rows[-1]['sdpa_median_s']:.0f} ms, "
              f"keys first {1e3 * rows[-1]['keys_first_median_s']:.0f} ms ({rows[-1]['ratio_median']:.2f}x)",
              flush=True)
    return rows


def format_table(report: dict) -> str:
    lines = ["# The RCU's attention on the CPU: SDPA against keys first", "",
             f"GRCSFTrainer's network on the stored plans, batch {report['batch_size']}, one torch thread; each RCU's "
             f"forward + backward, CPU time, median of {report['pairs']} pairs (SDPA then keys first); ratio = keys "
             f"first / SDPA per pair (median, range). Command: `{report['command']}`.", "",
             "| plans | RCU | features | SDPA (ms) | keys first (ms) | ratio (range) |",
             "| --- | --- | --- | ---: | ---: | ---: |"]
    for row in report["rows"]:
        low, high = row["ratio_range"]
        lines.append(f"| {row['case']} | `{row['rcu']}` | {'x'.join(map(str, row['features']))} | "
                     f"{1e3 * row['sdpa_median_s']:.0f} | {1e3 * row['keys_first_median_s']:.0f} | "
                     f"{row['ratio_median']:.2f}x ({low:.2f}-{high:.2f}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=7, help="timed pairs per RCU (after one warm-up pair)")
    parser.add_argument("--output", default=str(RESULTS / "rcu_attention_cpu"), help="output path without suffix")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    scratch = tempfile.TemporaryDirectory(prefix="rcu_attention_")  # nnU-Net's folders, which the trainer needs
    os.environ.update(nnunet_env(Path(scratch.name)))
    report = {"command": " ".join(["python benchmarks/rcu_attention_speed.py", *(argv if argv is not None else
                                                                                   sys.argv[1:])]),
              "batch_size": args.batch_size, "pairs": args.pairs,
              "rows": [row for case in args.cases for row in measure(case, args.batch_size, args.pairs)]}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(report, indent=1))
    output.with_suffix(".md").write_text(format_table(report))
    print(f"wrote {output.with_suffix('.json')} and {output.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
