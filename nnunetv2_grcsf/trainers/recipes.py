"""Optimizer recipes a trainer can take instead of nnU-Net's SGD (momentum 0.99, lr 1e-2, poly decay).

``AdamWWarmupRecipe`` is the recipe nnU-Net itself uses for its transformer (Primus, nnunetv2's
``primus_trainers.AbstractPrimus``): AdamW, lr 3e-4, weight decay 5e-2, betas (0.9, 0.98), a linear
warm-up, then nnU-Net's polynomial decay. Primus warms up for 50 of 1000 epochs; here the warm-up is the
same 5 % of ``num_epochs`` (at least one epoch), so that the short schedules (schedules.py) warm up too.
Deep supervision, the loss, gradient clipping and AMP stay nnU-Net's.
"""
import torch
from torch.optim.lr_scheduler import _LRScheduler


class WarmupPolyLRScheduler(_LRScheduler):
    """Linear warm-up over ``warmup_epochs``, then nnU-Net's poly decay ``(1 - t / T) ** exponent``.

    Epoch e < W gets ``initial_lr * (e + 1) / (W + 1)``; epoch e >= W gets
    ``initial_lr * (1 - (e - W) / (num_epochs - W)) ** exponent``. nnU-Net calls ``step(current_epoch)`` at
    each epoch's start and the rate depends on that epoch alone, so a resumed run (``--c``) continues on it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, num_epochs: int, warmup_epochs: int,
                 exponent: float = 0.9):
        if not 0 <= warmup_epochs < num_epochs:
            raise ValueError(f"warmup_epochs {warmup_epochs} must be in [0, num_epochs = {num_epochs}).")
        self.initial_lr, self.num_epochs, self.warmup_epochs, self.exponent = (initial_lr, num_epochs,
                                                                                warmup_epochs, exponent)
        self.ctr = 0
        super().__init__(optimizer, -1)

    def learning_rate(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.initial_lr * (epoch + 1) / (self.warmup_epochs + 1)
        progress = (epoch - self.warmup_epochs) / (self.num_epochs - self.warmup_epochs)
        return self.initial_lr * max(0.0, 1 - progress) ** self.exponent

    def step(self, current_step: int = None):
        if current_step is None or current_step == -1:
            current_step, self.ctr = self.ctr, self.ctr + 1
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(current_step)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class AdamWWarmupRecipe:
    """Mixin for our trainers (put it first among the bases): AdamW with linear warm-up, as nnU-Net's Primus.

    The hyper-parameters are entries of the trainer's ``schedule`` (applied by PluginTrainer after
    nnUNetTrainer's own ``__init__``), so the short-schedule variants keep them.
    """

    schedule = {"initial_lr": 3e-4, "weight_decay": 5e-2}
    warmup_fraction = 0.05
    betas = (0.9, 0.98)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                      betas=self.betas)
        warmup_epochs = min(max(1, round(self.warmup_fraction * self.num_epochs)), self.num_epochs - 1)
        self.print_to_log_file(f"AdamW lr {self.initial_lr}, weight decay {self.weight_decay}, linear warm-up "
                               f"over {warmup_epochs} of {self.num_epochs} epochs, then poly decay")
        return optimizer, WarmupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, warmup_epochs)
