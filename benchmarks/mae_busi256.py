"""Benchmark: MAE residual maps on real breast-ultrasound lesions (Dataset802_BUSI256), on this CPU.

Measures, for the default budget and a few variants:
- MAE training time (``nnunetv2_grcsf mae-train`` defaults: preset tiny, 300 steps of batch 16);
- pixel-level AUROC of the residual map for lesion pixels (label > 0): pooled over all pixels of all
  624 images and the mean of per-image AUROCs (the 17 % normal images have no lesion and only enter
  the pooled figure), at mask ratios 0.5 and 0.75;
- residual generation throughput in images/s (the real ``residuals -d`` path incl. reading, writing
  the new data set and the report, and the compute alone).
Context baseline: the AUROC of the inverted per-image z-scored intensity (lesions are mostly dark).

Variants (each a separate MAE training unless noted): residual smoothing sigma 0/1/2/4 (same MAE),
3x longer training, patch 16, pixel loss instead of the per-patch normalized loss.

Usage: python benchmarks/mae_busi256.py [--threads N] [--quick] [--only default,long,...]
Needs ../shared/data/Dataset802_BUSI256 (or $GRCSF_SHARED_DATA/Dataset802_BUSI256); exits with a
message if absent. Work files go to benchmarks/work/mae_busi256/ (git-ignored); results to
benchmarks/results/mae_busi256.json and benchmarks/results/mae_busi256_panel.png.
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




def setup_env(quick: bool) -> None:
    if WORK.exists():
        shutil.rmtree(WORK)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (WORK / var).mkdir(parents=True)
        os.environ[var] = str(WORK / var)
    src = shared_dataset(DATASET, None)
    if quick:  # a small copy: 24 images
        dst = WORK / "nnUNet_raw" / DATASET
        for sub in ("imagesTr", "labelsTr"):
            (dst / sub).mkdir(parents=True)
        cases = sorted(p.name[:-9] for p in (src / "imagesTr").glob("*_0000.png"))[::26]
        for c in cases:
            shutil.copyfile(src / "imagesTr" / f"{c}_0000.png", dst / "imagesTr" / f"{c}_0000.png")
            shutil.copyfile(src / "labelsTr" / f"{c}.png", dst / "labelsTr" / f"{c}.png")
        dj = json.loads((src / "dataset.json").read_text())
        dj["numTraining"] = len(cases)
        (dst / "dataset.json").write_text(json.dumps(dj))
    else:
        (WORK / "nnUNet_raw" / DATASET).symlink_to(src, target_is_directory=True)


def load_all(reader_cases):
    """Every image (raw array, spacing) and lesion mask of the data set."""
    from nnunetv2_grcsf.mae import data as mdata

    reader, cases, labels = reader_cases
    out = []
    for case, files in cases.items():
        image, props = mdata.read_case(reader, files, case)
        seg, _ = reader.read_seg(str(labels / f"{case}.png"))
        out.append((case, image, props["spacing"], seg[0] > 0))
    return out


def evaluate(checkpoint, images, ratios=(0.5, 0.75), smoothing=None, batch_size=16):
    """Pooled and mean per-case AUROC per mask ratio, and compute-only throughput."""
    from nnunetv2_grcsf.mae.report import ResidualReport
    from nnunetv2_grcsf.mae.residuals import ResidualMapper, ResidualSettings

    if smoothing is None:
        smoothing = ResidualSettings.smoothing_sigma
    mapper = ResidualMapper(checkpoint, ResidualSettings(mask_ratios=ratios, smoothing_sigma=smoothing), "cpu",
                            batch_size)
    rep = ResidualReport(WORK / "scratch_report", ratios, mapper.scale, max_panels=0)
    t0 = time.time()
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        results = mapper.compute([(c, img, sp) for c, img, sp, _ in chunk])
        for (case, _, _, mask), res in zip(chunk, results):
            rep.add_case(case, res["residuals"], mask)
    seconds = time.time() - t0
    s = rep.summary()["overall"]
    return {f"{r:g}": {"pooled_auroc": round(s[f"{r:g}"]["pooled_auroc"], 4),
                       "mean_case_auroc": round(s[f"{r:g}"]["mean_case_auroc"], 4)} for r in ratios} | {
        "compute_images_per_second": round(len(images) / seconds, 2), "compute_seconds": round(seconds, 1)}


def intensity_baseline(images):
    from nnunetv2_grcsf.mae.report import PooledAUROC, auroc
    import numpy as np

    pooled, per_case = PooledAUROC(8.0), []
    for _, image, _, mask in images:
        x = image[0].astype(np.float64)
        score = -(x - x.mean()) / (x.std() + 1e-8) + 4.0  # dark = high score, shifted into the histogram range
        pooled.add(score, mask)
        a = auroc(score, mask)
        if a is not None:
            per_case.append(a)
    return {"pooled_auroc": round(pooled.value(), 4), "mean_case_auroc": round(float(np.mean(per_case)), 4)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 24 images, 10 steps")
    parser.add_argument("--only", default="default,smoothing,long,patch16,pixel_loss",
                        help="comma-separated variants to run (default: all)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from nnunetv2_grcsf.mae import data as mdata
    from nnunetv2_grcsf.mae.residuals import ResidualSettings, make_residual_dataset
    from nnunetv2_grcsf.mae.train import TrainConfig, load_checkpoint, model_config_from_preset, train_mae

    setup_env(args.quick)
    variants = args.only.split(",")
    steps = 10 if args.quick else 300
    load_start = os.getloadavg()
    name, folder = mdata.resolve_raw_dataset(802)
    dj = mdata.load_dataset_json(folder)
    cases = mdata.list_cases(folder / "imagesTr", dj["file_ending"])
    reader = mdata.reader_for(dj, example_file=next(iter(cases.values()))[0])
    images = load_all((reader, cases, folder / "labelsTr"))
    print(f"{len(images)} images of {name}; torch threads {torch.get_num_threads()}; load average {load_start}")

    out = {"dataset": DATASET, "num_images": len(images), "torch_threads": args.threads,
                      "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                      "load_average_start": load_start, "quick": args.quick, "variants": {}}
    previous = RESULTS / "mae_busi256.json"
    if args.only != parser.get_default("only") and previous.is_file():  # keep the other variants' results
        earlier = json.loads(previous.read_text())
        if earlier.get("quick") == args.quick:
            out["variants"] = {k: v for k, v in earlier.get("variants", {}).items()
                               if not k.startswith("default")}
            out["earlier_run_load_average"] = [earlier.get("load_average_start"), earlier.get("load_average_end")]
    out["intensity_baseline"] = intensity_baseline(images)
    print("baseline (inverted z-scored intensity):", out["intensity_baseline"])

    def train(tag, steps_, **arch):
        cfg = model_config_from_preset("tiny", 1, **arch)
        t0 = time.time()
        ckpt = train_mae(802, WORK / f"mae_{tag}", cfg, TrainConfig(steps=steps_, batch_size=16), progress=False)
        wall = time.time() - t0
        c = load_checkpoint(ckpt)
        return ckpt, {"train_seconds_loop": round(c["train_seconds"], 1), "train_seconds_total": round(wall, 1),
                      "steps": steps_, "batch_size": 16, "model": {k: c["model_config"][k] for k in
                                                                    ("img_size", "patch_size", "embed_dim", "depth",
                                                                     "decoder_embed_dim", "decoder_depth",
                                                                     "norm_pix_loss")},
                      "final_loss": round(c["loss_history"][-1][1], 4), "residual_scale": round(c["residual_scale"], 3)}

    default_sigma = ResidualSettings.smoothing_sigma

    def record(tag, info, ev, smoothing=default_sigma):
        entry = {**info, "smoothing_sigma": smoothing, "auroc": ev}
        out["variants"][tag] = entry
        print(f"{tag}: {json.dumps(entry)}", flush=True)
        (RESULTS / "mae_busi256.json").write_text(json.dumps(out, indent=2))

    RESULTS.mkdir(parents=True, exist_ok=True)
    default_ckpt = None
    if "default" in variants or "smoothing" in variants:
        default_ckpt, info = train("default", steps)
        if "default" in variants:
            record(f"default (tiny, 300 steps, sigma {default_sigma:g})", info, evaluate(default_ckpt, images))
            # the real command path: new data set + report + panel; throughput incl. I/O
            t0 = time.time()
            res = make_residual_dataset(802, 902, checkpoint=default_ckpt,
                                        settings=ResidualSettings(mask_ratios=(0.5, 0.75)), report=True,
                                        report_cases=3, progress=False)
            fig = res["figures"]["imagesTr"]
            out["residuals_command"] = {"seconds": round(time.time() - t0, 1), **fig,
                                        "report_overall": res["report"]["overall"]}
            panels = res["report"]["panels"]
            if panels:
                shutil.copyfile(panels[0], RESULTS / "mae_busi256_panel.png")
            print("residuals -d 802 -o 902:", json.dumps(out["residuals_command"]), flush=True)
        if "smoothing" in variants:
            for sigma in sorted({0.0, 1.0, 2.0, 4.0} - {default_sigma}):
                record(f"default MAE, smoothing sigma {sigma:g}", {"train_seconds_total": 0},
                       evaluate(default_ckpt, images, smoothing=sigma), sigma)
    if "long" in variants:
        ckpt, info = train("long", 3 * steps)
        record("tiny, 900 steps (3x)", info, evaluate(ckpt, images))
    if "patch16" in variants:
        ckpt, info = train("patch16", steps, patch_size=16)
        record("tiny, patch 16, 300 steps", info, evaluate(ckpt, images))
    if "pixel_loss" in variants:
        ckpt, info = train("pixel", steps, norm_pix_loss=False)
        record("tiny, pixel loss, 300 steps", info, evaluate(ckpt, images))

    out["load_average_end"] = os.getloadavg()
    (RESULTS / "mae_busi256.json").write_text(json.dumps(out, indent=2))
    print(f"\n{'variant':42s} {'train s':>8s} {'AUROC@.5 pooled':>15s} {'per-case':>9s} {'AUROC@.75 pooled':>16s} "
          f"{'per-case':>9s} {'img/s':>7s}")
    for tag, v in out["variants"].items():
        a = v["auroc"]
        print(f"{tag:42s} {v.get('train_seconds_total', 0):8.0f} {a['0.5']['pooled_auroc']:15.3f} "
              f"{a['0.5']['mean_case_auroc']:9.3f} {a['0.75']['pooled_auroc']:16.3f} {a['0.75']['mean_case_auroc']:9.3f} "
              f"{a['compute_images_per_second']:7.1f}")
    b = out["intensity_baseline"]
    print(f"{'baseline: inverted intensity':42s} {'':8s} {b['pooled_auroc']:15.3f} {b['mean_case_auroc']:9.3f}")
    if "residuals_command" in out:
        rc = out["residuals_command"]
        print(f"residuals -d (2 ratios, incl. I/O + report): {rc['images_per_second']} images/s; "
              f"compute only {rc['images_per_second_compute']} images/s")
    print(f"results: {RESULTS / 'mae_busi256.json'}")


if __name__ == "__main__":
    main()
