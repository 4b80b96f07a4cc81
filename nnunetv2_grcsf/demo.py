"""The bundled default: the whole GRCSF pipeline on a synthetic 2D lesion data set, end to end.

Steps (each one a real command; nnU-Net's run as subprocesses, exactly as a user would type them):

1. write ``Dataset990_SyntheticLesions`` (40 training + 10 test images, 128x128, seed-deterministic);
2. ``nnunetv2_grcsf mae-train -d 990 --steps 300``: a small MAE on the training images;
3. ``nnunetv2_grcsf residuals -d 990 -o 991 --report``: ``Dataset991`` = image + residual channel;
4. ``nnUNetv2_plan_and_preprocess -d 991 -c 2d --verify_dataset_integrity``;
5. ``nnUNetv2_train 991 2d 0 -tr GRCSFTrainer_<short> -device DEVICE``;
6. ``nnUNetv2_predict`` on the held-out test images (their residual channel made in step 3);
7. evaluation with nnU-Net's own ``compute_metrics_on_folder``: per-class Dice, printed;
8. an overlay PNG (image | reference | prediction) of a few test cases; the residual maps have
   their own PNG panels in the report of step 3.

Everything is written below one output folder (its own nnUNet_raw / _preprocessed / _results), so
the user's nnU-Net folders are never touched.
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

from nnunetv2_grcsf.errors import UserFacingError

SOURCE_ID, RESIDUAL_ID = 990, 991
DATASET_NAME = "SyntheticLesions"
DEFAULT_TRAINER = "GRCSFTrainer_20epochs_25iters"
MARKER_FILE = ".nnunetv2_grcsf_demo"
PROGRESS_WORDS = ("Epoch ", "train_loss", "val_loss", "Pseudo dice", "Epoch time", "Mean Validation Dice",
                  "Predicting", "Traceback", "Error", "error")


class DemoStep:
    """Prints one numbered step with its duration."""

    def __init__(self, total: int):
        self.total, self.index = total, 0

    def __call__(self, title: str):
        self.index += 1
        print(f"\n[{self.index}/{self.total}] {title}", flush=True)
        return self

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc_info):
        if exc_info[0] is None:
            print(f"      done in {time.perf_counter() - self.start:.0f} s", flush=True)


def _run_streaming(command: list, env: dict, log_file: Path) -> None:
    """Run a console command, keep its full output in ``log_file``, show its progress lines."""
    print("      $ " + " ".join(command), flush=True)
    with open(log_file, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   bufsize=1)
        for line in process.stdout:
            log.write(line)
            if any(word in line for word in PROGRESS_WORDS):
                print("      " + line.rstrip()[:150], flush=True)
        if process.wait() != 0:
            raise UserFacingError(f"`{' '.join(command)}` failed (exit code {process.returncode}); "
                                  f"its full output is in {log_file}")


def _prepare_output(output: Path, overwrite: bool) -> None:
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise UserFacingError(f"{output} exists and is not empty; give another folder with -o, or --overwrite "
                                  f"to delete an earlier demo there")
        if not (output / MARKER_FILE).is_file():
            raise UserFacingError(f"{output} was not made by the demo (no {MARKER_FILE}); refusing to delete it")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / MARKER_FILE).write_text("made by `nnunetv2_grcsf demo`; safe to delete\n")


def run_demo(output: Path, device: str = "cpu", trainer: str = DEFAULT_TRAINER, seed: int = 0,
             num_training: int = 40, num_test: int = 10, overwrite: bool = False) -> dict:
    """Run the whole pipeline below ``output``; returns the mean Dice per label of the test predictions."""
    from nnunetv2_grcsf import cli
    from nnunetv2_grcsf.evaluation.overlay import save_overlay_grid
    from nnunetv2_grcsf.synthetic import write_synthetic_dataset

    started = time.perf_counter()
    output = Path(output).resolve()
    _prepare_output(output, overwrite)
    folders = {name: output / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for folder in folders.values():
        folder.mkdir(exist_ok=True)
    os.environ.update({name: str(folder) for name, folder in folders.items()})
    env = dict(os.environ, nnUNet_def_n_proc="2")
    logs = output / "logs"
    logs.mkdir(exist_ok=True)
    step = DemoStep(total=8)

    with step(f"writing synthetic data set Dataset{SOURCE_ID}_{DATASET_NAME} "
              f"({num_training} training + {num_test} test images, seed {seed})"):
        source = write_synthetic_dataset(folders["nnUNet_raw"], SOURCE_ID, DATASET_NAME, num_training, num_test,
                                         seed=seed)
    with step("training the MAE on the data set's images (nnunetv2_grcsf mae-train)"):
        _our_command(cli, ["mae-train", "-d", str(SOURCE_ID), "--steps", "300", "--seed", str(seed),
                           "--device", device])
    with step(f"residual maps -> Dataset{RESIDUAL_ID} (image + residual channel), with a quality report"):
        _our_command(cli, ["residuals", "-d", str(SOURCE_ID), "-o", str(RESIDUAL_ID), "--report",
                           "--device", device])
    residual_dataset = next(folders["nnUNet_raw"].glob(f"Dataset{RESIDUAL_ID}_*"))
    with step("nnU-Net planning and preprocessing"):
        _run_streaming(["nnUNetv2_plan_and_preprocess", "-d", str(RESIDUAL_ID), "-c", "2d", "-np", "2",
                        "--verify_dataset_integrity"], env, logs / "plan_and_preprocess.log")
    train_env = dict(env, nnUNet_n_proc_DA=env.get("nnUNet_n_proc_DA", "2"))
    with step(f"training {trainer} on fold 0 ({device})"):
        _run_streaming(["nnUNetv2_train", str(RESIDUAL_ID), "2d", "0", "-tr", trainer, "-device", device],
                       train_env, logs / "train.log")
    predictions = output / "predictions"
    with step(f"predicting the {num_test} held-out test images"):
        _run_streaming(["nnUNetv2_predict", "-i", str(residual_dataset / "imagesTs"), "-o", str(predictions),
                        "-d", str(RESIDUAL_ID), "-c", "2d", "-f", "0", "-tr", trainer, "-device", device],
                       env, logs / "predict.log")
    with step("evaluating with nnU-Net's evaluation"):
        dice = _evaluate(source / "labelsTs", predictions, residual_dataset)
    with step("writing overlay PNGs"):
        png = output / "overlays.png"
        save_overlay_grid(_overlay_cases(residual_dataset, predictions, limit=4), png)
    print(f"\nDice per label on the {num_test} test images: "
          + ", ".join(f"{name} {value:.3f}" for name, value in dice.items()))
    report = next(folders["nnUNet_results"].glob(f"Dataset{RESIDUAL_ID}_*/nnunetv2_grcsf_residual_report"), "-")
    print(f"overlays: {png}\nresidual-map report (AUROC, PNG panels): {report}\n"
          f"all outputs: {output}  (total {time.perf_counter() - started:.0f} s)")
    return dice


def _our_command(cli, argv: list) -> None:
    print("      $ nnunetv2_grcsf " + " ".join(argv), flush=True)
    code = cli.main(argv)
    if code:
        raise UserFacingError(f"`nnunetv2_grcsf {' '.join(argv)}` failed with exit code {code}")


def _evaluate(reference: Path, predictions: Path, dataset: Path) -> dict:
    """Mean Dice per foreground label, by nnU-Net's compute_metrics_on_folder."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunetv2_grcsf.datasets import load_dataset_json

    labels = {name: value for name, value in load_dataset_json(dataset)["labels"].items() if value != 0}
    summary = compute_metrics_on_folder(str(reference), str(predictions), str(predictions / "summary.json"),
                                        SimpleITKIO(), ".nii.gz", list(labels.values()), None, num_processes=1)
    return {name: summary["mean"][value]["Dice"] for name, value in labels.items()}


def _overlay_cases(dataset: Path, predictions: Path, limit: int) -> list:
    """Image, reference and prediction of the first ``limit`` predicted test cases, for the overlay grid."""
    import SimpleITK as sitk

    def read(path):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))

    references = dataset.parent / f"Dataset{SOURCE_ID}_{DATASET_NAME}" / "labelsTs"
    return [{"title": prediction.name[: -len(".nii.gz")],
             "image": read(dataset / "imagesTs" / prediction.name.replace(".nii.gz", "_0000.nii.gz")),
             "reference": read(references / prediction.name),
             "prediction": read(prediction)}
            for prediction in sorted(predictions.glob("*.nii.gz"))[:limit]]
