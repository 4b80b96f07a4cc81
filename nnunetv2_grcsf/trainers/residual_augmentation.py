"""nnU-Net's training augmentation with the MAE residual channels kept on their fixed scale.

A residual channel holds ``|image - MAE reconstruction|`` on a scale fixed per MAE checkpoint
(:mod:`nnunetv2_grcsf.mae.residuals`), so a value means the same in every image. nnU-Net's spatial
transforms (rotation, scaling, mirroring, cropping) must move it with its image; its intensity
transforms (noise, blur, brightness, contrast, simulated low resolution, gamma) imitate scanners and
protocols and would change what a residual value means. In batchgeneratorsv2 (nnU-Net's augmentation
library) the transforms that change image values only are exactly the ``ImageOnlyTransform``
subclasses; spatial ones act on image and segmentation alike. So we keep nnU-Net's pipeline and
wrap each ``ImageOnlyTransform`` in it so that it sees every channel except the residual ones.
Channels nnU-Net appends later (the cascade's one-hot previous-stage segmentation) stay visible to
the transforms made for them.
"""

from typing import Sequence

from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform, ImageOnlyTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import OneOfTransform, RandomTransform


class SkipChannels(BasicTransform):
    """Applies an image-only ``transform`` to the image (C, *S) without ``channels``, which pass through unchanged."""

    def __init__(self, transform: ImageOnlyTransform, channels: Sequence[int]):
        super().__init__()
        self.transform = transform
        self.channels = [int(c) for c in channels]

    def apply(self, data_dict: dict, **params) -> dict:
        image = data_dict.get("image")
        if image is None:
            return data_dict
        kept = [c for c in range(image.shape[0]) if c not in self.channels]
        image[kept] = self.transform(**{**data_dict, "image": image[kept]})["image"]
        data_dict["image"] = image
        return data_dict


def skip_channels_in_image_transforms(transform: BasicTransform, channels: Sequence[int]) -> BasicTransform:
    """``transform`` (nnU-Net's composed pipeline) with each ``ImageOnlyTransform`` in it wrapped in
    :class:`SkipChannels`."""
    if isinstance(transform, ImageOnlyTransform):
        return SkipChannels(transform, channels)
    if isinstance(transform, RandomTransform):
        transform.transform = skip_channels_in_image_transforms(transform.transform, channels)
    elif isinstance(transform, ComposeTransforms):
        transform.transforms = [skip_channels_in_image_transforms(t, channels) for t in transform.transforms]
    elif isinstance(transform, OneOfTransform):
        transform.list_of_transforms = [skip_channels_in_image_transforms(t, channels)
                                        for t in transform.list_of_transforms]
    return transform
