"""Context-Aware Fusion (CAF) of FIAS's two encoder paths, 2D and 3D.

What the paper states (FIAS, Liu, Xu, Ho, arXiv 2411.10881, abstract): a Context-Aware Fusion block
dynamically balances the contributions of the global (DilateFormer) and local (DMK) features.
(The authors' later code scaffold concatenates, reduces with a 1x1 conv and applies channel and spatial
sigmoid gates, without explicit branch weights.)

Our choices: explicit, input-dependent branch weights that sum to one at every channel and position,

    d = channel_context(g, l) + spatial_context(g, l)     logit(global) - logit(local), (B, C, *S)
    w_global = sigmoid(d) = softmax(logit(global), logit(local))[global],   w_local = 1 - w_global
    out = w_global * g + w_local * l                       (B, C, *S)

- channel context: a squeeze-excitation style MLP (two 1x1 convs) on the concatenated global average pools of
  both branches (B, 2C) -> one logit per branch and channel, of which the difference (B, C, 1, ..) is used;
- spatial context: a linear map of both branches' features at each position (a 1x1 conv of their
  concatenation (B, 2C, *S)) -> one logit difference per position (B, 1, *S), shared by the channels.
Both contexts see both branches, so the balance reacts to either. Only the logit difference is computed: the
two-way softmax is the sigmoid of it, which stores one weight map instead of two.
"""
from typing import Sequence, Type

import numpy as np
import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnunetv2_grcsf.architectures.helpers import feature_map_estimate


class ChannelContext(nn.Module):
    """Pooled context of both branches -> global-minus-local logit per channel: (B, C, *S) x2 -> (B, C, 1, ..)."""

    def __init__(self, conv_op: Type[_ConvNd], channels: int, reduction: int):
        super().__init__()
        hidden = max(2 * channels // reduction, 8)
        self.mlp = nn.Sequential(conv_op(2 * channels, hidden, 1), nn.ReLU(inplace=True),
                                 conv_op(hidden, 2 * channels, 1))

    def forward(self, global_features: torch.Tensor, local_features: torch.Tensor) -> torch.Tensor:
        axes = tuple(range(2, global_features.dim()))
        pooled = torch.cat([global_features.mean(axes, keepdim=True), local_features.mean(axes, keepdim=True)], 1)
        logit_global, logit_local = self.mlp(pooled).chunk(2, dim=1)
        return logit_global - logit_local


class SpatialContext(nn.Module):
    """Features of both branches at each position -> global-minus-local logit: (B, C, *S) x2 -> (B, 1, *S)."""

    def __init__(self, conv_op: Type[_ConvNd], channels: int):
        super().__init__()
        self.global_projection = conv_op(channels, 1, 1)
        self.local_projection = conv_op(channels, 1, 1)

    def forward(self, global_features: torch.Tensor, local_features: torch.Tensor) -> torch.Tensor:
        return self.global_projection(global_features) + self.local_projection(local_features)


class ContextAwareFusion(nn.Module):
    """Input-dependent convex combination of the global and local branch, per channel and position.

    Args:
        conv_op: nn.Conv2d or nn.Conv3d.
        channels: C of both branches.
        reduction: channel-context MLP width is max(2C / reduction, 8).

    Shapes: global_features, local_features (B, C, *S) -> (B, C, *S); ``global_weight`` -> (B, C, *S) (the
    local branch's weight is one minus it).
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, reduction: int = 4):
        super().__init__()
        self.channel_context = ChannelContext(conv_op, channels, reduction)
        self.spatial_context = SpatialContext(conv_op, channels)
        self.channels = channels

    def global_weight(self, global_features: torch.Tensor, local_features: torch.Tensor) -> torch.Tensor:
        """The global branch's weight in (0, 1): softmax over the two branches' logits = sigmoid of their
        difference."""
        return torch.sigmoid(self.channel_context(global_features, local_features) +
                             self.spatial_context(global_features, local_features))

    def forward(self, global_features: torch.Tensor, local_features: torch.Tensor) -> torch.Tensor:
        if global_features.shape != local_features.shape:
            raise ValueError(f"ContextAwareFusion: branch shapes differ: global {tuple(global_features.shape)}, "
                             f"local {tuple(local_features.shape)}.")
        weight_global = self.global_weight(global_features, local_features)  # (B, C, *S)
        return local_features + weight_global * (global_features - local_features)

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> np.int64:
        """Activation estimate at spatial size ``size`` (see ``feature_map_estimate``)."""
        # weight map, branch difference, output
        return feature_map_estimate(size, 3 * self.channels)
