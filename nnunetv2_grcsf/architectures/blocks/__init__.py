"""Building blocks of the networks; each takes the conv op and works in 2D and 3D."""
from nnunetv2_grcsf.architectures.blocks.gcu import GlobalCompensationUnit
from nnunetv2_grcsf.architectures.blocks.rcu import RegionCompensationUnit
from nnunetv2_grcsf.architectures.blocks.caf import ContextAwareFusion
from nnunetv2_grcsf.architectures.blocks.dmk import DepthwiseMultiKernelConv
from nnunetv2_grcsf.architectures.blocks.mixatt import MixingAttention, MonteCarloChannelAttention
from nnunetv2_grcsf.architectures.blocks.msda import AttentionBlock, GlobalSelfAttention, MultiScaleDilatedAttention
