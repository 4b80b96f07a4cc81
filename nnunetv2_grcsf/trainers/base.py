"""The one base class of our trainers: it chooses the network and a training schedule, and for MAE residual
channels stores their MAE with the model and keeps intensity augmentation off them; nothing else.

nnU-Net does everything else (data loading, augmentation, loss with deep supervision, AMP and
torch.compile on CUDA, DDP, validation, checkpoints). At inference nnU-Net's predictor never runs
``__init__``: it calls only ``build_network_architecture`` with the plans saved beside the model,
so everything the network needs must be derivable from those plans (see residual_channels.py).
"""

import os
import random
import traceback
from typing import Optional

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

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


def compiler_failure_headline(error: Exception) -> str:
    """'ExceptionType: first line' of what the compiler raised inside a BackendCompilerFailed."""
    cause = getattr(error, "inner_exception", None) or error
    return f"{type(cause).__name__}: " + (str(cause).strip().splitlines() or [""])[0]


def drop_torch_compile(network: nn.Module) -> Optional[nn.Module]:
    """The network without nnU-Net's ``torch.compile`` wrapper (inside a DDP wrapper, which is kept and runs the
    uncompiled module: the same parameters, so its gradient hooks stay valid), or None if it was not compiled."""
    wrapper = network.module if isinstance(network, DDP) else network
    if not isinstance(wrapper, OptimizedModule):
        return None
    if isinstance(network, DDP):
        network.module = wrapper._orig_mod
        return network
    return wrapper._orig_mod


def last_lines(error: Exception, count: int = 40) -> str:
    """The last ``count`` lines of ``error``'s traceback (a compiler's runs to hundreds of lines)."""
    return "\n".join("".join(traceback.format_exception(error)).rstrip().splitlines()[-count:])


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

    A network that torch.compile cannot compile (nnU-Net compiles on CUDA by default) trains uncompiled: the step
    that failed is run again without nnU-Net's compile wrapper, and the console and the training log say so once,
    with the compiler's error and ``nnUNet_compile=f`` to skip the attempt (:meth:`run_compiled_or_not`). A
    kernel the network compiles itself (FIAS's flex_attention) cannot be dropped: that failure stops training with
    ``compile_failure_advice``.

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

    #: What to try when a kernel the network compiles itself fails to compile (run_compiled_or_not), a sentence
    compile_failure_advice = ""

    #: Compile with static shapes only (TorchDynamo's automatic dynamic shapes off, for the whole process), for
    #: networks that run parts eagerly under torch.compile: the compiled frames around those parts run at the
    #: sizes of several stages, and recompiled with dynamic shapes, inductor failed (FIAS's MSDA stages on CUDA)
    compile_with_static_shapes = False

    #: Set when nnU-Net's torch.compile failed and training went on uncompiled (run_compiled_or_not): the message
    #: and the end of the compiler's traceback, {"message": ..., "traceback": ...}
    compile_failure = None

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

    def _do_i_compile(self) -> bool:
        """nnU-Net's choice (CUDA: compile unless ``nnUNet_compile=f``); with ``compile_with_static_shapes`` it also
        turns TorchDynamo's automatic dynamic shapes off when compiling (one static graph per size)."""
        compiling = super()._do_i_compile()
        if compiling and self.compile_with_static_shapes:
            torch._dynamo.config.automatic_dynamic_shapes = False
        return compiling

    def train_step(self, batch: dict) -> dict:
        return self.run_compiled_or_not(super().train_step, batch)

    def validation_step(self, batch: dict) -> dict:
        return self.run_compiled_or_not(super().validation_step, batch)

    def run_compiled_or_not(self, step, batch: dict) -> dict:
        """``step(batch)``; if torch.compile fails on the network nnU-Net compiled (BackendCompilerFailed: no step
        has run its optimizer yet, the failure comes at the first call of each graph), the network continues
        uncompiled and the step runs again, said once in the console and the log. A failure to compile a kernel the
        network compiles itself (nnU-Net's compile wrapper not there, or dropped) is raised with
        ``compile_failure_advice``."""
        try:
            return step(batch)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            uncompiled = drop_torch_compile(self.network)
            what = "this network" if uncompiled is not None else "a kernel of this network"
            message = (f"{type(self).__name__}: torch.compile could not compile {what} on {self.device} "
                       f"(torch {torch.__version__}): {compiler_failure_headline(error)}\n")
            traceback_end = last_lines(error)
            self.print_to_log_file("the compiler's error, its last lines:\n" + traceback_end,
                                   also_print_to_console=False)
            if uncompiled is None:
                message += self.compile_failure_advice + "(The compiler's traceback is above.)"
                self.print_to_log_file(message)
                raise RuntimeError(message) from error
            self.network = uncompiled
            self.compile_failure = {"message": message.strip(), "traceback": traceback_end}
            self.print_to_log_file(message + "Training continues uncompiled (slower). `nnUNet_compile=f "
                                   "nnUNetv2_train ...` (nnU-Net's switch) skips the attempt; the compiler's error "
                                   "is in the training log.")
            return self.run_compiled_or_not(step, batch)  # a kernel it compiles itself may still fail

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
