"""Depthwise Multi-Kernel convolution (DMK): FIAS's local encoder path, 2D and 3D.

What the paper states (FIAS, Liu, Xu, Ho, arXiv 2411.10881, abstract): the local path of the dual-path encoder
is a Depthwise Multi-Kernel convolution that captures fine local detail. The authors' later code scaffold
(not the paper's code) sums a 3x3 conv with depthwise 5x5 and 7x7 convs of it and mixes with a pointwise conv.

Our choices: parallel depthwise convs of several kernel sizes (default 3, 5, 7) on the same input, summed,
then the plans' norm and nonlinearity, a pointwise (1x1) conv that mixes channels, and a residual add.
The sum of the parallel depthwise convs is computed as one depthwise conv with the summed kernels.
Kernels follow the plans per axis: an axis whose plans kernel is 1 (anisotropic data) keeps kernel 1.
The depthwise convs run in channels-last memory format: with torch 2.15 on CPU the backward of a depthwise
conv in the default layout is up to 10x (2D, kernel 5-7) and 25x (3D) slower.
"""
from typing import Sequence, Type, Union

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, maybe_convert_scalar_to_list
from torch import nn
from torch.nn.modules.conv import _ConvNd

CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}  # by tensor dimension


def feature_map_estimate(size: Sequence[int], stored_per_position: float) -> np.int64:
    """A block's activation memory in the units of dynamic_network_architectures' compute_conv_feature_map_size.

    Those count one feature map per conv block (its output), while a conv-norm-nonlinearity block stores about
    two for the backward pass; so a block that stores ``stored_per_position`` elements per position (its output
    included) counts half of them, and nnU-Net's planners compare it in the same units as PlainConvUNet.
    """
    return np.int64(np.prod(size, dtype=np.int64) * stored_per_position / 2)


def per_axis_kernel(kernel_size: int, plans_kernel: Sequence[int]) -> list:
    """``kernel_size`` on every axis whose plans kernel is > 1, 1 elsewhere."""
    return [kernel_size if k > 1 else 1 for k in plans_kernel]


def depthwise_layout(x: torch.Tensor) -> torch.Tensor:
    """2D/3D ``x`` (B, C, *S) in channels-last memory format, in which PyTorch's depthwise convs are fast on CPU."""
    memory_format = CHANNELS_LAST.get(x.dim())
    return x if memory_format is None else x.contiguous(memory_format=memory_format)


class DepthwiseMultiKernelConv(nn.Module):
    """x + PW(Nonlin(Norm(sum_k DW_k(x)))): parallel depthwise convs of several kernel sizes, pointwise mix.

    The parallel depthwise convs are linear and share their input, so their sum is computed as one depthwise
    conv whose kernel is the sum of the (centred, zero-padded) kernels: the same function and the same
    gradients for every kernel, at the cost of the largest kernel alone.

    Args:
        conv_op: nn.Conv2d or nn.Conv3d.
        channels: C (input = output).
        kernel_sizes: one depthwise conv per entry (odd).
        plans_kernel: the stage's kernel from the plans (per axis); axes where it is 1 get kernel 1.
            None: all axes use the full kernel.
        conv_bias, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs: as in the plans (norm/nonlin may be None).

    Shapes: (B, C, *S) -> (B, C, *S).
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, kernel_sizes: Sequence[int] = (3, 5, 7),
                 plans_kernel: Union[None, Sequence[int]] = None, conv_bias: bool = True,
                 norm_op: Union[None, Type[nn.Module]] = None, norm_op_kwargs: dict = None,
                 nonlin: Union[None, Type[nn.Module]] = None, nonlin_kwargs: dict = None):
        super().__init__()
        if not kernel_sizes or any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"DepthwiseMultiKernelConv: kernel_sizes {list(kernel_sizes)} must be odd positive ints.")
        plans_kernel = maybe_convert_scalar_to_list(conv_op, 3 if plans_kernel is None else plans_kernel)
        self.depthwise = nn.ModuleList()
        for k in kernel_sizes:
            kernel = per_axis_kernel(k, plans_kernel)
            self.depthwise.append(conv_op(channels, channels, kernel, padding=[(i - 1) // 2 for i in kernel],
                                          groups=channels, bias=conv_bias))
        self.merged_kernel = per_axis_kernel(max(kernel_sizes), plans_kernel)
        self.norm = nn.Identity() if norm_op is None else norm_op(channels, **(norm_op_kwargs or {}))
        self.nonlin = nn.Identity() if nonlin is None else nonlin(**(nonlin_kwargs or {}))
        self.pointwise = conv_op(channels, channels, 1, bias=conv_bias)
        self.channels = channels
        self.conv_function = CONV_FUNCTIONS[convert_conv_op_to_dim(conv_op)]

    def merged_weight_and_bias(self):
        """The single depthwise kernel (C, 1, *k_max) and bias equal to the sum of the parallel convs."""
        weight, bias = 0, None
        for conv in self.depthwise:
            pad = []
            for full, k in zip(reversed(self.merged_kernel), reversed(conv.kernel_size)):
                pad += [(full - k) // 2] * 2
            weight = weight + F.pad(conv.weight, pad)
            if conv.bias is not None:
                bias = conv.bias if bias is None else bias + conv.bias
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.merged_weight_and_bias()
        padding = [(k - 1) // 2 for k in self.merged_kernel]
        mixed = self.conv_function(depthwise_layout(x), weight, bias, padding=padding, groups=self.channels)
        return x + self.pointwise(self.nonlin(self.norm(mixed.contiguous())))

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> np.int64:
        """Activation estimate at spatial size ``size`` (see ``feature_map_estimate``)."""
        # channels-last copy, norm input, norm output (= pointwise input), output
        return feature_map_estimate(size, 4 * self.channels)
