"""Tiny trainers for the tests of the path nnU-Net takes on a GPU (float16 AMP, torch.compile, DDP), on the CPU.

Each network is built as nnU-Net builds it: a real trainer of ours is constructed from a plans file of
tests/data/plans shrunk to 4 stages of 8-32 channels and a small patch (benchmarks/gpu_check.py's ``tiny_plans``,
the plans of its CPU dry run), and the calls of ``nnUNetTrainer.initialize()`` build its network (the trainer's
``build_network_architecture``), its deep-supervision loss (``_build_loss``) and optimizer.
"""
import json
import sys

import torch
from conftest import PLANS_DIR, PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
from gpu_check import OUR_TRAINERS as TRAINERS  # noqa: E402,F401  (every shipped network, by its trainer)
from gpu_check import synthetic_batch, tiny_plans, trainer_without_data  # noqa: E402,F401

#: dimension -> (plans, configuration)
CASES = {"2d": ("Dataset802_BUSI256_nnUNetPlans", "2d"), "3d": ("Dataset804_Hippocampus_nnUNetPlans", "3d_fullres")}


def tiny_trainer(name: str, dimension: str, results_folder, seed: int = 0):
    """A CPU trainer of ``name`` on the tiny plans of ``dimension``, its network initialized with ``seed``."""
    plans_name, configuration = CASES[dimension]
    plans = tiny_plans(json.loads((PLANS_DIR / f"{plans_name}.json").read_text()), configuration)
    torch.manual_seed(seed)
    return trainer_without_data(name, plans, configuration, torch.device("cpu"), results_folder)
