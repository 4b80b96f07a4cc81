"""Finding nnU-Net raw data sets by id or name, with errors that say where we looked."""

import json
import os
from pathlib import Path

from nnunetv2_grcsf.errors import UserFacingError

NNUNET_PATH_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


class DatasetNotFoundError(UserFacingError, FileNotFoundError):
    """No such data set in nnUNet_raw, or a data set folder without dataset.json."""


def nnunet_folder(variable: str) -> Path:
    """The folder an nnU-Net path variable points to; a clear error if it is unset."""
    value = os.environ.get(variable)
    if not value:
        raise UserFacingError(f"{variable} is not set. Set it to the folder nnU-Net should use, e.g. "
                              f"`export {variable}=/data/{variable}` (see nnU-Net's documentation/setting_up_paths.md)")
    return Path(value)


def find_raw_dataset(dataset: str) -> Path:
    """The folder of a raw data set given as id (``500``) or name (``Dataset500_X``); checks dataset.json."""
    raw = nnunet_folder("nnUNet_raw")
    text = str(dataset).strip()
    if text.isdigit():
        prefix = f"Dataset{int(text):03d}_"
        matches = sorted(p for p in raw.glob(f"{prefix}*") if p.is_dir()) if raw.is_dir() else []
        if not matches:
            raise DatasetNotFoundError(f"no data set with id {int(text)} (a folder named {prefix}*) in nnUNet_raw={raw}")
        if len(matches) > 1:
            raise DatasetNotFoundError(f"several data sets with id {int(text)} in nnUNet_raw={raw}: "
                                       f"{[m.name for m in matches]}; give the full name")
        folder = matches[0]
    else:
        folder = raw / text
        if not folder.is_dir():
            raise DatasetNotFoundError(f"no data set named {text} in nnUNet_raw={raw}")
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
