"""Self-supervised residual maps for GRCSF's Region Compensation Unit: a Masked Autoencoder (MAE).

GRCSF (arXiv 2502.08675) feeds its Region Compensation Unit with "SSL residual maps": the pixel-wise
difference between an image and its reconstruction by a Masked Autoencoder (He et al., CVPR 2022)
trained on the same data set's images. Lesions are what the MAE has not learned to reconstruct, so
they light up. Only the abstract of GRCSF is public; everything in this package below that level
(model size, normalization, how residuals are taken, scaled and stored) is our design and is
documented where it is made.

Modules (imports point down only):

- :mod:`.model`: the MAE (2D ViT encoder on patch tokens, random masking, light decoder).
- :mod:`.data`: reading an nnU-Net raw data set with nnU-Net's own reader/writer classes, slicing
  3D volumes along their lowest-resolution axis, intensity normalization, resizing to the model.
- :mod:`.train`: the training loop and the checkpoint format (``nnunetv2_grcsf mae-train``).
- :mod:`.residuals`: residual maps with complementary masks; new data sets / folders with residual
  channels (``nnunetv2_grcsf residuals``).
- :mod:`.report`: pixel-level AUROC of residual maps against lesion masks and PNG panels.
- :mod:`.geometry`: checks that a data set made by ``residuals`` still fits together (residual
  channels on their images' grid, images equal to the source's; ``nnunetv2_grcsf doctor -d``).

This ``__init__`` imports nothing heavy: it only defines the errors, so that the command line can
build its parser without importing torch.
"""

from nnunetv2_grcsf.errors import UserFacingError


class MAEError(UserFacingError, RuntimeError):
    """A problem with MAE training or residual maps that the user can fix; the message says how."""


class MAEDatasetError(MAEError, FileNotFoundError):
    """A data set id/name that does not resolve to an nnU-Net raw data set, or an unusable data set."""


class MAECheckpointError(MAEError):
    """A file that is not an nnunetv2_grcsf MAE checkpoint, or is truncated / unreadable."""


class MAEIncompatibleError(MAEError, ValueError):
    """Images whose channel count or dimensionality differ from what the MAE checkpoint was trained on, or
    whose slices are smaller than one MAE patch."""


class MAEOutputExistsError(MAEError, FileExistsError):
    """An output data set / folder / training folder that already exists (pass --overwrite or --resume)."""


class MAEImageReadError(MAEError):
    """An image file that nnU-Net's reader cannot read (corrupt, truncated or of another format)."""


class MAEGeometryError(MAEDatasetError):
    """A data set made by ``residuals`` whose channel files no longer share a grid (or no longer match its source)."""


#: Named MAE sizes (kept here, torch-free, so the command line can list them without importing torch).
#: ``tiny`` trains on a 2-core CPU in minutes; ``small`` and ``base`` are for GPUs.
PRESETS = {
    "tiny": dict(img_size=128, patch_size=8, embed_dim=96, depth=3, num_heads=4,
                 decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4),
    "small": dict(img_size=256, patch_size=8, embed_dim=192, depth=6, num_heads=6,
                  decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4),
    "base": dict(img_size=256, patch_size=8, embed_dim=384, depth=12, num_heads=6,
                 decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8),
}
#: Training budget when neither steps nor epochs are given.
DEFAULT_STEPS = 300

__all__ = ["PRESETS", "DEFAULT_STEPS", "MAEError", "MAEDatasetError", "MAECheckpointError", "MAEIncompatibleError", "MAEOutputExistsError",
           "MAEImageReadError", "MAEGeometryError"]
