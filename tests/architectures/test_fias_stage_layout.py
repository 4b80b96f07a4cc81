"""FIAS trainers choose dilated attention only where the plans' patch size leaves room for its window."""
import pytest
import torch

from nnunetv2_grcsf.architectures.fias import default_stage_attention, stage_attention_for_patch_size
from nnunetv2_grcsf.trainers import FIASTrainer

STRIDES_2D = [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]]
KERNELS_2D = [[3, 3]] * 5


def test_small_patch_turns_too_small_msda_stages_global():
    assert default_stage_attention(5) == ["conv", "conv", "msda", "msda", "global"]
    # at 48x48, stage 3 is 6x6: smaller than the 7x7 window of kernel 3 at dilation 3 (DilateFormer's largest)
    assert stage_attention_for_patch_size([48, 48], STRIDES_2D, KERNELS_2D) == ["conv", "conv", "msda", "global",
                                                                               "global"]
    assert stage_attention_for_patch_size([56, 56], STRIDES_2D, KERNELS_2D) == default_stage_attention(5)
    assert stage_attention_for_patch_size([128, 128], STRIDES_2D, KERNELS_2D) == default_stage_attention(5)


def test_anisotropic_kernels_only_count_axes_with_a_window():
    strides = [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2]]
    kernels = [[1, 3, 3], [1, 3, 3], [1, 3, 3], [3, 3, 3]]
    assert stage_attention_for_patch_size([4, 80, 80], strides, kernels)[2] == "msda"  # axis 0 has kernel 1


def test_the_trainer_builds_a_fias_that_runs_on_the_small_patch():
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from conftest import load_plans

    plans = load_plans("Dataset802_BUSI256_nnUNetPlans")
    plans["configurations"]["2d_small"] = {"inherits_from": "2d", "patch_size": [48, 48], "batch_size": 2}
    arch = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
    plans["configurations"]["2d_small"]["architecture"] = {
        **plans["configurations"]["2d"]["architecture"],
        "arch_kwargs": {**arch, "n_stages": 5, "features_per_stage": arch["features_per_stage"][:5],
                        "kernel_sizes": KERNELS_2D, "strides": STRIDES_2D, "n_conv_per_stage": [2] * 5,
                        "n_conv_per_stage_decoder": [2] * 4}}
    manager = PlansManager(plans)
    network = FIASTrainer.build_network_architecture(manager, manager.get_configuration("2d_small"), 1, 2, False)
    with torch.no_grad():
        assert network(torch.randn(1, 1, 48, 48)).shape == (1, 2, 48, 48)
    with pytest.raises(ValueError, match="stage 3 has feature map"):
        network.encoder.stage_attention[3] = "msda"
        network.check_input_size([48, 48])
