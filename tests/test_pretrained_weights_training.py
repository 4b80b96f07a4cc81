"""Fine-tuning GRCSFTrainer from a real nnU-Net model through nnU-Net's commands: an ``nnUNetTrainer`` run on a
tiny image data set, ``nnunetv2_grcsf pretrained-weights`` for the residual data set of the same images, then
``nnUNetv2_train ... -tr GRCSFTrainer_... -pretrained_weights``; and the message when the plain model is given."""
import subprocess
from pathlib import Path

import pytest
import torch

from nnunet_runs import add_lesion_channel, nnunet_env, run
from nnunetv2_grcsf.synthetic import write_synthetic_dataset

pytestmark = pytest.mark.slow

IMAGES_ID, RESIDUAL_ID = 973, 974
FEW_WORKERS = {"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"}
SHORT_NNUNET_TRAINER = """\
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_2epochs_4iters(nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 2, 4, 2
"""


def test_grcsf_fine_tunes_from_an_nnunet_model_through_pretrained_weights(tmp_path):
    own_trainers = tmp_path / "my_trainers"
    own_trainers.mkdir()
    (own_trainers / "short_nnunet.py").write_text(SHORT_NNUNET_TRAINER)
    env = nnunet_env(tmp_path, nnUNet_extTrainer=str(own_trainers))
    for dataset_id in (IMAGES_ID, RESIDUAL_ID):  # the same images; the second also gets a residual channel
        dataset = write_synthetic_dataset(env["nnUNet_raw"], dataset_id, "Tiny", 8, 0, shape=(64, 64),
                                          progress=False)
        if dataset_id == RESIDUAL_ID:
            add_lesion_channel(dataset)
        run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", "2d", "-np", "1"], env)
    train_env = {**env, **FEW_WORKERS}
    run(["nnUNetv2_train", str(IMAGES_ID), "2d", "0", "-tr", "nnUNetTrainer_2epochs_4iters", "-device", "cpu"],
        train_env)
    nnunet_model = next(Path(env["nnUNet_results"]).glob(
        f"Dataset{IMAGES_ID}_Tiny/nnUNetTrainer_2epochs_4iters__nnUNetPlans__2d/fold_0/checkpoint_final.pth"))

    trainer = "GRCSFTrainer_2epochs_4iters"
    plain = subprocess.run(["nnUNetv2_train", str(RESIDUAL_ID), "2d", "0", "-tr", trainer, "-device", "cpu",
                            "-pretrained_weights", str(nnunet_model)], env=train_env, capture_output=True, text=True)
    assert plain.returncode != 0
    assert f"nnunetv2_grcsf pretrained-weights -i {nnunet_model}" in plain.stderr

    start = tmp_path / "grcsf_start.pth"
    run(["nnunetv2_grcsf", "pretrained-weights", "-i", str(nnunet_model), "-o", str(start), "-d", str(RESIDUAL_ID),
         "-c", "2d", "-tr", trainer], env)
    result = run(["nnUNetv2_train", str(RESIDUAL_ID), "2d", "0", "-tr", trainer, "-device", "cpu",
                  "-pretrained_weights", str(start)], train_env)
    assert f"Loading pretrained weights from file  {start}" in result.stdout
    assert "encoder.stages.0.0.convs.0.conv.weight shape" in result.stdout  # nnU-Net's list of loaded keys
    assert "encoder.global_compensation" in result.stdout  # the units' start weights are loaded too
    model = Path(env["nnUNet_results"]) / f"Dataset{RESIDUAL_ID}_Tiny" / f"{trainer}__nnUNetPlans__2d" / "fold_0"
    assert (model / "checkpoint_final.pth").is_file()
    assert torch.load(start, weights_only=False)["pretrained_from"]["source"] == str(nnunet_model.resolve())
