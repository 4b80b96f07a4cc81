"""Input routing shared by GRCSFUNet and FIASUNet: MAE residual channels go to the RCU, the rest to the encoder.

Subclasses build ``self.encoder`` (image (B, C_img, *S) -> skips) and ``self.decoder`` (skips, and with the RCU
also the residual map (B, K, *S) -> logits), implement ``check_input_size``, call :meth:`route_channels` in
their constructor, and name their variant without the RCU in ``without_rcu_hint`` (for the error message).
"""
from typing import Sequence

import numpy as np
import torch
from dynamic_network_architectures.architectures.abstract_arch import AbstractDynamicNetworkArchitectures
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim

from nnunetv2_grcsf.residual_channels import ResidualChannelError, check_residual_channels


class ResidualRoutedUNet(AbstractDynamicNetworkArchitectures):
    """Splits ``residual_channels`` off the input (B, C_in, *S) when ``use_rcu``; otherwise all are image channels."""

    without_rcu_hint = "use_rcu=False"

    def route_channels(self, input_channels: int, residual_channels: Sequence[int], use_rcu: bool) -> None:
        """Set ``use_rcu``, ``residual_channels`` and ``image_channels``; clear errors for bad residual channels."""
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

    def check_input_size(self, size: Sequence[int]) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor):
        self.check_input_size(x.shape[2:])
        if not self.use_rcu:
            return self.decoder(self.encoder(x))
        image, residual_map = x[:, self.image_channels], x[:, self.residual_channels]
        return self.decoder(self.encoder(image), residual_map)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Approximate number of stored activation elements for one sample (nnU-Net's planners use it)."""
        assert len(input_size) == convert_conv_op_to_dim(self.encoder.conv_op), \
            "give the spatial size only: input_size=(x, y(, z)), without batch and channel axes"
        return self.encoder.compute_conv_feature_map_size(input_size) + \
            self.decoder.compute_conv_feature_map_size(input_size)
