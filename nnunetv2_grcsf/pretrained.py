"""Fine-tuning GRCSF from an nnU-Net model: a start checkpoint for ``nnUNetv2_train -pretrained_weights``.

nnU-Net's ``-pretrained_weights`` runs ``nnunetv2.run.load_pretrained_weights``, which asserts that every key of
the network being trained (segmentation layers aside) is in the checkpoint with the same shape. GRCSFUNet keeps
the backbone's keys of nnU-Net's PlainConvUNet / ResidualEncoderUNet of the same plans, but its Global and Region
Compensation Units have no weights there. :func:`start_weights` therefore makes the complete weights of the GRCSF
network: the backbone from the nnU-Net model, each unit as the network initializes it (the GCU's output scale is
zero, so the network starts by computing the nnU-Net model's function; the RCU starts from its initialization),
the segmentation layers left to nnU-Net (it never loads them). ``nnunetv2_grcsf pretrained-weights`` writes them
as a checkpoint that plain ``nnUNetv2_train ... -pretrained_weights`` loads, with DDP and compile as usual.

The trainer cannot see ``-pretrained_weights`` through nnU-Net's interface, so :func:`check_pretrained_weights_argument`
reads it from the command line to replace nnU-Net's bare "Key ... is missing" assertion by the command to run.
"""
import os
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from nnunetv2_grcsf.errors import UserFacingError

#: nnU-Net's load_pretrained_weights never transfers keys containing this (the 1x1 segmentation layers).
SEGMENTATION_LAYER_KEY = ".seg_layers."
COMMAND = "nnunetv2_grcsf pretrained-weights"


class PretrainedWeightsError(UserFacingError, ValueError):
    """The checkpoint does not hold the backbone of the network to be trained."""


def compensation_unit_prefixes(network: nn.Module) -> Tuple[str, ...]:
    """State-dict key prefixes of the network's GCUs and RCUs (every path a unit is reachable by: nnU-Net's decoder
    keeps a reference to the encoder, so encoder units also appear under ``decoder.encoder.``)."""
    from nnunetv2_grcsf.architectures.blocks.gcu import GlobalCompensationUnit
    from nnunetv2_grcsf.architectures.blocks.rcu import RegionCompensationUnit

    return tuple(f"{name}." for name, module in network.named_modules(remove_duplicate=False)
                 if isinstance(module, (GlobalCompensationUnit, RegionCompensationUnit)))


def load_network_weights(checkpoint_file) -> Dict[str, torch.Tensor]:
    """The ``network_weights`` of an nnU-Net checkpoint (``checkpoint_final.pth``...), on the CPU."""
    checkpoint_file = Path(checkpoint_file)
    if not checkpoint_file.is_file():
        raise PretrainedWeightsError(f"{checkpoint_file} does not exist: give an nnU-Net checkpoint, e.g. "
                                     f"nnUNet_results/DatasetXXX_Name/nnUNetTrainer__nnUNetPlans__2d/fold_0/"
                                     f"checkpoint_final.pth")
    try:
        checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
    except Exception as error:
        raise PretrainedWeightsError(f"{checkpoint_file} cannot be read as a PyTorch checkpoint "
                                     f"({type(error).__name__}: {error}); is the file complete?") from error
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise PretrainedWeightsError(f"{checkpoint_file} has no 'network_weights': it is not a checkpoint written by "
                                     f"nnUNetv2_train (checkpoint_final.pth, checkpoint_best.pth...).")
    return checkpoint["network_weights"]


def start_weights(source_weights: Dict[str, torch.Tensor], network: nn.Module,
                  source_name: str) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The weights for ``network`` (its full state dict): every key taken from ``source_weights`` (same name and
    shape), except the compensation units' and the segmentation layers', which keep the network's own values.

    Returns (weights, names of the units that kept their initialization). :class:`PretrainedWeightsError` when a
    backbone key is missing from the source or differs in shape (not an nnU-Net model of the same plans).
    """
    unit_prefixes = compensation_unit_prefixes(network)
    if not unit_prefixes:
        raise PretrainedWeightsError(
            f"{type(network).__name__} has no Global or Region Compensation Unit: nnU-Net's own "
            f"-pretrained_weights loads {source_name} into it directly, no conversion needed.")
    weights = network.state_dict()
    missing, differing = [], []
    for key, value in weights.items():
        if key.startswith(unit_prefixes) or SEGMENTATION_LAYER_KEY in key:
            continue
        if key not in source_weights:
            missing.append(key)
        elif tuple(source_weights[key].shape) != tuple(value.shape):
            differing.append(f"{key}: {tuple(source_weights[key].shape)} there, {tuple(value.shape)} here")
        else:
            weights[key] = source_weights[key].detach().clone().to(value.dtype)
    if missing or differing:
        shown = (differing + [f"{key}: missing there" for key in missing])[:5]
        raise PretrainedWeightsError(
            f"{source_name} does not hold the backbone of {type(network).__name__} ({len(missing)} keys missing, "
            f"{len(differing)} of other shape; first: {'; '.join(shown)}). Start from an nnU-Net model trained with "
            f"the same plans (-p) and configuration (-c), on the data set's image channels only (the encoder of a "
            f"GRCSF network never reads the residual channels); only GRCSF networks share nnU-Net's backbone "
            f"(FIAS networks do not).")
    units = sorted({prefix.rstrip(".") for prefix in unit_prefixes if not prefix.startswith("decoder.encoder.")})
    return weights, units


def network_for_training(trainer_class, plans: dict, configuration: str, dataset_json: dict) -> nn.Module:
    """The network ``trainer_class`` trains (with deep supervision) for these plans and data set, built by the
    trainer's own ``build_network_architecture`` with the plans it uses (ours add the residual channels)."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_grcsf.residual_channels import plans_with_residual_channels, residual_channels_of_dataset

    if getattr(trainer_class, "needs_residual_channels", False):
        plans = plans_with_residual_channels(plans, residual_channels_of_dataset(dataset_json, plans["dataset_name"]))
    plans_manager = PlansManager(plans)
    if configuration not in plans_manager.available_configurations:
        raise PretrainedWeightsError(f"the plans {plans['plans_name']} of {plans['dataset_name']} have no "
                                     f"configuration {configuration!r}; choose one of "
                                     f"{plans_manager.available_configurations}")
    configuration_manager = plans_manager.get_configuration(configuration)
    num_inputs = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    num_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    return trainer_class.build_network_architecture(plans_manager, configuration_manager, num_inputs, num_outputs,
                                                    True)


def save_start_checkpoint(output_file, weights: Dict[str, torch.Tensor], provenance: dict) -> None:
    """Write ``{'network_weights': weights, 'pretrained_from': provenance}`` (what nnU-Net's loader reads) to a new
    file; an existing file is never replaced, and an interruption leaves no partial file."""
    output_file = Path(output_file)
    if output_file.exists():
        raise PretrainedWeightsError(f"{output_file} exists already; give a new file name (it is never overwritten).")
    output_file.parent.mkdir(parents=True, exist_ok=True)
    partial = output_file.with_name(f".{output_file.name}.partial-{os.getpid()}")
    try:
        torch.save({"network_weights": weights, "pretrained_from": provenance}, partial)
        os.replace(partial, output_file)
    finally:
        partial.unlink(missing_ok=True)


def pretrained_weights_argument(argv: Sequence[str]):
    """The file given to ``-pretrained_weights`` on an nnUNetv2_train command line, or None."""
    argv = list(argv)
    for position, argument in enumerate(argv):
        if argument == "-pretrained_weights" and position + 1 < len(argv):
            return argv[position + 1]
        if argument.startswith("-pretrained_weights="):
            return argument.split("=", 1)[1]
    return None


def check_pretrained_weights_argument(network: nn.Module, trainer_name: str, dataset_name: str, configuration: str,
                                      plans_name: str, argv: Sequence[str] = None) -> None:
    """Before nnU-Net loads ``-pretrained_weights``: if the file holds everything but the network's compensation
    units (a plain nnU-Net model of the same plans), stop with the command that makes a start checkpoint from it.
    Any other mismatch is left to nnU-Net's loader, which names the key."""
    pretrained_file = pretrained_weights_argument(sys.argv if argv is None else argv)
    if pretrained_file is None or not Path(pretrained_file).is_file():
        return
    if isinstance(network, DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):  # torch.compile
        network = network._orig_mod
    unit_prefixes = compensation_unit_prefixes(network)
    if not unit_prefixes:
        return
    source_weights = load_network_weights(pretrained_file)
    if any(key.startswith(unit_prefixes) for key in source_weights):
        return  # a start checkpoint (or a model of this network): nnU-Net's loader takes it as it is
    try:
        start_weights(source_weights, network, pretrained_file)
    except PretrainedWeightsError:
        return  # not this network's backbone either: nnU-Net's loader names the key
    suggested = Path(pretrained_file).with_name(f"{Path(pretrained_file).stem}_for_{trainer_name}.pth")
    raise PretrainedWeightsError(
        f"-pretrained_weights {pretrained_file} has no weights for {trainer_name}'s compensation units (it is a plain "
        f"nnU-Net model), and nnU-Net's loader needs every key. Make a start checkpoint from it (backbone from your "
        f"model, units initialized), then train from that:\n"
        f"  {COMMAND} -i {pretrained_file} -o {suggested} -d {dataset_name} -c {configuration} -tr {trainer_name}"
        f"{'' if plans_name == 'nnUNetPlans' else f' -p {plans_name}'}\n"
        f"  nnUNetv2_train ... -tr {trainer_name} -pretrained_weights {suggested}")
