"""GRCSF trainers: the full framework and one ablation per unit (as in the paper's ablation study)."""

from nnunetv2_grcsf.trainers.base import PluginTrainer

GRCSF_NETWORK = "nnunetv2_grcsf.architectures.grcsf.GRCSFUNet"


class GRCSFTrainer(PluginTrainer):
    """GRCSF: Global Compensation Unit at every downsampling + Region Compensation Unit on MAE residuals."""

    network_class_name = GRCSF_NETWORK
    network_kwargs = {"use_gcu": True, "use_rcu": True}
    needs_residual_channels = True


class GRCSFTrainer_noRCU(PluginTrainer):
    """GCU only: needs no residual channel (any input channels are image channels)."""

    network_class_name = GRCSF_NETWORK
    network_kwargs = {"use_gcu": True, "use_rcu": False}


class GRCSFTrainer_noGCU(GRCSFTrainer):
    """RCU only: the plain nnU-Net backbone plus the Region Compensation Unit."""

    network_kwargs = {"use_gcu": False, "use_rcu": True}


class GRCSFTrainer_residualInEncoder(GRCSFTrainer):
    """GRCSF whose encoder also reads the residual maps as input channels (as nnU-Net does given them), the RCU
    fusing them in the decoder as in GRCSFTrainer."""

    network_kwargs = {"use_gcu": True, "use_rcu": True, "residual_in_encoder": True}
