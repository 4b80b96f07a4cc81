"""FIAS trainers: the FIAS network alone, and FIAS with GRCSF's Region Compensation Unit; each with nnU-Net's
SGD recipe or with AdamW and warm-up (``...AdamW``, trainers/recipes.py), as transformers are usually trained."""

import os

from nnunetv2_grcsf.trainers.base import PluginTrainer
from nnunetv2_grcsf.trainers.recipes import AdamWWarmupRecipe

FIAS_NETWORK = "nnunetv2_grcsf.architectures.fias.FIASUNet"
#: Environment variable choosing the MSDA's implementation (blocks/msda.py): auto (default), flex or loop
MSDA_VARIABLE = "NNUNETV2_GRCSF_MSDA"


def msda_implementation_from_environment() -> dict:
    """``{'msda_implementation': NNUNETV2_GRCSF_MSDA}``, or {} when it is unset or empty (the network's default,
    'auto'). The implementations compute the same function, so a model trained with one predicts with another."""
    from nnunetv2_grcsf.architectures.blocks.msda import IMPLEMENTATIONS

    value = os.environ.get(MSDA_VARIABLE, "").strip()
    if not value:
        return {}
    if value not in IMPLEMENTATIONS:
        raise SystemExit(f"{MSDA_VARIABLE}={value!r} is not one of {', '.join(IMPLEMENTATIONS)}: e.g. "
                         f"`export {MSDA_VARIABLE}=loop`, or unset it for the default (auto).")
    return {"msda_implementation": value}


class FIASTrainer(PluginTrainer):
    """FIAS: DilateFormer (MSDA) + DMK dual-path encoder, CAF fusion, MixAtt decoder; no residual channel."""

    network_class_name = FIAS_NETWORK
    network_kwargs = {"use_rcu": False}
    compile_with_static_shapes = True  # its MSDA stages run eagerly on CUDA (blocks/msda.py)
    compile_failure_advice = (f"FIAS's MSDA compiles flex_attention on CUDA even with nnUNet_compile=f; "
                              f"`{MSDA_VARIABLE}=loop` computes it with plain PyTorch ops instead "
                              f"(the same function). ")

    @classmethod
    def configuration_network_kwargs(cls, configuration_manager) -> dict:
        """Dilated attention only where the stage's feature map at the plans' patch size holds its window; the
        MSDA implementation of ``NNUNETV2_GRCSF_MSDA``."""
        from nnunetv2_grcsf.architectures.fias import stage_attention_for_patch_size

        arch = configuration_manager.network_arch_init_kwargs
        return {"stage_attention": stage_attention_for_patch_size(configuration_manager.patch_size, arch["strides"],
                                                                  arch["kernel_sizes"]),
                **msda_implementation_from_environment()}


class GRCSF_FIASTrainer(FIASTrainer):
    """FIAS network whose decoder also takes the MAE residual channel(s) through GRCSF's RCU."""

    network_kwargs = {"use_rcu": True}
    needs_residual_channels = True


class FIASTrainerAdamW(AdamWWarmupRecipe, FIASTrainer):
    """FIASTrainer with AdamW, lr 3e-4 and a linear warm-up (nnU-Net's Primus recipe) instead of SGD."""

    schedule = {**FIASTrainer.schedule, **AdamWWarmupRecipe.schedule}


class GRCSF_FIASTrainerAdamW(AdamWWarmupRecipe, GRCSF_FIASTrainer):
    """GRCSF_FIASTrainer with AdamW, lr 3e-4 and a linear warm-up (nnU-Net's Primus recipe) instead of SGD."""

    schedule = {**GRCSF_FIASTrainer.schedule, **AdamWWarmupRecipe.schedule}
