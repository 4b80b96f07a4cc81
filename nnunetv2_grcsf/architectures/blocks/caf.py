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
two-way softmax is the sigmoid of it, which stores one weight map instead of two. (A CBAM-like spatial conv
over channel-mean/max maps was measured on CPU: a conv with 2-4 channels costs as much time as a full 3x3
conv of the stage.)
"""
from typing import Sequence, Type

import numpy as np
import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnunetv2_grcsf.architectures.blocks.dmk import feature_map_estimate


class ChannelProjection(nn.Module):
    """Per-position linear map of the channels to one value: (B, C, *S) -> (B, 1, *S).

    The same function as a 1x1 conv with one output channel, computed as a batched matrix product
    (1, C) @ (C, prod(S)) per sample: on CPU a conv with one output costs as much as one with C, and the
    weighted channel sum ``(x * w).sum(1)`` makes a full-size temporary in the forward pass and two in the
    backward pass (6x slower than the product at 2 x 32 x 224 x 256). The input is read in place when it is
    contiguous (NC...), as the FIAS blocks give it.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.linear = nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        out = torch.baddbmm(self.linear.bias.view(1, 1, 1), self.linear.weight.expand(batch, 1, channels),
                            x.reshape(batch, channels, -1))
        return out.view(batch, 1, *x.shape[2:])


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

    def __init__(self, channels: int):
        super().__init__()
        self.global_projection = ChannelProjection(channels)
        self.local_projection = ChannelProjection(channels)

    def forward(self, global_features: torch.Tensor, local_features: torch.Tensor) -> torch.Tensor:
        return self.global_projection(global_features) + self.local_projection(local_features)


class ContextAwareFusion(nn.Module):
    """Input-dependent convex combination of the global and local branch, per channel and position.

    Args:
        conv_op: nn.Conv2d or nn.Conv3d.
        channels: C of both branches.
        reduction: channel-context MLP width is max(2C / reduction, 8).

    Shapes: global_features, local_features (B, C, *S) -> (B, C, *S); with ``return_weights=True`` also the
    branch weights (B, 2, C, *S) ([:, 0] global, [:, 1] local; they sum to one).
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, reduction: int = 4):
        super().__init__()
        self.channel_context = ChannelContext(conv_op, channels, reduction)
        self.spatial_context = SpatialContext(channels)
        self.channels = channels

    def forward(self, global_features: torch.Tensor, local_features: torch.Tensor, return_weights: bool = False):
        if global_features.shape != local_features.shape:
            raise ValueError(f"ContextAwareFusion: branch shapes differ: global {tuple(global_features.shape)}, "
                             f"local {tuple(local_features.shape)}.")
        # softmax over the two branches = sigmoid of the difference of their logits
        weight_global = torch.sigmoid(self.channel_context(global_features, local_features) +
                                      self.spatial_context(global_features, local_features))  # (B, C, *S)
        fused = local_features + weight_global * (global_features - local_features)
        if return_weights:
            return fused, torch.stack([weight_global, 1 - weight_global], 1)
        return fused

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> np.int64:
        """Activation estimate at spatial size ``size`` (see ``feature_map_estimate``)."""
        # weight map, branch difference, output
        return feature_map_estimate(size, 3 * self.channels)
