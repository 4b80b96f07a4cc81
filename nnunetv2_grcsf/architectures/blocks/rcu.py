"""Region Compensation Unit (RCU) of GRCSF: residual-map patches fused into pixel features by cross-attention.

What the paper states (Wang, Chen, Yang, Kim, arXiv 2502.08675, abstract only; no official code):
the RCU uses self-supervised residual maps (the pixel-wise difference between an MAE reconstruction and
the image) through a *patch-based cross-attention* that integrates regional (patch) and pixel-level
features, and a *patch-level importance score* computed from the backbone's global spatial features
weights the fusion.

Everything below that level is our design:

- Regional tokens: the residual map (B, K, *S_full) (K = number of residual channels, e.g. one per MAE mask
  ratio) is cut into non-overlapping patches and linearly embedded (the map of a conv with
  kernel = stride = ``patch_size``, computed as patch flattening + matmul), giving one token of
  ``embed_channels`` per patch on the patch grid P = S_full / patch_size, then a LayerNorm and a linear
  key/value projection.
- Pixel queries: a per-pixel linear map (a 1x1 conv) of the backbone's pixel-level features (B, C, *S).
- Patch-level importance: a two-layer 1x1-conv MLP with a sigmoid on the backbone's global spatial
  features (B, G, *P) (in GRCSFUNet: the bottleneck, whose grid is the patch grid) gives one score in
  (0, 1) per patch; it scales that patch's value vector, so unimportant patches contribute little to
  every pixel that attends to them.
- Cross-attention: every pixel query attends to all patch tokens (multi-head,
  ``torch.nn.functional.scaled_dot_product_attention``, so the (N_pixels x N_patches) attention matrix
  is never materialized by us and fused kernels are used where available). Tokens carry no position
  encoding, so the attention adds *what* anomalous regions look like; the *where* comes from a local
  term: each pixel also receives the importance-weighted value of its own patch (nearest upsampling of
  the value grid). Both are summed and projected back to C channels by a per-pixel linear map.
- Fusion into the backbone: residual add with a learnable per-channel scale (initialized to
  ``init_scale``, small but non-zero so the unit starts near identity and still passes gradients to
  all its parameters from the first step).

Interface (stable; reused by the FIAS-based networks)::

    rcu = RegionCompensationUnit(conv_op, feature_channels=C, residual_channels=K, global_channels=G,
                                 patch_size=(p_1, ..., p_d), embed_channels=None, num_heads=2)
    out = rcu(features, residual_map, global_features)
    # features        (B, C, *S)       pixel-level backbone features, S a multiple of P per axis
    # residual_map    (B, K, *S_full)  MAE residual maps, S_full divisible by patch_size per axis
    # global_features (B, G, *P)       backbone global features on the patch grid P = S_full / patch_size
    # out             (B, C, *S)       features + scale * compensation

2D and 3D share one code path: ``conv_op`` (nn.Conv2d or nn.Conv3d) decides.
"""
import math
from typing import Sequence, Type, Union

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, maybe_convert_scalar_to_list
from torch import nn
from torch.nn.modules.conv import _ConvNd


def split_into_patches(x: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """(B, K, *S) -> (B, M, K * prod(patch_size)): each non-overlapping patch flattened (N-D space-to-depth).

    M = prod(S / patch_size), patches in row-major order of the patch grid.
    """
    batch, channels, *size = x.shape
    grid = [s // p for s, p in zip(size, patch_size)]
    interleaved = [n for g, p in zip(grid, patch_size) for n in (g, p)]
    x = x.reshape(batch, channels, *interleaved)
    dims = len(size)
    grid_axes = [2 + 2 * i for i in range(dims)]
    within_patch_axes = [3 + 2 * i for i in range(dims)]
    return x.permute(0, *grid_axes, 1, *within_patch_axes).reshape(batch, math.prod(grid), -1)


class RegionTokenizer(nn.Module):
    """Residual map (B, K, *S_full) -> normalized patch tokens (B, M, D), M = prod(S_full / patch_size).

    A linear patch embedding (the same map as a conv with kernel = stride = ``patch_size``, computed as
    patch flattening + matmul, which is much faster than such a large-kernel conv on CPU), then LayerNorm.
    """

    def __init__(self, residual_channels: int, embed_channels: int, patch_size: Sequence[int]):
        super().__init__()
        self.patch_size = list(patch_size)
        self.patch_embedding = nn.Linear(residual_channels * int(np.prod(patch_size)), embed_channels)
        self.norm = nn.LayerNorm(embed_channels)

    def forward(self, residual_map: torch.Tensor) -> torch.Tensor:
        return self.norm(self.patch_embedding(split_into_patches(residual_map, self.patch_size)))


class PatchImportanceScore(nn.Module):
    """Global spatial features (B, G, *P) -> one importance score per patch in (0, 1), shape (B, 1, *P)."""

    def __init__(self, conv_op: Type[_ConvNd], global_channels: int, hidden_channels: int):
        super().__init__()
        self.score = nn.Sequential(conv_op(global_channels, hidden_channels, kernel_size=1),
                                   nn.LeakyReLU(negative_slope=0.01),
                                   conv_op(hidden_channels, 1, kernel_size=1),
                                   nn.Sigmoid())

    def forward(self, global_features: torch.Tensor) -> torch.Tensor:
        return self.score(global_features)


class RegionCompensationUnit(nn.Module):
    """Fuses MAE residual-map patches into pixel-level features; see the module docstring for the design.

    Args:
        conv_op: nn.Conv2d or nn.Conv3d; decides 2D/3D.
        feature_channels: C, channels of the pixel-level features (input and output).
        residual_channels: K, number of residual-map channels.
        global_channels: G, channels of the global features that score the patches.
        patch_size: patch edge per axis (int or sequence of length d).
        embed_channels: D, token/attention width; defaults to ``feature_channels``.
        num_heads: attention heads; must divide D.
        importance_hidden_channels: width of the importance MLP.
        init_scale: initial value of the per-channel scale of the residual add.

    Shapes: features (B, C, *S), residual_map (B, K, *S_full), global_features (B, G, *P) with
    P = S_full / patch_size and S a multiple of P per axis  ->  (B, C, *S).
    """

    def __init__(self, conv_op: Type[_ConvNd], feature_channels: int, residual_channels: int, global_channels: int,
                 patch_size: Union[int, Sequence[int]], embed_channels: int = None, num_heads: int = 2,
                 importance_hidden_channels: int = 32, init_scale: float = 0.1):
        super().__init__()
        embed_channels = feature_channels if embed_channels is None else embed_channels
        if embed_channels % num_heads:
            raise ValueError(f"RegionCompensationUnit: embed_channels={embed_channels} is not divisible by "
                             f"num_heads={num_heads}.")
        self.patch_size = [int(p) for p in maybe_convert_scalar_to_list(conv_op, patch_size)]
        if len(self.patch_size) != convert_conv_op_to_dim(conv_op):
            raise ValueError(f"RegionCompensationUnit: patch_size {self.patch_size} must have one entry per spatial "
                             f"axis of {conv_op.__name__}.")
        self.num_heads = num_heads
        self.embed_channels = embed_channels
        self.feature_channels = feature_channels
        self.tokenizer = RegionTokenizer(residual_channels, embed_channels, self.patch_size)
        self.key_value = nn.Linear(embed_channels, 2 * embed_channels)
        self.query = nn.Linear(feature_channels, embed_channels)
        self.importance = PatchImportanceScore(conv_op, global_channels, importance_hidden_channels)
        self.output_projection = nn.Linear(embed_channels, feature_channels)
        self.scale = nn.Parameter(torch.full((feature_channels,), float(init_scale)))

    def patch_grid(self, residual_size: Sequence[int]) -> list:
        """The patch grid P for a residual map of spatial size S_full; raises if S_full is not divisible."""
        if any(s % p for s, p in zip(residual_size, self.patch_size)):
            raise ValueError(f"RegionCompensationUnit: residual map size {list(residual_size)} is not divisible by "
                             f"its patch_size {self.patch_size} on every axis.")
        return [s // p for s, p in zip(residual_size, self.patch_size)]

    def _check_shapes(self, features: torch.Tensor, residual_map: torch.Tensor,
                      global_features: torch.Tensor) -> list:
        grid = self.patch_grid(residual_map.shape[2:])
        if list(global_features.shape[2:]) != grid:
            raise ValueError(f"RegionCompensationUnit: global features have grid {list(global_features.shape[2:])}, "
                             f"expected the patch grid {grid} (residual map {list(residual_map.shape[2:])} / "
                             f"patch_size {self.patch_size}).")
        if any(s % g for s, g in zip(features.shape[2:], grid)):
            raise ValueError(f"RegionCompensationUnit: feature size {list(features.shape[2:])} is not a multiple of "
                             f"the patch grid {grid}.")
        return grid

    def forward(self, features: torch.Tensor, residual_map: torch.Tensor,
                global_features: torch.Tensor) -> torch.Tensor:
        grid = self._check_shapes(features, residual_map, global_features)
        batch, _, *size = features.shape
        heads, head_channels = self.num_heads, self.embed_channels // self.num_heads

        key, value = self.key_value(self.tokenizer(residual_map)).chunk(2, dim=-1)  # (B, M, D) each
        value = value * self.importance(global_features).flatten(2).transpose(1, 2)  # weighted by (B, M, 1)

        # (B, h, N, D/h) views with unit last stride, so SDPA takes its fused (flash) kernel on CPU and GPU
        query = self.query(features.flatten(2).transpose(1, 2)).view(batch, -1, heads, head_channels).transpose(1, 2)
        attended = F.scaled_dot_product_attention(query, *(t.view(batch, -1, heads, head_channels).transpose(1, 2)
                                                           for t in (key, value)))
        attended = self.output_projection(attended.transpose(1, 2).reshape(batch, -1, self.embed_channels))

        # own-patch term, projected on the patch grid (the projection is linear) and then spread over its pixels
        own_patch = F.linear(value, self.output_projection.weight).transpose(1, 2).reshape(batch, -1, *grid)
        compensation = attended.transpose(1, 2).reshape(batch, -1, *size) + F.interpolate(own_patch, size=size,
                                                                                          mode="nearest")
        return torch.addcmul(features, self.scale.view(1, -1, *[1] * len(size)), compensation)

    def compute_conv_feature_map_size(self, feature_size: Sequence[int]) -> np.int64:
        """Feature-map elements this unit adds at feature size S, counted as dynamic_network_architectures counts
        (one map per conv-like layer output): query, attention output (D each) and output projection (C)."""
        pixels = np.prod(feature_size, dtype=np.int64)
        return np.int64(pixels * (2 * self.embed_channels + self.feature_channels))
