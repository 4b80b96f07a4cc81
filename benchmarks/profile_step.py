"""Where a trainer's train step spends its time, kernel by kernel: torch.profiler over nnU-Net's real train step.

    python benchmarks/profile_step.py GRCSFTrainer --output results/profile_grcsf_busi256_cuda   # on a CUDA machine
    python benchmarks/profile_step.py FIASTrainer --device cpu --batch-size 2 --flops --output /tmp/fias  # the CPU
    python benchmarks/profile_step.py GRCSFTrainer --dry-run --output /tmp/profile                # CPU, tiny network

The trainer is built as gpu_check.py builds it (its network, loss, optimizer; ``torch.compile`` where nnU-Net
compiles, unless ``--compile off``) on the stored plans (BUSI256 2d by default) at their batch size (or
``--batch-size``), warmed up (compilation included), then ``--steps`` train steps are profiled on synthetic
batches. Written: ``OUTPUT.txt``, the operators and kernels by their own device time (CPU time on the CPU), with
``--flops`` headed by the floating-point operations of one train step per operator, and with ``--trace``
``OUTPUT.json``, a Chrome trace (chrome://tracing, ui.perfetto.dev). For the RCU's cost on CUDA, compare
GRCSFTrainer with GRCSFTrainer_noRCU.
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import (BUSI256, EXTRA_ROWS, PLANS_DIR, ROWS, synchronize, synthetic_batch,  # noqa: E402
                       tiny_plans, trainer_without_data)

ROW_LIMIT = 40  # rows of the table


def main(argv=None) -> int:
    known = sorted({row[1] for row in ROWS + EXTRA_ROWS})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trainer", choices=known)
    parser.add_argument("--plans", default=BUSI256, help="a plans file of tests/data/plans, without .json")
    parser.add_argument("--configuration", default="2d")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--compile", choices=["on", "off"], default="on")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--batch-size", type=int, default=None, help="instead of the plans' (e.g. 2 on the CPU)")
    parser.add_argument("--flops", action="store_true",
                        help="also count the floating-point operations of one train step, per operator "
                             "(torch.utils.flop_counter, on the uncompiled network)")
    parser.add_argument("--dry-run", action="store_true", help="the CPU, tiny plans (a check of this script)")
    parser.add_argument("--output", required=True, help="path without suffix")
    parser.add_argument("--trace", action="store_true", help="also write OUTPUT.json, a Chrome trace (large)")
    args = parser.parse_args(argv)
    if args.compile == "off":
        os.environ["nnUNet_compile"] = "f"

    device = torch.device("cpu" if args.dry_run else args.device)
    plans = json.loads((PLANS_DIR / f"{args.plans}.json").read_text())
    if args.dry_run:
        plans = tiny_plans(plans, args.configuration)
    if args.batch_size:
        plans["configurations"][args.configuration]["batch_size"] = args.batch_size
    torch.manual_seed(0)
    trainer = trainer_without_data(args.trainer, plans, args.configuration, device, tempfile.mkdtemp())
    batches = [synthetic_batch(trainer, seed) for seed in range(2)]
    for step in range(3):  # compilation, then the allocator's steady state
        trainer.train_step(batches[step % 2])
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for step in range(args.steps):
            trainer.train_step(batches[step % 2])
        synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_by, row_limit=ROW_LIMIT, max_name_column_width=90)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    header = (f"{args.trainer} on {args.plans} {args.configuration}, batch {trainer.batch_size}, {args.steps} train "
              f"steps, {'compiled' if hasattr(trainer.network, '_orig_mod') else 'not compiled'}, "
              f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, "
              f"torch {torch.__version__}\n" + (train_step_flops(trainer, batches[0]) if args.flops else ""))
    output.with_suffix(".txt").write_text(header + table + "\n")
    if args.trace:
        profiler.export_chrome_trace(str(output.with_suffix(".json")))
    print(header + table)
    return 0


def train_step_flops(trainer, batch: dict) -> str:
    """'FLOPs of one train step: TOTAL G (op G, ...)', counted on the network without its compile wrapper."""
    compiled = trainer.network
    trainer.network = getattr(compiled, "_orig_mod", compiled)
    try:
        with FlopCounterMode(display=False) as counter:
            trainer.train_step(batch)
    finally:
        trainer.network = compiled
    per_operator = sorted(counter.get_flop_counts()["Global"].items(), key=lambda item: -item[1])
    return (f"FLOPs of one train step: {counter.get_total_flops() / 1e9:.1f} G ("
            + ", ".join(f"{operator} {count / 1e9:.1f} G" for operator, count in per_operator) + ")\n")


if __name__ == "__main__":
    sys.exit(main())
