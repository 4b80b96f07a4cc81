"""nnunetv2-grcsf: GRCSF and FIAS networks, MAE residual maps and trainers for nnU-Net v2.

Kept import-light on purpose: the start-up hook (see :mod:`nnunetv2_grcsf.discovery`) imports this
package in every Python process of the environment, so nothing heavy (torch, nnunetv2) is imported here.
"""

__version__ = "0.1.0"
