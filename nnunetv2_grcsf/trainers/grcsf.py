"""GRCSF trainers: the full framework and one ablation per unit (as in the paper's ablation study)."""

from nnunetv2_grcsf.architectures.input_routing import EVERY_TOKEN_SCALE
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


class GRCSFTrainer_rcuEveryScale(GRCSFTrainer):
    """GRCSF with an RCU at every decoder scale whose stride divides the token patch (BUSI256 2d: the four finest;
    Hippocampus 3d_fullres: all three), not only at the two finest: the residual also reaches the coarse decoder
    stages, whose convolutions see a lesion whole. On held-out BUSI256 it did worse than GRCSFTrainer and cost more
    (README, Accuracy); kept so that the comparison can be rerun."""

    network_kwargs = {"use_gcu": True, "use_rcu": True, "rcu_stages": EVERY_TOKEN_SCALE}


class GRCSFTrainer_noRCU_gcuZeroProjection(GRCSFTrainer_noRCU):
    """GCU only, each GCU starting as the identity by a zero-initialized detail projection (ControlNet's zero
    convolution) instead of a zero output scale, so that it changes the function at a conv's pace under nnU-Net's
    SGD (blocks/gcu.py, GCU_STARTS). Its GCUs act where the zero-scale ones barely do, at the same Dice as nnU-Net
    and the zero-scale GCU on BUSI256 and worse on Hippocampus (README, Accuracy)."""

    network_kwargs = {"use_gcu": True, "use_rcu": False, "gcu_start": "zero_projection"}
