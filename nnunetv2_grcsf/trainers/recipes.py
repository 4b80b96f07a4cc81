"""Optimizer recipes a trainer can take instead of nnU-Net's SGD (momentum 0.99, lr 1e-2, poly decay).

``AdamWWarmupRecipe`` is the recipe nnU-Net itself uses for its transformer (Primus, nnunetv2's
``primus_trainers.AbstractPrimus``): AdamW, lr 3e-4, weight decay 5e-2, betas (0.9, 0.98), nnU-Net's linear
warm-up ``Lin_incr_LRScheduler``, then its ``PolyLRScheduler_offset`` decay (nnunetv2's ``lr_scheduler/warmup.py``),
one optimizer throughout as Primus keeps it. Primus warms up for 50 of 1000 epochs; here the warm-up is the same
5 % of ``num_epochs`` (at least one epoch when there are two or more), so that the short schedules (schedules.py)
warm up too. Deep supervision, the loss, gradient clipping and AMP stay nnU-Net's.
"""
import torch
from nnunetv2.training.lr_scheduler.warmup import Lin_incr_LRScheduler, PolyLRScheduler_offset


class AdamWWarmupRecipe:
    """Mixin for our trainers (put it first among the bases): AdamW with linear warm-up, as nnU-Net's Primus.

    The hyper-parameters are entries of the trainer's ``schedule`` (applied by PluginTrainer after
    nnUNetTrainer's own ``__init__``), so the short-schedule variants keep them. Both of nnU-Net's schedulers set
    the rate of the epoch nnU-Net passes to ``step(current_epoch)``, so a resumed run (``--c``) continues on the
    schedule: the scheduler of the current stage is chosen from ``current_epoch`` at every epoch's start.
    """

    schedule = {"initial_lr": 3e-4, "weight_decay": 5e-2}
    warmup_fraction = 0.05
    betas = (0.9, 0.98)

    @property
    def warmup_epochs(self) -> int:
        return min(max(1, round(self.warmup_fraction * self.num_epochs)), self.num_epochs - 1)

    def lr_scheduler_for_epoch(self, optimizer: torch.optim.Optimizer, epoch: int):
        """nnU-Net's linear warm-up before ``warmup_epochs``, its offset poly decay from there on."""
        if epoch < self.warmup_epochs:
            return Lin_incr_LRScheduler(optimizer, self.initial_lr, self.warmup_epochs)
        return PolyLRScheduler_offset(optimizer, self.initial_lr, self.num_epochs, self.warmup_epochs)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                      betas=self.betas)
        self.print_to_log_file(f"AdamW lr {self.initial_lr}, weight decay {self.weight_decay}, linear warm-up "
                               f"over {self.warmup_epochs} of {self.num_epochs} epochs, then poly decay")
        return optimizer, self.lr_scheduler_for_epoch(optimizer, self.current_epoch)

    def on_train_epoch_start(self):
        in_warmup = self.current_epoch < self.warmup_epochs
        if in_warmup != isinstance(self.lr_scheduler, Lin_incr_LRScheduler):
            self.lr_scheduler = self.lr_scheduler_for_epoch(self.optimizer, self.current_epoch)
        super().on_train_epoch_start()
