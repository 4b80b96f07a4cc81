"""Depthwise Multi-Kernel convolution (DMK): FIAS's local encoder path, 2D and 3D.

What the paper states (FIAS, Liu, Xu, Ho, arXiv 2411.10881, abstract): the local path of the dual-path encoder
is a Depthwise Multi-Kernel convolution that captures fine local detail. The authors' later code scaffold
(not the paper's code) sums a 3x3 conv with depthwise 5x5 and 7x7 convs of it and mixes with a pointwise conv.

Our choices: parallel depthwise convs of several kernel sizes (default 3, 5, 7) on the same input, summed,
then the plans' norm and nonlinearity, a pointwise (1x1) conv that mixes channels, and a residual add.
The sum of the parallel depthwise convs is computed as one depthwise conv with the summed kernels.
Kernels follow the plans per axis: an axis whose plans kernel is 1 (anisotropic data) keeps kernel 1.
The depthwise convs run in channels-last memory format: with torch 2.15 on CPU the backward of a depthwise
conv in the default layout is up to 10x (2D, kernel 5-7) and 25x (3D) slower. Even so, PyTorch's CPU backward
of a 3D depthwise conv is slow (7x7x7 kernel, 128 channels, 2x8x16x16: forward 5 ms, gradient of the input
75 ms, of the weight 62 ms): :func:`depthwise_conv` computes the gradient of the input as the forward conv of the
gradient with the flipped kernel (4 ms, the same function) and only the weight's through PyTorch.
"""
from typing import Optional, Sequence, Type, Union

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import maybe_convert_scalar_to_list
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


class _DepthwiseConv(torch.autograd.Function):
    """Stride-1 depthwise conv with odd kernels and 'same' padding; backward of the input by a forward conv.

    For stride 1 and padding (k - 1) / 2, the gradient of the input is the correlation of the output gradient
    with the kernel flipped on every spatial axis: one more depthwise forward conv, which PyTorch's CPU kernels
    do far faster than its depthwise convolution_backward. The weight's gradient is PyTorch's own. Under autocast
    the conv runs in the autocast dtype (as F.conv would) and the gradients are returned in the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        x = depthwise_layout(x)
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.dtypes, ctx.has_bias = list(padding), dtypes, bias is not None
        with torch.autocast(x.device.type, enabled=False):
            return CONV_FUNCTIONS[x.dim() - 2](x, weight, bias, padding=ctx.padding, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = depthwise_layout(grad.to(x.dtype))
        axes = list(range(2, x.dim()))
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = CONV_FUNCTIONS[x.dim() - 2](grad, weight.flip(axes), None, padding=ctx.padding,
                                                 groups=x.shape[1]).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            ones = [1] * len(axes)
            grad_weight = torch.ops.aten.convolution_backward(
                grad, x, weight, None, ones, ctx.padding, ones, False, [0] * len(axes), x.shape[1],
                [False, True, False])[1].to(ctx.dtypes[1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum([0, *axes]).to(ctx.dtypes[2])
        return grad_x, grad_weight, grad_bias, None


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Depthwise conv, stride 1, 'same' padding, odd kernel per axis, in channels-last layout; 2D and 3D.

    x (B, C, *S), weight (C, 1, *k), bias (C,) or None -> (B, C, *S) in channels-last memory format.
    The same function and gradients as ``F.conv{2,3}d(x, weight, bias, padding=(k - 1) // 2, groups=C)``,
    with a faster backward on CPU (see :class:`_DepthwiseConv`).
    """
    if any(k % 2 == 0 for k in weight.shape[2:]):
        raise ValueError(f"depthwise_conv: kernel {list(weight.shape[2:])} must be odd on every axis.")
    return _DepthwiseConv.apply(x, weight, bias, [(k - 1) // 2 for k in weight.shape[2:]])


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
        return x + self.pointwise(self.nonlin(self.norm(depthwise_conv(x, weight, bias).contiguous())))

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> np.int64:
        """Activation estimate at spatial size ``size`` (see ``feature_map_estimate``)."""
        # channels-last copy, norm input, norm output (= pointwise input), output
        return feature_map_estimate(size, 4 * self.channels)
