"""The GPU path nnU-Net takes (float16 AMP, torch.compile, CUDA), measured for every base trainer on one GPU.

Run it on a CUDA machine, from the repository root, as one command (it stops starting rows after ``--budget``
seconds, 450 by default)::

    timeout 540 python benchmarks/gpu_check.py [--rows NAME ...] [--configurations 2d] [--compile off]

For every base trainer of ours, ``nnUNetTrainer`` and nnU-Net's ResEnc-M network (nnUNetResEncUNetMPlans), on the
BUSI256 2d and Hippocampus 3d_fullres plans of tests/data/plans (their patch and batch sizes), each row in a
fresh process (its own compile caches and peak memory; a row that hangs is stopped after ``--row-seconds``):
- nnU-Net's real ``train_step`` (a trainer instance on CUDA: AMP with its GradScaler, ``torch.compile`` as
  ``initialize()`` applies it, or not with ``--compile off``, i.e. ``nnUNet_compile=f``) on synthetic batches:
  median step time after the compile warm-up; a row whose network torch.compile could not compile (our trainers
  then train it uncompiled) says so, ``compiled`` false and the compiler's error in ``compile_failure``;
- nnU-Net's sliding-window inference (``nnUNetPredictor.predict_sliding_window_return_logits``, mirroring on) of
  a synthetic image of twice the patch size per axis;
- ``torch.cuda.max_memory_allocated`` of each, and the ratios to ``nnUNetTrainer`` on the same plans;
- a one-epoch ``nnUNetv2_train`` smoke run of each trainer (``<trainer>_1epoch_10iters``) on a small
  synthetic data set made here (nnunetv2_grcsf/synthetic.py, with a residual channel for the RCU trainers).
Diagnostic rows (``--rows``, benchmarks/trainers): ``FIASTrainer_noCheckpointing`` (FIAS without activation
checkpointing), ``FIASTrainer_loopMSDA`` (FIAS with the MSDA's plain-ops loop instead of flex_attention),
``GRCSFTrainer_rcuFolded`` and ``GRCSFTrainer_rcuWindowSum`` (GRCSF with the RCU's other CUDA attention layouts).
It writes benchmarks/results/gpu_<card>[_eager].json and .md after every row, so whatever finished survives a
timeout; a failed row keeps its whole traceback in the JSON and the rest go on.

``--dry-run`` runs the same code on the CPU with tiny networks, one step and no smoke run unless ``--smoke``
(tests/test_gpu_check_dry_run.py runs it in CI).
"""
import argparse
import copy
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch._dynamo import OptimizedModule

ROOT = Path(__file__).resolve().parents[1]
PLANS_DIR = ROOT / "tests" / "data" / "plans"
BENCHMARK_TRAINERS = ROOT / "benchmarks" / "trainers"
OUR_TRAINERS = ("GRCSFTrainer", "GRCSFTrainer_noRCU", "GRCSFTrainer_noGCU", "FIASTrainer", "GRCSF_FIASTrainer")
BUSI256, HIPPOCAMPUS = "Dataset802_BUSI256_nnUNetPlans", "Dataset804_Hippocampus_nnUNetPlans"
#: (row, trainer, plans file, configuration); the row named nnUNetTrainer of each configuration is the ratios'
#: reference. The default rows, in the order they run:
ROWS = ([("nnUNetTrainer", "nnUNetTrainer", BUSI256, "2d"),
         ("nnUNetTrainer ResEnc-M", "nnUNetTrainer", "Dataset802_BUSI256_nnUNetResEncUNetMPlans", "2d")]
        + [(name, name, BUSI256, "2d") for name in OUR_TRAINERS]
        + [("nnUNetTrainer", "nnUNetTrainer", HIPPOCAMPUS, "3d_fullres")]
        + [(name, name, HIPPOCAMPUS, "3d_fullres") for name in OUR_TRAINERS])
#: rows run only when ``--rows`` names them (diagnostics)
EXTRA_ROWS = [(name, name, plans, configuration)
              for name in ("FIASTrainer_noCheckpointing", "FIASTrainer_loopMSDA", "GRCSFTrainer_rcuFolded",
                           "GRCSFTrainer_rcuWindowSum")
              for plans, configuration in ((BUSI256, "2d"), (HIPPOCAMPUS, "3d_fullres"))]
SMOKE_SCHEDULE = "1epoch_10iters"
SMOKE_DATASET_ID = 990
BUDGET_SECONDS = 450  # stop starting new work after this; the documented timeout leaves room to write results
ROW_SECONDS = 180  # a row (its own process: compile, steps, inference) is stopped after this
DRY_RUN_SECONDS = 3600  # the CPU dry run's budget and row limit (a slow shared CI machine)
WORKER_OUTPUT_CHARS = 4000  # of a stopped or failed row process's output, kept in the results


def trainer_class(name: str):
    """Our trainers, nnUNetTrainer, or a diagnostic trainer of benchmarks/trainers."""
    if name == "nnUNetTrainer":
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        return nnUNetTrainer
    import nnunetv2_grcsf.trainers as trainers
    if hasattr(trainers, name):
        return getattr(trainers, name)
    sys.path.insert(0, str(BENCHMARK_TRAINERS))
    import grcsf_benchmark_trainers
    return getattr(grcsf_benchmark_trainers, name)


def dataset_json(trainer) -> dict:
    """One image channel, and a declared MAE residual channel for the trainers whose network has an RCU."""
    from nnunetv2_grcsf.residual_channels import DATASET_JSON_KEY

    channels, extra = {"0": "image"}, {}
    if getattr(trainer, "needs_residual_channels", False):
        channels["1"] = "rgb_to_0_1"
        extra = {DATASET_JSON_KEY: {"residual_channels": [1]}}
    return {"channel_names": channels, "labels": {"background": 0, "lesion": 1}, "numTraining": 4,
            "file_ending": ".nii.gz", **extra}


def trainer_without_data(name: str, plans: dict, configuration: str, device: torch.device, results_folder):
    """A real trainer with network, loss and optimizer made by the calls ``nnUNetTrainer.initialize()`` makes
    (batch size, input channels, network, torch.compile where nnU-Net compiles, optimizer, loss), without the
    preprocessed data set that initialize() also looks up."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    os.environ["nnUNet_results"] = str(results_folder)
    cls = trainer_class(name)
    trainer = cls({**copy.deepcopy(plans), "continue_training": False}, configuration, 0, dataset_json(cls), device)
    trainer._set_batch_size_and_oversample()
    trainer.num_input_channels = determine_num_input_channels(trainer.plans_manager, trainer.configuration_manager,
                                                              trainer.dataset_json)
    trainer.network = trainer.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, trainer.num_input_channels,
        trainer.label_manager.num_segmentation_heads, trainer.enable_deep_supervision).to(trainer.device)
    if trainer._do_i_compile():
        trainer.network = torch.compile(trainer.network)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.loss = trainer._build_loss()
    trainer.was_initialized = True
    return trainer


def synthetic_batch(trainer, seed: int = 0) -> dict:
    """A batch as nnU-Net's data loader gives it: data (B, C, *patch) and one target per deep-supervision output
    (nearest-neighbour downsampled, as nnU-Net's DownsampleSegForDSTransform)."""
    generator = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    data = torch.randn(trainer.batch_size, trainer.num_input_channels, *patch, generator=generator)
    segmentation = (torch.rand(trainer.batch_size, 1, *patch, generator=generator) > 0.7).float()
    scales = trainer._get_deep_supervision_scales() if trainer.enable_deep_supervision else [[1] * len(patch)]
    targets = [torch.nn.functional.interpolate(segmentation, size=[round(p * s) for p, s in zip(patch, scale)],
                                               mode="nearest") for scale in scales]
    return {"data": data, "target": targets}


def tiny_plans(plans: dict, configuration: str) -> dict:
    """Dry run and tests: 4 stages of 8-32 channels, patch 32 (2d: FIAS's third stage holds its MSDA window) or 16
    (3d) per axis, batch size 2."""
    plans = copy.deepcopy(plans)
    config = plans["configurations"][configuration]
    arch = config["architecture"]["arch_kwargs"]
    stages = 4
    for key in ("strides", "kernel_sizes", "n_conv_per_stage", "n_blocks_per_stage"):
        if key in arch:
            arch[key] = arch[key][:stages]
    arch.update(n_stages=stages, features_per_stage=[8, 16, 32, 32],
                n_conv_per_stage_decoder=arch["n_conv_per_stage_decoder"][:stages - 1])
    config.update(patch_size=[32 if len(config["patch_size"]) == 2 else 16] * len(config["patch_size"]),
                  batch_size=2)
    return plans


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


def measure_row(trainer_name, plans_name, configuration, device, steps, dry_run, folder) -> dict:
    """Train-step time and memory, then sliding-window inference time and memory, of one trainer on one plans."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    plans = json.loads((PLANS_DIR / f"{plans_name}.json").read_text())
    if dry_run:
        plans = tiny_plans(plans, configuration)
    torch.manual_seed(0)
    trainer = trainer_without_data(trainer_name, plans, configuration, device, folder)
    batches = [synthetic_batch(trainer, seed) for seed in range(2)]
    start = time.perf_counter()
    trainer.train_step(batches[0])  # compiles on CUDA
    synchronize(device)
    compile_seconds = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        loss = trainer.train_step(batches[step % 2])["loss"]
        synchronize(device)
        times.append(time.perf_counter() - start)
    row = {"patch_size": list(trainer.configuration_manager.patch_size), "batch_size": trainer.batch_size,
           "compiled": isinstance(trainer.network, OptimizedModule), "first_step_s": compile_seconds,
           "train_step_s": statistics.median(times), "train_loss": float(loss),
           "train_max_memory_mb": peak_memory_mb(device)}
    if getattr(trainer, "compile_failure", None):  # our trainer went on uncompiled: its times are eager ones
        row["compile_failure"] = trainer.compile_failure

    trained = trainer.network._orig_mod if hasattr(trainer.network, "_orig_mod") else trainer.network
    # the predictor's network, as nnU-Net's predictor builds it: without deep supervision, the trained weights
    network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                 trainer.num_input_channels,
                                                 trainer.label_manager.num_segmentation_heads, False).to(device)
    network.load_state_dict(trained.state_dict())
    network.eval()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=device.type == "cuda", device=device,
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(network, trainer.plans_manager, trainer.configuration_manager,
                                    [network.state_dict()], trainer.dataset_json, type(trainer).__name__,
                                    tuple(range(len(row["patch_size"]))))
    image = torch.randn(trainer.num_input_channels, *[2 * p for p in row["patch_size"]])
    if len(row["patch_size"]) == 2:
        image = image[:, None]  # nnU-Net's 2d predictor takes (C, 1, X, Y)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    logits = predictor.predict_sliding_window_return_logits(image)
    synchronize(device)
    row.update(inference_s=time.perf_counter() - start, inference_max_memory_mb=peak_memory_mb(device),
               inference_finite=bool(torch.isfinite(logits).all()))
    del trainer, predictor, network, trained
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run_bounded(command, env: dict, seconds: float):
    """Runs ``command`` in a session of its own (with its compile workers); after ``seconds``, or on Ctrl-C, the
    whole process group is killed. Returns (return code, or None when stopped; its stdout and stderr)."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=max(seconds, 1))
        return process.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return None, process.communicate()[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def output_tail(output: str) -> str:
    return output[-WORKER_OUTPUT_CHARS:]


def compile_environment(compile_network: bool) -> dict:
    """This process's environment for nnU-Net's default (``nnUNet_compile`` unset: the trainer compiles, the
    predictor does not) or with ``nnUNet_compile=f`` (neither)."""
    env = {key: value for key, value in os.environ.items() if key != "nnUNet_compile"}
    return env if compile_network else {**env, "nnUNet_compile": "f"}


def run_row(row, compile_network: bool, steps: int, dry_run: bool, seconds: float, folder) -> dict:
    """One row, measured by :func:`measure_row` in a fresh process (``--measure-row``), stopped after
    ``seconds``. Returns the row's results, or ``{'error': ...}`` with the traceback or the process's output."""
    row_file = Path(folder) / "row.json"
    row_file.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--measure-row", json.dumps(row),
               "--row-file", str(row_file), "--steps", str(steps)] + (["--dry-run"] if dry_run else [])
    returncode, output = run_bounded(command, compile_environment(compile_network), seconds)
    if returncode is None:
        return {"error": f"stopped after {seconds:.0f} s (--row-seconds, or the time left of --budget); the row's "
                         f"output ends:\n{output_tail(output)}"}
    if row_file.exists():
        return json.loads(row_file.read_text())
    return {"error": f"the row's process exited with code {returncode} and no result; its output ends:\n"
                     f"{output_tail(output)}"}


def measure_row_in_this_process(row, steps: int, dry_run: bool, row_file: Path) -> int:
    """The worker of :func:`run_row`: measures ``row`` and writes its results, or its whole traceback."""
    _, trainer_name, plans_name, configuration = row
    device = torch.device("cpu") if dry_run else torch.device("cuda", 0)
    if dry_run:
        torch.set_num_threads(1)  # tiny networks: on a shared 2-core CI machine more threads only contend
    with tempfile.TemporaryDirectory() as folder:
        try:
            result = measure_row(trainer_name, plans_name, configuration, device, steps, dry_run, folder)
        except Exception:
            result = {"error": traceback.format_exc()}
    write_atomically(row_file, json.dumps(result))
    return 0


def add_ratios(report: dict, device_type: str) -> None:
    """Each measured row's train-step (and on CUDA memory) ratio to its configuration's nnUNetTrainer row."""
    for row in report["rows"]:
        reference = next((r for r in report["rows"] if r["configuration"] == row["configuration"]
                          and r["row"] == "nnUNetTrainer" and "error" not in r), None)
        if reference is not None and "error" not in row:
            row["train_step_ratio"] = row["train_step_s"] / reference["train_step_s"]
            if device_type == "cuda":
                row["train_memory_ratio"] = row["train_max_memory_mb"] / reference["train_max_memory_mb"]


def error_headline(error: str) -> str:
    """The line that says what went wrong: the exception (a traceback's last line), or gpu_check's own first line
    (a row stopped, skipped or without a result, before the output it quotes)."""
    lines = error.strip().splitlines() or [""]
    return lines[0] if lines[0].startswith(("stopped", "skipped", "the row's process")) else lines[-1]


def summary_line(row: dict) -> str:
    """One printed line per row; a failed row prints the end of its traceback (the exception) too."""
    where = f"{row['row']} ({row['plans']}, {row['configuration']})"
    if "error" in row:
        return f"{where}: ERROR {error_headline(row['error'])}\n" + "\n".join(row["error"].strip().splitlines()[-15:])
    ratio = row.get("train_step_ratio")
    memory = row.get("train_memory_ratio")
    memory_mb = row["train_max_memory_mb"]
    return (f"{where}: train step {1000 * row['train_step_s']:.1f} ms"
            f"{'' if ratio is None else f' ({ratio:.2f}x)'}"
            f"{'' if memory_mb is None else f', memory {memory_mb:.0f} MiB'}"
            f"{'' if memory is None else f' ({memory:.2f}x)'}, first step {row['first_step_s']:.1f} s, "
            f"inference {row['inference_s']:.2f} s{uncompiled_note(row)}")


def uncompiled_note(row: dict) -> str:
    """' (uncompiled: ...)' for a row whose trainer went on uncompiled after torch.compile failed, else ''."""
    failure = row.get("compile_failure")
    return "" if not failure else f" (uncompiled: {failure['message'].splitlines()[0].split(': ', 1)[-1][:160]})"


def smoke_runs(trainers, device, compile_network: bool, folder, deadline, on_result) -> dict:
    """``nnUNetv2_train`` for one epoch of each trainer on a generated 2d data set with a residual channel; each
    run stopped at the deadline; ``on_result()`` after each."""
    sys.path.insert(0, str(ROOT / "tests"))
    from nnunet_runs import tiny_residual_dataset

    dataset_env, _ = tiny_residual_dataset(Path(folder) / "smoke", SMOKE_DATASET_ID, shape=(96, 96), num_training=8)
    env = {**compile_environment(compile_network), **dataset_env}  # this one's PYTHONPATH, the data set's folders
    env.update(nnUNet_extTrainer=str(BENCHMARK_TRAINERS), NNUNETV2_GRCSF_SEED="0",
               nnUNet_n_proc_DA=os.environ.get("nnUNet_n_proc_DA", "4"))
    results = {}
    for name in trainers:
        if time.monotonic() > deadline:
            results[name] = {"error": "skipped: time budget"}
            continue
        command = ["nnUNetv2_train", str(SMOKE_DATASET_ID), "2d", "0", "-tr", f"{name}_{SMOKE_SCHEDULE}",
                   "-device", device.type]
        start = time.perf_counter()
        returncode, output = run_bounded(command, env, deadline - time.monotonic())
        results[name] = {"command": " ".join(command), "seconds": time.perf_counter() - start,
                         "ok": returncode == 0,
                         **({} if returncode == 0 else {"error": ("stopped: time budget\n" if returncode is None
                                                                  else "") + output_tail(output)})}
        on_result(results)
    return results


def markdown(report: dict) -> str:
    lines = [f"# GPU check on {report['device']}", "",
             f"torch {report['torch']}, nnunetv2 {report['nnunetv2']}; torch.compile {report['compile']}; "
             f"{report['steps']} timed train steps (median) after one warm-up (compile) step; sliding-window "
             f"inference of a random image of 2x the patch per axis, mirroring on. Each row in a fresh process. "
             f"Ratios are to nnUNetTrainer on the same plans.", "",
             "| plans | configuration | trainer | train step (ms) | ratio | train memory (MiB) | ratio "
             "| inference (s) | inference memory (MiB) | first step (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def number(value, digits=1):
        return "-" if value is None else f"{value:.{digits}f}"

    for row in report["rows"]:
        if "error" in row:
            lines.append(f"| {row['plans']} | {row['configuration']} | {row['row']} | error: "
                         f"{error_headline(row['error'])[:160]} |||||||")
            continue
        lines.append(f"| {row['plans']} | {row['configuration']} | {row['row']}{uncompiled_note(row)} "
                     f"| {1000 * row['train_step_s']:.1f} "
                     f"| {number(row.get('train_step_ratio'), 2)} | {number(row['train_max_memory_mb'], 0)} "
                     f"| {number(row.get('train_memory_ratio'), 2)} | {row['inference_s']:.2f} "
                     f"| {number(row['inference_max_memory_mb'], 0)} | {row['first_step_s']:.1f} |")
    if report["smoke"]:
        lines += ["", f"One-epoch `nnUNetv2_train` smoke runs (`<trainer>_{SMOKE_SCHEDULE}`, compile "
                      f"{report['compile']}):", ""]
        lines += [f"- {name}: {'ok' if result.get('ok') else 'FAILED'}"
                  f"{' in %.0f s' % result['seconds'] if 'seconds' in result else ''}"
                  f"{'' if result.get('ok') else ': ' + error_headline(result['error'])[:200]}"
                  for name, result in report["smoke"].items()]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str):
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(text)
    partial.replace(path)


def selected_rows(names, configurations):
    """The default rows, or the rows (default and diagnostic) named in ``names``, of ``configurations``; the
    reference row (nnUNetTrainer) of each configuration first."""
    candidates = ROWS if not names else [row for row in ROWS + EXTRA_ROWS if row[0] in names]
    rows = [row for row in candidates if not configurations or row[3] in configurations]
    references = [row for row in ROWS if row[0] == "nnUNetTrainer"]
    chosen = []
    for configuration in dict.fromkeys(row[3] for row in rows):
        reference = next(row for row in references if row[3] == configuration)
        chosen += [reference] + [row for row in rows if row[3] == configuration and row != reference]
    return chosen


def main(argv=None):
    known_rows = sorted({row[0] for row in ROWS + EXTRA_ROWS})
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny networks, one step (CI)")
    parser.add_argument("--smoke", action="store_true", help="with --dry-run: also the nnUNetv2_train smoke runs")
    parser.add_argument("--skip-smoke", action="store_true", help="no nnUNetv2_train smoke runs")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--steps", type=int, default=None, help="timed train steps (default 10, dry run 1)")
    parser.add_argument("--rows", nargs="+", metavar="NAME", help=f"only these rows (of {known_rows}), each after "
                        f"its configuration's nnUNetTrainer row; default: every row but the diagnostic ones")
    parser.add_argument("--configurations", nargs="+", choices=["2d", "3d_fullres"], help="only these")
    parser.add_argument("--compile", choices=["on", "off"], default="on",
                        help="nnU-Net's default (on: nnUNet_compile unset, the trainer compiles) or nnUNet_compile=f")
    parser.add_argument("--budget", type=float, help=f"seconds; no row starts after it (default {BUDGET_SECONDS}, "
                        f"dry run {DRY_RUN_SECONDS})")
    parser.add_argument("--row-seconds", type=float, help=f"a row is stopped after this (default {ROW_SECONDS}, "
                        f"dry run {DRY_RUN_SECONDS})")
    parser.add_argument("--measure-row", help=argparse.SUPPRESS)  # the worker of one row (run_row)
    parser.add_argument("--row-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps = args.steps or (1 if args.dry_run else 10)
    if args.measure_row:
        return measure_row_in_this_process(json.loads(args.measure_row), steps, args.dry_run, args.row_file)
    unknown = sorted(set(args.rows or ()) - set(known_rows))
    if unknown:
        parser.error(f"unknown rows {unknown}; the rows are {known_rows}")
    budget = args.budget or (DRY_RUN_SECONDS if args.dry_run else BUDGET_SECONDS)
    row_seconds = args.row_seconds or (DRY_RUN_SECONDS if args.dry_run else ROW_SECONDS)
    deadline = time.monotonic() + budget
    if args.dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", 0)
    else:
        parser.error("no CUDA device: run on a GPU machine, or use --dry-run on the CPU")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU dry run"
    from importlib.metadata import version
    report = {"device": card, "torch": torch.__version__, "nnunetv2": version("nnunetv2"), "steps": steps,
              "compile": args.compile, "dry_run": args.dry_run, "rows": [], "smoke": {}}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stem = "gpu_dry_run" if args.dry_run else "gpu_" + "".join(c if c.isalnum() else "_" for c in card).strip("_")
    stem += "_eager" if args.compile == "off" else ""

    def write_report():
        write_atomically(args.output_dir / f"{stem}.json", json.dumps(report, indent=2))
        write_atomically(args.output_dir / f"{stem}.md", markdown(report))

    rows = selected_rows(args.rows, args.configurations)
    with tempfile.TemporaryDirectory() as folder:
        for index, row in enumerate(rows):
            base = dict(zip(("row", "trainer", "plans", "configuration"), row))
            seconds = min(row_seconds, deadline - time.monotonic())
            result = ({"error": "skipped: time budget"} if seconds <= 0 else
                      run_row(row, args.compile == "on", steps, args.dry_run, seconds, folder))
            report["rows"].append({**base, **result})
            add_ratios(report, device.type)
            write_report()
            print(f"[{index + 1}/{len(rows)}] {summary_line(report['rows'][-1])}", flush=True)
        if (not args.dry_run or args.smoke) and not args.skip_smoke:
            trainers = [name for name in dict.fromkeys(row[1] for row in rows)
                        if name == "nnUNetTrainer" or name in OUR_TRAINERS]

            def record(results):
                report["smoke"] = results
                write_report()

            report["smoke"] = smoke_runs(trainers, device, args.compile == "on", folder, deadline, record)
    write_report()
    print(f"wrote {args.output_dir / stem}.json and .md")
    failed = [r["row"] for r in report["rows"] if "error" in r] + [n for n, r in report["smoke"].items()
                                                                    if not r.get("ok")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
