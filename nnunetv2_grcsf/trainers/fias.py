"""FIAS trainers: the FIAS network alone, and FIAS with GRCSF's Region Compensation Unit."""

from nnunetv2_grcsf.trainers.base import PluginTrainer

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
