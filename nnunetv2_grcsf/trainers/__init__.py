"""nnU-Net trainers of nnunetv2-grcsf (found by nnU-Net through nnunetv2_grcsf/discovery.py).

Every name in ``__all__`` works with ``nnUNetv2_train ... -tr NAME`` and ``nnUNetv2_predict ... -tr NAME``.
"""

from nnunetv2_grcsf.trainers.fias import FIASTrainer, FIASTrainerAdamW, GRCSF_FIASTrainer, GRCSF_FIASTrainerAdamW
from nnunetv2_grcsf.trainers.grcsf import (GRCSFTrainer, GRCSFTrainer_noGCU, GRCSFTrainer_noRCU,
                                          GRCSFTrainer_noRCU_gcuZeroProjection, GRCSFTrainer_rcuEveryScale,
                                          GRCSFTrainer_residualInEncoder)
from nnunetv2_grcsf.trainers.schedules import schedule_variants

# one trainer per network (the benchmarks measure each), then the same networks with another optimizer recipe
BASE_TRAINERS = (GRCSFTrainer, GRCSFTrainer_noRCU, GRCSFTrainer_noGCU, GRCSFTrainer_residualInEncoder,
                 GRCSFTrainer_rcuEveryScale, GRCSFTrainer_noRCU_gcuZeroProjection, FIASTrainer, GRCSF_FIASTrainer)
OPTIMIZER_VARIANTS = (FIASTrainerAdamW, GRCSF_FIASTrainerAdamW)
_VARIANTS = schedule_variants(BASE_TRAINERS + OPTIMIZER_VARIANTS, __name__)
globals().update(_VARIANTS)

__all__ = [trainer.__name__ for trainer in BASE_TRAINERS + OPTIMIZER_VARIANTS] + list(_VARIANTS)
