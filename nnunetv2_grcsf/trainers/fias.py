"""FIAS trainers: the FIAS network alone, and FIAS with GRCSF's Region Compensation Unit; each with nnU-Net's
SGD recipe or with AdamW and warm-up (``...AdamW``, trainers/recipes.py), as transformers are usually trained."""

from nnunetv2_grcsf.trainers.base import PluginTrainer
from nnunetv2_grcsf.trainers.recipes import AdamWWarmupRecipe

FIAS_NETWORK = "nnunetv2_grcsf.architectures.fias.FIASUNet"


class FIASTrainer(PluginTrainer):
    """FIAS: DilateFormer (MSDA) + DMK dual-path encoder, CAF fusion, MixAtt decoder; no residual channel."""

    network_class_name = FIAS_NETWORK
    network_kwargs = {"use_rcu": False}

    @classmethod
    def configuration_network_kwargs(cls, configuration_manager) -> dict:
        """Dilated attention only where the stage's feature map at the plans' patch size holds its window."""
        from nnunetv2_grcsf.architectures.fias import stage_attention_for_patch_size

        arch = configuration_manager.network_arch_init_kwargs
        return {"stage_attention": stage_attention_for_patch_size(configuration_manager.patch_size, arch["strides"],
                                                                  arch["kernel_sizes"])}


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
