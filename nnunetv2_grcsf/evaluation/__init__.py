"""Lesion-aware evaluation: nnU-Net's Dice plus HD95, volume difference and lesion-wise detection.

- :mod:`.metrics`: pure numpy/scipy metrics on binary masks, and the conventions (HD95, lesion matching,
  empty cases, units) in its docstring.
- :mod:`.evaluate`: folder evaluation (``nnunetv2_grcsf evaluate``), JSON / CSV / table, best and worst PNGs.
- :mod:`.overlay`: ``save_overlay_png`` / ``save_overlay_grid`` (image | ground truth | prediction).

Importing this package does not import nnU-Net or torch (the folder evaluation does, when it runs).
"""
from nnunetv2_grcsf.evaluation.evaluate import EvaluationError, LesionSettings, evaluate_folders, format_table
from nnunetv2_grcsf.evaluation.metrics import (EMPTY_CONVENTIONS, EmptyConvention, LesionDetection,
                                               absolute_volume_difference, connected_components, hd95,
                                               lesion_detection, lesion_metrics, volume)
from nnunetv2_grcsf.evaluation.overlay import OverlayCase, save_overlay_grid, save_overlay_png

__all__ = ["EvaluationError", "LesionSettings", "evaluate_folders", "format_table", "EMPTY_CONVENTIONS",
           "EmptyConvention", "LesionDetection", "absolute_volume_difference", "connected_components", "hd95",
           "lesion_detection", "lesion_metrics", "volume", "OverlayCase", "save_overlay_grid", "save_overlay_png"]
