"""The MAE that made a model's residual channel(s), stored inside the model so that it travels with it.

A model trained on a data set made by ``nnunetv2_grcsf residuals -d`` only works on inputs whose
residual channel(s) were made by the same MAE checkpoint with the same settings. The residual data
set's ``dataset.json`` names that checkpoint by an absolute path on the training machine, which a
model shared with ``nnUNetv2_export_model_to_zip`` does not carry.

Where it is stored (our design): as one extra key, :data:`CHECKPOINT_KEY`, in every
``checkpoint_*.pth`` that a residual-channel trainer writes (:meth:`PluginTrainer.save_checkpoint
<nnunetv2_grcsf.trainers.base.PluginTrainer.save_checkpoint>`). nnU-Net's export zips, per fold,
only ``debug.json``, the chosen checkpoints, ``progress.png``, ``network_architecture.pdf`` and
``validation/summary.json``, and per configuration ``plans.json``, ``dataset.json`` and
``dataset_fingerprint.json``; the install unzips exactly these. The checkpoints are the only ones
meant for binary data (every nnU-Net tool reads the JSON files), and nnU-Net's predictor reads only
the checkpoint keys it knows. The entry::

    "nnunetv2_grcsf_mae": {
        "format": "nnunetv2_grcsf.model_mae", "format_version": 1,
        "checkpoint_bytes": b"...",           # the MAE checkpoint file, byte for byte
        "sha256": "…",                        # sha256 of those bytes (hex)
        "settings": {"mask_ratios": [0.75], "smoothing_sigma": 2.0, "repeats": 1, "seed": 0},
        "residual_channels": [1], "scale": 4.2, "source_dataset": "Dataset500_X",
        "file_name": "checkpoint_final.pth"   # the file's name on the training machine, for messages
    }

The bytes are stored rather than a re-saved state dict so that the hash is the one
``residuals -d`` records in the residual data set's ``dataset.json`` (``mae_sha256``): the model,
the data set and the file can be compared directly. At training start the checkpoint named in
``dataset.json`` is read and checked against that hash (or, for data sets made before hashes were
recorded, against the recorded residual scale; :func:`~nnunetv2_grcsf.mae.residuals.recorded_mae_problem`).
At prediction the stored bytes are checked against the stored hash, so an altered model file is refused.
"""

import hashlib
import os
from pathlib import Path

from nnunetv2_grcsf.errors import UserFacingError
from nnunetv2_grcsf.residual_channels import DATASET_JSON_KEY

CHECKPOINT_KEY = "nnunetv2_grcsf_mae"
FORMAT = "nnunetv2_grcsf.model_mae"
FORMAT_VERSION = 1


class ModelMAEError(UserFacingError, RuntimeError):
    """A residual data set whose MAE checkpoint is missing or changed, or a model whose stored MAE is."""


def sha256_of_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def entry_settings(entry: dict):
    """The :class:`~nnunetv2_grcsf.mae.residuals.ResidualSettings` of a stored MAE entry."""
    from nnunetv2_grcsf.mae.residuals import ResidualSettings

    return ResidualSettings(**entry["settings"])


def mae_entry_for_dataset(dataset_json: dict, dataset_name: str):
    """The entry to store in the model for a residual data set's ``dataset.json``; None if it names no MAE.

    Reads the recorded MAE checkpoint and checks it against the recorded hash (or, for older data sets,
    residual scale) with ``residuals``' own check; :class:`ModelMAEError` naming what to run when the file
    is missing or is another MAE.
    """
    block = dataset_json.get(DATASET_JSON_KEY, {})
    if not block.get("mae_checkpoint"):
        return None
    from nnunetv2_grcsf.mae.residuals import recorded_mae_problem, settings_from_block
    from nnunetv2_grcsf.mae.train import load_checkpoint

    path = Path(block["mae_checkpoint"])
    if not path.is_file():
        raise ModelMAEError(f"the MAE checkpoint {path} that {dataset_name} was made with (dataset.json "
                            f"'{DATASET_JSON_KEY}.mae_checkpoint') does not exist, so the model could not carry its "
                            f"MAE: put that file back, or remake the residual data set with an MAE that exists "
                            f"(`nnunetv2_grcsf residuals -d {block.get('source_dataset', 'SRC')} -o {dataset_name} "
                            f"--overwrite`, then nnUNetv2_plan_and_preprocess) before training")
    data = path.read_bytes()
    problem, fix, _ = recorded_mae_problem(dataset_json, dataset_name, path)
    if problem:
        raise ModelMAEError(f"{problem}. Fix: {fix}")
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "checkpoint_bytes": data,
            "sha256": sha256_of_bytes(data), "settings": settings_from_block(block).to_dict(),
            "residual_channels": list(block.get("residual_channels", [])),
            "scale": load_checkpoint(path).get("residual_scale"), "source_dataset": block.get("source_dataset"),
            "file_name": path.name}


def add_to_checkpoint(checkpoint_file, entry: dict) -> None:
    """Add ``entry`` under :data:`CHECKPOINT_KEY` to an nnU-Net checkpoint file (rewritten atomically)."""
    import torch

    checkpoint_file = Path(checkpoint_file)
    checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
    checkpoint[CHECKPOINT_KEY] = entry
    partial = checkpoint_file.with_name(checkpoint_file.name + ".partial")
    try:
        torch.save(checkpoint, partial)
        os.replace(partial, checkpoint_file)
    finally:
        partial.unlink(missing_ok=True)


def mae_entry_of_model(model_folder, folds, checkpoint_name: str):
    """The MAE entry stored in the checkpoints of ``folds`` of a model folder; None if none has one.

    :class:`ModelMAEError` if the stored bytes no longer match their hash (an altered file), if the
    folds carry different MAEs, or if only some carry one.
    """
    import torch

    entries = {}
    for fold in folds:
        checkpoint_file = Path(model_folder) / f"fold_{fold}" / checkpoint_name
        entry = torch.load(checkpoint_file, map_location="cpu", weights_only=False, mmap=True).get(CHECKPOINT_KEY)
        if entry is not None:
            data = entry.get("checkpoint_bytes", b"")
            if entry.get("format") != FORMAT or sha256_of_bytes(data) != entry.get("sha256"):
                raise ModelMAEError(f"the MAE stored in {checkpoint_file} is damaged or was altered (its bytes no "
                                    f"longer match their sha256): reinstall or retrain the model")
        entries[checkpoint_file] = entry
    carried = {r["sha256"] for r in entries.values() if r is not None}
    if not carried:
        return None
    if len(carried) > 1 or None in entries.values():
        listing = ", ".join(f"{f.parent.name}: {r['sha256'][:12] + '...' if r else 'none'}" for f, r in entries.items())
        raise ModelMAEError(f"the folds of {model_folder} carry different MAEs ({listing}), so their inputs would "
                            f"differ: predict with folds trained on the same residual data set (-f)")
    return next(r for r in entries.values() if r is not None)


def write_checkpoint_file(entry: dict, folder) -> Path:
    """Write the stored MAE checkpoint into ``folder``; returns its path (for ``residuals -m``)."""
    path = Path(folder) / entry["file_name"]
    path.write_bytes(entry["checkpoint_bytes"])
    return path


def describe(entry: dict) -> str:
    """One line about a stored MAE, for logs: source data set, hash, settings."""
    settings, scale = entry["settings"], entry.get("scale")
    return (f"MAE of {entry.get('source_dataset') or 'an unnamed data set'} (sha256 {entry['sha256'][:12]}..., "
            f"mask ratios {settings['mask_ratios']}, smoothing {settings['smoothing_sigma']}"
            f"{f', residual scale {scale:.4g}' if scale is not None else ''})")
