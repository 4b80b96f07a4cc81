"""The RCU's attention layouts side by side (rcu.ATTENTION_LAYOUTS), on the CPU or CUDA.

Builds GRCSFTrainer's network from the stored BUSI256 (2d) and Hippocampus (3d_fullres) plans, with one residual
channel as it trains, runs one forward pass on a random batch to catch each RCU's inputs, then times each RCU's
forward + backward (a random output gradient) with every layout, in rounds (one call of each layout per round, the
order rotating). CPU: process time, one thread. CUDA: wall time (synchronized), float16 autocast as nnU-Net trains
(``--amp``), optionally each layout under torch.compile (``--compile``), and the peak memory of a call above what
was allocated before it. Reports the medians and the median of the per-round ratios to SDPA; the results file
keeps every time.

    python benchmarks/rcu_attention_speed.py [--cases busi256 hippocampus] [--batch-size 2] [--rounds 7]
    python benchmarks/rcu_attention_speed.py --device cuda --compile     # plans' batch sizes, float16 autocast
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from speed import with_residual_channel
from speed_cases import STORED_PLANS, load_json, minimal_dataset_json, nnunet_env
from speed_worker import build_trainer, random_batch, timed

from nnunetv2_grcsf.architectures.blocks.rcu import ATTENTION_LAYOUTS, RegionCompensationUnit

RESULTS = Path(__file__).resolve().parent / "results"
CASES = {"busi256": ("Dataset802_BUSI256", "2d", {"background": 0, "lesion": 1}),
         "hippocampus": ("Dataset804_Hippocampus", "3d_fullres", {"background": 0, "anterior": 1, "posterior": 2})}
REFERENCE_LAYOUT = "sdpa"


def captured_rcu_inputs(case: str, batch_size, device: torch.device):
    """(batch size, [(name, rcu, (features, residual_map, global_features))]) of GRCSFTrainer's network on
    ``case``'s plans; batch size None: the plans'."""
    dataset, configuration, labels = CASES[case]
    plans = load_json(STORED_PLANS / f"{dataset}_nnUNetPlans.json")
    spec = {"trainer": "GRCSFTrainer", "plans": plans, "configuration": configuration, "compile": False,
            "dataset_json": with_residual_channel(minimal_dataset_json(plans, labels))}
    trainer = build_trainer(spec, device)
    batch_size = batch_size or trainer.configuration_manager.batch_size
    captured, hooks = [], []
    for name, module in trainer.network.named_modules():
        if isinstance(module, RegionCompensationUnit):
            hooks.append(module.register_forward_hook(
                lambda module, args, output, name=name: captured.append((name, module, [a.detach() for a in args]))))
    with torch.no_grad():
        trainer.network(random_batch(trainer, batch_size, device)["data"])
    for hook in hooks:
        hook.remove()
    return batch_size, captured


def forward_backward(rcu, inputs, output_gradient, amp: bool) -> None:
    """One forward + backward of ``rcu`` (gradients of the features and every parameter; nothing kept)."""
    device_type = inputs[0].device.type
    autocast = torch.autocast(device_type, dtype=torch.float16) if amp else contextlib.nullcontext()
    with autocast:
        out = rcu(*inputs)
    parameters = [p for p in rcu.parameters() if p.requires_grad]
    torch.autograd.grad(out, [inputs[0], *parameters], output_gradient.to(out.dtype))


def measure(case: str, batch_size, rounds: int, layouts, device: torch.device, amp: bool, compile_rcu: bool):
    batch_size, captured = captured_rcu_inputs(case, batch_size, device)
    rows = []
    for name, rcu, inputs in captured:
        inputs[0].requires_grad_()
        output_gradient = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(0)).to(device)
        runner = torch.compile(rcu) if compile_rcu else rcu  # one compiled graph per layout (guarded on it)

        def seconds(layout: str) -> float:
            rcu.attention_layout = layout
            wall, cpu = timed(lambda: forward_backward(runner, inputs, output_gradient, amp), device)
            return wall if device.type == "cuda" else cpu

        times, memory_mb = {layout: [] for layout in layouts}, {}
        for layout in layouts:  # warm-up (and compile), then the peak memory of one call
            seconds(layout)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                seconds(layout)
                memory_mb[layout] = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
        for round_index in range(rounds):
            for position in range(len(layouts)):
                layout = layouts[(round_index + position) % len(layouts)]
                times[layout].append(seconds(layout))
        reference = times.get(REFERENCE_LAYOUT)
        row = {"case": case, "rcu": name, "batch_size": batch_size, "features": list(inputs[0].shape),
               "residual_map": list(inputs[1].shape), "times_s": times,
               "median_s": {layout: statistics.median(values) for layout, values in times.items()},
               "memory_mb": memory_mb or None}
        if reference is not None:
            ratios = {layout: [t / r for t, r in zip(values, reference)] for layout, values in times.items()}
            row["ratio_median"] = {layout: statistics.median(values) for layout, values in ratios.items()}
            row["ratio_range"] = {layout: [min(values), max(values)] for layout, values in ratios.items()}
        rows.append(row)
        print(f"[{case}] {name} features {row['features']}: " + ", ".join(
            f"{layout} {1e3 * row['median_s'][layout]:.1f} ms" + (f" ({row['ratio_median'][layout]:.2f}x)"
                                                                  if reference is not None else "")
            + (f", {memory_mb[layout]:.0f} MiB" if memory_mb else "") for layout in layouts), flush=True)
    return rows


def format_table(report: dict) -> str:
    layouts = report["layouts"]
    where = ("the CPU, one torch thread, process time" if report["device"] == "cpu" else
             f"{report['device_name']}, wall time{', float16 autocast' if report['amp'] else ''}"
             f"{', each layout under torch.compile' if report['compile'] else ', eager'}, peak memory of a call "
             f"above what was allocated before it")
    lines = [f"# The RCU's attention layouts on {report['device_name']}", "",
             f"GRCSFTrainer's network on the stored plans; each RCU's forward + backward on its own inputs, on "
             f"{where}; median of {report['rounds']} rounds (each layout once per round, rotating order); ratio = "
             f"layout / {REFERENCE_LAYOUT} per round (median, range). Command: `{report['command']}`.", "",
             "| plans | RCU | features | " + " | ".join(f"{layout} (ms)" for layout in layouts) + " | "
             + " | ".join(f"{layout} / {REFERENCE_LAYOUT}" for layout in layouts if layout != REFERENCE_LAYOUT)
             + (" | " + " | ".join(f"{layout} (MiB)" for layout in layouts) if report["device"] != "cpu" else "")
             + " |",
             "| --- | --- | --- | " + " | ".join("---:" for _ in layouts) + " | "
             + " | ".join("---:" for layout in layouts if layout != REFERENCE_LAYOUT)
             + (" | " + " | ".join("---:" for _ in layouts) if report["device"] != "cpu" else "") + " |"]
    for row in report["rows"]:
        cells = [row["case"], f"`{row['rcu']}`", "x".join(map(str, row["features"]))]
        cells += [f"{1e3 * row['median_s'][layout]:.1f}" for layout in layouts]
        for layout in layouts:
            if layout != REFERENCE_LAYOUT and "ratio_median" in row:
                low, high = row["ratio_range"][layout]
                cells.append(f"{row['ratio_median'][layout]:.2f}x ({low:.2f}-{high:.2f})")
            elif layout != REFERENCE_LAYOUT:
                cells.append("-")
        if report["device"] != "cpu":
            cells += [f"{row['memory_mb'][layout]:.0f}" for layout in layouts]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--layouts", nargs="+", choices=ATTENTION_LAYOUTS, default=list(ATTENTION_LAYOUTS))
    parser.add_argument("--batch-size", type=int, help="default: 2 on the CPU, the plans' batch size on CUDA")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per RCU (after one warm-up call each)")
    parser.add_argument("--amp", choices=["on", "off"], help="float16 autocast (default: on CUDA only)")
    parser.add_argument("--compile", action="store_true", help="each layout under torch.compile (CUDA)")
    parser.add_argument("--output", help="output path without suffix (default results/rcu_attention_<device>"
                                         "[_compiled])")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --device cpu, or on a GPU machine")
    amp = (args.amp or ("on" if device.type == "cuda" else "off")) == "on"
    batch_size = args.batch_size or (2 if device.type == "cpu" else None)
    if device.type == "cpu":
        torch.set_num_threads(1)
    torch.manual_seed(0)
    scratch = tempfile.TemporaryDirectory(prefix="rcu_attention_")  # nnU-Net's folders, which the trainer needs
    os.environ.update(nnunet_env(Path(scratch.name)))
    layouts = [REFERENCE_LAYOUT] + [layout for layout in args.layouts if layout != REFERENCE_LAYOUT] \
        if REFERENCE_LAYOUT in args.layouts else list(args.layouts)
    report = {"command": " ".join(["python benchmarks/rcu_attention_speed.py", *(argv if argv is not None else
                                                                                   sys.argv[1:])]),
              "device": device.type, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "the CPU", "torch": torch.__version__, "amp": amp, "compile": args.compile, "layouts": layouts,
              "rounds": args.rounds,
              "rows": [row for case in args.cases
                       for row in measure(case, batch_size, args.rounds, layouts, device, amp, args.compile)]}
    output = Path(args.output or RESULTS / f"rcu_attention_{device.type}{'_compiled' if args.compile else ''}")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(report, indent=1))
    output.with_suffix(".md").write_text(format_table(report))
    print(f"wrote {output.with_suffix('.json')} and {output.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
