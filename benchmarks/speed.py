"""Every network side by side: nnU-Net training step and sliding-window inference time, peak memory, parameters.

One run measures, on the same nnU-Net plans (same patch size, batch size and topology per case; see
speed_cases.py), nnU-Net's PlainConvUNet (the default, the reference of every ratio), nnU-Net's
ResidualEncoderUNet (ResEnc M plans), and the network of every base trainer in
``nnunetv2_grcsf.trainers.BASE_TRAINERS`` (its ``network_class_name`` and ``network_kwargs``: exactly what
``nnUNetv2_train -tr NAME`` trains). Each network is measured in a fresh process by speed_worker.py (its
docstring says exactly what is timed); a network that fails to build or run is reported with its error and
the run goes on.

    python benchmarks/speed.py                          # CPU (or CUDA if present): 2d BUSI256 + 3d generated volume
    python benchmarks/speed.py --dims 2d --networks GRCSFTrainer FIASTrainer --steps 5
    python benchmarks/speed.py --dims 2d --cases busi256 --networks FIASTrainer --paired \
        --variant FIASTrainer mlp_ratio=2 --variant FIASTrainer activation_checkpointing=false
    python benchmarks/speed.py --dims 3d --cases hippocampus --output benchmarks/results/speed_cpu_hippocampus
    python benchmarks/speed.py --dims 3d --cases brats6 --batch-size 1 --steps 1 --inference-runs 1 \
        --image-scale 1 --memory-limit-gb 10 --output benchmarks/results/speed_cpu_brats6
    python benchmarks/speed.py --device cuda --compile  # AMP as nnU-Net trains; torch.compile as nnU-Net's default

Writes benchmarks/results/speed_<device>.json and .md (``--output`` to change) and prints the table.
Timings are medians of ``--steps`` training steps and ``--inference-runs`` sliding-window predictions after
``--warmup`` untimed ones, as measured: wall-clock and process CPU time. On CPU the ratios use CPU time of a
single-threaded process (``--threads 1``, the default there), the figure that stays put on a shared machine
whose load changes (the load average is recorded beside each row).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))

from speed_cases import CASE_DIMS, CASES, DEFAULT_CASES, Case  # noqa: E402

RESULTS = BENCHMARKS / "results"
WORK = BENCHMARKS / "work" / "speed"
REFERENCE = "PlainConvUNet"


@dataclass
class Network:
    """One row: a name, the trainer class that builds it, which plans it reads, and what the trainer adds."""

    name: str
    trainer: str
    plans: str  # "default" or "resenc"
    network_kwargs: dict = field(default_factory=dict)
    needs_residual_channels: bool = False
    kwargs_override: dict = field(default_factory=dict)  # a --variant's constructor arguments over the trainer's


def networks() -> List[Network]:
    """nnU-Net's two U-Nets (built by nnUNetTrainer from the plans), then one row per base trainer of ours."""
    from nnunetv2_grcsf.trainers import BASE_TRAINERS

    rows = [Network(REFERENCE, "nnUNetTrainer", "default"), Network("ResEncUNet-M", "nnUNetTrainer", "resenc")]
    rows += [Network(t.__name__, t.__name__, "default", dict(t.network_kwargs), t.needs_residual_channels)
             for t in BASE_TRAINERS]
    return rows


def select_networks(names: Optional[List[str]]) -> List[Network]:
    """The chosen rows (case-insensitive names), always with the reference first."""
    rows = networks()
    if not names:
        return rows
    known = {n.name.lower(): n for n in rows}
    unknown = [n for n in names if n.lower() not in known]
    if unknown:
        raise SystemExit(f"unknown network(s) {unknown}; choose from {[n.name for n in rows]}")
    chosen = [known[n.lower()] for n in names if n.lower() != REFERENCE.lower()]
    return [known[REFERENCE.lower()]] + chosen


def variant_network(words: List[str]) -> Network:
    """A ``--variant NAME KEY=VALUE ...`` row: trainer NAME's network with those constructor arguments over its
    own (each VALUE read as JSON, else as a string), named ``NAME(KEY=VALUE, ...)``."""
    name, *assignments = words
    known = {n.name: n for n in networks() if n.trainer != "nnUNetTrainer"}
    if name not in known or not assignments or any("=" not in a for a in assignments):
        raise SystemExit(f"--variant {' '.join(words)}: expected one of {sorted(known)} then KEY=VALUE pairs, e.g. "
                         f"--variant FIASTrainer mlp_ratio=2")
    override = {}
    for key, _, text in (a.partition("=") for a in assignments):
        try:
            override[key] = json.loads(text)
        except json.JSONDecodeError:
            override[key] = text
    base = known[name]
    return Network(f"{name}({', '.join(assignments)})", base.trainer, base.plans,
                   {**base.network_kwargs, **override}, base.needs_residual_channels, override)


def with_residual_channel(dataset_json: dict) -> dict:
    """The dataset.json plus one MAE residual channel, declared as `nnunetv2_grcsf residuals` declares it."""
    from nnunetv2_grcsf.residual_channels import DATASET_JSON_KEY

    channel = len(dataset_json["channel_names"])
    return {**dataset_json, "channel_names": {**dataset_json["channel_names"], str(channel): "residual"},
            DATASET_JSON_KEY: {"residual_channels": [channel]}}


def network_spec(case: Case, network: Network) -> Optional[dict]:
    """Trainer, plans and dataset.json that build this row's network; None if the case has no plans for it."""
    plans = case.plans if network.plans == "default" else case.resenc_plans
    if plans is None:
        return None
    dataset_json = with_residual_channel(case.dataset_json) if network.needs_residual_channels else case.dataset_json
    return {"trainer": network.trainer, "network_kwargs_override": network.kwargs_override, "plans": plans,
            "dataset_json": dataset_json}


def worker_spec(case: Case, network: Network, reference: Optional[Network], args, result_file: Path) -> Optional[dict]:
    """What speed_worker.py measures for this row (timed in pairs with ``reference`` if given); None without plans."""
    spec = network_spec(case, network)
    if spec is None:
        return None
    return {**spec, "configuration": case.configuration, "batch_size": args.batch_size, "steps": args.steps,
            "warmup": args.warmup, "inference_runs": args.inference_runs, "image_scale": args.image_scale,
            "device": args.device, "threads": args.threads, "memory_limit_gb": args.memory_limit_gb,
            "compile": args.compile, "result_file": str(result_file),
            "reference": network_spec(case, reference) if reference is not None else None}


def run_worker(spec: dict, timeout: float, scratch: Path) -> dict:
    """Measure one row in a fresh process; a crash or timeout becomes an error result."""
    spec_file = Path(spec["result_file"]).with_suffix(".spec.json")
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, nnUNet_results=str(scratch), nnUNet_compile="true" if spec["compile"] else "false")
    started = time.perf_counter()
    try:
        process = subprocess.run([sys.executable, str(BENCHMARKS / "speed_worker.py"), str(spec_file)], env=env,
                                 capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "stage": "timeout", "error": f"no result within --timeout {timeout:.0f} s"}
    result_file = Path(spec["result_file"])
    if process.returncode != 0 or not result_file.is_file():
        tail = (process.stderr or process.stdout).strip().splitlines()[-3:]
        return {"status": "error", "stage": "process",
                "error": f"worker exited {process.returncode}: {' | '.join(tail)}"}
    result = json.loads(result_file.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def clock_of(device: str) -> str:
    """Which time the ratios use: process CPU time on CPU (stable under other processes' load), else wall time."""
    return "_cpu" if device == "cpu" else ""


def add_ratios(rows: List[dict], clock: str) -> None:
    """Each row's time (``clock``: "_cpu" or ""), memory and parameters relative to the reference row.

    Times: the row's paired ratio (median of per-pair ratios, measured in one process) when it has one, else
    the ratio of the medians of the two rows' separate runs. None where either row has no value.
    """
    reference = next((r for r in rows if r["name"] == REFERENCE and r["status"] == "ok"), None)
    for row in rows:
        ok = reference is not None and row["status"] == "ok"
        for key in ("train_step", "inference"):
            pairs = zip(row.get(f"{key}{clock}_s", []), row.get(f"reference_{key}{clock}_s", []))
            row[f"{key}_pair_ratios"] = [own / ref for own, ref in pairs]
            paired = row.get(f"{key}{clock}_paired_ratio")
            median = f"{key}{clock}_median_s"
            row[f"{key}_ratio"] = paired if paired is not None else row[median] / reference[median] if ok else None
        for key in ("peak_memory_train_mb", "peak_memory_inference_mb", "peak_tensors_train_mb",
                    "peak_tensors_inference_mb", "params"):
            row[f"{key}_ratio"] = row[key] / reference[key] if ok and row.get(key) and reference.get(key) else None


def measure_case(case: Case, rows: List[Network], args, scratch: Path, results: List[dict], on_row) -> None:
    """Every row of one case (the reference first) appended to ``results``; ``on_row()`` after each one."""
    for network in rows:
        reference = rows[0] if args.paired and network is not rows[0] else None
        with tempfile.TemporaryDirectory() as folder:
            spec = worker_spec(case, network, reference, args, Path(folder) / "result.json")
            if spec is None:
                result = {"status": "error", "stage": "plans", "error": f"no ResEnc M plans for {case.name}"}
            else:
                result = run_worker(spec, args.timeout, scratch)
        row = {"name": network.name, "trainer": network.trainer, "network_kwargs": network.network_kwargs,
               "plans": network.plans, **result}
        results.append(row)
        print(f"  {network.name:<20} " + (f"train {row['train_step_median_s']:.2f} s, inference "
                                          f"{row['inference_median_s']:.2f} s, {row['params'] / 1e6:.2f} M params"
                                          if row["status"] == "ok" else f"ERROR ({row['stage']}): {row['error']}"),
              flush=True)
        add_ratios(results, clock_of(args.device))
        on_row()


def _cell(value, ratio, fmt: str, pair_ratios=()) -> str:
    """``value (ratio x)``, with the range of the per-pair ratios when there are several."""
    if value is None:
        return "-"
    spread = f", {min(pair_ratios):.2f}-{max(pair_ratios):.2f}" if len(pair_ratios) > 1 else ""
    return f"{value:{fmt}} ({ratio:.2f}x{spread})" if ratio is not None else f"{value:{fmt}}"


def describe_settings(report: dict) -> str:
    """The paragraph above the tables: what was timed, how, and on what."""
    settings = report["settings"]
    cpu = settings["device"] == "cpu"
    threads = settings["threads"] or "torch's default"
    return (f"Batch size {settings['batch_size']}; medians of {settings['steps']} training steps "
            f"(nnUNetTrainer.train_step: forward, DC+CE loss with deep supervision, backward, SGD) and "
            f"{settings['inference_runs']} sliding-window predictions (nnUNetPredictor, tile step 0.5, Gaussian, no "
            f"mirroring, image {settings['image_scale']}x the patch per axis), after {settings['warmup']} warm-up "
            f"each{'' if cpu else ', AMP'}{', torch.compile' if settings['compile'] else ''}; torch threads: "
            f"{threads}. Ratios to PlainConvUNet of the same case, in brackets"
            + (" (times: process CPU time, which on a shared machine stays what the network costs while wall time "
               "follows the other processes' load)" if cpu else "")
            + ("; with the range of per-pair ratios, each timed step right after a PlainConvUNet step in the same "
               "process" if settings["paired"] else "")
            + ". Memory: " + ("RSS: peak resident set size above the built model" if cpu
                              else "torch.cuda.max_memory_allocated") + " (MB)"
            + ("; tensors: peak bytes of live tensors (torch profiler memory events, one more prediction and "
               "training step), weights, gradients, optimizer state and batch included: the CPU counterpart of "
               "CUDA's figure, independent of how glibc's heap places and keeps freed memory, which the RSS "
               "includes" if cpu else "") + ". "
            f"torch {report['torch']}, nnunetv2 {report['nnunetv2']}, {report['date']}; load average "
            f"{report['loadavg_start']:.1f} at the start, {report['loadavg_end']:.1f} at the end.")


def table_row(r: dict, cpu: bool) -> str:
    """One Markdown row: values with their ratios, or the error where the network failed."""
    wall = [f"{r['train_step_median_s']:.2f}", f"{r['inference_median_s']:.2f}"] if cpu else []
    clock = "_cpu" if cpu else ""
    cells = [r["name"], r["trainer"], str(r["input_channels"]), _cell(r["params"] / 1e6, r["params_ratio"], ".2f"),
             _cell(r[f"train_step{clock}_median_s"], r["train_step_ratio"], ".2f", r["train_step_pair_ratios"]),
             _cell(r[f"inference{clock}_median_s"], r["inference_ratio"], ".2f", r["inference_pair_ratios"]),
             *wall, str(r["inference_tiles"]), _cell(r["peak_memory_train_mb"], r["peak_memory_train_mb_ratio"], ".0f"),
             _cell(r["peak_memory_inference_mb"], r["peak_memory_inference_mb_ratio"], ".0f")]
    if cpu:
        cells += [_cell(r.get("peak_tensors_train_mb"), r.get("peak_tensors_train_mb_ratio"), ".0f"),
                  _cell(r.get("peak_tensors_inference_mb"), r.get("peak_tensors_inference_mb_ratio"), ".0f")]
    return "| " + " | ".join(cells) + " |"


def format_table(report: dict) -> str:
    """Markdown: one table per case, each value with its ratio to PlainConvUNet."""
    cpu = report["settings"]["device"] == "cpu"
    header = ["network", "trainer", "in ch", "params (M)",
              *(["train step, CPU s", "inference, CPU s", "train step, wall s", "inference, wall s"] if cpu
                else ["train step (s)", "inference (s)"]), "tiles",
              *(["RSS train (MB)", "RSS inference (MB)"] if cpu else ["memory train (MB)", "memory inference (MB)"]),
              *(["tensors train (MB)", "tensors inference (MB)"] if cpu else [])]
    lines = [f"# Speed: every network side by side ({report['settings']['device']}: {report['device_name']})", "",
             describe_settings(report), ""]
    for case in report["cases"]:
        info = case["case"]
        lines += [f"## {info['dims']} `{info['name']}`: {info['source']}", "",
                  f"patch {'x'.join(map(str, info['patch_size']))}, {info['n_stages']} stages "
                  f"{info['features_per_stage']}, {info['image_channels']} image channel(s), {info['classes']} classes "
                  f"(planned batch {info['planned_batch_size']}, measured at {report['settings']['batch_size']})."
                  + "".join(f" {n}." for n in info["notes"]), "",
                  "| " + " | ".join(header) + " |", "| --- | --- |" + " ---: |" * (len(header) - 2)]
        for r in case["rows"]:
            if r["status"] == "ok":
                lines.append(table_row(r, cpu))
            else:
                error = r["error"][:160].replace("|", "/")
                lines.append(f"| {r['name']} | {r['trainer']} | | | error at {r['stage']}: {error} |"
                             + " |" * (len(header) - 5))
        lines.append("")
    lines.append("Rows with a residual channel (GRCSFTrainer, GRCSFTrainer_noGCU, GRCSF_FIASTrainer) get one more "
                 "input channel (the MAE residual map), as they train. CPU memory of training includes inference's "
                 "(measured first, in the same process).")
    return "\n".join(lines) + "\n"


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    model = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").is_file() else []
    return f"{model[0] if model else platform.processor()}, {os.cpu_count()} cores"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: cuda if available, else cpu")
    parser.add_argument("--dims", nargs="+", default=["2d", "3d"], choices=("2d", "3d"))
    parser.add_argument("--cases", nargs="+", default=None, choices=sorted(CASES),
                        help="plans to run on (default: busi256 for 2d, volume for 3d; extra: hippocampus, brats6)")
    parser.add_argument("--networks", nargs="+", default=None, metavar="NAME",
                        help="rows to measure (PlainConvUNet always runs: it is the reference); default: all")
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar="WORD",
                        help="one more row: NAME KEY=VALUE ...: trainer NAME's network with these constructor "
                             "arguments (JSON values) over its own, e.g. --variant FIASTrainer mlp_ratio=2 "
                             "activation_checkpointing=false (repeatable; without --networks: the reference and "
                             "the variants only)")
    parser.add_argument("--batch-size", type=int, default=2, help="training batch size (same for every network)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps and warm-up forward passes")
    parser.add_argument("--inference-runs", type=int, default=2, help="timed sliding-window predictions")
    parser.add_argument("--image-scale", type=float, default=1.5,
                        help="inference image size per axis, in patch sizes (1.5: 2 tiles per axis at step 0.5)")
    parser.add_argument("--volume-shape", type=int, nargs=3, default=[32, 64, 64], metavar=("D", "H", "W"),
                        help="volume size of the generated 3d data set (case 'volume')")
    parser.add_argument("--patch-size", type=int, nargs="+", default=None,
                        help="measure at this patch size instead of the planned one (quick checks; must fit --dims)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per network (0: torch's default). Default on CPU: 1, because on a "
                             "shared machine multi-threaded steps spin-wait for descheduled threads, so their CPU "
                             "and wall times follow the load; on CUDA: 0")
    parser.add_argument("--memory-limit-gb", type=float, default=0,
                        help="CPU: cap each network's process at this much data memory (RLIMIT_DATA), so that a "
                             "network too large for a shared machine fails as its row's error (0: no cap)")
    parser.add_argument("--paired", action="store_true",
                        help="time each step of a network right after a PlainConvUNet step in the same process "
                             "(per-pair ratios: wall-time ratios that hold under a changing load; twice the time)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (CUDA; as nnU-Net does)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per network before it is reported failed")
    parser.add_argument("--output", default=None, help="output path without suffix (default: results/speed_<device>)")
    parser.add_argument("--work-dir", default=str(WORK), help="generated data sets and plans (reused)")
    parser.add_argument("--render", default=None, metavar="RESULTS_JSON",
                        help="measure nothing: rewrite the Markdown table of an earlier results JSON")
    args = parser.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    if args.compile and args.device == "cpu":
        print("note: --compile ignored on CPU (nnU-Net does not compile on CPU)")
        args.compile = False
    cases = args.cases or sum((DEFAULT_CASES[d] for d in args.dims), [])
    args.cases = [c for c in cases if CASE_DIMS[c] in args.dims]
    return args


def render(results_file: Path) -> str:
    """Rewrite the Markdown table beside a results JSON (ratios recomputed); returns the table."""
    report = json.loads(results_file.read_text())
    for case in report["cases"]:
        add_ratios(case["rows"], clock_of(report["settings"]["device"]))
    table = format_table(report)
    results_file.with_suffix(".md").write_text(table)
    return table


def main(argv=None) -> int:
    from importlib.metadata import version

    import torch

    args = parse_args(argv)
    if args.render:
        print(render(Path(args.render)))
        return 0
    rows = select_networks(args.networks if args.networks or not args.variant else [REFERENCE])
    rows += [variant_network(words) for words in args.variant]
    output = Path(args.output) if args.output else RESULTS / f"speed_{args.device}"
    work = Path(args.work_dir)
    started = time.perf_counter()
    report = {"settings": {k: v for k, v in vars(args).items() if k not in ("output", "work_dir")},
              "device_name": device_name(args.device), "torch": torch.__version__, "nnunetv2": version("nnunetv2"),
              "date": time.strftime("%Y-%m-%d %H:%M"), "loadavg_start": os.getloadavg()[0], "cases": []}
    scratch = work / "scratch_results"

    def save() -> str:
        """Write the JSON and the table as they stand (after every row: a long run leaves what it measured)."""
        report.update(loadavg_end=os.getloadavg()[0], duration_s=time.perf_counter() - started)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.with_suffix(".json").write_text(json.dumps(report, indent=1))
        table = format_table(report)
        output.with_suffix(".md").write_text(table)
        return table

    for name in args.cases:
        print(f"[{name}] preparing plans", flush=True)
        case = CASES[name](work, args)
        if args.patch_size:
            case = case.with_patch(args.patch_size)
        print(f"[{name}] {case.source}: patch {case.summary()['patch_size']}, batch {args.batch_size}", flush=True)
        report["cases"].append({"case": case.summary(), "rows": []})
        measure_case(case, rows, args, scratch, report["cases"][-1]["rows"], save)
    print("\n" + save())
    print(f"wrote {output.with_suffix('.json')} and {output.with_suffix('.md')} "
          f"({report['duration_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
