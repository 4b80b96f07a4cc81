"""Optimizer recipes of our trainers (trainers/recipes.py)."""
import pytest
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

import nnunetv2_grcsf.trainers as trainers
from nnunetv2_grcsf.trainers.recipes import WarmupPolyLRScheduler


def learning_rates(scheduler, optimizer, epochs):
    rates = []
    for epoch in range(epochs):  # as nnUNetTrainer.on_train_epoch_start: step(current_epoch)
        scheduler.step(epoch)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


def optimizer():
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def test_warmup_rises_linearly_then_follows_nnunet_poly_decay():
    sgd = optimizer()
    rates = learning_rates(WarmupPolyLRScheduler(sgd, 1e-3, num_epochs=20, warmup_epochs=3), sgd, 20)
    assert rates[:3] == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3])
    reference_optimizer = optimizer()
    poly = learning_rates(PolyLRScheduler(reference_optimizer, 1e-3, 17), reference_optimizer, 17)
    assert rates[3:] == pytest.approx(poly)  # nnU-Net's own decay over the remaining epochs
    assert rates[3] == pytest.approx(1e-3)


def test_without_warmup_it_is_nnunet_poly_schedule():
    ours, theirs = optimizer(), optimizer()
    assert learning_rates(WarmupPolyLRScheduler(ours, 1e-2, 10, 0), ours, 10) == pytest.approx(
        learning_rates(PolyLRScheduler(theirs, 1e-2, 10), theirs, 10))


@pytest.mark.parametrize("warmup", [-1, 5, 6])
def test_warmup_must_leave_epochs_to_train(warmup):
    with pytest.raises(ValueError, match=rf"warmup_epochs {warmup} must be in \[0, num_epochs = 5\)"):
        WarmupPolyLRScheduler(optimizer(), 1e-3, 5, warmup)


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
