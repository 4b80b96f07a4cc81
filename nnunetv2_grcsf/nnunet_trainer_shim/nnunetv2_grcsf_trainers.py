"""Re-exports the trainers of nnunetv2-grcsf for nnU-Net's ``nnUNet_extTrainer`` lookup.

This directory (not the package) is what nnU-Net scans; see nnunetv2_grcsf/discovery.py.
"""
from nnunetv2_grcsf.trainers import *  # noqa: F401,F403
