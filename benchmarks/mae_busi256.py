"""Benchmark: does the MAE reconstruct breast ultrasound, and do its residuals beat simple baselines? (BUSI256, CPU)

Data: Dataset802_BUSI256 (624 images, 256 px). A fixed held-out list (every 5th case in sorted order:
125 images, benign / malignant / normal alike) is never trained on: the work folder's raw data set holds
the other 499 in ``imagesTr`` (with their labels) and the held-out ones in ``imagesTs`` / ``labelsTs``, and
``mae-train`` reads ``imagesTr`` only (checked: the checkpoint's ``training_splits``).

Per variant (one MAE training each, settings below):

1. ``train_mae`` (the ``mae-train`` code path) on the 499 training images; wall time measured.
2. ``make_residual_folder`` (the ``residuals -i imagesTs --labels labelsTs`` code path) on the 125 held-out
   images, whose report gives: the pixel AUROC of the residual for lesion pixels (pooled and mean per image;
   at mask ratios 0.5 and 0.75), the same AUROC of the baselines (intensity, better sign; |x - median|;
   |x - Gaussian(4 px) * x|; an untrained MAE of the same settings; the residual of interpolating each masked
   patch from the visible pixels), and the PSNR of the reconstruction on lesion-free pixels against the PSNR of
   each image's mean and of that interpolation (median over images; the gap in dB).

Results: benchmarks/results/mae_busi256.json (one entry per variant; reruns of one variant replace it) and
benchmarks/results/mae_busi256_panel.png (default) and mae_busi256_panel_<variant>.png (image |
reconstruction | residual | mask, a held-out image).

Usage: python benchmarks/mae_busi256.py [--variants default,all_patches] [--seed S] [--threads N] [--quick]
[--evaluate-only]
Needs ../shared/data/Dataset802_BUSI256 (or $GRCSF_SHARED_DATA/Dataset802_BUSI256); exits with a message if
absent. Work files go to benchmarks/work/mae_busi256/ (git-ignored).
"""

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

from nnunet_workspace import shared_dataset

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "work" / "mae_busi256"
DATASET = "Dataset802_BUSI256"
HELD_OUT_EVERY = 5
MASK_RATIOS = (0.5, 0.75)

#: Variants: architecture overrides of the tiny preset and training settings; "default" is mae-train's defaults
#: (tiny preset: loss on pixels outside the labelled patches of the training images; DEFAULT_STEPS steps of
#: batch 16 at mask ratios 0.5 and 0.75); "all_patches": the loss on every patch, lesions included.
VARIANTS = {
    "default": dict(arch={}, train={}),
    "all_patches": dict(arch={}, train={"skip_labelled_patches": False}),
    "norm_pix_loss_all_patches": dict(arch={"norm_pix_loss": True}, train={"skip_labelled_patches": False}),
}


def setup_raw_dataset(quick: bool) -> tuple:
    """Link the shared data set's images into WORK's nnUNet_raw: training cases in imagesTr, held-out in imagesTs."""
    src = shared_dataset(DATASET, None)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[var] = str(WORK / var)
    dst = WORK / "nnUNet_raw" / DATASET
    if dst.exists():  # links only: the shared data set is never touched
        shutil.rmtree(dst)
    cases = sorted(p.name[:-len("_0000.png")] for p in (src / "imagesTr").glob("*_0000.png"))
    held_out = cases[::HELD_OUT_EVERY]
    train = [c for c in cases if c not in set(held_out)]
    if quick:
        held_out, train = held_out[::10], train[::20]
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (dst / sub).mkdir(parents=True)
    for split, names in (("Tr", train), ("Ts", held_out)):
        for c in names:
            (dst / f"images{split}" / f"{c}_0000.png").symlink_to(src / "imagesTr" / f"{c}_0000.png")
            (dst / f"labels{split}" / f"{c}.png").symlink_to(src / "labelsTr" / f"{c}.png")
    dj = json.loads((src / "dataset.json").read_text())
    dj["numTraining"] = len(train)
    (dst / "dataset.json").write_text(json.dumps(dj))
    return dst, train, held_out


def run_variant(tag: str, spec: dict, raw: Path, threads: int, quick: bool, seed: int, reuse: dict = None) -> dict:
    from nnunetv2_grcsf.mae import checkpoint_saw_test_images
    from nnunetv2_grcsf.mae.residuals import ResidualSettings, make_residual_folder
    from nnunetv2_grcsf.mae.train import TrainConfig, load_checkpoint, model_config_from_preset, train_mae

    out = WORK / f"mae_{tag}"
    ckpt_path = out / "mae" / "checkpoint_final.pth"
    if reuse is not None:  # evaluate the MAE this variant trained before (its training figures are kept)
        train_wall = reuse["train_wall_seconds"]
        shutil.rmtree(out / "residuals", ignore_errors=True)
        shutil.rmtree(out / "report", ignore_errors=True)
    else:
        if out.exists():
            shutil.rmtree(out)
        train_settings = {**spec["train"], "seed": seed, **({"steps": 10} if quick else {})}
        t0 = time.time()
        ckpt_path = train_mae(DATASET, out / "mae", model_config_from_preset("tiny", 1, **spec["arch"]),
                              TrainConfig(**train_settings), device="cpu", progress=False, num_threads=threads)
        train_wall = time.time() - t0
    ckpt = load_checkpoint(ckpt_path)
    assert checkpoint_saw_test_images(ckpt) is False, "the benchmark MAE must not see the held-out images"
    t0 = time.time()
    res = make_residual_folder(raw / "imagesTs", out / "residuals", ckpt_path,
                               ResidualSettings(mask_ratios=MASK_RATIOS), labels_folder=raw / "labelsTs",
                               report_dir=out / "report", report_cases=3, device="cpu", progress=False,
                               num_threads=threads)
    report = res["report"]
    return {"model_config": ckpt["model_config"], "train_config": ckpt["train_config"],
            "training_splits": ckpt["training_splits"], "train_wall_seconds": round(train_wall, 1),
            "train_loop_seconds": round(ckpt["train_seconds"], 1),
            "final_loss": round(ckpt["loss_history"][-1][1], 4), "residual_scale": round(ckpt["residual_scale"], 3),
            "training_reconstruction_check": ckpt.get("reconstruction_check"),
            "held_out_residuals_seconds": round(time.time() - t0, 1),
            "held_out": {k: report[k] for k in ("overall", "baselines", "reconstruction", "num_labelled_cases")},
            "panels": report["panels"]}


def print_table(results: dict) -> None:
    from nnunetv2_grcsf.mae.report import format_comparison

    for tag, v in results["variants"].items():
        print(f"\n== {tag}: {v['train_config']['total_steps']} steps, training {v['train_wall_seconds']:.0f} s wall "
              f"(loop {v['train_loop_seconds']:.0f} s), model {v['model_config']['img_size']} px / patch "
              f"{v['model_config']['patch_size']} / norm_pix_loss {v['model_config']['norm_pix_loss']}")
        for line in format_comparison(v["held_out"]):
            print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="default", help=f"comma-separated, of {sorted(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: mae-train's choice, the idle cores)")
    parser.add_argument("--quick", action="store_true", help="smoke run: few images, 10 steps")
    parser.add_argument("--seed", type=int, default=0,
                        help="the MAE training's seed; results of seed S > 0 are stored as VARIANT@seedS (default 0)")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="re-evaluate the MAE each variant trained in an earlier run (work folder and results "
                             "entry kept), e.g. after a change of the report")
    args = parser.parse_args()
    tags = args.variants.split(",")
    unknown = [t for t in tags if t not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")

    from nnunetv2_grcsf.mae.train import auto_num_threads

    threads = args.threads or auto_num_threads()
    raw, train, held_out = setup_raw_dataset(args.quick)
    name = "mae_busi256_quick" if args.quick else "mae_busi256"
    path = RESULTS / f"{name}.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    if results.get("held_out_every") != HELD_OUT_EVERY or "variants" not in results:
        results = {"variants": {}}
    results.update({"dataset": DATASET, "held_out_every": HELD_OUT_EVERY, "num_train_images": len(train),
                    "num_held_out_images": len(held_out), "held_out_cases": held_out, "mask_ratios": list(MASK_RATIOS),
                    "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()})
    RESULTS.mkdir(parents=True, exist_ok=True)
    for variant in tags:
        tag = variant if args.seed == 0 else f"{variant}@seed{args.seed}"
        load = os.getloadavg()
        print(f"variant {tag}: {len(train)} training images, {len(held_out)} held out; torch threads {threads}; "
              f"load average {load}", flush=True)
        reuse = None
        if args.evaluate_only:
            reuse = results["variants"].get(tag)
            if reuse is None or not (WORK / f"mae_{tag}" / "mae" / "checkpoint_final.pth").is_file():
                parser.error(f"--evaluate-only: variant {tag} has no earlier training in {WORK}")
        entry = run_variant(tag, VARIANTS[variant], raw, threads, args.quick, args.seed, reuse)
        entry.update({"torch_threads": threads, "load_average_start": load, "load_average_end": os.getloadavg(),
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
        if entry["panels"] and not args.quick and args.seed == 0:
            panel = "mae_busi256_panel.png" if tag == "default" else f"mae_busi256_panel_{tag}.png"
            shutil.copyfile(entry["panels"][0], RESULTS / panel)
        results["variants"][tag] = entry
        path.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
