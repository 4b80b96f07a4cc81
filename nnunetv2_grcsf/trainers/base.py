"""The one base class of our trainers: it chooses the network and a training schedule, nothing else.

nnU-Net does everything else (data loading, augmentation, loss with deep supervision, AMP and
torch.compile on CUDA, DDP, validation, checkpoints). At inference nnU-Net's predictor never runs
``__init__``: it calls only ``build_network_architecture`` with the plans saved beside the model,
so everything the network needs must be derivable from those plans (see residual_channels.py).
"""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunetv2_grcsf.residual_channels import (plans_with_residual_channels, residual_channels_of_dataset,
                                              residual_channels_of_plans)


class PluginTrainer(nnUNetTrainer):
    """nnUNetTrainer that builds ``network_class_name`` from the plans' arch_kwargs plus ``network_kwargs``.

    Subclasses set class attributes only:
    - ``network_class_name``: dotted path of a network whose constructor takes the plans' arch_kwargs;
    - ``network_kwargs``: extra constructor arguments (ablation switches);
      ``configuration_network_kwargs`` may add some derived from the configuration (e.g. its patch size);
    - ``needs_residual_channels``: the network's Region Compensation Unit needs MAE residual channels;
      they are read from the data set's dataset.json at training and recorded in the saved plans;
    - ``schedule``: attributes of nnUNetTrainer to override (``num_epochs``, ``num_iterations_per_epoch``...).
    """

    network_class_name = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    network_kwargs = {}
    needs_residual_channels = False
    schedule = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        if self.needs_residual_channels:
            channels = residual_channels_of_dataset(dataset_json, plans.get("dataset_name", "this data set"))
            plans = plans_with_residual_channels(plans, channels)
        super().__init__(plans, configuration, fold, dataset_json, device)
        for name, value in self.schedule.items():
            setattr(self, name, value)

    @classmethod
    def configuration_network_kwargs(cls, configuration_manager) -> dict:
        """Constructor arguments derived from the configuration (none by default)."""
        return {}

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        extra_kwargs = {**cls.network_kwargs, **cls.configuration_network_kwargs(configuration_manager)}
        if cls.needs_residual_channels:
            extra_kwargs["residual_channels"] = residual_channels_of_plans(plans_manager.plans, num_input_channels,
                                                                           cls.__name__)
        return get_network_from_plans(cls.network_class_name,
                                      {**configuration_manager.network_arch_init_kwargs, **extra_kwargs},
                                      configuration_manager.network_arch_init_kwargs_req_import,
                                      num_input_channels, num_output_channels, allow_init=True,
                                      deep_supervision=enable_deep_supervision)
