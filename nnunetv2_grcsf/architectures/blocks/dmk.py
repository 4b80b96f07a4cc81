"""Depthwise Multi-Kernel convolution (DMK): FIAS's local encoder path, 2D and 3D.

What the paper states (FIAS, Liu, Xu, Ho, arXiv 2411.10881, abstract): the local path of the dual-path encoder
is a Depthwise Multi-Kernel convolution that captures fine local detail. The authors' later code scaffold
(not the paper's code): a dense 3x3 conv, whose output is summed with depthwise 5x5 and 7x7 convs of it, then a
pointwise conv.

Our choices: that structure, y = Conv_3(x), out = x + PW(Nonlin(Norm(y + DW_5(y) + DW_7(y)))): the residual add
and the plans' norm and nonlinearity before the pointwise conv are ours (as the other blocks of the network,
which keep the input's scale). Kernels follow the plans per axis: an axis whose plans kernel is 1 (anisotropic
data) keeps kernel 1. The identity and the depthwise convs are linear and share their input, so their sum is
computed as one depthwise conv whose kernel is the centred sum of theirs plus the identity's unit tap: the same
function and gradients for every kernel, at the cost of the largest depthwise kernel alone
(:meth:`DepthwiseMultiKernelConv.merged_weight_and_bias`). The depthwise conv is ``helpers.depthwise_conv``
(cuDNN on CUDA, a faster backward on the CPU).
"""
from typing import Sequence, Type, Union

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import maybe_convert_scalar_to_list
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnunetv2_grcsf.architectures.helpers import depthwise_conv, feature_map_estimate, per_axis_kernel


class DepthwiseMultiKernelConv(nn.Module):
    """x + PW(Nonlin(Norm(y + sum_k DW_k(y)))), y = dense conv of x: the scaffold's DMK with a residual.

    Args:
        conv_op: nn.Conv2d or nn.Conv3d.
        channels: C (input = output).
        kernel_sizes: the dense conv's kernel first, then one depthwise conv per further entry (odd; (3, 5, 7)).
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
        dense = per_axis_kernel(kernel_sizes[0], plans_kernel)
        self.conv = conv_op(channels, channels, dense, padding=[(k - 1) // 2 for k in dense], bias=conv_bias)
        self.depthwise = nn.ModuleList()
        for k in kernel_sizes[1:]:
            kernel = per_axis_kernel(k, plans_kernel)
            self.depthwise.append(conv_op(channels, channels, kernel, padding=[(i - 1) // 2 for i in kernel],
                                          groups=channels, bias=conv_bias))
        self.merged_kernel = per_axis_kernel(max(kernel_sizes[1:], default=1), plans_kernel)
        self.norm = nn.Identity() if norm_op is None else norm_op(channels, **(norm_op_kwargs or {}))
        self.nonlin = nn.Identity() if nonlin is None else nonlin(**(nonlin_kwargs or {}))
        self.pointwise = conv_op(channels, channels, 1, bias=conv_bias)
        self.channels = channels

    def merged_weight_and_bias(self):
        """The single depthwise kernel (C, 1, *k_max) and bias of identity + the sum of the depthwise convs."""
        weight = torch.zeros(self.channels, 1, *self.merged_kernel, device=self.pointwise.weight.device,
                             dtype=self.pointwise.weight.dtype)
        weight[(Ellipsis, *[k // 2 for k in self.merged_kernel])] = 1  # the identity
        bias = None
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
        summed = depthwise_conv(self.conv(x), weight, bias).contiguous()
        return x + self.pointwise(self.nonlin(self.norm(summed)))

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> np.int64:
        """Activation estimate at spatial size ``size`` (see ``helpers.feature_map_estimate``)."""
        # dense conv output, depthwise sum (norm input), norm output (= pointwise input), output
        return feature_map_estimate(size, 4 * self.channels)
