"""nnU-Net's own ``nnUNetTrainer`` with the plugin's short CPU schedules, for the accuracy benchmark's baseline.

nnU-Net ships ``nnUNetTrainer_Xepochs`` variants but none that also shortens epochs, so for an equal budget
the baseline needs ``nnUNetTrainer_<suffix>`` for the ``iters`` schedules of
:data:`nnunetv2_grcsf.trainers.schedules.SCHEDULES` (the same table the plugin's trainers are generated from).
This directory is given to nnU-Net through ``nnUNet_extTrainer`` by accuracy_busi256.py.
"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_grcsf.trainers.schedules import SCHEDULES


class ScheduledNNUNetTrainer(nnUNetTrainer):
    """nnUNetTrainer whose class attribute ``schedule`` overrides trainer attributes (as the plugin's trainers)."""

    schedule = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        for name, value in self.schedule.items():
            setattr(self, name, value)


for _suffix, _schedule in SCHEDULES.items():
    if "num_iterations_per_epoch" in _schedule:  # nnU-Net has its own nnUNetTrainer_Xepochs
        _name = f"nnUNetTrainer_{_suffix}"
        globals()[_name] = type(_name, (ScheduledNNUNetTrainer,), {"schedule": dict(_schedule), "__module__": __name__,
                                                                    "__doc__": f"nnUNetTrainer with {_schedule}."})
