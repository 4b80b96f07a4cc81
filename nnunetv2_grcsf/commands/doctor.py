"""``nnunetv2_grcsf doctor``: is this environment ready to train and predict with our trainers?

Checks, in order: versions, the compute device, the torch/torchvision pairing (a mismatch breaks
every nnU-Net trainer lookup), nnU-Net's three path variables (and unfinished build folders that
killed runs left in ``nnUNet_raw``), the start-up hook and ``nnUNet_extTrainer`` (every module in the
user's own trainer directories must import, since nnU-Net imports them all), and then looks every
trainer up exactly as ``nnUNetv2_train`` does (failures of one cause are printed once). With ``-d``,
also the data set: its residual channels and, for a data set made by ``residuals``, that the MAE
checkpoint is still the one recorded (SHA-256), whether that MAE saw test images and left labelled patches
out of its loss, that every residual file lies on its image's grid and the images still equal the source's
(:mod:`nnunetv2_grcsf.mae.geometry`).
Each failed check prints what to do; warnings do not count as failures. Exit code 0 when everything is
ready, 1 otherwise.
"""

import contextlib
import importlib
import io
import os
import pkgutil
import site
import sys
from importlib import metadata
from pathlib import Path

from nnunetv2_grcsf import discovery
from nnunetv2_grcsf.datasets import NNUNET_PATH_VARIABLES, find_raw_dataset, load_dataset_json
from nnunetv2_grcsf.errors import UserFacingError
from nnunetv2_grcsf.interruption import stale_incomplete_folders

PACKAGES = ("nnunetv2-grcsf", "nnunetv2", "torch", "torchvision", "dynamic-network-architectures",
            "batchgenerators", "SimpleITK")


class Report:
    """Collects OK / FAIL / WARN lines; ``failures`` counts the problems found, ``warnings`` the rest."""

    def __init__(self):
        self.failures = 0
        self.warnings = 0

    def ok(self, what: str, detail: str = "") -> None:
        print(f"  [ok]   {what}" + (f": {detail}" if detail else ""))

    def fail(self, what: str, fix: str) -> None:
        self.failures += 1
        print(f"  [FAIL] {what}\n         fix: {fix}")

    def warn(self, what: str, fix: str) -> None:
        self.warnings += 1
        print(f"  [WARN] {what}\n         fix: {fix}")

    def info(self, what: str, detail: str) -> None:
        print(f"  [info] {what}: {detail}")


def _check_versions(report: Report) -> None:
    print("versions")
    report.info("python", sys.version.split()[0])
    for package in PACKAGES:
        try:
            report.ok(package, metadata.version(package))
        except metadata.PackageNotFoundError:
            report.fail(f"{package} is not installed", f"pip install {package} (or reinstall nnunetv2-grcsf)")


def _check_torch(report: Report) -> None:
    print("device")
    import torch

    if torch.cuda.is_available():
        report.ok("CUDA", f"{torch.cuda.get_device_name(0)} (train and predict with -device cuda)")
    else:
        report.info("CUDA", "not available: use -device cpu (training on a CPU is for small runs)")
    try:
        import torchvision  # noqa: F401  (nnU-Net's trainer lookup imports it through timm)

        torch.ops.torchvision.nms  # raises if torchvision's compiled ops do not match this torch
        report.ok("torch/torchvision pairing", f"torch {torch.__version__}, torchvision {torchvision.__version__}")
    except (ImportError, RuntimeError, AttributeError) as error:
        report.fail(f"torchvision does not work with this torch ({error})",
                    "install a matching pair from the same index, e.g. `pip install --force-reinstall torch "
                    "torchvision`; nnU-Net's trainer lookup imports torchvision and fails for every trainer")


def _check_paths(report: Report) -> None:
    print("nnU-Net paths")
    for variable in NNUNET_PATH_VARIABLES:
        value = os.environ.get(variable)
        if not value:
            report.fail(f"{variable} is not set", f"export {variable}=/path/to/{variable}  "
                                                  "(see nnU-Net's documentation/setting_up_paths.md)")
        elif not Path(value).is_dir():
            report.fail(f"{variable}={value} does not exist", f"mkdir -p {value}  (or point {variable} elsewhere)")
        else:
            report.ok(variable, value)
    raw = os.environ.get("nnUNet_raw")
    stale = stale_incomplete_folders(raw) if raw else []
    if stale:
        report.warn(f"{len(stale)} unfinished data set folder(s) in nnUNet_raw, left by killed runs: "
                    f"{', '.join(p.name for p in stale)}", f"delete them: rm -r {' '.join(str(p) for p in stale)}")


def _installed_hook_files() -> list:
    folders = site.getsitepackages() + [site.getusersitepackages()]
    return [Path(f) / discovery.HOOK_FILE_NAME for f in folders if (Path(f) / discovery.HOOK_FILE_NAME).is_file()]


def _check_discovery(report: Report) -> None:
    print("trainer discovery")
    hooks = _installed_hook_files()
    if hooks:
        report.ok("start-up hook", str(hooks[0]))
    else:
        report.info("start-up hook", f"{discovery.HOOK_FILE_NAME} not found in site-packages")
    opted_out = os.environ.get(discovery.OPT_OUT_VARIABLE)
    if opted_out:
        report.info("automatic registration", f"switched off by {discovery.OPT_OUT_VARIABLE}={opted_out}")
    value = os.environ.get(discovery.EXT_TRAINER_VARIABLE, "")
    export = (f"export {discovery.EXT_TRAINER_VARIABLE}="
              f"{os.pathsep.join([*discovery.ext_trainer_directories(), discovery.shim_directory()])}")
    if discovery.is_registered():
        report.ok(discovery.EXT_TRAINER_VARIABLE, value)
    elif opted_out:
        report.fail(f"{discovery.EXT_TRAINER_VARIABLE} does not list our shim directory (it is {value!r}), and "
                    f"{discovery.OPT_OUT_VARIABLE} keeps the start-up hook from adding it",
                    f"{export}  (or unset {discovery.OPT_OUT_VARIABLE})")
    else:
        report.fail(f"{discovery.EXT_TRAINER_VARIABLE} does not list our shim directory (it is {value!r})",
                    f"{export}  (or reinstall with `pip install nnunetv2-grcsf`, which installs the start-up hook)"
                    if not hooks else export)
    shim = os.path.realpath(discovery.shim_directory())
    for directory in discovery.ext_trainer_directories():
        if os.path.realpath(directory) == shim:
            continue
        if not os.path.isdir(directory):
            report.warn(f"{discovery.EXT_TRAINER_VARIABLE} lists {directory}, which does not exist",
                        f"remove it from {discovery.EXT_TRAINER_VARIABLE} or create it")
            continue
        for module_file, error in _unimportable_modules(directory):
            report.fail(f"{module_file} in your trainer directory ({discovery.EXT_TRAINER_VARIABLE}) cannot be "
                        f"imported: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                        f"fix or remove that file: nnU-Net imports every module there whenever it looks up a trainer "
                        f"outside its own tree, so this error stops the lookup of every such trainer, ours included")


def _unimportable_modules(directory: str) -> list:
    """``[(file, exception)]``: modules of a ``nnUNet_extTrainer`` directory that fail to import when nnU-Net's
    trainer lookup imports them (same module names, ``sys.path`` and clean-up as
    ``nnunetv2.utilities.find_class_by_name.recursive_find_python_class``)."""
    from nnunetv2.utilities.find_class_by_name import (temporarily_cleanup_imports_from_path,
                                                       temporarily_extend_syspath)

    broken = []

    def walk(folder, prefix):
        for _, name, is_package in pkgutil.iter_modules([folder]):
            module = prefix + name
            if is_package:
                walk(os.path.join(folder, name), module + ".")
                continue
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    importlib.import_module(module)
            except ModuleNotFoundError as error:
                if error.name != module:  # nnU-Net skips a module that cannot be found as itself, as we do
                    broken.append((os.path.join(folder, name + ".py"), error))
            except Exception as error:  # whatever the user's module raises stops nnU-Net's lookup
                broken.append((getattr(error, "filename", None) or os.path.join(folder, name + ".py"), error))

    with temporarily_extend_syspath(directory), temporarily_cleanup_imports_from_path(directory):
        walk(directory, "")
    return broken


def _check_trainers(report: Report) -> None:
    print("trainers, looked up as nnUNetv2_train does")
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunetv2_grcsf.trainers import __all__ as trainer_names

    found, failures = [], {}  # failures: {reason: [trainer names]}, so that one cause is printed once
    for name in trainer_names:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                trainer = recursive_find_trainer_class_by_name(name)
        except Exception as error:  # report every kind of lookup failure; that is this check's purpose
            first_line = str(error).splitlines()[0] if str(error) else ""
            reason = f"{type(error).__name__}: {first_line.replace(name, '<trainer>')[:160]}"
            failures.setdefault(reason, []).append(name)
            continue
        if trainer.__module__.startswith("nnunetv2_grcsf"):
            found.append(name)
        else:
            report.fail(f"{name} resolves to {trainer.__module__}.{trainer.__name__}, not ours",
                        "a trainer of the same name earlier in nnUNet_extTrainer wins; rename or remove it")
    for reason, names in failures.items():
        listed = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        report.fail(f"{len(names)} of {len(trainer_names)} trainers not found ({listed}): {reason}",
                    "fix the problems above (paths, torchvision, nnUNet_extTrainer), then run doctor again")
    if found:
        report.ok(f"{len(found)} of {len(trainer_names)} trainers found", ", ".join(found[:6]) + ", ...")


def _check_dataset(report: Report, dataset: str) -> None:
    print(f"data set {dataset}")
    from nnunetv2_grcsf.residual_channels import DATASET_JSON_KEY, ResidualChannelError, residual_channels_of_dataset

    folder = find_raw_dataset(dataset)
    dataset_json = load_dataset_json(folder)
    report.ok("raw data set", str(folder))
    report.info("channels", str(dataset_json.get("channel_names")))
    try:
        channels = residual_channels_of_dataset(dataset_json, folder.name)
    except ResidualChannelError as error:
        if DATASET_JSON_KEY in dataset_json:
            from nnunetv2_grcsf.mae.geometry import rerun_command

            report.fail(f"MAE residual channels: {error}",
                        f"recreate the data set from its source: {rerun_command(dataset_json, folder.name)}")
        else:
            report.info("MAE residual channels", "none: use FIASTrainer or GRCSFTrainer_noRCU, or make a data set "
                                                 f"with them: nnunetv2_grcsf mae-train -d {dataset} && "
                                                 f"nnunetv2_grcsf residuals -d {dataset} -o NEW_ID")
        return
    report.ok("MAE residual channels", f"{channels}: GRCSFTrainer and GRCSF_FIASTrainer can train on it")
    reconstruction = dataset_json[DATASET_JSON_KEY].get("residual_definition", {}).get("reconstruction", "mae")
    if reconstruction != "mae":
        report.info("residual", f"a control: |image - {reconstruction} of the masked patches| (`residuals "
                                f"--reconstruction {reconstruction}`), not the MAE's residual; for comparisons with "
                                f"it, not for GRCSF's results")
    _check_residual_mae(report, folder, dataset_json)
    _check_residual_geometry(report, folder, dataset_json)


def _check_residual_mae(report: Report, folder: Path, dataset_json: dict) -> None:
    """The recorded MAE checkpoint: still there, still the one that made the residuals, trained without test images,
    its loss outside the labelled patches."""
    from nnunetv2_grcsf.mae.residuals import MAE_SHA256_KEY, recorded_mae_problem, test_images_warning
    from nnunetv2_grcsf.mae.train import TrainConfig, load_checkpoint
    from nnunetv2_grcsf.residual_channels import DATASET_JSON_KEY

    recorded = dataset_json[DATASET_JSON_KEY]
    checkpoint = recorded.get("mae_checkpoint")
    if not checkpoint or not Path(checkpoint).is_file():
        report.warn(f"the MAE checkpoint recorded in dataset.json, {checkpoint}, does not exist: `nnunetv2_grcsf "
                    f"residuals -i IN -o OUT --from-dataset {folder.name}` cannot make prediction inputs",
                    f"copy that checkpoint there (SHA-256 {recorded.get(MAE_SHA256_KEY, 'not recorded')}), or pass the "
                    f"copy with -m (its hash is checked)")
        return
    try:
        problem, fix, note = recorded_mae_problem(dataset_json, folder.name, checkpoint)
        mae = load_checkpoint(checkpoint)
        _, test_warning, test_fix = test_images_warning(mae, checkpoint, recorded.get("source_dataset", "SOURCE"))
    except UserFacingError as error:
        report.fail(f"MAE checkpoint {checkpoint} cannot be checked: {error}",
                    "put the checkpoint the data set was made with back in its place")
        return
    if problem:  # then which images the MAE that made the residuals saw is unknown
        report.fail(problem, fix)
        return
    if note:
        report.info("MAE checkpoint", f"{checkpoint}; {note}")
    else:
        report.ok("MAE checkpoint", f"{checkpoint} is the one the residuals were made with (SHA-256)")
    if test_warning:
        report.warn(test_warning, f"{test_fix}, and retrain the models on {folder.name}")
    else:
        report.ok("MAE training images", "imagesTr only (it never saw the test images)")
    if TrainConfig.from_dict(mae["train_config"]).skip_labelled_patches:
        report.ok("MAE loss", "outside the labelled patches of its training images (it modelled normal tissue)")
    else:
        source = recorded.get("source_dataset", "SOURCE")
        report.info("MAE loss", f"on every patch, labelled lesions included (an MAE of an earlier version, or "
                                f"--no-skip-labelled-patches); mae-train's default leaves labelled patches out, so that "
                                f"lesions stand out more in the residual: `nnunetv2_grcsf mae-train -d {source} "
                                f"--overwrite`, then remake the residuals (residuals ... --overwrite) and retrain the "
                                f"models on {folder.name}")


def _check_residual_geometry(report: Report, folder: Path, dataset_json: dict) -> None:
    """Residual files on their images' grid, images equal to the source's (nnunetv2_grcsf.mae.geometry)."""
    from nnunetv2_grcsf.mae.geometry import describe_problems, rerun_command, source_folder, verify_residual_dataset
    from nnunetv2_grcsf.residual_channels import DATASET_JSON_KEY

    source = source_folder(dataset_json)
    if source is None:
        recorded = dataset_json[DATASET_JSON_KEY].get("source_dataset")
        report.info("source data set", f"{recorded} is not in nnUNet_raw: residual channels are compared with "
                                       f"their own images only")
    fix = (f"recreate the data set from its source (which may have changed since): "
           f"{rerun_command(dataset_json, folder.name)}")
    try:
        problems = verify_residual_dataset(folder.name)
    except UserFacingError as error:
        report.fail(f"residual channel geometry cannot be checked: {error}", fix)
        return
    if problems:
        listed = describe_problems(problems, " " * 9)
        report.fail(f"residual channel geometry: {len(problems)} problem(s)\n{listed}", fix)
    else:
        compared = f"their images and the source {source.name}" if source else "their images"
        report.ok("residual channel geometry", f"every case's channels match {compared}")


def add_parser(subparsers):
    parser = subparsers.add_parser("doctor", help="check that nnU-Net finds our trainers and what to fix if not",
                                   description=__doc__)
    parser.add_argument("-d", "--dataset", help="also check this raw data set (id or DatasetXXX_Name)")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    report = Report()
    _check_versions(report)
    _check_torch(report)
    _check_paths(report)
    _check_discovery(report)
    _check_trainers(report)
    if args.dataset:
        _check_dataset(report, args.dataset)
    warned = f" ({report.warnings} warning(s) above)" if report.warnings else ""
    print(f"ready{warned}." if not report.failures else f"{report.failures} problem(s) found: see the fixes above.")
    return 0 if not report.failures else 1
