"""A benchmark's own nnU-Net folders and the real commands that fill them (shared by the accuracy scripts).

Every step is nnU-Net's or the plugin's console command, run in a subprocess with the workspace's
``nnUNet_raw`` / ``_preprocessed`` / ``_results`` (all below one work folder), so a benchmark measures
exactly what a user gets:

- :func:`link_dataset`: a shared raw data set linked (never copied or modified) into the workspace,
  optionally a subset of cases, with a seeded held-out test split (stratified by empty / non-empty reference
  masks, :func:`benchmark_statistics.held_out_split`) in ``imagesTs`` / ``labelsTs``;
- :func:`plan_and_preprocess`: ``nnUNetv2_plan_and_preprocess`` once, then a ``<configuration>_bs<B>``
  configuration added by nnU-Net's plans inheritance (``{"inherits_from": ..., "batch_size": B}``);
- :func:`make_residual_dataset`: ``nnunetv2_grcsf mae-train`` + ``residuals`` (source + MAE residual channel),
  refused when the MAE saw more images than ``imagesTr`` holds;
- :func:`residual_test_inputs`: the test images with their residual channel, made as a user makes prediction
  inputs (``nnunetv2_grcsf residuals -i imagesTs --from-dataset``); :func:`shuffled_residual_inputs`: the same
  with every image's residual taken from another test image (the shuffled-residual control);
- :func:`train`: ``nnUNetv2_train``, continued from nnU-Net's checkpoints when a run was interrupted; with a
  seed, in that seed's own ``nnUNet_results`` and with ``NNUNETV2_GRCSF_SEED`` set (raw and preprocessed data
  are shared by all seeds);
- :func:`predict`, :func:`evaluate_nnunet`, :func:`evaluate_lesions`, :func:`score_predictions`:
  ``nnUNetv2_predict``, ``nnUNetv2_evaluate_folder`` and ``nnunetv2_grcsf evaluate``;
- :func:`finished_results`, :func:`record_result`: the results JSON, one result per (row, seed), never mixed
  with results made under other settings.

Trainers named ``nnUNetTrainer_<schedule>`` come from ``benchmarks/trainers/`` (given to nnU-Net through
``nnUNet_extTrainer``), the plugin's from its installed start-up hook.
"""
import argparse
import collections
import contextlib
import fcntl
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from benchmark_statistics import DEFAULT_SEED, derangement, held_out_split

BENCHMARKS = Path(__file__).resolve().parent
PROJECT_ROOT = BENCHMARKS.parent
#: The environment variable our trainers and ``benchmarks/trainers``' baselines take their seed from.
SEED_VARIABLE = "NNUNETV2_GRCSF_SEED"


def console_script(name: str) -> str:
    """Path of a console script of this Python environment (else the bare name, found on PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.is_file() else name


def run_logged(command: List[str], env: dict, log_file: Path) -> None:
    """Run a command, appending its output to ``log_file`` and echoing nnU-Net's progress lines.

    A failing command raises RuntimeError with the end of its output.
    """
    print("  $ " + " ".join(command), flush=True)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    tail = collections.deque(maxlen=30)
    with open(log_file, "a") as log:
        log.write(f"\n$ {' '.join(command)}\n")
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            log.write(line)
            tail.append(line)
            if re.search(r"Epoch \d|Epoch time|Pseudo dice|Mean Validation Dice|Error|error:", line):
                print("    " + line.rstrip()[:160], flush=True)
        if process.wait() != 0:
            raise RuntimeError(f"`{' '.join(command)}` exited {process.returncode}; see {log_file}. It ended with:\n"
                               + "".join(tail))


@contextlib.contextmanager
def locked(lock_file: Path):
    """An exclusive lock, so that runs started side by side prepare data and write results one at a time."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def shared_dataset(folder_name: str, data_dir: Optional[str]) -> Path:
    """A raw data set of ``../shared/data`` (or ``data_dir``, or $GRCSF_SHARED_DATA); exits when absent."""
    base = Path(data_dir or os.environ.get("GRCSF_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
    folder = base / folder_name
    if not (folder / "dataset.json").is_file():
        raise SystemExit(f"{folder_name} not found at {folder}: pass --data DIR or set GRCSF_SHARED_DATA")
    return folder


def subset_cases(cases: List[str], num_cases: Optional[int]) -> List[str]:
    """All cases, or ``num_cases`` spread evenly over the sorted list (so every kind of case appears)."""
    if not num_cases or num_cases >= len(cases):
        return cases
    step = len(cases) / num_cases
    return [cases[int(i * step)] for i in range(num_cases)]


class Workspace:
    """The benchmark's own nnUNet_raw / _preprocessed / _results below ``root``, and its environment.

    Source and residual data sets share ``dataset_name`` (``Dataset802_BUSI256`` -> ``Dataset803_BUSI256``).
    A seeded run trains and predicts in ``seeds/seed_<S>/nnUNet_results`` (nnU-Net's model folder is fixed by
    trainer, plans and configuration, so each seed needs a results root of its own); the MAE stays in the
    shared ``nnUNet_results``.
    """

    def __init__(self, root: Path, dataset_name: str, n_proc_da: int):
        self.root = Path(root).resolve()
        self.dataset_name = dataset_name
        self.raw, self.preprocessed, self.results = (self.root / n for n in
                                                     ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
        self.logs = self.root / "logs"
        user_dirs = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
        ext = [str(BENCHMARKS / "trainers")] + user_dirs
        self.env = dict(os.environ, nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.preprocessed),
                        nnUNet_results=str(self.results), nnUNet_extTrainer=os.pathsep.join(ext))
        self.train_env = dict(self.env, nnUNet_n_proc_DA=str(n_proc_da))  # planning crashes with 0 (nnU-Net 2.8.1)
        # nnU-Net's validation export and metrics otherwise start 8 processes (each importing torch) per training
        self.train_env.setdefault("nnUNet_def_n_proc", str(max(n_proc_da, 1)))

    def folder_name(self, dataset_id: int) -> str:
        return f"Dataset{dataset_id:03d}_{self.dataset_name}"

    def dataset_folder(self, dataset_id: int) -> Path:
        return self.raw / self.folder_name(dataset_id)

    def plans_file(self, dataset_id: int) -> Path:
        return self.preprocessed / self.folder_name(dataset_id) / "nnUNetPlans.json"

    def results_root(self, seed: Optional[int] = None) -> Path:
        """The ``nnUNet_results`` of a seed's runs (the shared one without a seed)."""
        return self.results if seed is None else self.root / "seeds" / f"seed_{seed}" / "nnUNet_results"

    def seed_env(self, seed: Optional[int], training: bool = False) -> dict:
        """The environment of a seed's training or prediction: its ``nnUNet_results`` and ``NNUNETV2_GRCSF_SEED``."""
        env = dict(self.train_env if training else self.env, nnUNet_results=str(self.results_root(seed)))
        if seed is not None:
            env[SEED_VARIABLE] = str(seed)
        return env

    def seed_name(self, seed: Optional[int]) -> str:
        return "unseeded" if seed is None else f"seed_{seed}"

    def model_folder(self, dataset_id: int, trainer: str, configuration: str, seed: Optional[int] = None) -> Path:
        return self.results_root(seed) / self.folder_name(dataset_id) / f"{trainer}__nnUNetPlans__{configuration}"


def empty_reference(label_file: Path, dataset_json: dict) -> bool:
    """Whether a reference segmentation holds no foreground (read with nnU-Net's reader for the data set)."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    reader = determine_reader_writer_from_dataset_json(dataset_json, str(label_file), verbose=False)()
    return not reader.read_seg(str(label_file))[0].any()


def held_out_test_split(shared: Path, num_cases: Optional[int], num_test: Union[int, float],
                        seed: int = DEFAULT_SEED) -> dict:
    """The held-out test split of a shared data set: ``{"rule", "seed", "training_cases", "test_cases"}``.

    Cases: all, or ``num_cases`` evenly spread (:func:`subset_cases`); of them ``num_test`` (a number, or a
    fraction when a float below 1) are held out, seeded and stratified by whether the reference mask is empty
    (:func:`benchmark_statistics.held_out_split`).
    """
    dataset_json = json.loads((shared / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    cases = subset_cases(sorted(p.name[: -len(ending)] for p in (shared / "labelsTr").glob(f"*{ending}")), num_cases)
    if not num_test:
        return {"rule": "no test split", "seed": None, "training_cases": cases, "test_cases": []}
    empty = [empty_reference(shared / "labelsTr" / f"{case}{ending}", dataset_json) for case in cases]
    training, test = held_out_split(cases, empty, num_test, seed)
    empty_cases = {case for case, is_empty in zip(cases, empty) if is_empty}
    return {"rule": f"scikit-learn train_test_split(test_size={num_test}, random_state={seed}), stratified by empty "
                    f"/ non-empty reference mask, of the {len(cases)} sorted case names"
                    + (f" (an evenly spread subset of {num_cases})" if num_cases else ""),
            "seed": seed, "training_cases": training, "test_cases": test,
            "test_cases_with_empty_reference": len(empty_cases.intersection(test)),
            "training_cases_with_empty_reference": len(empty_cases.intersection(training))}


def link_dataset(workspace: Workspace, shared: Path, dataset_id: int, num_cases: Optional[int] = None,
                 num_test: Union[int, float] = 0, split_seed: int = DEFAULT_SEED) -> Path:
    """The shared data set in the workspace's nnUNet_raw as links to the shared files.

    ``num_cases``: an evenly spread subset; ``num_test``: that many of them (a number, or a fraction if a float
    below 1) held out by :func:`held_out_test_split` in ``imagesTs`` / ``labelsTs``, the rest in ``imagesTr`` /
    ``labelsTr``. A workspace linked earlier with another split is refused (its models trained on other cases).
    """
    target = workspace.dataset_folder(dataset_id)
    split = held_out_test_split(shared, num_cases, num_test, split_seed)
    dataset_json = json.loads((shared / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    if (target / "dataset.json").is_file():
        linked = {sub: sorted(p.name[: -len(ending)] for p in (target / sub).glob(f"*{ending}"))
                  for sub in ("labelsTr", "labelsTs")}
        if linked != {"labelsTr": split["training_cases"], "labelsTs": split["test_cases"]}:
            raise SystemExit(f"{target} holds another training / test split than this run asks for "
                             f"({len(linked['labelsTr'])} / {len(linked['labelsTs'])} cases there): pass another "
                             f"--work-dir (nothing trained there can be scored on this split)")
        return target
    test = set(split["test_cases"])
    for case in split["training_cases"] + split["test_cases"]:
        images, labels = ("imagesTs", "labelsTs") if case in test else ("imagesTr", "labelsTr")
        (target / images).mkdir(parents=True, exist_ok=True)
        (target / labels).mkdir(parents=True, exist_ok=True)
        for image in sorted((shared / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}")):
            (target / images / image.name).symlink_to(image.resolve())
        (target / labels / f"{case}{ending}").symlink_to((shared / "labelsTr" / f"{case}{ending}").resolve())
    dataset_json["numTraining"] = len(split["training_cases"])
    (target / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return target


def plan_and_preprocess(workspace: Workspace, dataset_id: int, configuration: str, batch_size: int) -> str:
    """nnU-Net's planning and preprocessing of ``configuration`` (once), then ``<configuration>_bs<B>``."""
    plans_file = workspace.plans_file(dataset_id)
    if not plans_file.is_file():
        run_logged([console_script("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", configuration,
                    "-np", "2", "--verify_dataset_integrity"], workspace.env, workspace.logs / f"plan_{dataset_id}.log")
    small = f"{configuration}_bs{batch_size}"
    plans = json.loads(plans_file.read_text())
    if small not in plans["configurations"]:
        plans["configurations"][small] = {"inherits_from": configuration, "batch_size": batch_size}
        plans_file.write_text(json.dumps(plans, indent=2))
    return small


def make_residual_dataset(workspace: Workspace, source_id: int, residual_id: int, mae_steps: Optional[int],
                          device: str) -> dict:
    """``residual_id`` = the source + MAE residual channel, by the plugin's commands (same case names).

    ``mae-train`` reads ``imagesTr`` only (its default), so the MAE never sees a test image; the checkpoint's
    record of how many images it trained on is checked against ``imagesTr`` (a run is refused otherwise). An MAE
    training that was interrupted (its ``checkpoint_latest.pth`` there) is resumed.
    Returns :func:`mae_record`.
    """
    if not (workspace.dataset_folder(residual_id) / "dataset.json").is_file():
        from nnunetv2_grcsf.mae.train import DEFAULT_SUBFOLDER, LATEST

        mae = ["mae-train", "-d", str(source_id), "--device", device, "--quiet"]
        mae += ["--steps", str(mae_steps)] if mae_steps else []
        interrupted = workspace.results / workspace.folder_name(source_id) / DEFAULT_SUBFOLDER / LATEST
        mae += ["--resume"] if interrupted.is_file() else []  # an interrupted run continues exactly where it stopped
        log = workspace.logs / "residuals.log"
        run_logged([console_script("nnunetv2_grcsf"), *mae], workspace.env, log)
        run_logged([console_script("nnunetv2_grcsf"), "residuals", "-d", str(source_id), "-o", str(residual_id),
                    "--device", device, "--quiet"], workspace.env, log)
    record = mae_record(workspace, residual_id)
    training = len(list((workspace.dataset_folder(source_id) / "labelsTr").iterdir()))
    if record["trained_on_images"] != training:
        raise SystemExit(f"the MAE {record['checkpoint']} trained on {record['trained_on_images']} images, but "
                         f"{workspace.dataset_folder(source_id) / 'imagesTr'} holds {training}: it saw the held-out "
                         f"test images. Update nnunetv2_grcsf (mae-train reads imagesTr only) and start over in a new "
                         f"--work-dir.")
    return record


def mae_record(workspace: Workspace, residual_id: int) -> dict:
    """The MAE a residual data set was made with: checkpoint, SHA-256, images and steps it trained on, residual
    channels (from the data set's dataset.json and the checkpoint)."""
    import torch

    info = json.loads((workspace.dataset_folder(residual_id) / "dataset.json").read_text())["nnunetv2_grcsf"]
    checkpoint = torch.load(info["mae_checkpoint"], map_location="cpu", weights_only=False)
    return {"checkpoint": info["mae_checkpoint"], "sha256": info.get("mae_sha256"),
            "trained_on_images": checkpoint["data"]["num_cases"], "steps": checkpoint["step"],
            "training_splits": checkpoint.get("training_splits", "not recorded (mae-train of an earlier version)"),
            "loss": ("outside the labelled patches of its training images"
                     if checkpoint["train_config"].get("skip_labelled_patches") else "on every patch"),
            "residual_channels": info["residual_channels"], "mask_ratios": info.get("mask_ratios")}


def residual_test_inputs(workspace: Workspace, source_id: int, residual_id: int, device: str) -> Path:
    """The source's ``imagesTs`` with the residual channel(s) of ``residual_id``'s MAE, as a user makes prediction
    inputs: ``nnunetv2_grcsf residuals -i imagesTs -o OUT --from-dataset RESIDUAL_ID``."""
    images = workspace.dataset_folder(source_id) / "imagesTs"
    output = workspace.root / "test_inputs" / workspace.folder_name(residual_id)
    channels = len(json.loads((workspace.dataset_folder(residual_id) / "dataset.json").read_text())["channel_names"])
    expected = len(list((workspace.dataset_folder(source_id) / "labelsTs").iterdir())) * channels
    if output.is_dir() and len(list(output.glob("*_[0-9][0-9][0-9][0-9].*"))) == expected:
        return output
    run_logged([console_script("nnunetv2_grcsf"), "residuals", "-i", str(images), "-o", str(output),
                "--from-dataset", str(residual_id), "--device", device, "--quiet", "--overwrite"],
               workspace.env, workspace.logs / "residuals.log")
    return output


def residual_pairing(workspace: Workspace, source_id: int, file_ending: str, seed: int) -> Dict[str, str]:
    """``{test case: the test case whose residual it gets}`` in the shuffled-residual control: a derangement
    (:func:`benchmark_statistics.derangement` with ``seed``) of the sorted test cases of ``source_id``."""
    labels = workspace.dataset_folder(source_id) / "labelsTs"
    cases = sorted(p.name[: -len(file_ending)] for p in labels.glob(f"*{file_ending}"))
    return {case: cases[j] for case, j in zip(cases, derangement(len(cases), seed))}


def shuffled_residual_inputs(inputs: Path, output: Path, partner: Dict[str, str], residual_channels: Sequence[int],
                             file_ending: str) -> Path:
    """``inputs`` with every case's residual channel(s) taken from case ``partner[case]`` (the shuffled-residual
    control): image channels linked, the partner's residual resampled (linear) onto the case's own grid when the
    sizes differ, written with the case's geometry. Written to a temporary folder, then renamed into place."""
    import shutil

    import numpy as np
    import SimpleITK as sitk
    from skimage.transform import resize

    if output.is_dir():
        return output
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for case, other in partner.items():
        for file in sorted(inputs.glob(f"{case}_[0-9][0-9][0-9][0-9]{file_ending}")):
            channel = int(file.name[len(case) + 1: len(case) + 5])
            if channel not in residual_channels:
                (partial / file.name).symlink_to(file.resolve())
                continue
            own = sitk.ReadImage(str(file))
            donor = sitk.GetArrayFromImage(sitk.ReadImage(str(inputs / f"{other}_{channel:04d}{file_ending}")))
            shape = sitk.GetArrayFromImage(own).shape
            if donor.shape != shape:
                donor = np.round(resize(donor.astype(np.float32), shape, order=1, preserve_range=True,
                                        anti_aliasing=False)).astype(donor.dtype)
            shuffled = sitk.GetImageFromArray(donor)
            shuffled.CopyInformation(own)
            sitk.WriteImage(shuffled, str(partial / file.name))
    (partial / "pairing.json").write_text(json.dumps(partner, indent=1))
    os.replace(partial, output)
    return output


def shuffled_test_inputs(workspace: Workspace, source_id: int, residual_inputs: Path,
                         residual_channels: Sequence[int], file_ending: str, seed: int) -> Path:
    """The shuffled-residual control's test inputs, beside ``residual_inputs`` (``<name>_shuffled``): each test case
    of ``source_id`` with its partner's residual (:func:`residual_pairing`, :func:`shuffled_residual_inputs`)."""
    return shuffled_residual_inputs(residual_inputs, residual_inputs.with_name(residual_inputs.name + "_shuffled"),
                                    residual_pairing(workspace, source_id, file_ending, seed), residual_channels,
                                    file_ending)


def zeroed_channel_images(images: Path, output: Path, channels: Sequence[int], file_ending: str) -> Path:
    """``images`` with the files of ``channels`` replaced by zeros of the same geometry and dtype, the other
    channels linked. Written to a temporary folder, then renamed into place."""
    import shutil

    import numpy as np
    import SimpleITK as sitk

    if output.is_dir():
        return output
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for file in sorted(images.glob(f"*_[0-9][0-9][0-9][0-9]{file_ending}")):
        if int(file.name[-len(file_ending) - 4: -len(file_ending)]) not in channels:
            (partial / file.name).symlink_to(file.resolve())
            continue
        image = sitk.ReadImage(str(file))
        zeros = sitk.GetImageFromArray(np.zeros_like(sitk.GetArrayFromImage(image)))
        zeros.CopyInformation(image)
        sitk.WriteImage(zeros, str(partial / file.name))
    os.replace(partial, output)
    return output


def zero_channel_test_inputs(residual_inputs: Path, residual_channels: Sequence[int], file_ending: str) -> Path:
    """The zero-channel control's test inputs, beside ``residual_inputs`` (``<name>_zero_channel``): the residual
    channel(s) all zeros (:func:`zeroed_channel_images`)."""
    return zeroed_channel_images(residual_inputs, residual_inputs.with_name(residual_inputs.name + "_zero_channel"),
                                 residual_channels, file_ending)


def make_zero_channel_dataset(workspace: Workspace, residual_id: int, zero_id: int,
                              residual_channels: Sequence[int], file_ending: str) -> None:
    """``zero_id`` = the residual data set with its residual channel(s) all zeros (the zero-channel control: the
    same channels, names and normalization, no information in the extra channel); its labels linked. Its
    dataset.json keeps only the residual channels' indices of the MAE record (an RCU trainer reads them; no MAE made
    these channels)."""
    import shutil

    source, target = workspace.dataset_folder(residual_id), workspace.dataset_folder(zero_id)
    if (target / "dataset.json").is_file():
        return
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    zeroed_channel_images(source / "imagesTr", partial / "imagesTr", residual_channels, file_ending)
    (partial / "labelsTr").symlink_to((source / "labelsTr").resolve())
    dataset_json = json.loads((source / "dataset.json").read_text())
    dataset_json["nnunetv2_grcsf"] = {"residual_channels": list(residual_channels)}
    (partial / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    os.replace(partial, target)


def make_interpolation_dataset(workspace: Workspace, source_id: int, residual_id: int, interpolation_id: int,
                               device: str) -> None:
    """``interpolation_id`` = the source + the residual of interpolating each masked patch from the visible pixels
    (``residuals --reconstruction interpolation``), with the MAE checkpoint and mask ratios of ``residual_id``, so
    its channels are normalized, encoded and laid out as the MAE residual's: the control that asks whether the MAE
    is needed at all."""
    if (workspace.dataset_folder(interpolation_id) / "dataset.json").is_file():
        return
    record = json.loads((workspace.dataset_folder(residual_id) / "dataset.json").read_text())["nnunetv2_grcsf"]
    run_logged([console_script("nnunetv2_grcsf"), "residuals", "-d", str(source_id), "-o", str(interpolation_id),
                "-m", record["mae_checkpoint"], "--mask-ratios", *(f"{r:g}" for r in record["mask_ratios"]),
                "--reconstruction", "interpolation", "--device", device, "--quiet"], workspace.env,
               workspace.logs / "residuals.log")


def prepare_residual_rows(workspace: Workspace, rows: Sequence["Row"], ids: Tuple[int, int, int, int],
                          configuration: str, args, file_ending: str, configurations: dict, inputs: dict) -> dict:
    """The data of the rows that read the residual: the residual data set (``ids``: source, residual, zero-channel,
    interpolation-residual data set ids) planned and preprocessed, its test inputs (``inputs['residual']``), and
    those of the controls the rows name (``'shuffled'``, ``'zero'``, ``'interpolation'``: their data sets too);
    ``configurations`` and ``inputs`` are filled in. Returns :func:`mae_record`; a failing command raises
    RuntimeError."""
    source_id, residual_id, zero_channel_id, interpolation_id = ids
    mae = make_residual_dataset(workspace, source_id, residual_id, args.mae_steps, args.device)
    configurations[residual_id] = plan_and_preprocess(workspace, residual_id, configuration, args.batch_size)
    inputs["residual"] = residual_test_inputs(workspace, source_id, residual_id, args.device)
    if any(row.shuffled for row in rows):
        inputs["shuffled"] = shuffled_test_inputs(workspace, source_id, inputs["residual"], mae["residual_channels"],
                                                  file_ending, args.split_seed)
    if any(row.zero_channel for row in rows):
        make_zero_channel_dataset(workspace, residual_id, zero_channel_id, mae["residual_channels"], file_ending)
        configurations[zero_channel_id] = plan_and_preprocess(workspace, zero_channel_id, configuration,
                                                              args.batch_size)
        inputs["zero"] = zero_channel_test_inputs(inputs["residual"], mae["residual_channels"], file_ending)
    if any(row.interpolation for row in rows):
        make_interpolation_dataset(workspace, source_id, residual_id, interpolation_id, args.device)
        configurations[interpolation_id] = plan_and_preprocess(workspace, interpolation_id, configuration,
                                                               args.batch_size)
        inputs["interpolation"] = residual_test_inputs(workspace, source_id, interpolation_id, args.device)
    return mae


def needs_residuals(trainer: str) -> bool:
    """Whether the trainer's network takes the MAE residual channel (then it trains on the residual data set)."""
    if trainer.startswith("nnUNetTrainer"):
        return False
    import nnunetv2_grcsf.trainers as trainers

    return getattr(trainers, trainer).needs_residual_channels


class Row(NamedTuple):
    """One row of an accuracy table: a trainer, the data it trains on and the test inputs it is scored on.

    Named ``TRAINER`` (its own data: the residual data set when its network reads the residual channel),
    ``TRAINER+residual`` (trained and tested on the residual data set: for ``nnUNetTrainer`` the residual is a plain
    extra input channel, normalized by nnU-Net as its channel name says), ``TRAINER+shuffled_residual`` (the
    models trained on the residual data set, those of ``TRAINER``'s row or, for a trainer whose network does not read
    the residual, of ``TRAINER+residual``'s, tested with each test image's residual replaced by another test
    image's), ``TRAINER+zero_channel`` (trained and tested on the residual data set with the residual channel all
    zeros, :func:`make_zero_channel_dataset`: an extra input channel without information; for a trainer whose RCU
    reads the residual channel, the RCU without a residual to read: what its architecture does by itself) or
    ``TRAINER+interpolation_residual`` (trained and tested on the data set whose residual channel is that of the
    interpolation from the visible pixels, :func:`make_interpolation_dataset`: the residual without the MAE).
    """
    name: str
    trainer: str
    residual_data: bool
    shuffled: bool
    zero_channel: bool = False
    interpolation: bool = False

    @classmethod
    def parse(cls, name: str) -> "Row":
        trainer, _, control = name.partition("+")
        if control not in ("", "residual", "shuffled_residual", "zero_channel", "interpolation_residual"):
            raise SystemExit(f"row {name}: the part after '+' must be 'residual', 'shuffled_residual', "
                             f"'zero_channel' or 'interpolation_residual'")
        residual_data = control != "" or needs_residuals(trainer)
        return cls(name, trainer, residual_data, control == "shuffled_residual", control == "zero_channel",
                   control == "interpolation_residual")

    def test_inputs_kind(self) -> str:
        """The test inputs it is scored on: 'zero', 'interpolation', 'shuffled', 'residual' or 'source'."""
        return ("zero" if self.zero_channel else "interpolation" if self.interpolation else "shuffled" if self.shuffled
                else "residual" if self.residual_data else "source")

    def dataset_id(self, source_id: int, residual_id: int, zero_channel_id: int, interpolation_id: int) -> int:
        """The data set it trains on, of a benchmark's source, residual, zero-channel and interpolation ids."""
        return (zero_channel_id if self.zero_channel else interpolation_id if self.interpolation else residual_id
                if self.residual_data else source_id)


def train_and_score(workspace: Workspace, dataset_id: int, trainer: str, configuration: str, fold: int, device: str,
                    seed: Optional[int], inputs: Path, prediction_name: str, labels: Path,
                    overlay_images: Optional[Path] = None) -> dict:
    """Train (or reuse) one seed's model, predict ``inputs`` with it and score the predictions against ``labels``
    (:func:`score_predictions`); also the training time, the seed its training log records and nnU-Net's own
    validation Dice."""
    folder = train(workspace, dataset_id, trainer, configuration, fold, device, seed)
    started = time.perf_counter()
    predictions = predict(workspace, dataset_id, trainer, configuration, [fold], device, seed, inputs, prediction_name)
    predict_s = time.perf_counter() - started
    scores = score_predictions(workspace, predictions, labels, f"{workspace.seed_name(seed)}/{prediction_name}",
                               overlay_images)
    validation = json.loads((folder / "validation" / "summary.json").read_text())
    epochs = epoch_times(folder)
    return {"dataset": workspace.folder_name(dataset_id), "fold_folder": str(folder), "seed": seed,
            "seed_in_training_log": logged_seed(folder), "test_inputs": str(inputs), "predictions": str(predictions),
            **scores, "validation_dice": validation["foreground_mean"]["Dice"],
            "validation_cases": len(validation["metric_per_case"]), "train_time_s": sum(epochs),
            "epochs_done": len(epochs), "predict_wall_s": predict_s}


def train(workspace: Workspace, dataset_id: int, trainer: str, configuration: str, fold: int, device: str,
          seed: Optional[int] = None) -> Path:
    """nnUNetv2_train, continued from the latest checkpoint or validation only when a run was interrupted.

    With ``seed``: in the seed's own ``nnUNet_results``, with ``NNUNETV2_GRCSF_SEED`` set."""
    folder = workspace.model_folder(dataset_id, trainer, configuration, seed) / f"fold_{fold}"
    if (folder / "validation" / "summary.json").is_file():
        return folder
    command = [console_script("nnUNetv2_train"), str(dataset_id), configuration, str(fold), "-tr", trainer,
               "-device", device]
    if (folder / "checkpoint_final.pth").is_file():
        command.append("--val")
    elif (folder / "checkpoint_latest.pth").is_file():
        command.append("--c")
    else:  # a fresh start: the logs of an interrupted run that saved no checkpoint are not this run's
        for stale in folder.glob("training_log_*.txt"):
            stale.rename(stale.with_name(stale.name + ".interrupted"))
    run_logged(command, workspace.seed_env(seed, training=True),
               workspace.logs / workspace.seed_name(seed) / f"train_{trainer}_{workspace.folder_name(dataset_id)}.log")
    return folder


def logged_seed(folder: Path) -> Optional[int]:
    """The seed the training log of a fold folder records (PluginTrainer writes ``seed: S (from
    NNUNETV2_GRCSF_SEED)``), None when it records none."""
    for log in sorted(folder.glob("training_log_*.txt")):
        found = re.search(r"\bseed: (\d+)\b", log.read_text())
        if found:
            return int(found.group(1))
    return None


def epoch_times(folder: Path) -> List[float]:
    """Seconds of every epoch, from nnU-Net's training logs in the fold folder."""
    times = []
    for log in sorted(folder.glob("training_log_*.txt")):
        times += [float(t) for t in re.findall(r"Epoch time: ([0-9.]+) s", log.read_text())]
    return times


def predict(workspace: Workspace, dataset_id: int, trainer: str, configuration: str, folds: Sequence[int],
            device: str, seed: Optional[int] = None, inputs: Optional[Path] = None, name: Optional[str] = None) -> Path:
    """``nnUNetv2_predict`` of ``inputs`` (default: the data set's imagesTs) with the trained folds (of ``seed``'s
    results); returns the output folder (``predictions/<seed>/<data set>/<name or trainer>``)."""
    output = workspace.root / "predictions"
    output = (output / workspace.seed_name(seed) if seed is not None else output) / workspace.folder_name(dataset_id)
    output = output / (name or trainer)
    if (output / "dataset.json").is_file():
        return output
    inputs = inputs or workspace.dataset_folder(dataset_id) / "imagesTs"
    run_logged([console_script("nnUNetv2_predict"), "-i", str(inputs), "-o", str(output), "-d", str(dataset_id),
                "-c", configuration, "-tr", trainer, "-f", *map(str, folds), "-device", device, "-npp", "1",
                "-nps", "1"], workspace.seed_env(seed), workspace.logs / workspace.seed_name(seed) /
               f"predict_{name or trainer}.log")
    return output


def evaluate_nnunet(workspace: Workspace, dataset_id: int, predictions: Path, labels: Path,
                    plans_file: Path) -> dict:
    """nnU-Net's own ``nnUNetv2_evaluate_folder`` of ``predictions`` against ``labels``; its summary JSON."""
    summary = predictions / "summary.json"
    run_logged([console_script("nnUNetv2_evaluate_folder"), str(labels), str(predictions), "-djfile",
                str(workspace.dataset_folder(dataset_id) / "dataset.json"), "-pfile", str(plans_file),
                "-o", str(summary), "-np", "1"], workspace.env, workspace.logs / "evaluate.log")
    return json.loads(summary.read_text())


def evaluate_lesions(workspace: Workspace, predictions: Path, labels: Path, name: str,
                     images: Optional[Path] = None) -> dict:
    """``nnunetv2_grcsf evaluate`` (Dice, HD95, lesion F1, volume difference); returns its summary JSON.

    With ``images``, it also draws overlays of the best and worst cases (PNG beside the JSON).
    """
    output = workspace.root / "evaluation" / f"{name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    overlays = ["--images", str(images)] if images else []
    subprocess.run([console_script("nnunetv2_grcsf"), "evaluate", "-ref", str(labels), "-pred", str(predictions),
                    "-o", str(output), "--chill", "--overwrite", "-q", *overlays], env=workspace.env, check=True)
    return json.loads(output.read_text())


def score_predictions(workspace: Workspace, predictions: Path, labels: Path, name: str,
                      images: Optional[Path] = None) -> dict:
    """The test scores of one run by ``nnunetv2_grcsf evaluate`` (:func:`evaluate_lesions`).

    ``per_image_dice``: each image's Dice, averaged over the labels (an image with empty reference and empty
    prediction scores 1, evaluate's convention); ``Dice``: their mean; ``pooled_Dice``: 2 TP / (2 TP + FP + FN)
    over all pixels of all images, per label, averaged over labels; ``Dice_per_label`` and ``HD95_per_label``:
    means over images; ``HD95``: their mean over labels; lesion F1 / precision / recall: pooled over all lesions.
    """
    summary = evaluate_lesions(workspace, predictions, labels, name, images)
    failed = [r for r in summary["metric_per_case"] if "error" in r]
    if failed:
        raise RuntimeError(f"{len(failed)} prediction(s) do not match their reference: {failed[0]['message']}")
    keys = list(summary["mean"])
    per_image = {r["case"]: sum(r["metrics"][k]["Dice"] for k in keys) / len(keys)
                 for r in summary["metric_per_case"]}
    pooled = {}
    for k in keys:
        tp, fp, fn = (sum(r["metrics"][k][m] for r in summary["metric_per_case"]) for m in ("TP", "FP", "FN"))
        pooled[k] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    detection = summary["foreground_pooled"]
    return {"test_cases": len(per_image), "per_image_dice": per_image,
            "Dice": sum(per_image.values()) / len(per_image), "pooled_Dice": sum(pooled.values()) / len(pooled),
            "Dice_per_label": {k: summary["mean"][k]["Dice"] for k in keys}, "pooled_Dice_per_label": pooled,
            "HD95": summary["foreground_mean"]["HD95"], "HD95_per_label": {k: summary["mean"][k]["HD95"] for k in keys},
            "lesion_F1": detection["lesion_F1"], "lesion_precision": detection["lesion_precision"],
            "lesion_recall": detection["lesion_recall"], "evaluation": summary["files"]["json"]}


def run_argument_parser(description: str, *, rows: List[str], rows_help: str, seeds: List[int], budget: str,
                        configuration: str, dataset_folder: str, work_dir: Path, output: Path,
                        split_seed_help: str) -> argparse.ArgumentParser:
    """The arguments every accuracy benchmark takes (rows, seeds, budget, batch, fold, device, split seed, MAE steps,
    workers, data, folders, --overwrite, --smoke); the script adds its own and parses with
    :func:`parse_with_smoke_settings`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=rows, help=rows_help)
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds, help=f"values of {SEED_VARIABLE}")
    parser.add_argument("--budget", default=budget, help="schedule suffix (trainers/schedules.py)")
    parser.add_argument("--batch-size", type=int, default=2, help=f"batch size of the {configuration}_bs<B> "
                                                                   f"configuration")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--split-seed", type=int, default=DEFAULT_SEED, help=split_seed_help)
    parser.add_argument("--mae-steps", type=int, default=None, help="mae-train --steps (default: its own)")
    parser.add_argument("--n-proc-da", type=int, default=2, help="nnUNet_n_proc_DA for training")
    parser.add_argument("--data", default=None, help=f"folder holding {dataset_folder} (default ../shared/data)")
    parser.add_argument("--work-dir", default=str(work_dir))
    parser.add_argument("--output", default=str(output), help="output path without suffix")
    parser.add_argument("--overwrite", action="store_true", help="redo runs whose results exist")
    parser.add_argument("--smoke", action="store_true", help="tiny end-to-end check (see SMOKE in the script)")
    return parser


def parse_with_smoke_settings(parser, argv, smoke: dict):
    """Parse; with ``--smoke``, the ``smoke`` settings replace every argument left at its default (given ones
    stay)."""
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update({k: str(v) if isinstance(v, Path) else v for k, v in smoke.items()
                           if getattr(args, k) == parser.get_default(k)})
    return args


def budget_sentence(settings: dict, plans: str) -> str:
    """What every run of a results table was trained with: schedule, configuration, batch, device, seeds."""
    return (f"Budget: schedule `{settings['budget']}` ({settings['schedule']}), configuration "
            f"`{settings['configuration']}` (nnU-Net's {plans}, batch {settings['batch_size']}), device "
            f"{settings['device']}; seeds set by `{SEED_VARIABLE}`, one model per row and seed.")


def seed_statistics_cells(summary: dict, metrics: Sequence[tuple]) -> str:
    """``| mean ± sd`` cells over seeds of each ``(metric, decimals)`` of a row summary (one value: no ±)."""
    return "".join(f"| {mean_sd(summary[metric], digits)} " for metric, digits in metrics)


def mean_sd(figure: dict, digits: int) -> str:
    """``mean ± sd`` of a summarized figure (``mean`` alone for one value, empty when there is none)."""
    if figure["mean"] is None:
        return ""
    return f"{figure['mean']:.{digits}f} ± {figure['sd']:.{digits}f}" if figure["n"] > 1 else \
        f"{figure['mean']:.{digits}f}"


def every_run_section(report: dict, columns: List[str], ok_cells) -> List[str]:
    """The "## Every run" table: row, seed, the seed in its training log, then ``columns``, whose cells
    ``ok_cells(result)`` gives as a string of ``| ...`` cells (failed runs: error rows)."""
    header = ["row", "seed", "seed in training log", *columns]
    return ["", "## Every run", "", "| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1),
            *every_run_rows(report, ok_cells, len(header))]


def every_run_rows(report: dict, ok_cells, columns: int) -> List[str]:
    """One markdown row per (row, seed) of ``report``: row, seed, the seed in its training log, then
    ``ok_cells(result)`` (a string of ``| ...`` cells); failed runs as error rows of ``columns`` cells."""
    lines = []
    for name, runs in report["rows"].items():
        for seed, r in sorted(runs.items(), key=lambda item: int(item[0])):
            if r["status"] != "ok":
                lines.append(error_row([name, seed], r["error"], columns))
                continue
            logged = "not recorded" if r["seed_in_training_log"] is None else str(r["seed_in_training_log"])
            lines.append(f"| {name} | {seed} | {logged} {ok_cells(r)}")
    return lines


def error_row(cells: list, error: str, columns: int) -> str:
    """A Markdown table row for a trainer that failed: its leading ``cells``, the error (shortened, without the
    table's ``|``), then empty cells up to ``columns``."""
    cells = [*cells, "error: " + error[:150].replace("|", "/")]
    return "| " + " | ".join(cells + [""] * (columns - len(cells))) + " |"


def finished_results(workspace: Workspace, results_file: Path, run_settings: dict) -> dict:
    """``{row: {seed: result}}`` already in the results JSON. Results made under other settings (budget, batch,
    fold, test split, ...: the keys of ``run_settings``; a file that lacks one of them, such as one written by an
    earlier version of the benchmark, counts as other settings) are never mixed into one table: that is an error
    naming both."""
    with locked(workspace.root / ".results.lock"):
        report = json.loads(results_file.read_text()) if results_file.is_file() else None
    if report is None:
        return {}
    recorded = report.get("settings", {})
    differing = {k: (recorded.get(k, "not recorded"), v) for k, v in run_settings.items()
                 if k not in recorded or recorded[k] != v}
    if differing or "rows" not in report:
        raise SystemExit(f"{results_file} holds results made with other settings ("
                         + (", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differing.items())
                            or "one result per trainer, no seeds") +
                         "). Pass --output NEW_PATH for this run, or move that file away to start over.")
    return report["rows"]


def record_result(workspace: Workspace, results_file: Path, settings: dict, row: str, seed: Optional[int],
                  result: dict) -> None:
    """Merge one run's result (row, seed) and the run's settings into the results JSON, under the workspace's lock;
    the file is replaced whole (written beside it, then renamed), so an interruption never leaves it half written.
    Settings already in the file that this run does not set (notes on earlier runs) are kept. A row that reads
    residual maps records the sha256 of the MAE that made them (``settings["mae"]``): an MAE trained again for
    later seeds (a new work folder) stays told apart per run."""
    if Row.parse(row).test_inputs_kind() in ("residual", "shuffled", "interpolation"):
        result = {**result, "mae_sha256": settings.get("mae", {}).get("sha256")}
    with locked(workspace.root / ".results.lock"):
        report = json.loads(results_file.read_text()) if results_file.is_file() else {"rows": {}}
        report["settings"] = {**report.get("settings", {}), **settings}
        report["rows"].setdefault(row, {})[str(seed)] = result
        results_file.parent.mkdir(parents=True, exist_ok=True)
        partial = results_file.with_name(results_file.name + ".partial")
        partial.write_text(json.dumps(report, indent=1))
        os.replace(partial, results_file)
