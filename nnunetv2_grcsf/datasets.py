"""Finding nnU-Net raw data sets by id or name, with errors that say where we looked."""

import json
import os
from pathlib import Path

from nnunetv2_grcsf.errors import UserFacingError

NNUNET_PATH_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


class DatasetNotFoundError(UserFacingError, FileNotFoundError):
    """No such data set in nnUNet_raw, or a data set folder without dataset.json."""


def nnunet_folder(variable: str) -> Path:
    """The existing folder an nnU-Net path variable points to; a clear error if it is unset or missing."""
    value = os.environ.get(variable)
    if not value:
        raise UserFacingError(f"{variable} is not set. Set it to the folder nnU-Net should use, e.g. "
                              f"`export {variable}=/data/{variable}` (see nnU-Net's documentation/setting_up_paths.md)")
    if not os.path.isdir(value):
        raise UserFacingError(f"{variable}={value} is not a folder. Create it or point {variable} to your "
                              f"nnU-Net folder.")
    return Path(value)


def dataset_name(dataset) -> str:
    """The ``DatasetXXX_Name`` of a data set given as id (``500``) or name, resolved as nnU-Net resolves it
    (``maybe_convert_to_dataset_name``: raw, preprocessed and results folders); errors say where it looked."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    raw = os.environ.get("nnUNet_raw", "$nnUNet_raw (unset)")
    text = str(dataset).strip()
    try:
        name = str(maybe_convert_to_dataset_name(int(text) if text.isdigit() else text))  # nnU-Net returns np.str_
    except (RuntimeError, ValueError) as error:
        first_line = str(error).splitlines()[0]
        if "More than one" in first_line:
            raise DatasetNotFoundError(
                f"data set id {text} is ambiguous: several DatasetXXX_ names use it across nnUNet_raw={raw}, "
                f"nnUNet_preprocessed and nnUNet_results; give the full name (Dataset{int(text):03d}_Name) or "
                f"remove the stale folder.") from error
        raise DatasetNotFoundError(
            f"data set {text!r} not found: no folder Dataset{int(text):03d}_* in nnUNet_raw={raw} (nor in "
            f"nnUNet_preprocessed / nnUNet_results). Check the id with `ls {raw}`. (nnU-Net: {first_line})"
            if text.isdigit() else
            f"data set {text!r} is neither an id nor a DatasetXXX_Name name (searched nnUNet_raw={raw}). "
            f"(nnU-Net: {first_line})") from error
    return name


def find_raw_dataset(dataset) -> Path:
    """The folder of a raw data set given as id (``500``) or name (``Dataset500_X``); checks dataset.json.

    Ids are resolved by :func:`dataset_name`, then the data set must be in ``$nnUNet_raw``.
    """
    raw = nnunet_folder("nnUNet_raw")
    text = str(dataset).strip()
    name = dataset_name(text)
    folder = raw / name
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"data set {text!r} resolves to {name}, but there is no folder {folder} in nnUNet_raw={raw} (nnU-Net "
            f"knows the name from nnUNet_preprocessed or nnUNet_results only): put the raw data set there.")
    if not (folder / "dataset.json").is_file():
        raise DatasetNotFoundError(f"{folder} has no dataset.json: it is not an nnU-Net raw data set "
                                   f"(see nnU-Net's documentation/dataset_format.md)")
    return folder


def load_dataset_json(folder: Path) -> dict:
    """The parsed dataset.json of a raw data set folder."""
    try:
        return json.loads((Path(folder) / "dataset.json").read_text())
    except json.JSONDecodeError as error:
        raise UserFacingError(f"{Path(folder) / 'dataset.json'} is not valid JSON: {error}") from error
