"""Mixing attention (MixAtt) of the FIAS decoder: self-attention + Monte Carlo channel attention, 2D and 3D.

What the papers state:

- FIAS (Liu, Xu, Ho, arXiv 2411.10881, abstract): the decoder is a MixAtt decoder that combines
  self-attention and Monte Carlo attention. The authors' later code scaffold (not the paper's code): a MixAtt
  block is ``x + MHSA(x) + x * MCA(x)``.
- Monte Carlo attention is SvANet's ``MoCAttention`` (anthonyweidai/SvANet, ``lib/model/modules/mcattn.py``):
  a channel attention (squeeze-excitation bottleneck and sigmoid) whose pooled descriptor, in training, is one
  randomly chosen cell of an adaptive average pooling to a randomly drawn grid (1, 2 or 3 per side); at
  inference the global average pool.

Our choices:

- MixingAttention is the scaffold's identity scaffold, ``out = x + attention(LayerNorm(x)) + x * MC(x)``: the
  pre-norm is ours (as DilateFormer's blocks); the token mixing is MSDA at high resolution, global attention at
  low resolution, none where the caller says so (full resolution: ``out = x + x * MC(x)``). No spatial gate, no
  MLP (the decoder's convs already mix channels).
- Monte Carlo draws are tensors (``torch.randint`` / ``torch.rand`` / ``torch.randperm`` on the input's device),
  never Python numbers: no graph break and no recompilation per draw under torch.compile, and
  ``torch.manual_seed`` reproduces them. One grid (the same on every axis, as SvANet) and one cell per forward
  pass for the whole batch. The descriptor is the mean over the drawn cell, computed for every grid and cell
  with the same static shapes as a weighted sum ``x @ weights`` (weights = the cell's indicator / its size).
- ``shuffle_positions`` (default on): the cell is taken from a randomly shuffled map, i.e. the mean of a random
  subset of positions of the cell's size (the indicator permuted by ``torch.randperm``); off, the cell is a
  spatial block exactly as adaptive average pooling makes it.
- The bottleneck is dynamic-network-architectures' ``SqueezeExcite`` layers (fc1, ReLU, fc2, sigmoid), width
  max(C / reduction, 8); its own ``forward`` always pools globally (and over axes 2-3 only), so we call its layers
  on our descriptor.
"""
import math
from typing import Optional, Sequence, Type, Union

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.helper import maybe_convert_scalar_to_list
from dynamic_network_architectures.building_blocks.regularization import SqueezeExcite
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnunetv2_grcsf.architectures.blocks.msda import (attention_outside_graph, attention_stored_per_position,
                                                      make_attention)
from nnunetv2_grcsf.architectures.helpers import feature_map_estimate, maybe_checkpoint, maybe_eager, per_axis_kernel


def adaptive_pool_cell(size: int, grid: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(size,) bool: the positions along one axis that adaptive average pooling to ``grid`` cells averages for
    cell ``index`` (tensors of one element): [floor(index * size / grid), ceil((index + 1) * size / grid))."""
    position = torch.arange(size, device=grid.device)
    start = torch.div(index * size, grid, rounding_mode="floor")
    stop = -torch.div(-(index + 1) * size, grid, rounding_mode="floor")
    return (position >= start) & (position < stop)


class MonteCarloChannelAttention(nn.Module):
    """SvANet's Monte Carlo attention: x * sigmoid(SE(descriptor)), descriptor random in training, GAP at eval.

    Args:
        conv_op: nn.Conv2d or nn.Conv3d.
        channels: C.
        pool_sizes: grid sizes (per side) to draw from in training.
        reduction: bottleneck width is max(C / reduction, 8).
        shuffle_positions: draw the cell from a shuffled map instead of a spatial block.

    Shapes: (B, C, *S) -> (B, C, *S); ``descriptor`` and ``weights`` (B, C, *S) -> (B, C, 1, ..).
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, pool_sizes: Sequence[int] = (1, 2, 3),
                 reduction: int = 4, shuffle_positions: bool = True):
        super().__init__()
        if not pool_sizes or any(p < 1 for p in pool_sizes):
            raise ValueError(f"MonteCarloChannelAttention: pool_sizes {list(pool_sizes)} must be positive ints.")
        self.excitation = SqueezeExcite(channels, conv_op, rd_channels=max(channels // reduction, 8))
        self.pool_sizes = [int(p) for p in pool_sizes]
        self.shuffle_positions = shuffle_positions

    def descriptor(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool (eval) or the mean over one random cell of a random grid (training)."""
        axes = tuple(range(2, x.dim()))
        if not self.training:
            return x.mean(axes, keepdim=True)
        size = x.shape[2:]
        draw = torch.randint(len(self.pool_sizes), (1,), device=x.device)  # (1,): indexing stays a tensor op
        grid = torch.tensor(self.pool_sizes, device=x.device)[draw]
        cell = (torch.rand(len(size), device=x.device) * grid).long()  # one uniform cell index per axis
        indicator = torch.ones((), dtype=torch.bool, device=x.device)
        for axis, extent in enumerate(size):
            indicator = indicator[..., None] & adaptive_pool_cell(extent, grid, cell[axis])
        weights = indicator.flatten().to(x.dtype)
        weights = weights / weights.sum()
        if self.shuffle_positions:
            weights = weights[torch.randperm(math.prod(size), device=x.device)]
        pooled = torch.matmul(x.flatten(2), weights)  # (B, C)
        return pooled.view(*pooled.shape, *[1] * len(axes))

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Channel weights in (0, 1): (B, C, *S) -> (B, C, 1, ..)."""
        se = self.excitation
        return se.gate(se.fc2(se.act(se.bn(se.fc1(self.descriptor(x))))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weights(x)


class MixingAttention(nn.Module):
    """x + self-attention(LayerNorm(x)) + x * MonteCarloChannelAttention weights(x).

    Args:
        conv_op: nn.Conv2d or nn.Conv3d.
        channels: C.
        attention: 'msda', 'global' or None (no token mixing, e.g. at full resolution).
        num_heads, dilations, head_dim: of the attention (dilations only for 'msda').
        plans_kernel: the stage's kernel from the plans (per axis): the MSDA window is 3 on axes where it is > 1,
            1 elsewhere. None = all axes > 1.
        pool_sizes, reduction, shuffle_positions: of the Monte Carlo channel attention.
        checkpointing: recompute the token mixing in the backward pass instead of storing its activations.

    Shapes: (B, C, *S) -> (B, C, *S).
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, attention: Optional[str] = "msda", num_heads: int = 3,
                 dilations: Sequence[int] = (1, 2, 3), plans_kernel: Union[None, Sequence[int]] = None,
                 pool_sizes: Sequence[int] = (1, 2, 3), reduction: int = 4, shuffle_positions: bool = True,
                 checkpointing: bool = False, head_dim: int = None):
        super().__init__()
        plans_kernel = maybe_convert_scalar_to_list(conv_op, 3 if plans_kernel is None else plans_kernel)
        if attention is None:
            self.norm, self.attention = None, None
        else:
            self.norm = nn.LayerNorm(channels)
            self.attention = make_attention(attention, conv_op, channels, num_heads, dilations,
                                            per_axis_kernel(3, plans_kernel), head_dim)
        self.channel_attention = MonteCarloChannelAttention(conv_op, channels, pool_sizes, reduction,
                                                            shuffle_positions)
        self.checkpointing = checkpointing
        self.channels = channels
        self.neighbours = int(np.prod(per_axis_kernel(3, plans_kernel))) if attention == "msda" else 1

    def self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """attention(LayerNorm(x)) without the residual: (B, C, *S) -> (B, C, *S)."""
        return self.attention.forward_tokens(self.norm(x.movedim(1, -1))).movedim(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # eagerly around MSDA's flex_attention (helpers.maybe_eager)
        return maybe_eager(self._forward, x, attention_outside_graph(self.attention, x))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x + x * self.channel_attention.weights(x)
        if self.attention is not None:
            out = out + maybe_checkpoint(self.self_attention, x, self.checkpointing)
        return out

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> np.int64:
        """Activation estimate at spatial size ``size`` (see ``helpers.feature_map_estimate``)."""
        per_position = 2 * self.channels  # x * weights, output
        if self.attention is not None:  # attention output; unless recomputed: norm and the attention's own
            per_position += self.channels
            if not self.checkpointing:
                per_position += self.channels + attention_stored_per_position(self.attention, self.neighbours)
        return feature_map_estimate(size, per_position)
