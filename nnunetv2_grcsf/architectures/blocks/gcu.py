"""Global Compensation Unit (GCU) of GRCSF: gives a downsampling stage back detail and global context.

What the paper states (Wang, Chen, Yang, Kim, arXiv 2502.08675, abstract only; no official code):
the GCU preserves global context and fine detail during multiscale downsampling in the U-shaped backbone.

Everything below that level is our design. One GCU sits beside every downsampling encoder stage
(stride product > 1) and adds a compensation, computed from the stage's *input*, to the stage's output:

- Detail lost by downsampling: a space-to-depth rearrangement of the stage input (pixel-unshuffle in N-D,
  per-axis strides such as (1, 2, 2): every input value of a stride block lands in one output cell, nothing
  is dropped) to C_in * prod(stride) channels, then a 1x1 projection to C_out channels and the plans' norm.
  The rearrangement is lossless; the projection is not: it keeps C_out of C_in * prod(stride) dimensions
  (with nnU-Net's doubling channels 2:1 in 2D and 4:1 in 3D, and 4:1 / 8:1 where the channels stop growing).
  What it adds over the stage's strided 3x3 convs is a linear, unsaturated path that sees every value of each
  block. The composition is exactly one conv with kernel = stride = the stage stride, computed that way
  (no rearrangement copy).
- Global context (squeeze-excitation and GCNet style): the stage input averaged over all positions, through a
  two-layer 1x1 MLP, gives per output channel a sigmoid gate of the detail path and an additive context term
  broadcast over all positions. (dynamic-network-architectures' SqueezeExcite does not fit: it gates its own
  input, and it pools axes (2, 3) only, so in 3D it gates per slice of the last axis.)
- Fusion, and how the unit starts as exactly the identity of the backbone (a checkpoint of the plain network
  behaves the same), one of ``GCU_STARTS``:
  'zero_scale' (default): stage_output + scale * (gate * detail + context), ``scale`` per output channel
  initialized to 0. ``scale`` gets a gradient from the first step; once it moves, every other parameter does.
  Its gradient is one correlation per channel between the loss gradient and the compensation, so under
  nnU-Net's SGD it grows slowly: after our benchmarks' few hundred steps the trained GCUs are still all but the
  identity (README, Accuracy; benchmarks/gcu_activity.py).
  'zero_projection': stage_output + gate * detail + context with the detail projection and the context's output
  layer zero-initialized (ControlNet's "zero convolution"), no detail norm (the norm of an all-zero map would
  amplify the first gradient by 1 / sqrt(eps)), no scale. Every weight of the zero-initialized projection gets
  its own gradient from the first step, as any conv's, so the unit changes the function at a conv's pace
  (measured in README, Accuracy).
  A network's weight initialization (GRCSFUNet.initialize, He for every conv) runs after construction: it calls
  :meth:`GlobalCompensationUnit.reset_to_identity` afterwards.

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

#: how a GCU starts as the identity (GlobalCompensationUnit's ``start``; module docstring)
GCU_STARTS = ("zero_scale", "zero_projection")


class GlobalContext(nn.Module):
    """(B, C_in, *S) -> per output channel a gate in (0, 1) and a context term, each (B, C_out, 1, ..., 1),
    from the average over all positions."""

    def __init__(self, conv_op: Type[_ConvNd], in_channels: int, out_channels: int, hidden_channels: int):
        super().__init__()
        self.mlp = nn.Sequential(conv_op(in_channels, hidden_channels, kernel_size=1),
                                 nn.LeakyReLU(negative_slope=0.01),
                                 conv_op(hidden_channels, 2 * out_channels, kernel_size=1))

    def forward(self, x: torch.Tensor):
        gate_logits, context = self.mlp(x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)).chunk(2, dim=1)
        return torch.sigmoid(gate_logits), context


class GlobalCompensationUnit(nn.Module):
    """Adds the context-gated detail of a stage's input block by block, and its global context, to the stage's
    output; the identity at initialization. See the module docstring.

    Args:
        conv_op: nn.Conv2d or nn.Conv3d; decides 2D/3D.
        in_channels: C_in, channels of the stage input.
        out_channels: C_out, channels of the stage output.
        stride: the stage's stride (int or per-axis sequence, e.g. (1, 2, 2)).
        norm_op, norm_op_kwargs: normalization of the detail path (the plans' norm op); None -> instance norm.
            Only with start 'zero_scale'.
        context_hidden_channels: width of the context MLP; None -> max(8, C_out // 8).
        start: how it starts as the identity, one of ``GCU_STARTS`` (module docstring).

    Shapes: stage_input (B, C_in, *S), stage_output (B, C_out, *(S / stride)) -> (B, C_out, *(S / stride)).
    """

    def __init__(self, conv_op: Type[_ConvNd], in_channels: int, out_channels: int,
                 stride: Union[int, Sequence[int]], norm_op: Type[nn.Module] = None, norm_op_kwargs: dict = None,
                 context_hidden_channels: int = None, start: str = "zero_scale"):
        super().__init__()
        if start not in GCU_STARTS:
            raise ValueError(f"GlobalCompensationUnit: start {start!r} is not one of {GCU_STARTS}.")
        self.stride = [int(s) for s in maybe_convert_scalar_to_list(conv_op, stride)]
        if norm_op is None:
            norm_op, norm_op_kwargs = get_matching_instancenorm(conv_op), {"affine": True}
        hidden = max(8, out_channels // 8) if context_hidden_channels is None else context_hidden_channels
        self.out_channels = out_channels
        self.start = start
        self.detail_projection = conv_op(in_channels, out_channels, kernel_size=tuple(self.stride),
                                         stride=tuple(self.stride), bias=False)
        self.detail_norm = norm_op(out_channels, **(norm_op_kwargs or {})) if start == "zero_scale" else nn.Identity()
        self.context = GlobalContext(conv_op, in_channels, out_channels, hidden)
        self.scale = nn.Parameter(torch.zeros(out_channels)) if start == "zero_scale" else None
        self.reset_to_identity()

    @torch.no_grad()
    def reset_to_identity(self):
        """Zero what makes the unit the identity (the scale, or the detail projection and the context's output
        layer); the other weights keep their values."""
        if self.start == "zero_scale":
            self.scale.zero_()
            return
        self.detail_projection.weight.zero_()
        context_output = self.context.mlp[-1]
        context_output.weight[self.out_channels:].zero_()
        context_output.bias[self.out_channels:].zero_()

    def forward(self, stage_input: torch.Tensor, stage_output: torch.Tensor) -> torch.Tensor:
        detail = self.detail_norm(self.detail_projection(stage_input))
        if detail.shape != stage_output.shape:
            raise ValueError(f"GlobalCompensationUnit: stage input {list(stage_input.shape)} downsampled by stride "
                             f"{self.stride} gives {list(detail.shape)}, but the stage output is "
                             f"{list(stage_output.shape)}; the input size must be divisible by the stride.")
        gate, context = self.context(stage_input)
        if self.scale is None:
            return torch.addcmul(stage_output + context, gate, detail)
        scale = self.scale.view(1, -1, *[1] * (stage_output.ndim - 2))
        # = stage_output + scale * (gate * detail + context); this order stores no extra full-size map
        return torch.addcmul(stage_output + scale * context, scale * gate, detail)

    def compute_conv_feature_map_size(self, output_size: Sequence[int]) -> np.int64:
        """Feature-map elements this unit adds at the stage's output size, counted as dynamic_network_architectures
        counts (one map per conv output, norm and nonlinearity included): the detail projection."""
        return np.int64(self.out_channels * np.prod(output_size, dtype=np.int64))
