"""Input routing shared by GRCSFUNet and FIASUNet: the MAE residual-map channels go to the Region Compensation
Units, the image channels to the encoder; and the decoders' shared RCU layout.

Subclasses of :class:`ResidualMapRoutingUNet` build ``self.encoder`` (image (B, C_img, *S) -> skips) and
``self.decoder`` (skips, and with the RCU also the residual map (B, K, *S) -> logits), implement
``check_input_size``, call :meth:`~ResidualMapRoutingUNet.route_channels` in their constructor, and name their
variant without the RCU in ``without_rcu_hint`` (for the error message). Their decoders build their RCUs with
:func:`region_compensation_units` and apply each to the skip connection of its resolution stage, before the
stage's convolutions.
"""
from typing import Optional, Sequence, Type, Union

import numpy as np
import torch
from dynamic_network_architectures.architectures.abstract_arch import AbstractDynamicNetworkArchitectures
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnunetv2_grcsf.architectures.blocks.rcu import (ATTENTION_LAYOUTS, RegionCompensationUnit,
                                                     default_token_patch_size)
from nnunetv2_grcsf.architectures.helpers import AddedUnits
from nnunetv2_grcsf.residual_channels import ResidualChannelError, check_input_channels, check_residual_channels

DEFAULT_RCU_STAGES = (0, 1)  # the two finest decoder resolution stages
#: rcu_stages value: every decoder resolution stage whose stride divides the token patch (the finest ones)
EVERY_TOKEN_SCALE = "every"


def region_compensation_units(network_name: str, conv_op: Type[_ConvNd], features_per_stage: Sequence[int],
                              strides: Sequence[Sequence[int]], residual_map_channels: int,
                              rcu_stages: Union[str, Sequence[int]] = DEFAULT_RCU_STAGES,
                              rcu_patch_size: Union[None, int, Sequence[int]] = None, rcu_num_heads: int = 2,
                              rcu_window: int = 3) -> nn.ModuleDict:
    """One RegionCompensationUnit per resolution stage in ``rcu_stages`` (0 = full resolution, as the plans count;
    decoder stages are 0..n_stages - 2), keyed by the stage as a string, built and initialized from random numbers
    of their own (helpers.AddedUnits); empty without residual-map channels.

    Each fuses into the features of its stage (features_per_stage[stage] channels, at the product of
    strides[:stage + 1]); its global features are the bottleneck (features_per_stage[-1] channels).
    ``rcu_patch_size`` None -> :func:`default_token_patch_size` of the strides (8 per axis where they allow it).
    ``rcu_stages`` :data:`EVERY_TOKEN_SCALE` -> every decoder stage whose stride divides the token patch per axis
    (on the BUSI256 2d plans stages 0-3, on Hippocampus' 3d_fullres 0-2).
    """
    if residual_map_channels == 0:
        return nn.ModuleDict()
    n_stages = len(strides)
    strides = np.array(strides)
    size_divisor = np.prod(strides, axis=0)
    patch_size = default_token_patch_size(strides) if rcu_patch_size is None else [
        int(p) for p in np.broadcast_to(rcu_patch_size, size_divisor.shape)]
    if any(d % p for d, p in zip(size_divisor, patch_size)):
        raise ValueError(f"{network_name}: rcu_patch_size {patch_size} must divide the product of the strides "
                         f"{size_divisor.tolist()} on every axis (inputs are only guaranteed divisible by that).")
    feature_strides = np.cumprod(strides, axis=0)  # (n_stages, d): each stage's stride to the input
    stride_divides_patch = [not np.any(np.array(patch_size) % stride) for stride in feature_strides]
    if isinstance(rcu_stages, str):
        if rcu_stages != EVERY_TOKEN_SCALE:
            raise ValueError(f"{network_name}: rcu_stages {rcu_stages!r} is neither {EVERY_TOKEN_SCALE!r} nor a list "
                             f"of decoder resolution stages.")
        rcu_stages = [s for s in range(n_stages - 1) if stride_divides_patch[s]]
    bad_stages = [s for s in rcu_stages if not 0 <= s < n_stages - 1]
    if bad_stages:
        raise ValueError(f"{network_name}: rcu_stages {bad_stages} out of range; decoder resolution stages are "
                         f"0..{n_stages - 2} (0 = full resolution).")
    for stage in rcu_stages:
        if not stride_divides_patch[stage]:
            raise ValueError(f"{network_name}: rcu_stages includes stage {stage}, whose stride "
                             f"{feature_strides[stage].tolist()} does not divide rcu_patch_size {patch_size}; use "
                             f"finer rcu_stages or a larger patch.")
    return AddedUnits("region_compensation", lambda: {
        str(stage): RegionCompensationUnit(conv_op, features_per_stage[stage], residual_map_channels,
                                           features_per_stage[-1], patch_size, feature_strides[stage].tolist(),
                                           rcu_num_heads, rcu_window)
        for stage in sorted(set(rcu_stages))})


class ResidualMapRoutingUNet(AbstractDynamicNetworkArchitectures):
    """Splits the MAE residual-map channels ``residual_channels`` off the input (B, C_in, *S) when ``use_rcu``
    and passes them to the decoder; otherwise all channels are image channels.

    With ``residual_in_encoder`` (and the RCU on) the encoder reads every input channel, the residual maps as
    extra image channels too, as nnU-Net's own network does when given the residual data set, and the decoder's
    RCUs still get the residual maps (our design; the paper's abstract does not say whether its encoder sees them).
    """

    without_rcu_hint = "use_rcu=False"

    def route_channels(self, input_channels: int, residual_channels: Sequence[int], use_rcu: bool,
                       residual_in_encoder: bool = False) -> None:
        """Set ``use_rcu``, ``residual_channels``, ``image_channels`` and ``encoder_channels`` (the input channels
        the encoder reads); clear errors for bad residual channels."""
        name = type(self).__name__
        if use_rcu and not residual_channels:
            raise ResidualChannelError(
                f"{name} with the Region Compensation Unit (use_rcu=True) needs MAE residual map input channels, "
                f"but residual_channels is empty. Train on a data set made by `nnunetv2_grcsf residuals` (its "
                f"dataset.json lists them), or use {self.without_rcu_hint}.")
        self.use_rcu = use_rcu
        self.residual_channels = (check_residual_channels(residual_channels, input_channels,
                                                          f"{name} residual_channels") if use_rcu else [])
        self.image_channels = [c for c in range(input_channels) if c not in self.residual_channels]
        self.residual_in_encoder = use_rcu and residual_in_encoder
        self.encoder_channels = list(range(input_channels)) if self.residual_in_encoder else self.image_channels

    def set_rcu_attention_layout(self, layout: Optional[str]) -> None:
        """Every RCU's attention layout (blocks/rcu.py ATTENTION_LAYOUTS; None: chosen per call by the device); the
        layouts compute the same function, so weights trained with one predict with another."""
        if layout not in (None, *ATTENTION_LAYOUTS):
            raise ValueError(f"{type(self).__name__}: rcu_attention_layout {layout!r} is not None or one of "
                             f"{ATTENTION_LAYOUTS}.")
        for module in self.modules():
            if isinstance(module, RegionCompensationUnit):
                module.attention_layout = layout

    def check_input_size(self, size: Sequence[int]) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor):
        self.check_input_size(x.shape[2:])
        if not self.use_rcu:
            return self.decoder(self.encoder(x))
        check_input_channels(x.shape[1], self.image_channels, self.residual_channels, type(self).__name__)
        encoder_input = x if self.residual_in_encoder else x[:, self.image_channels]
        return self.decoder(self.encoder(encoder_input), x[:, self.residual_channels])

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Approximate number of stored activation elements for one sample (nnU-Net's planners use it)."""
        assert len(input_size) == convert_conv_op_to_dim(self.encoder.conv_op), \
            "give the spatial size only: input_size=(x, y(, z)), without batch and channel axes"
        return self.encoder.compute_conv_feature_map_size(input_size) + \
            self.decoder.compute_conv_feature_map_size(input_size)
