"""Does a data set made by ``nnunetv2_grcsf residuals`` still fit together? (``nnunetv2_grcsf doctor -d``)

A residual channel means something only on the grid of the image it was computed from.
``residuals`` writes it with the image's own geometry, but files change afterwards: a source case
re-exported or resampled, a residual file copied in from another run, a data set assembled by hand.
nnU-Net would then train on misaligned channels, or fail deep in preprocessing on a shape mismatch.
:func:`verify_residual_dataset` checks, for every case of ``imagesTr`` and ``imagesTs`` of a data set
whose dataset.json has the ``nnunetv2_grcsf`` key:

1. every channel file ``_0000`` .. ``_{N-1}`` is there (``N`` channels in ``channel_names``);
2. every channel file, residual or image, has the geometry of the case's ``_0000`` file;
3. when the source data set named in ``nnunetv2_grcsf.source_dataset`` is in ``$nnUNet_raw``: every
   image channel file has the geometry of the source's file of the same name, and both data sets hold
   the same cases (a case missing on either side is a problem too).

Geometry: for formats SimpleITK reads (``SITK_HEADER_ENDINGS``: NIfTI, NRRD, MetaImage, GIPL) the
header only (``ImageFileReader.ReadImageInformation``: size, spacing, origin, direction; fast, no
voxel data), spacing / origin / direction compared with a relative tolerance of 1e-4 (``|a - b| <=
1e-4 * max(|a|, |b|, 1)``, so absolute 1e-4 for values below 1: origins near 0, direction cosines).
For other formats (PNG, BMP, TIFF: nnU-Net's 2D readers, which know no real geometry) the array shape
returned by nnU-Net's reader.

The fix for every problem is to recreate the data set from its (possibly changed) source with the
recorded checkpoint and settings: :func:`rerun_command`.
"""

import shlex
from dataclasses import dataclass

from nnunetv2_grcsf.datasets import nnunet_folder
from nnunetv2_grcsf.mae import MAEGeometryError, MAEImageReadError
from nnunetv2_grcsf.mae import data as mdata
from nnunetv2_grcsf.residual_channels import DATASET_JSON_KEY

SITK_HEADER_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".gipl", ".gipl.gz")
RELATIVE_TOLERANCE = 1e-4
#: Problems listed in one message (the rest are counted).
MAX_LISTED_PROBLEMS = 5


def _numbers(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _close(a, b) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= RELATIVE_TOLERANCE * max(abs(x), abs(y), 1.0) for x, y in zip(a, b))


@dataclass(frozen=True)
class Geometry:
    """The grid of one image file: ``size`` (SimpleITK's x, y, z order, or nnU-Net's array shape without the
    channel axis for formats read by nnU-Net's reader); ``spacing``, ``origin``, ``direction`` where the
    header holds them, else None."""

    size: tuple
    spacing: tuple = None
    origin: tuple = None
    direction: tuple = None

    def differences(self, other: "Geometry") -> list:
        """``["spacing (1, 1, 3) vs (3, 3, 3)", ...]``: the fields in which ``other`` differs from this one."""
        found = []
        if tuple(self.size) != tuple(other.size):
            found.append(f"size {_numbers(self.size)} vs {_numbers(other.size)}")
        for field in ("spacing", "origin", "direction"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine is not None and theirs is not None and not _close(mine, theirs):
                found.append(f"{field} {_numbers(mine)} vs {_numbers(theirs)}")
        return found


class GeometryReader:
    """Reads :class:`Geometry` of a data set's files the fast way their format allows (see the module docstring)."""

    def __init__(self, dataset_json: dict, example_file):
        self.file_ending = dataset_json["file_ending"]
        self.header_only = self.file_ending.lower() in SITK_HEADER_ENDINGS
        self.reader = None if self.header_only else mdata.reader_for(dataset_json, example_file=example_file)

    def __call__(self, path) -> Geometry:
        """The geometry of one file; :class:`~nnunetv2_grcsf.mae.MAEImageReadError` if it cannot be read."""
        if not self.header_only:
            image, _ = mdata.read_case(self.reader, [path])
            return Geometry(tuple(image.shape[1:]))
        import SimpleITK as sitk

        header = sitk.ImageFileReader()
        header.SetFileName(str(path))
        try:
            header.ReadImageInformation()
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[-1]
            raise MAEImageReadError(f"cannot read the header of {path}: {reason}") from error
        return Geometry(tuple(header.GetSize()), tuple(header.GetSpacing()), tuple(header.GetOrigin()),
                        tuple(header.GetDirection()))


def source_folder(dataset_json: dict):
    """The folder of the source data set recorded by ``residuals`` if it is in ``$nnUNet_raw``, else None."""
    name = dataset_json.get(DATASET_JSON_KEY, {}).get("source_dataset")
    if not name:
        return None
    folder = nnunet_folder("nnUNet_raw") / name
    return folder if (folder / "dataset.json").is_file() else None


def _check_case(split: str, case: str, files: list, num_channels: int, residual_channels: set, read: GeometryReader,
                source_split) -> list:
    """Problems of one case of ``split`` (imagesTr / imagesTs) given its channel files in channel order.

    ``source_split``: the source's folder of the same split when it holds this case, else None.
    """
    label = f"{split}/{case}"
    by_index = {int(f.name[len(case) + 1:len(case) + 5]): f for f in files}
    missing = [f"{case}_{i:04d}{read.file_ending}" for i in range(num_channels) if i not in by_index]
    problems = [f"{label}: channel file(s) {', '.join(missing)} missing"] if missing else []
    if 0 not in by_index:
        return problems
    try:
        geometries = {i: read(f) for i, f in sorted(by_index.items())}
    except MAEImageReadError as error:
        return problems + [f"{label}: {error}"]
    reference = geometries[0]
    for i, geometry in geometries.items():
        differences = reference.differences(geometry)
        if differences:
            kind = "residual" if i in residual_channels else "image"
            problems.append(f"{label}: {by_index[i].name} ({kind} channel) is not on the grid of {by_index[0].name}: "
                            f"{'; '.join(differences)}")
    if source_split is None:
        return problems
    for i, f in sorted(by_index.items()):
        if i in residual_channels:
            continue
        original = source_split / f.name
        if not original.is_file():
            problems.append(f"{label}: {f.name} is missing in the source ({original})")
            continue
        try:
            differences = read(original).differences(geometries[i])
        except MAEImageReadError as error:
            problems.append(f"{label}: {error}")
            continue
        if differences:
            problems.append(f"{label}: {f.name} differs from the source's {original}: {'; '.join(differences)} "
                            f"(source vs this data set)")
    return problems


def verify_residual_dataset(dataset) -> list:
    """Problems (one line each, naming ``split/case``) of raw data set ``dataset`` (id or name); empty if none.

    Only data sets made by ``nnunetv2_grcsf residuals`` (dataset.json key ``nnunetv2_grcsf``) are checked;
    for any other data set the list is empty. See the module docstring for the checks.
    """
    name, folder = mdata.resolve_raw_dataset(dataset)
    dataset_json = mdata.load_dataset_json(folder)
    recorded = dataset_json.get(DATASET_JSON_KEY)
    if not recorded:
        return []
    ending = dataset_json["file_ending"]
    num_channels = len(mdata.channel_names_of(dataset_json))
    residual_channels = {int(i) for i in recorded.get("residual_channels", [])}
    source = source_folder(dataset_json)
    splits = {sub: mdata.list_cases(folder / sub, ending) for sub in ("imagesTr", "imagesTs")}
    first = next((files[0] for cases in splits.values() for files in cases.values()), None)
    if first is None:
        return [f"{name}: no images (CASE_XXXX{ending}) in imagesTr or imagesTs"]
    read = GeometryReader(dataset_json, first)
    problems = []
    for sub, cases in splits.items():
        source_cases = None if source is None else mdata.list_cases(source / sub, ending)
        for case, files in cases.items():
            in_source = source_cases is not None and case in source_cases
            problems += _check_case(sub, case, files, num_channels, residual_channels, read,
                                    source / sub if in_source else None)
            if source_cases is not None and not in_source:
                problems.append(f"{sub}/{case}: not in the source {source.name}")
        if source_cases is not None:
            problems += [f"{sub}/{case}: in the source {source.name} but missing here" for case in source_cases
                         if case not in cases]
    return problems


def rerun_command(dataset_json: dict, dataset_name: str) -> str:
    """The command line that recreates data set ``dataset_name`` from its source with the recorded MAE and settings."""
    recorded = dataset_json.get(DATASET_JSON_KEY, {})
    definition = recorded.get("residual_definition", {})
    parts = ["nnunetv2_grcsf", "residuals", "-d", recorded.get("source_dataset", "SOURCE"), "-o", dataset_name]
    if recorded.get("mae_checkpoint"):
        parts += ["-m", recorded["mae_checkpoint"]]
    if recorded.get("mask_ratios"):
        parts += ["--mask-ratios", *(f"{r:g}" for r in recorded["mask_ratios"])]
    for option, key in (("--smoothing", "smoothing_sigma"), ("--repeats", "repeats"), ("--seed", "seed")):
        if key in definition:
            parts += [option, f"{definition[key]:g}"]
    if definition.get("reconstruction", "mae") != "mae":
        parts += ["--reconstruction", definition["reconstruction"]]
    return shlex.join(parts + ["--overwrite"])


def describe_problems(problems: list, indent: str = "  ") -> str:
    """The first ``MAX_LISTED_PROBLEMS`` problems, one per ``indent``-ed line, and how many more there are."""
    lines = [f"{indent}{p}" for p in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(f"{indent}... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    return "\n".join(lines)


def check_residual_dataset(dataset) -> None:
    """Raise :class:`~nnunetv2_grcsf.mae.MAEGeometryError` (first problems and the fix) if
    :func:`verify_residual_dataset` finds any."""
    problems = verify_residual_dataset(dataset)
    if problems:
        name, folder = mdata.resolve_raw_dataset(dataset)
        raise MAEGeometryError(f"{name}: {len(problems)} problem(s) with its residual channels' geometry:\n"
                               f"{describe_problems(problems)}\nRecreate it from its source (which may have changed "
                               f"since): {rerun_command(mdata.load_dataset_json(folder), name)}")
