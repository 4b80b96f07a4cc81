"""Building blocks of the networks; each takes the conv op and works in 2D and 3D."""
from nnunetv2_grcsf.architectures.blocks.gcu import GlobalCompensationUnit
from nnunetv2_grcsf.architectures.blocks.rcu import RegionCompensationUnit
