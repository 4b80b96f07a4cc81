"""A benchmark's own nnU-Net folders and the real commands that fill them (shared by the accuracy scripts).

Every step is nnU-Net's or the plugin's console command, run in a subprocess with the workspace's
``nnUNet_raw`` / ``_preprocessed`` / ``_results`` (all below one work folder), so a benchmark measures
exactly what a user gets:

- :func:`link_dataset`: a shared raw data set linked (never copied or modified) into the workspace,
  optionally a subset of cases and with held-out cases moved to ``imagesTs`` / ``labelsTs``;
- :func:`plan_and_preprocess`: ``nnUNetv2_plan_and_preprocess`` once, then a ``<configuration>_bs<B>``
  configuration added by nnU-Net's plans inheritance (``{"inherits_from": ..., "batch_size": B}``);
- :func:`make_residual_dataset`: ``nnunetv2_grcsf mae-train`` + ``residuals`` (source + MAE residual channel);
- :func:`train`: ``nnUNetv2_train``, continued from nnU-Net's checkpoints when a run was interrupted;
- :func:`predict`, :func:`evaluate_nnunet`, :func:`evaluate_lesions`: ``nnUNetv2_predict``,
  ``nnUNetv2_evaluate_folder`` and ``nnunetv2_grcsf evaluate``.

Trainers named ``nnUNetTrainer_<schedule>`` come from ``benchmarks/trainers/`` (given to nnU-Net through
``nnUNet_extTrainer``), the plugin's from its installed start-up hook.
"""
import collections
import contextlib
import fcntl
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

BENCHMARKS = Path(__file__).resolve().parent
PROJECT_ROOT = BENCHMARKS.parent


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

    def folder_name(self, dataset_id: int) -> str:
        return f"Dataset{dataset_id:03d}_{self.dataset_name}"

    def dataset_folder(self, dataset_id: int) -> Path:
        return self.raw / self.folder_name(dataset_id)

    def plans_file(self, dataset_id: int) -> Path:
        return self.preprocessed / self.folder_name(dataset_id) / "nnUNetPlans.json"

    def model_folder(self, dataset_id: int, trainer: str, configuration: str) -> Path:
        return self.results / self.folder_name(dataset_id) / f"{trainer}__nnUNetPlans__{configuration}"


def link_dataset(workspace: Workspace, shared: Path, dataset_id: int, num_cases: Optional[int] = None,
                 num_test: int = 0) -> Path:
    """The shared data set in the workspace's nnUNet_raw as links to the shared files.

    ``num_cases``: an evenly spread subset; ``num_test``: that many of them (evenly spread) go to
    ``imagesTs`` / ``labelsTs`` as held-out test cases, the rest to ``imagesTr`` / ``labelsTr``.
    """
    target = workspace.dataset_folder(dataset_id)
    if (target / "dataset.json").is_file():
        return target
    dataset_json = json.loads((shared / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    cases = subset_cases(sorted(p.name[: -len(ending)] for p in (shared / "labelsTr").glob(f"*{ending}")), num_cases)
    test = set(subset_cases(cases, num_test)) if num_test else set()
    for case in cases:
        images, labels = ("imagesTs", "labelsTs") if case in test else ("imagesTr", "labelsTr")
        (target / images).mkdir(parents=True, exist_ok=True)
        (target / labels).mkdir(parents=True, exist_ok=True)
        for image in sorted((shared / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}")):
            (target / images / image.name).symlink_to(image.resolve())
        (target / labels / f"{case}{ending}").symlink_to((shared / "labelsTr" / f"{case}{ending}").resolve())
    dataset_json["numTraining"] = len(cases) - len(test)
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
                          device: str) -> None:
    """``residual_id`` = the source + MAE residual channel, by the plugin's commands (same case names)."""
    if (workspace.dataset_folder(residual_id) / "dataset.json").is_file():
        return
    mae = ["mae-train", "-d", str(source_id), "--device", device, "--quiet"]
    mae += ["--steps", str(mae_steps)] if mae_steps else []
    log = workspace.logs / "residuals.log"
    run_logged([console_script("nnunetv2_grcsf"), *mae], workspace.env, log)
    run_logged([console_script("nnunetv2_grcsf"), "residuals", "-d", str(source_id), "-o", str(residual_id),
                "--device", device, "--quiet"], workspace.env, log)


def needs_residuals(trainer: str) -> bool:
    """Whether the trainer's network takes the MAE residual channel (then it trains on the residual data set)."""
    if trainer.startswith("nnUNetTrainer"):
        return False
    import nnunetv2_grcsf.trainers as trainers

    return getattr(trainers, trainer).needs_residual_channels


def train(workspace: Workspace, dataset_id: int, trainer: str, configuration: str, fold: int, device: str) -> Path:
    """nnUNetv2_train, continued from the latest checkpoint or validation only when a run was interrupted."""
    folder = workspace.model_folder(dataset_id, trainer, configuration) / f"fold_{fold}"
    if (folder / "validation" / "summary.json").is_file():
        return folder
    command = [console_script("nnUNetv2_train"), str(dataset_id), configuration, str(fold), "-tr", trainer,
               "-device", device]
    if (folder / "checkpoint_final.pth").is_file():
        command.append("--val")
    elif (folder / "checkpoint_latest.pth").is_file():
        command.append("--c")
    run_logged(command, workspace.train_env, workspace.logs / f"train_{trainer}.log")
    return folder


def epoch_times(folder: Path) -> List[float]:
    """Seconds of every epoch, from nnU-Net's training logs in the fold folder."""
    times = []
    for log in sorted(folder.glob("training_log_*.txt")):
        times += [float(t) for t in re.findall(r"Epoch time: ([0-9.]+) s", log.read_text())]
    return times


def predict(workspace: Workspace, dataset_id: int, trainer: str, configuration: str, folds: Sequence[int],
            device: str) -> Path:
    """``nnUNetv2_predict`` of the data set's imagesTs with the trained folds; returns the output folder."""
    output = workspace.root / "predictions" / workspace.folder_name(dataset_id) / trainer
    if (output / "dataset.json").is_file():
        return output
    run_logged([console_script("nnUNetv2_predict"), "-i", str(workspace.dataset_folder(dataset_id) / "imagesTs"),
                "-o", str(output), "-d", str(dataset_id), "-c", configuration, "-tr", trainer,
                "-f", *map(str, folds), "-device", device, "-npp", "1", "-nps", "1"],
               workspace.env, workspace.logs / f"predict_{trainer}.log")
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
    overlays = ["--images", str(images)] if images else []
    subprocess.run([console_script("nnunetv2_grcsf"), "evaluate", "-ref", str(labels), "-pred", str(predictions),
                    "-o", str(output), "--chill", "--overwrite", "-q", *overlays], env=workspace.env, check=True)
    return json.loads(output.read_text())


def error_row(cells: list, error: str, columns: int) -> str:
    """A Markdown table row for a trainer that failed: its leading ``cells``, the error (shortened, without the
    table's ``|``), then empty cells up to ``columns``."""
    cells = [*cells, "error: " + error[:150].replace("|", "/")]
    return "| " + " | ".join(cells + [""] * (columns - len(cells))) + " |"


def finished_trainers(workspace: Workspace, results_file: Path, run_settings: dict) -> dict:
    """``{trainer: result}`` already in the results JSON. Results made under other settings (budget, batch, fold,
    ...: the keys of ``run_settings``) are never mixed into one table: that is an error naming both."""
    with locked(workspace.root / ".results.lock"):
        report = json.loads(results_file.read_text()) if results_file.is_file() else {"trainers": {}}
    recorded = report.get("settings", {})
    differing = {k: (recorded[k], v) for k, v in run_settings.items() if k in recorded and recorded[k] != v}
    if differing:
        raise SystemExit(f"{results_file} holds results made with other settings ("
                         + ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differing.items())
                         + "). Pass --output NEW_PATH for this run, or move that file away to start over.")
    return report["trainers"]


def record_result(workspace: Workspace, results_file: Path, settings: dict, trainer: str, result: dict) -> None:
    """Merge one trainer's result (and the run's settings) into the results JSON, under the workspace's lock."""
    with locked(workspace.root / ".results.lock"):
        report = json.loads(results_file.read_text()) if results_file.is_file() else {"trainers": {}}
        report["settings"] = settings
        report["trainers"][trainer] = result
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(report, indent=1))
