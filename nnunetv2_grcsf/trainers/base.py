"""The one base class of our trainers: it chooses the network and a training schedule, and for MAE residual
channels stores their MAE with the model and keeps intensity augmentation off them; nothing else.

nnU-Net does everything else (data loading, augmentation, loss with deep supervision, AMP and
torch.compile on CUDA, DDP, validation, checkpoints). At inference nnU-Net's predictor never runs
``__init__``: it calls only ``build_network_architecture`` with the plans saved beside the model,
so everything the network needs must be derivable from those plans (see residual_channels.py).
"""

import contextlib
import os
import random

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunetv2_grcsf.model_mae import add_to_checkpoint, describe, mae_entry_for_dataset
from nnunetv2_grcsf.pretrained import check_pretrained_weights_argument
from nnunetv2_grcsf.residual_channels import (plans_with_residual_channels, residual_channels_of_dataset,
                                              residual_channels_of_plans)
from nnunetv2_grcsf.trainers.residual_augmentation import skip_channels_in_image_transforms

#: Environment variable holding the training seed of our trainers (unset: unseeded, as nnU-Net).
SEED_VARIABLE = "NNUNETV2_GRCSF_SEED"


def seed_from_environment():
    """The integer in ``NNUNETV2_GRCSF_SEED``, or None when it is unset or empty."""
    value = os.environ.get(SEED_VARIABLE, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"{SEED_VARIABLE}={value!r} is not an integer: set e.g. `export {SEED_VARIABLE}=0`, "
                         f"or unset it for an unseeded run.") from None


def seed_everything(seed: int) -> None:
    """Seeds python's, numpy's and torch's global generators, which nnU-Net's network initialization, its data
    loader (patch sampling: numpy) and its augmentation (batchgeneratorsv2: numpy and torch) draw from."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def compile_failure_explained(trainer):
    """Re-raises torch.compile's failure to compile ``trainer``'s network, or a kernel the network compiles itself
    (BackendCompilerFailed, a long compiler traceback), with what to do: train uncompiled with nnU-Net's own switch
    ``nnUNet_compile=f``, and the trainer's ``compile_failure_advice``; the message goes to the training log too.
    Other errors pass unchanged."""
    try:
        yield
    except torch._dynamo.exc.BackendCompilerFailed as error:
        cause = getattr(error, "inner_exception", None) or error  # what the compiler raised
        headline = f"{type(cause).__name__}: " + (str(cause).strip().splitlines() or [""])[0]
        compiling = trainer._do_i_compile()
        message = (f"{type(trainer).__name__}: torch.compile could not compile "
                   f"{'this network' if compiling else 'a kernel of this network'} on {trainer.device} "
                   f"(torch {torch.__version__}): {headline}\n"
                   + ("Train it without compiling, with nnU-Net's own switch: `nnUNet_compile=f nnUNetv2_train ...`. "
                      if compiling else "") + trainer.compile_failure_advice + "(The compiler's traceback is above.)")
        trainer.print_to_log_file(message)
        raise RuntimeError(message) from error


class PluginTrainer(nnUNetTrainer):
    """nnUNetTrainer that builds ``network_class_name`` from the plans' arch_kwargs plus ``network_kwargs``.

    Subclasses set class attributes only:
    - ``network_class_name``: dotted path of a network whose constructor takes the plans' arch_kwargs (None: the
      plans' own network, exactly nnUNetTrainer's);
    - ``network_kwargs``: extra constructor arguments (ablation switches);
      ``configuration_network_kwargs`` may add some derived from the configuration (e.g. its patch size);
    - ``needs_residual_channels``: the network's Region Compensation Unit needs MAE residual channels;
      they are read from the data set's dataset.json at training and recorded in the saved plans; the MAE that
      made them is stored in every checkpoint (see model_mae.py), and nnU-Net's intensity augmentations leave
      them alone (see residual_augmentation.py);
    - fine-tuning from a plain nnU-Net model: ``-pretrained_weights`` needs a start checkpoint made by
      ``nnunetv2_grcsf pretrained-weights`` (pretrained.py); given the plain model, ``initialize`` says so.
    - ``schedule``: attributes of nnUNetTrainer to override (``num_epochs``, ``num_iterations_per_epoch``...).

    A network that torch.compile cannot compile (nnU-Net compiles on CUDA by default) stops training with a
    message naming ``nnUNet_compile=f`` and ``compile_failure_advice`` (compile_failure_explained), in the
    console and the training log.

    Seed: with ``NNUNETV2_GRCSF_SEED`` set, python, numpy and torch are seeded (with seed + DDP rank, so that
    ranks sample different batches; DDP copies rank 0's initial weights to all) before nnU-Net builds the network
    and its data loaders, and the seed is written to the training log. A run is then reproducible on the CPU with
    ``nnUNet_n_proc_DA=0``; nnU-Net's data-augmentation workers (``NonDetMultiThreadedAugmenter``) seed themselves
    from the operating system and deliver batches in arrival order, so runs with workers are not.
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
        self.seed = seed_from_environment()
        if self.seed is not None:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            seed_everything(self.seed + rank)
        super().__init__(plans, configuration, fold, dataset_json, device)
        for name, value in self.schedule.items():
            setattr(self, name, value)
        self.print_to_log_file(f"seed: {self.seed} (from {SEED_VARIABLE})" if self.seed is not None else
                               f"seed: none ({SEED_VARIABLE} is unset), as nnU-Net: this run is not reproducible")

    #: What else to try when torch.compile fails (compile_failure_explained), a sentence or ""
    compile_failure_advice = ""

    #: The MAE entry stored in every checkpoint (model_mae.py); set at training start, None without an MAE.
    mae_entry = None

    def initialize(self):
        super().initialize()
        check_pretrained_weights_argument(self.network, type(self).__name__, self.plans_manager.dataset_name,
                                          self.configuration_name, self.plans_manager.plans_name)

    def on_train_start(self):
        if self.needs_residual_channels:
            name = self.plans_manager.dataset_name
            self.mae_entry = mae_entry_for_dataset(self.dataset_json, name)
            self.print_to_log_file(
                f"storing the {describe(self.mae_entry)} in every checkpoint" if self.mae_entry else
                f"note: {name}'s dataset.json names no MAE checkpoint, so this model cannot make its own residual "
                f"channels: `nnunetv2_grcsf predict` will need inputs that already have them")
        super().on_train_start()

    def save_checkpoint(self, filename: str) -> None:
        super().save_checkpoint(filename)
        if self.mae_entry is not None and self.local_rank == 0 and not self.disable_checkpointing:
            add_to_checkpoint(filename, self.mae_entry)

    def train_step(self, batch: dict) -> dict:
        with compile_failure_explained(self):
            return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        with compile_failure_explained(self):
            return super().validation_step(batch)

    def get_training_transforms(self, *args, **kwargs):
        """nnU-Net's training augmentation; its intensity transforms skip the residual channels (fixed scale)."""
        transforms = super().get_training_transforms(*args, **kwargs)
        if not self.needs_residual_channels:
            return transforms
        return skip_channels_in_image_transforms(transforms, residual_channels_of_dataset(self.dataset_json))

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
        return get_network_from_plans(cls.network_class_name or configuration_manager.network_arch_class_name,
                                      {**configuration_manager.network_arch_init_kwargs, **extra_kwargs},
                                      configuration_manager.network_arch_init_kwargs_req_import,
                                      num_input_channels, num_output_channels, allow_init=True,
                                      deep_supervision=enable_deep_supervision)
