"""nnU-Net's own network with the plugin's short CPU schedules and seed, for the benchmarks' baseline.

nnU-Net ships ``nnUNetTrainer_Xepochs`` variants but none that also shortens epochs, so for an equal budget
the baseline needs ``nnUNetTrainer_<suffix>`` for the ``iters`` schedules of
:data:`nnunetv2_grcsf.trainers.schedules.SCHEDULES` (the same table the plugin's trainers are generated from).
They are PluginTrainers whose network is the plans' own (exactly nnUNetTrainer's), so they take the plugin's
schedules and its ``NNUNETV2_GRCSF_SEED`` seed from PluginTrainer itself. This directory is given to nnU-Net
through ``nnUNet_extTrainer`` by the benchmarks. ``FIASTrainer_noCheckpointing``, ``FIASTrainer_loopMSDA`` and
``GRCSFTrainer_rcu<Layout>`` are diagnostic rows of gpu_check.py.
"""
from nnunetv2_grcsf.trainers import FIASTrainer, GRCSFTrainer
from nnunetv2_grcsf.trainers.base import PluginTrainer
from nnunetv2_grcsf.trainers.schedules import SCHEDULES, schedule_variants


class PlansNetworkTrainer(PluginTrainer):
    """nnUNetTrainer's network (the plans' ``network_class_name``) with PluginTrainer's schedule and seed."""

    network_class_name = None


# nnU-Net has its own nnUNetTrainer_Xepochs: only the schedules that also shorten epochs, under nnUNetTrainer's name
globals().update(schedule_variants([PlansNetworkTrainer], __name__, base_name="nnUNetTrainer",
                                   suffixes=[suffix for suffix, schedule in SCHEDULES.items()
                                             if "num_iterations_per_epoch" in schedule]))


class FIASTrainer_noCheckpointing(FIASTrainer):
    """Diagnostic row of gpu_check.py: FIASTrainer without activation checkpointing (the same function)."""

    network_kwargs = {**FIASTrainer.network_kwargs, "activation_checkpointing": False}


class FIASTrainer_loopMSDA(FIASTrainer):
    """Diagnostic row of gpu_check.py: FIASTrainer with the MSDA's loop implementation (plain PyTorch ops) on CUDA
    too, instead of flex_attention (the same function)."""

    network_kwargs = {**FIASTrainer.network_kwargs, "msda_implementation": "loop"}


class GRCSFTrainer_rcuFolded(GRCSFTrainer):
    """Diagnostic row of gpu_check.py: GRCSFTrainer whose RCUs use the 'sdpa_folded' attention layout (no mask)."""

    network_kwargs = {**GRCSFTrainer.network_kwargs, "rcu_attention_layout": "sdpa_folded"}


class GRCSFTrainer_rcuWindowSum(GRCSFTrainer):
    """Diagnostic row of gpu_check.py: GRCSFTrainer whose RCUs use the 'window_sum' attention layout."""

    network_kwargs = {**GRCSFTrainer.network_kwargs, "rcu_attention_layout": "window_sum"}
