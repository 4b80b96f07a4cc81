"""Residual channels keep their fixed scale in training: nnU-Net's spatial augmentations move them with
the image, its intensity augmentations (noise, blur, brightness, contrast, low resolution, gamma) skip them.

The pipeline is the one a real GRCSFTrainer builds (nnU-Net's, from trainer.get_training_transforms);
nnU-Net's own unchanged pipeline is run beside it to show that it does change the residual channel.
"""
import math

import torch
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from conftest import load_plans
from nnunetv2_grcsf.residual_channels import DATASET_JSON_KEY
from nnunetv2_grcsf.trainers import FIASTrainer, GRCSFTrainer
from nnunetv2_grcsf.trainers.residual_augmentation import SkipChannels

PATCH = (64, 64)
RUNS = 30
RESIDUAL_VALUE = 0.6  # a constant residual map: spatial transforms keep it in [0, 0.6] (0 = padding)


def make_trainer(trainer_class, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    plans = {**load_plans("Dataset802_BUSI256_nnUNetPlans"), "continue_training": False}
    dataset_json = {"channel_names": {"0": "grey", "1": "rgb_to_0_1"}, "labels": {"background": 0, "lesion": 1},
                    "numTraining": 1, "file_ending": ".png", DATASET_JSON_KEY: {"residual_channels": [1]}}
    return trainer_class(plans, "2d", 0, dataset_json, device=torch.device("cpu"))


def training_transforms(get_training_transforms, spatial: bool):
    transforms = get_training_transforms(PATCH, (-math.pi, math.pi), None, (0, 1), False)
    if not spatial:
        transforms.transforms = [t for t in transforms.transforms if not isinstance(t, (SpatialTransform,
                                                                                         MirrorTransform))]
    return transforms


def grcsf_and_nnunet_transforms(tmp_path, monkeypatch, spatial: bool):
    """(a GRCSFTrainer's training transforms, nnUNetTrainer's own), with or without the spatial ones."""
    trainer = make_trainer(GRCSFTrainer, tmp_path, monkeypatch)
    return (training_transforms(trainer.get_training_transforms, spatial),
            training_transforms(nnUNetTrainer.get_training_transforms, spatial))


def augmented(transforms, seed: int, constant_residual: bool):
    """(input image, augmented image) of one sample: channel 0 an image, channel 1 a residual map (8-bit levels
    / 255 as nnU-Net's rgb_to_0_1 normalization gives them, or the constant RESIDUAL_VALUE)."""
    torch.manual_seed(seed)
    residual = torch.full(PATCH, RESIDUAL_VALUE) if constant_residual else torch.randint(0, 256, PATCH) / 255
    image = torch.stack([torch.rand(PATCH), residual])
    segmentation = (torch.rand((1, *PATCH)) > 0.5).to(torch.int16)
    return image, transforms(image=image.clone(), segmentation=segmentation)["image"]


def test_intensity_augmentations_change_image_channels_only(tmp_path, monkeypatch):
    ours, nnunet = grcsf_and_nnunet_transforms(tmp_path, monkeypatch, spatial=False)
    image_changed = residual_changed_by_nnunet = 0
    for seed in range(RUNS):
        before, after = augmented(ours, seed, constant_residual=False)
        assert torch.equal(after[1], before[1]), f"run {seed}: an intensity transform changed the residual channel"
        image_changed += not torch.equal(after[0], before[0])
        before, after = augmented(nnunet, seed, constant_residual=False)
        residual_changed_by_nnunet += not torch.equal(after[1], before[1])
    assert image_changed >= RUNS // 2  # nnU-Net's intensity transforms still act on the image channel
    assert residual_changed_by_nnunet >= RUNS // 2  # ... and, unwrapped, on the residual channel too


def test_spatial_augmentations_still_move_the_residual_channel(tmp_path, monkeypatch):
    ours, nnunet = grcsf_and_nnunet_transforms(tmp_path, monkeypatch, spatial=True)
    residual_moved = nnunet_outside_range = 0
    for seed in range(RUNS):
        _, after = augmented(ours, seed, constant_residual=True)
        residual = after[1]
        assert residual.shape == PATCH
        # rotation / scaling pad with 0 and interpolate; nothing may leave [0, RESIDUAL_VALUE]
        assert 0 <= residual.min() and residual.max() <= RESIDUAL_VALUE + 1e-6
        residual_moved += bool((residual < RESIDUAL_VALUE - 1e-6).any())
        _, after = augmented(nnunet, seed, constant_residual=True)
        nnunet_outside_range += bool((after[1] > RESIDUAL_VALUE + 1e-3).any() or (after[1] < 0).any())
    assert residual_moved > 0  # some rotation / scaling padded the residual map like the image
    assert nnunet_outside_range > 0


def test_trainers_without_residual_channels_keep_nnunet_augmentation(tmp_path, monkeypatch):
    transforms = training_transforms(make_trainer(FIASTrainer, tmp_path, monkeypatch).get_training_transforms, True)
    assert not any(isinstance(t, SkipChannels) or isinstance(getattr(t, "transform", None), SkipChannels)
                   for t in transforms.transforms)
    wrapped = training_transforms(make_trainer(GRCSFTrainer, tmp_path, monkeypatch).get_training_transforms, True)
    assert sum(isinstance(getattr(t, "transform", None), SkipChannels) for t in wrapped.transforms) >= 6
