"""FIAS trainers: the FIAS network alone, and FIAS with GRCSF's Region Compensation Unit."""

from nnunetv2_grcsf.trainers.base import PluginTrainer

FIAS_NETWORK = "nnunetv2_grcsf.architectures.fias.FIASUNet"


class FIASTrainer(PluginTrainer):
    """FIAS: DilateFormer (MSDA) + DMK dual-path encoder, CAF fusion, MixAtt decoder; no residual channel."""

    network_class_name = FIAS_NETWORK
    network_kwargs = {"use_rcu": False}


class GRCSF_FIASTrainer(PluginTrainer):
    """FIAS network whose decoder also takes the MAE residual channel(s) through GRCSF's RCU."""

    network_class_name = FIAS_NETWORK
    network_kwargs = {"use_rcu": True}
    needs_residual_channels = True
