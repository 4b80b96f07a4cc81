"""The MAE a residual-channel model carries in its checkpoints (model_mae.py): what is stored, and the
clear errors for a changed or missing MAE, an altered model file and folds with different MAEs.

The residual data set is made by the real `residuals -d` code from a real (briefly trained) MAE.
"""
import hashlib
import json

import pytest
import torch

from nnunetv2_grcsf.mae.model import MAEConfig
from nnunetv2_grcsf.mae.residuals import ResidualSettings, make_residual_dataset
from nnunetv2_grcsf.mae.train import TrainConfig, load_checkpoint, save_checkpoint, train_mae
from nnunetv2_grcsf.model_mae import (ModelMAEError, add_to_checkpoint, entry_settings, mae_entry_for_dataset,
                                      mae_entry_of_model)
from nnunetv2_grcsf.residual_channels import DATASET_JSON_KEY
from nnunetv2_grcsf.synthetic import write_synthetic_dataset
from nnunet_runs import set_nnunet_folders

SETTINGS = ResidualSettings(mask_ratios=(0.5,), smoothing_sigma=1.0, repeats=1, seed=3)  # none of them the default


@pytest.fixture(scope="module")
def residual_dataset(tmp_path_factory):
    """(dataset.json of a residual data set made by `residuals -d`, its MAE checkpoint), in a module-wide env."""
    root = tmp_path_factory.mktemp("model_mae")
    with pytest.MonkeyPatch.context() as env:
        set_nnunet_folders(env, root)
        write_synthetic_dataset(root / "nnUNet_raw", 991, "Tiny", 4, 0, shape=(32, 32), progress=False)
        config = MAEConfig(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=16,
                           decoder_depth=1, decoder_num_heads=2)
        checkpoint = train_mae(991, model_config=config, train_config=TrainConfig(steps=2, batch_size=2),
                               progress=False, num_threads=1, log=lambda *a: None)
        result = make_residual_dataset(991, 992, checkpoint, SETTINGS, progress=False, num_threads=1,
                                       log=lambda *a: None)
    dataset_json = json.loads((root / "nnUNet_raw" / result["dataset"] / "dataset.json").read_text())
    return dataset_json, checkpoint


def changed_copy(checkpoint, tmp_path):
    """A copy of the MAE checkpoint with another residual scale (as a retrained MAE would have)."""
    state = load_checkpoint(checkpoint)
    state["residual_scale"] = state["residual_scale"] * 1.04
    save_checkpoint(state, tmp_path / "checkpoint_final.pth")
    return tmp_path / "checkpoint_final.pth"


def with_checkpoint(dataset_json, path, **block_changes):
    block = {**dataset_json[DATASET_JSON_KEY], "mae_checkpoint": str(path), **block_changes}
    return {**dataset_json, DATASET_JSON_KEY: {k: v for k, v in block.items() if v is not None}}


def test_the_entry_is_the_checkpoint_file_and_the_data_sets_settings(residual_dataset):
    dataset_json, checkpoint = residual_dataset
    entry = mae_entry_for_dataset(dataset_json, "Dataset992_Tiny")
    data = checkpoint.read_bytes()
    assert entry["checkpoint_bytes"] == data
    assert entry["sha256"] == hashlib.sha256(data).hexdigest() == dataset_json[DATASET_JSON_KEY]["mae_sha256"]
    assert entry_settings(entry) == SETTINGS
    assert entry["residual_channels"] == [1] and entry["source_dataset"] == "Dataset991_Tiny"
    assert entry["scale"] == load_checkpoint(checkpoint)["residual_scale"]


def test_a_data_set_without_mae_gives_no_entry():
    assert mae_entry_for_dataset({"channel_names": {"0": "a", "1": "rgb_to_0_1"},
                                  DATASET_JSON_KEY: {"residual_channels": [1]}}, "Dataset993_X") is None


@pytest.mark.parametrize("recorded_hash", [True, False], ids=["hash", "scale-only (older data sets)"])
def test_another_mae_than_the_data_set_was_made_with_is_refused(residual_dataset, tmp_path, recorded_hash):
    dataset_json, checkpoint = residual_dataset
    changed = with_checkpoint(dataset_json, changed_copy(checkpoint, tmp_path),
                              **({} if recorded_hash else {"mae_sha256": None}))
    with pytest.raises(ModelMAEError, match="is not the one Dataset992_Tiny was made with") as error:
        mae_entry_for_dataset(changed, "Dataset992_Tiny")
    assert "residuals -d" in str(error.value) and "\n" not in str(error.value)


def test_a_missing_mae_checkpoint_names_the_file_and_the_fix(residual_dataset, tmp_path):
    dataset_json, _ = residual_dataset
    with pytest.raises(ModelMAEError, match="does not exist") as error:
        mae_entry_for_dataset(with_checkpoint(dataset_json, tmp_path / "gone.pth"), "Dataset992_Tiny")
    assert str(tmp_path / "gone.pth") in str(error.value)
    assert "nnunetv2_grcsf residuals -d Dataset991_Tiny -o Dataset992_Tiny --overwrite" in str(error.value)


def model_folder(tmp_path, entries):
    """A model folder whose fold_i/checkpoint_final.pth holds network weights and ``entries[i]`` (None: no MAE)."""
    for fold, entry in enumerate(entries):
        (tmp_path / f"fold_{fold}").mkdir(parents=True)
        checkpoint = tmp_path / f"fold_{fold}" / "checkpoint_final.pth"
        torch.save({"network_weights": {"w": torch.ones(2)}, "trainer_name": "GRCSFTrainer"}, checkpoint)
        if entry is not None:
            add_to_checkpoint(checkpoint, entry)
    return tmp_path


def test_the_entry_travels_in_every_fold_checkpoint(residual_dataset, tmp_path):
    entry = mae_entry_for_dataset(residual_dataset[0], "Dataset992_Tiny")
    folder = model_folder(tmp_path, [entry, entry])
    checkpoint = torch.load(folder / "fold_1" / "checkpoint_final.pth", weights_only=False)
    assert torch.equal(checkpoint["network_weights"]["w"], torch.ones(2))  # nnU-Net's keys are kept
    assert mae_entry_of_model(folder, [0, 1], "checkpoint_final.pth") == entry
    assert mae_entry_of_model(model_folder(tmp_path / "plain", [None]), [0], "checkpoint_final.pth") is None


def test_an_altered_stored_mae_is_refused(residual_dataset, tmp_path):
    entry = mae_entry_for_dataset(residual_dataset[0], "Dataset992_Tiny")
    data = bytearray(entry["checkpoint_bytes"])
    data[len(data) // 2] ^= 0xFF  # one byte flipped, the recorded hash kept
    altered = {**entry, "checkpoint_bytes": bytes(data)}
    with pytest.raises(ModelMAEError, match="damaged or was altered"):
        mae_entry_of_model(model_folder(tmp_path, [altered]), [0], "checkpoint_final.pth")


def test_folds_with_different_maes_are_refused(residual_dataset, tmp_path):
    entry = mae_entry_for_dataset(residual_dataset[0], "Dataset992_Tiny")
    data = entry["checkpoint_bytes"] + b"other"
    other = {**entry, "checkpoint_bytes": data, "sha256": hashlib.sha256(data).hexdigest()}
    with pytest.raises(ModelMAEError, match="carry different MAEs"):
        mae_entry_of_model(model_folder(tmp_path, [entry, other]), [0, 1], "checkpoint_final.pth")
    with pytest.raises(ModelMAEError, match="fold_1: none"):
        mae_entry_of_model(model_folder(tmp_path / "some", [entry, None]), [0, 1], "checkpoint_final.pth")
