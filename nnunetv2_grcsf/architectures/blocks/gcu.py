"""Global Compensation Unit (GCU) of GRCSF: gives back what a downsampling stage throws away.

What the paper states (Wang, Chen, Yang, Kim, arXiv 2502.08675, abstract only; no official code):
the GCU preserves global context and fine detail during multiscale downsampling in the U-shaped backbone.

Everything below that level is our design. One GCU sits beside every downsampling encoder stage
(stride product > 1) and adds a compensation to that stage's output:

- Fine detail: a lossless space-to-depth rearrangement of the stage input (pixel-unshuffle generalized
  to N-D and per-axis strides such as (1, 2, 2): every input value lands in exactly one output cell)
  followed by a 1x1 projection to the stage's output channels. That composition is exactly one conv with
  kernel = stride = the stage stride, which is how it is computed (no reshuffle copy). Unlike the
  stage's strided 3x3 convs it is a linear, unsaturated path (no nonlinearity, no dropout) that carries
  the whole content of each output cell's input block; the plans' norm op scales it like the stage output.
- Global context: global average pooling of the stage input -> two 1x1 convs (bottleneck MLP with
  LeakyReLU) -> sigmoid gives one weight per output channel that gates the detail path (squeeze-excitation
  style), so the image-wide context decides which detail channels are compensated.
- Fusion: stage_output + scale * gate * detail, with a learnable per-channel scale initialized to
  ``init_scale`` (small, so the encoder starts near the plain backbone, but non-zero so every parameter
  gets a gradient from the first step).

Shapes: stage_input (B, C_in, *S), stage_output (B, C_out, *(S / stride)) -> (B, C_out, *(S / stride)).
2D and 3D share one code path: ``conv_op`` decides.
"""
from typing import Sequence, Type, Union

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.helper import get_matching_instancenorm, \
    maybe_convert_scalar_to_list
from torch import nn
from torch.nn.modules.conv import _ConvNd


class GlobalContextGate(nn.Module):
    """(B, C_in, *S) -> per-channel weights (B, C_out, 1, ..., 1) in (0, 1) from the global average."""

    def __init__(self, conv_op: Type[_ConvNd], in_channels: int, out_channels: int, hidden_channels: int):
        super().__init__()
        self.mlp = nn.Sequential(conv_op(in_channels, hidden_channels, kernel_size=1),
                                 nn.LeakyReLU(negative_slope=0.01),
                                 conv_op(hidden_channels, out_channels, kernel_size=1),
                                 nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.mean(dim=tuple(range(2, x.ndim)), keepdim=True))


class GlobalCompensationUnit(nn.Module):
    """Adds a globally gated, lossless-downsampled copy of a stage's input to the stage's output.

    Args:
        conv_op: nn.Conv2d or nn.Conv3d; decides 2D/3D.
        in_channels: C_in, channels of the stage input.
        out_channels: C_out, channels of the stage output.
        stride: the stage's stride (int or per-axis sequence, e.g. (1, 2, 2)).
        norm_op, norm_op_kwargs: normalization of the detail path (the plans' norm op); None -> instance norm.
        gate_hidden_channels: width of the context-gate MLP; None -> max(8, C_out // 8).
        init_scale: initial value of the per-channel scale of the compensation.

    Shapes: stage_input (B, C_in, *S), stage_output (B, C_out, *(S / stride)) -> (B, C_out, *(S / stride)).
    """

    def __init__(self, conv_op: Type[_ConvNd], in_channels: int, out_channels: int,
                 stride: Union[int, Sequence[int]], norm_op: Type[nn.Module] = None, norm_op_kwargs: dict = None,
                 gate_hidden_channels: int = None, init_scale: float = 0.1):
        super().__init__()
        self.stride = [int(s) for s in maybe_convert_scalar_to_list(conv_op, stride)]
        if norm_op is None:
            norm_op, norm_op_kwargs = get_matching_instancenorm(conv_op), {"affine": True}
        gate_hidden_channels = max(8, out_channels // 8) if gate_hidden_channels is None else gate_hidden_channels
        self.out_channels = out_channels
        self.detail_projection = conv_op(in_channels, out_channels, kernel_size=tuple(self.stride),
                                         stride=tuple(self.stride), bias=False)
        self.detail_norm = norm_op(out_channels, **(norm_op_kwargs or {}))
        self.context_gate = GlobalContextGate(conv_op, in_channels, out_channels, gate_hidden_channels)
        self.scale = nn.Parameter(torch.full((out_channels,), float(init_scale)))

    def forward(self, stage_input: torch.Tensor, stage_output: torch.Tensor) -> torch.Tensor:
        detail = self.detail_norm(self.detail_projection(stage_input))
        if detail.shape != stage_output.shape:
            raise ValueError(f"GlobalCompensationUnit: stage input {list(stage_input.shape)} downsampled by stride "
                             f"{self.stride} gives {list(detail.shape)}, but the stage output is "
                             f"{list(stage_output.shape)}; the input size must be divisible by the stride.")
        channel_weights = self.scale.view(1, -1, *[1] * (stage_output.ndim - 2)) * self.context_gate(stage_input)
        return torch.addcmul(stage_output, channel_weights, detail)

    def compute_conv_feature_map_size(self, output_size: Sequence[int]) -> np.int64:
        """Feature-map elements this unit adds at the stage's output size, counted as dynamic_network_architectures
        counts (one map per conv output, norm and nonlinearity included): the detail projection."""
        return np.int64(self.out_channels * np.prod(output_size, dtype=np.int64))
