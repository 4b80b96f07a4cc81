"""Shared test helpers: real nnU-Net plans (tests/data/plans) and a one-thread fixture.

The plans in tests/data/plans were made by `nnUNetv2_plan_and_preprocess` (nnunetv2 2.8.1) on the
data sets in ../shared/data, so networks are tested on the topologies nnU-Net really plans:
- Dataset802_BUSI256_nnUNetPlans.json: 2d, patch 224x256, 6 stages (32..512), PlainConvUNet.
- Dataset802_BUSI256_nnUNetResEncUNetMPlans.json: the same with ResidualEncoderUNet (ResEnc M).
- Dataset804_Hippocampus_nnUNetPlans.json: 3d_fullres patch 40x56x40, 4 stages (32..256); and 2d.
- Dataset805_BraTS6_nnUNetPlans.json: 3d_fullres patch 96x160x160, 6 stages (32..320), 2 channels.
"""
import json
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
PLANS_DIR = TESTS_DIR / "data" / "plans"
PROJECT_ROOT = TESTS_DIR.parent


def load_plans(plans_name: str) -> dict:
    """The plans dict of tests/data/plans/<plans_name>.json, e.g. 'Dataset802_BUSI256_nnUNetPlans'."""
    return json.loads((PLANS_DIR / f"{plans_name}.json").read_text())


def configuration_manager(plans_name: str, configuration: str):
    """nnU-Net's ConfigurationManager for one configuration of a stored plans file."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    return PlansManager(load_plans(plans_name)).get_configuration(configuration)


def build_network_from_plans(network_class_name: str, plans_name: str, configuration: str, input_channels: int,
                             num_classes: int, deep_supervision: bool = True, **extra_arch_kwargs):
    """Build `network_class_name` exactly as nnU-Net would from the plans' arch_kwargs (+ extra kwargs).

    Returns (network, patch_size).
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    cm = configuration_manager(plans_name, configuration)
    network = get_network_from_plans(network_class_name, {**cm.network_arch_init_kwargs, **extra_arch_kwargs},
                                     cm.network_arch_init_kwargs_req_import, input_channels, num_classes,
                                     allow_init=True, deep_supervision=deep_supervision)
    return network, tuple(cm.patch_size)


def expected_deep_supervision_shapes(plans, configuration, input_size, batch, num_classes):
    """The target shapes nnU-Net's loss uses: its deep supervision scales (nnUNetTrainer) times the patch size."""
    import numpy as np

    pool_op_kernel_sizes = configuration_manager(plans, configuration).pool_op_kernel_sizes
    scales = (1 / np.cumprod(np.vstack(pool_op_kernel_sizes), axis=0))[:-1]
    return [(batch, num_classes, *[int(round(s * f)) for s, f in zip(input_size, scale)]) for scale in scales]


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Runs a test module's torch work on one thread (restored afterwards): on a 2-core machine shared with
    nnU-Net's worker processes, two threads per test ran 3-4x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
