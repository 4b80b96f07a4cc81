"""Self-supervised residual maps for GRCSF's Region Compensation Unit: a Masked Autoencoder (MAE).

GRCSF (arXiv 2502.08675) feeds its Region Compensation Unit with "SSL residual maps": the pixel-wise
difference between an image and its reconstruction by a Masked Autoencoder (He et al., CVPR 2022)
trained on the same data set's images. Lesions are what the MAE has not learned to reconstruct, so
they light up. Only the abstract of GRCSF is public; everything in this package below that level
(model size, normalization, how residuals are taken, scaled and stored) is our design and is
documented where it is made.

Modules (imports point down only):

- :mod:`.model`: the MAE (2D ViT encoder of timm blocks on patch tokens, random masking, light decoder).
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


#: The raw data set folders ``mae-train`` reads by default (``--include-test-images`` adds ``imagesTs``); the
#: checkpoint records those it read under :data:`TRAINING_SPLITS_KEY`.
DEFAULT_TRAINING_SPLITS = ("imagesTr",)
TRAINING_SPLITS_KEY = "training_splits"


def checkpoint_saw_test_images(checkpoint):
    """Whether an MAE checkpoint was trained on test images: ``True``/``False``, or ``None`` when unknown.

    ``checkpoint``: a loaded checkpoint dict or the path of one (then loaded and checked with
    :func:`nnunetv2_grcsf.mae.train.load_checkpoint`). ``None`` means the checkpoint predates the
    :data:`TRAINING_SPLITS_KEY` record; mae-train of that time read ``imagesTs`` too, so treat ``None``
    as "may have seen the test images".
    """
    if not isinstance(checkpoint, dict):
        from nnunetv2_grcsf.mae.train import load_checkpoint

        checkpoint = load_checkpoint(checkpoint)
    splits = checkpoint.get(TRAINING_SPLITS_KEY)
    if splits is None:
        return None
    return any(split != "imagesTr" for split in splits)


#: Named MAE sizes (kept here, torch-free, so the command line can list them without importing torch).
#: ``tiny`` trains on a 2-core CPU in minutes, with the loss on pixels (measured on held-out BUSI256 images,
#: benchmarks/mae_busi256.py: at the CPU budget both losses reconstruct and single out lesions alike; the
#: pixel loss needs no statistics head); ``small`` and ``base`` are for GPUs and keep the paper's normalized loss.
PRESETS = {
    "tiny": dict(img_size=128, patch_size=8, embed_dim=96, depth=3, num_heads=4,
                 decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, norm_pix_loss=False),
    "small": dict(img_size=256, patch_size=8, embed_dim=192, depth=6, num_heads=6,
                  decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4),
    "base": dict(img_size=256, patch_size=8, embed_dim=384, depth=12, num_heads=6,
                 decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8),
}
#: Training budget when neither steps nor epochs are given (the tiny preset: minutes on a 2-core CPU).
DEFAULT_STEPS = 800
#: mae-train's defaults for an MAE of one token per patch (single-channel data sets, or --no-channel-tokens).
DEFAULT_TRAINING = {"steps": DEFAULT_STEPS, "max_shift_patches": 0, "lr": 1e-3}
#: mae-train's defaults for an MAE with channel tokens (data sets of several channels, e.g. multi-modal MRI), where
#: 800 steps reconstruct held-out brain worse than its mean: more steps, slices shifted by up to 3 patches and a
#: higher peak learning rate (measured on BraTS6 with benchmarks/mae_brats6.py: README); 10 minutes on 2 CPU cores.
CHANNEL_TOKEN_TRAINING = {"steps": 3200, "max_shift_patches": 3, "lr": 4e-3}

__all__ = ["PRESETS", "DEFAULT_STEPS", "DEFAULT_TRAINING", "CHANNEL_TOKEN_TRAINING", "DEFAULT_TRAINING_SPLITS",
           "TRAINING_SPLITS_KEY", "checkpoint_saw_test_images",
           "MAEError", "MAEDatasetError", "MAECheckpointError", "MAEIncompatibleError", "MAEOutputExistsError",
           "MAEImageReadError", "MAEGeometryError"]
