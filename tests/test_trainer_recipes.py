"""Optimizer recipes of our trainers (trainers/recipes.py), on real trainer instances and nnU-Net's epoch hook."""
import pytest
import torch
from conftest import load_plans
from nnunetv2.training.lr_scheduler.warmup import Lin_incr_LRScheduler, PolyLRScheduler_offset

import nnunetv2_grcsf.trainers as trainers

DATASET_JSON = {"channel_names": {"0": "image"}, "labels": {"background": 0, "lesion": 1}, "numTraining": 4,
                "file_ending": ".nii.gz"}


def trainer_with_optimizer(name: str, tmp_path, monkeypatch):
    """A real trainer (CPU) with a one-parameter network and the optimizer and scheduler its recipe configures."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    plans = {**load_plans("Dataset802_BUSI256_nnUNetPlans"), "continue_training": False}
    trainer = getattr(trainers, name)(plans, "2d", 0, DATASET_JSON, torch.device("cpu"))
    trainer.network = torch.nn.Linear(1, 1)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    return trainer


def learning_rates(trainer, epochs):
    """The rate of each epoch as nnU-Net's training loop sets it (nnUNetTrainer.on_train_epoch_start)."""
    rates = []
    for epoch in epochs:
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()
        rates.append(trainer.optimizer.param_groups[0]["lr"])
    return rates


def nnunet_warmup_then_poly(initial_lr, num_epochs, warmup_epochs):
    """The rates of nnU-Net's Lin_incr_LRScheduler, then its PolyLRScheduler_offset (as its Primus trainers)."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    warmup = Lin_incr_LRScheduler(optimizer, initial_lr, warmup_epochs)
    poly = PolyLRScheduler_offset(optimizer, initial_lr, num_epochs, warmup_epochs)
    rates = []
    for epoch in range(num_epochs):
        (warmup if epoch < warmup_epochs else poly).step(epoch)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


def test_adamw_recipe_warms_up_linearly_then_follows_nnunet_poly_decay(tmp_path, monkeypatch):
    trainer = trainer_with_optimizer("FIASTrainerAdamW_50epochs", tmp_path, monkeypatch)
    assert isinstance(trainer.optimizer, torch.optim.AdamW) and trainer.warmup_epochs == 2  # 5 % of 50 epochs
    rates = learning_rates(trainer, range(50))
    assert rates[:3] == pytest.approx([1.5e-4, 3e-4, 3e-4])  # linear to the peak, then the decay starts there
    assert rates == pytest.approx(nnunet_warmup_then_poly(3e-4, 50, 2))
    assert all(a > b for a, b in zip(rates[2:], rates[3:]))


def test_resumed_run_continues_on_the_schedule(tmp_path, monkeypatch):
    """``--c``: nnU-Net's load_checkpoint sets current_epoch on a trainer whose scheduler was made at epoch 0."""
    uninterrupted = learning_rates(trainer_with_optimizer("FIASTrainerAdamW_50epochs", tmp_path / "a", monkeypatch),
                                   range(50))
    for resume_at in (1, 2, 30):
        resumed = trainer_with_optimizer("FIASTrainerAdamW_50epochs", tmp_path / str(resume_at), monkeypatch)
        assert learning_rates(resumed, range(resume_at, 50)) == pytest.approx(uninterrupted[resume_at:])


def test_one_epoch_runs_without_warmup(tmp_path, monkeypatch):
    trainer = trainer_with_optimizer("FIASTrainerAdamW_1epoch", tmp_path, monkeypatch)
    assert trainer.warmup_epochs == 0 and learning_rates(trainer, [0]) == pytest.approx([3e-4])


@pytest.mark.parametrize("name", ["FIASTrainerAdamW", "GRCSF_FIASTrainerAdamW_10epochs_25iters"])
def test_adamw_trainers_keep_the_network_and_take_the_recipe(name):
    """Same network as the SGD trainer (speed rows, checkpoints), AdamW hyper-parameters kept by the schedules."""
    trainer = getattr(trainers, name)
    sgd_trainer = getattr(trainers, name.split("AdamW")[0])
    assert trainer.network_class_name == sgd_trainer.network_class_name
    assert trainer.network_kwargs == sgd_trainer.network_kwargs
    assert trainer.needs_residual_channels == sgd_trainer.needs_residual_channels
    assert trainer.schedule["initial_lr"] == 3e-4 and trainer.schedule["weight_decay"] == 5e-2
    if name.endswith("iters"):
        assert trainer.schedule["num_epochs"] == 10
    assert name in trainers.__all__
