"""Networks built from nnU-Net plans' arch_kwargs (usable as the plans' network_class_name)."""
from nnunetv2_grcsf.architectures.grcsf import GRCSFUNet
from nnunetv2_grcsf.architectures.fias import FIASUNet
