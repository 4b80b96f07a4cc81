"""Mixing attention (MixAtt) of the FIAS decoder: self-attention + Monte Carlo channel attention, 2D and 3D.

What the papers state:

- FIAS (Liu, Xu, Ho, arXiv 2411.10881, abstract): the decoder is a MixAtt decoder that combines
  self-attention and Monte Carlo attention.
- Monte Carlo attention is SvANet's ``MoCAttention`` (anthonyweidai/SvANet, ``lib/model/modules/mcattn.py``):
  a channel attention (squeeze-excitation bottleneck and sigmoid) whose pooled descriptor, in training, is one
  randomly chosen cell of an adaptive average pooling to a randomly drawn grid (1, 2 or 3 per side); the
  spatial positions are shuffled first (its default), so a cell is a random subset of positions. At inference
  the descriptor is the global average pool.

Our choices:

- The grid (one size for all axes, as SvANet) and the cell are drawn once per forward pass for the whole batch
  from torch's generator (so ``torch.manual_seed`` reproduces them). With shuffling, the descriptor is computed
  directly as the mean of a random subset of positions of the drawn cell's size (same distribution as
  pooling the shuffled map, without copying it); without shuffling, as the mean over the cell's slice.
  Bottleneck width max(C / reduction, 8) (SvANet: at least 32), no norm in the bottleneck.
- MixingAttention = pre-norm self-attention token mixing with a residual (MSDA at high resolution, global
  attention at low resolution, none where the caller says so, e.g. full resolution), then Monte Carlo channel
  weights and a spatial gate (ours), both computed from the mixed tokens and applied together
  (x * w_channel * w_position, as concurrent spatial and channel squeeze-excitation, scSE). The spatial gate is
  the sigmoid of a linear map of the channels at each position (as Attention U-Net's gates; a CBAM-like conv
  over channel-mean/max maps costs, on CPU, as much time as a full conv of the stage). The product is one
  autograd function that stores only its inputs (its backward makes two full-size maps, the weights'
  gradients are batched matrix-vector products). ``MixingAttention.gates`` returns the mixed tokens and both
  weights before the product, so that a caller can recompute the product where it is consumed instead of
  storing it (the FIAS decoder does, with activation checkpointing). No MLP: the decoder's convs already mix
  channels.
"""
import math
from typing import Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.helper import maybe_convert_scalar_to_list
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnunetv2_grcsf.architectures.blocks.caf import ChannelProjection
from nnunetv2_grcsf.architectures.blocks.dmk import feature_map_estimate, per_axis_kernel
from nnunetv2_grcsf.architectures.blocks.msda import make_attention, maybe_checkpoint


def adaptive_pool_cell(size: int, grid: int, index: int) -> slice:
    """The positions along one axis that adaptive average pooling to ``grid`` cells averages for cell ``index``."""
    return slice((index * size) // grid, -((-(index + 1) * size) // grid))


class MonteCarloChannelAttention(nn.Module):
    """SvANet's Monte Carlo attention: x * sigmoid(SE(descriptor)), descriptor random in training, GAP at eval.

    Args:
        conv_op: nn.Conv2d or nn.Conv3d.
        channels: C.
        pool_sizes: grid sizes (per side) to draw from in training.
        reduction: bottleneck width is max(C / reduction, 8).
        shuffle_positions: draw the cell from a shuffled map (SvANet's default) instead of a spatial block.

    Shapes: (B, C, *S) -> (B, C, *S); ``descriptor`` (B, C, *S) -> (B, C, 1, ..).
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, pool_sizes: Sequence[int] = (1, 2, 3),
                 reduction: int = 4, shuffle_positions: bool = True):
        super().__init__()
        if not pool_sizes or any(p < 1 for p in pool_sizes):
            raise ValueError(f"MonteCarloChannelAttention: pool_sizes {list(pool_sizes)} must be positive ints.")
        hidden = max(channels // reduction, 8)
        self.excitation = nn.Sequential(conv_op(channels, hidden, 1), nn.ReLU(inplace=True),
                                        conv_op(hidden, channels, 1), nn.Sigmoid())
        self.pool_sizes = [int(p) for p in pool_sizes]
        self.shuffle_positions = shuffle_positions

    def descriptor(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool (eval) or the mean over one random cell of a random grid (training)."""
        axes = tuple(range(2, x.dim()))
        grid = self.pool_sizes[int(torch.randint(len(self.pool_sizes), ()))] if self.training else 1
        if grid == 1:
            return x.mean(axes, keepdim=True)
        cell = [adaptive_pool_cell(s, grid, int(torch.randint(grid, ()))) for s in x.shape[2:]]
        if not self.shuffle_positions:
            return x[(slice(None), slice(None), *cell)].mean(axes, keepdim=True)
        cell_positions = math.prod(c.stop - c.start for c in cell)
        chosen = torch.randperm(math.prod(x.shape[2:]), device=x.device)[:cell_positions]
        pooled = x.flatten(2)[:, :, chosen].mean(-1)
        return pooled.view(*pooled.shape, *[1] * len(axes))

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Channel weights in (0, 1): (B, C, *S) -> (B, C, 1, ..)."""
        return self.excitation(self.descriptor(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weights(x)


class SpatialGate(nn.Module):
    """One gate per position, sigmoid(linear map of the channels): (B, C, *S) -> (B, 1, *S) in (0, 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.projection = ChannelProjection(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.projection(x))


class _ChannelAndSpatialScaling(torch.autograd.Function):
    """x * channel_weights * spatial_weights; saves only its inputs (no full-size intermediate product).

    Shapes: x (B, C, *S), channel_weights (B, C, 1, ..), spatial_weights (B, 1, *S) -> (B, C, *S). The backward
    allocates two full-size maps (the input's gradient and grad * x); the weights' gradients are batched
    matrix-vector products of grad * x with the other weights (no further full-size temporaries).
    """

    @staticmethod
    def forward(ctx, x, channel_weights, spatial_weights):
        ctx.save_for_backward(x, channel_weights, spatial_weights)
        return torch.mul(x, channel_weights).mul_(spatial_weights)

    @staticmethod
    def backward(ctx, grad):
        x, channel_weights, spatial_weights = ctx.saved_tensors
        batch, channels = x.shape[:2]
        grad_x = torch.mul(grad, spatial_weights).mul_(channel_weights)
        grad_times_x = torch.mul(grad, x).view(batch, channels, -1)  # (B, C, N)
        # d/d channel_weights[b, c] = sum_n grad x sw;  d/d spatial_weights[b, n] = sum_c grad x cw
        grad_channel = torch.bmm(grad_times_x, spatial_weights.reshape(batch, -1, 1).to(grad_times_x.dtype))
        grad_spatial = torch.bmm(channel_weights.reshape(batch, 1, channels).to(grad_times_x.dtype), grad_times_x)
        return (grad_x.to(x.dtype), grad_channel.view(channel_weights.shape).to(channel_weights.dtype),
                grad_spatial.view(spatial_weights.shape).to(spatial_weights.dtype))


def scale_channels_and_positions(x: torch.Tensor, channel_weights: torch.Tensor,
                                 spatial_weights: torch.Tensor) -> torch.Tensor:
    """x * channel_weights * spatial_weights, storing nothing but the inputs for the backward pass.

    Shapes: x (B, C, *S), channel_weights (B, C, 1, ..), spatial_weights (B, 1, *S) -> (B, C, *S).
    """
    return _ChannelAndSpatialScaling.apply(x, channel_weights, spatial_weights)


class MixingAttention(nn.Module):
    """Self-attention token mixing, then Monte Carlo channel weights and spatial weights applied together.

    Args:
        conv_op: nn.Conv2d or nn.Conv3d.
        channels: C.
        attention: 'msda', 'global' or None (no token mixing, e.g. at full resolution).
        num_heads, dilations: of the attention (dilations only for 'msda').
        plans_kernel: the stage's kernel from the plans (per axis): the MSDA window is 3 on axes where it is > 1,
            1 elsewhere. None = all axes > 1.
        pool_sizes, reduction, shuffle_positions: of the Monte Carlo channel attention.
        checkpointing: recompute the token mixing in the backward pass instead of storing its activations.

    Shapes: (B, C, *S) -> (B, C, *S).
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, attention: Optional[str] = "msda", num_heads: int = 4,
                 dilations: Sequence[int] = (1, 2, 3), plans_kernel: Union[None, Sequence[int]] = None,
                 pool_sizes: Sequence[int] = (1, 2, 3), reduction: int = 4, shuffle_positions: bool = True,
                 checkpointing: bool = False):
        super().__init__()
        plans_kernel = maybe_convert_scalar_to_list(conv_op, 3 if plans_kernel is None else plans_kernel)
        if attention is None:
            self.norm, self.attention = None, None
        else:
            self.norm = nn.LayerNorm(channels)
            self.attention = make_attention(attention, conv_op, channels, num_heads, dilations,
                                            per_axis_kernel(3, plans_kernel))
        self.channel_attention = MonteCarloChannelAttention(conv_op, channels, pool_sizes, reduction,
                                                            shuffle_positions)
        self.spatial_gate = SpatialGate(channels)
        self.checkpointing = checkpointing
        self.channels = channels
        self.num_heads = num_heads
        self.neighbours = int(np.prod(per_axis_kernel(3, plans_kernel))) if attention == "msda" else None

    def mix_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x + attention(LayerNorm(x)): (B, C, *S) -> (B, C, *S)."""
        tokens = x.movedim(1, -1)
        return (tokens + self.attention.forward_tokens(self.norm(tokens))).movedim(-1, 1).contiguous()

    def gates(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mixed tokens and both weights, not yet applied: ``forward(x) ==
        scale_channels_and_positions(*gates(x))``. A caller that recomputes the (cheap) product where it is
        used, instead of storing it (FIASDecoder with activation checkpointing), takes these.

        Shapes: (B, C, *S) -> mixed (B, C, *S), channel weights (B, C, 1, ..), spatial weights (B, 1, *S).
        """
        if self.attention is not None:
            x = maybe_checkpoint(self.mix_tokens, x, self.checkpointing)
        return x, self.channel_attention.weights(x), self.spatial_gate(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scale_channels_and_positions(*self.gates(x))

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> np.int64:
        """Activation estimate at spatial size ``size`` (see ``dmk.feature_map_estimate``)."""
        per_position = self.channels + 1  # output, spatial weights
        if self.attention is not None:  # mixed tokens; unless recomputed: norm, q, k, v, attention output, probs
            per_position += self.channels
            if not self.checkpointing:
                per_position += 5 * self.channels + self.num_heads * (self.neighbours or 1)
        return feature_map_estimate(size, per_position)
