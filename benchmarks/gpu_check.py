"""The GPU path nnU-Net takes (float16 AMP, torch.compile, CUDA), measured for every base trainer on one GPU.

Run it on a CUDA machine, from the repository root, as one command (it stops itself before 8 minutes)::

    timeout 540 python benchmarks/gpu_check.py

For every base trainer of ours, ``nnUNetTrainer`` and nnU-Net's ResEnc-M network (nnUNetResEncUNetMPlans), on the
BUSI256 2d and Hippocampus 3d_fullres plans of tests/data/plans (their patch and batch sizes):
- nnU-Net's real ``train_step`` (a trainer instance on CUDA: AMP with its GradScaler, ``torch.compile`` as
  ``initialize()`` applies it) on synthetic batches: median step time after the compile warm-up;
- nnU-Net's sliding-window inference (``nnUNetPredictor.predict_sliding_window_return_logits``, mirroring on) of
  a synthetic image of twice the patch size per axis;
- ``torch.cuda.max_memory_allocated`` of each, and the ratios to ``nnUNetTrainer`` on the same plans;
- a one-epoch ``nnUNetv2_train`` smoke run of each trainer (``<trainer>_1epoch_10iters``, compile on) on a small
  synthetic data set made here (nnunetv2_grcsf/synthetic.py, with a residual channel for the RCU trainers).
It writes benchmarks/results/gpu_<card>.json and .md. Rows that fail record their error and the rest go on.

``--dry-run`` runs the same code on the CPU with tiny networks, one step and no smoke run unless ``--smoke``
(tests/test_gpu_check_dry_run.py runs it in CI).
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PLANS_DIR = ROOT / "tests" / "data" / "plans"
BENCHMARK_TRAINERS = ROOT / "benchmarks" / "trainers"
OUR_TRAINERS = ("GRCSFTrainer", "GRCSFTrainer_noRCU", "GRCSFTrainer_noGCU", "FIASTrainer", "GRCSF_FIASTrainer")
#: (row, trainer, plans file, configuration); the first row of each configuration is the ratios' reference
ROWS = ([("nnUNetTrainer", "nnUNetTrainer", "Dataset802_BUSI256_nnUNetPlans", "2d"),
         ("nnUNetTrainer ResEnc-M", "nnUNetTrainer", "Dataset802_BUSI256_nnUNetResEncUNetMPlans", "2d")]
        + [(name, name, "Dataset802_BUSI256_nnUNetPlans", "2d") for name in OUR_TRAINERS]
        + [("nnUNetTrainer", "nnUNetTrainer", "Dataset804_Hippocampus_nnUNetPlans", "3d_fullres")]
        + [(name, name, "Dataset804_Hippocampus_nnUNetPlans", "3d_fullres") for name in OUR_TRAINERS])
SMOKE_SCHEDULE = "1epoch_10iters"
SMOKE_DATASET_ID = 990
BUDGET_SECONDS = 450  # stop starting new work after this; the documented timeout leaves room to write results


def trainer_class(name: str):
    if name == "nnUNetTrainer":
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        return nnUNetTrainer
    import nnunetv2_grcsf.trainers as trainers
    return getattr(trainers, name)


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
           "compiled": trainer._do_i_compile(), "first_step_s": compile_seconds,
           "train_step_s": statistics.median(times), "train_loss": float(loss),
           "train_max_memory_mb": peak_memory_mb(device)}

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


def smoke_runs(trainers, device, folder, deadline) -> dict:
    """``nnUNetv2_train`` for one epoch of each trainer on a generated 2d data set with a residual channel."""
    sys.path.insert(0, str(ROOT / "tests"))
    from nnunet_runs import tiny_residual_dataset

    env, _ = tiny_residual_dataset(Path(folder) / "smoke", SMOKE_DATASET_ID, shape=(96, 96), num_training=8)
    env.update(nnUNet_extTrainer=str(BENCHMARK_TRAINERS), nnUNet_compile="1", NNUNETV2_GRCSF_SEED="0",
               nnUNet_n_proc_DA=os.environ.get("nnUNet_n_proc_DA", "4"))
    results = {}
    for name in trainers:
        if time.monotonic() > deadline:
            results[name] = {"error": "skipped: time budget"}
            continue
        command = ["nnUNetv2_train", str(SMOKE_DATASET_ID), "2d", "0", "-tr", f"{name}_{SMOKE_SCHEDULE}",
                   "-device", device.type]
        start = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        results[name] = {"command": " ".join(command), "seconds": time.perf_counter() - start,
                         "ok": done.returncode == 0,
                         **({} if done.returncode == 0 else {"error": (done.stdout + done.stderr)[-2000:]})}
    return results


def markdown(report: dict) -> str:
    lines = [f"# GPU check on {report['device']}", "",
             f"torch {report['torch']}, nnunetv2 {report['nnunetv2']}; {report['steps']} timed train steps "
             f"(median) after one compile step; sliding-window inference of a random image of 2x the patch per "
             f"axis, mirroring on. Ratios are to nnUNetTrainer on the same plans.", "",
             "| plans | configuration | trainer | train step (ms) | ratio | train memory (MiB) | ratio "
             "| inference (s) | inference memory (MiB) | first step (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def number(value, digits=1):
        return "-" if value is None else f"{value:.{digits}f}"

    for row in report["rows"]:
        if "error" in row:
            lines.append(f"| {row['plans']} | {row['configuration']} | {row['row']} | error: "
                         f"{row['error'].strip().splitlines()[-1][:120]} |||||||")
            continue
        lines.append(f"| {row['plans']} | {row['configuration']} | {row['row']} | {1000 * row['train_step_s']:.1f} "
                     f"| {number(row.get('train_step_ratio'), 2)} | {number(row['train_max_memory_mb'], 0)} "
                     f"| {number(row.get('train_memory_ratio'), 2)} | {row['inference_s']:.2f} "
                     f"| {number(row['inference_max_memory_mb'], 0)} | {row['first_step_s']:.1f} |")
    if report["smoke"]:
        lines += ["", f"One-epoch `nnUNetv2_train` smoke runs (`<trainer>_{SMOKE_SCHEDULE}`, compile on):", ""]
        lines += [f"- {name}: {'ok' if result.get('ok') else 'FAILED'}"
                  f"{' in %.0f s' % result['seconds'] if 'seconds' in result else ''}"
                  f"{'' if result.get('ok') else ': ' + result['error'].strip().splitlines()[-1][:200]}"
                  for name, result in report["smoke"].items()]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str):
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(text)
    partial.replace(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny networks, one step (CI)")
    parser.add_argument("--smoke", action="store_true", help="with --dry-run: also the nnUNetv2_train smoke runs")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--steps", type=int, default=None, help="timed train steps (default 10, dry run 1)")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + BUDGET_SECONDS
    if args.dry_run:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # tiny networks: on a shared 2-core CI machine more threads only contend
    elif torch.cuda.is_available():
        device = torch.device("cuda", 0)
    else:
        parser.error("no CUDA device: run on a GPU machine, or use --dry-run on the CPU")
    steps = args.steps or (1 if args.dry_run else 10)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU dry run"
    from importlib.metadata import version
    report = {"device": card, "torch": torch.__version__, "nnunetv2": version("nnunetv2"), "steps": steps,
              "dry_run": args.dry_run, "rows": [], "smoke": {}}
    with tempfile.TemporaryDirectory() as folder:
        for row_name, trainer_name, plans_name, configuration in ROWS:
            base = {"row": row_name, "trainer": trainer_name, "plans": plans_name, "configuration": configuration}
            if time.monotonic() > deadline:
                report["rows"].append({**base, "error": "skipped: time budget"})
                continue
            try:
                report["rows"].append({**base, **measure_row(trainer_name, plans_name, configuration, device, steps,
                                                             args.dry_run, folder)})
            except Exception:
                report["rows"].append({**base, "error": traceback.format_exc()[-3000:]})
            print(json.dumps(report["rows"][-1])[:400], flush=True)
        for row in report["rows"]:
            reference = next((r for r in report["rows"] if r["configuration"] == row["configuration"]
                              and r["row"] == "nnUNetTrainer" and "error" not in r), None)
            if reference is not None and "error" not in row:
                row["train_step_ratio"] = row["train_step_s"] / reference["train_step_s"]
                if device.type == "cuda":
                    row["train_memory_ratio"] = row["train_max_memory_mb"] / reference["train_max_memory_mb"]
        if not args.dry_run or args.smoke:
            report["smoke"] = smoke_runs(("nnUNetTrainer",) + OUR_TRAINERS, device, folder, deadline)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stem = "gpu_dry_run" if args.dry_run else "gpu_" + "".join(c if c.isalnum() else "_" for c in card).strip("_")
    write_atomically(args.output_dir / f"{stem}.json", json.dumps(report, indent=2))
    write_atomically(args.output_dir / f"{stem}.md", markdown(report))
    print(f"wrote {args.output_dir / stem}.json and .md")
    failed = [r["row"] for r in report["rows"] if "error" in r] + [n for n, r in report["smoke"].items()
                                                                    if not r.get("ok")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
