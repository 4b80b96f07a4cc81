"""Multi-scale dilated attention (MSDA) and the attention blocks of FIAS's global encoder path, 2D and 3D.

What the papers state:

- FIAS (Liu, Xu, Ho, arXiv 2411.10881, abstract): the global path of the dual-path encoder is DilateFormer,
  which captures long-range global features.
- DilateFormer (Jiao et al., IEEE TMM 2023; code: JIAOJIAYUASD/dilateformer, ``models/dilateformer.py``):
  a 1x1 projection makes queries, keys and values; channels (and heads) are split into one group per dilation
  (1, 2, 3; heads divisible by the number of dilations); in each group every position attends to its
  kernel-3 neighbourhood sampled at that group's dilation (softmax over the k^2 neighbours, scale
  head_dim^-0.5); the groups are concatenated and linearly projected. A block is: depthwise-conv positional
  encoding, pre-norm (LayerNorm) MSDA, pre-norm MLP with ratio 4 and GELU. MSDA is used in the two
  high-resolution stages, plain global self-attention in the deeper ones.

Our choices:

- One code path for 2D and 3D (``conv_op`` decides): the neighbourhood is k^d positions (27 in 3D).
- Memory: DilateFormer gathers keys and values with ``nn.Unfold``, which stores k^d copies of them (27x in
  3D). We never materialize that: keys and values are zero-padded, each neighbour offset is a *view* (a
  slice) of the padded tensor, and logits and weighted values are accumulated offset by offset, in a custom
  autograd function whose hand-written backward does the same. It saves q, k, v and the attention
  probabilities (k^d per head and position, not per channel): about 3C + 27C / head_dim floats per position
  in 3D (4.7 C with head_dim 16) instead of DilateFormer's 2 * 27 C for the unfolded keys and values alone.
  Under CUDA autocast it computes in float32.
- Borders: DilateFormer's zero padding lets out-of-image neighbours take part in the softmax with logit 0 and
  value 0. We mask them out instead (logit -inf), so a window that covers the whole input is exactly global
  attention. A feature map smaller than the dilated window ``dilation * (k - 1) + 1`` on an axis would leave
  that group attending to little more than itself; :meth:`MultiScaleDilatedAttention.check_size` rejects it.
- ``kernel_size`` may differ per axis (nnU-Net plans for anisotropic data have kernel 1 on some axes: the
  window then has size 1 there).
- Layout: the attention modules take (B, C, *S); internally, and in the blocks, tokens are channels-last
  (B, *S, C) so LayerNorm and the projections are plain ``nn.LayerNorm`` / ``nn.Linear`` as in DilateFormer.
- Global attention uses ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels where available).
"""
import itertools
from typing import List, Sequence, Tuple, Type, Union

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, maybe_convert_scalar_to_list
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnunetv2_grcsf.architectures.blocks.dmk import depthwise_layout, feature_map_estimate

ATTENTION_KINDS = ("msda", "global")


def dilated_window_extent(kernel_size: int, dilation: int) -> int:
    """Positions spanned along one axis by a window of ``kernel_size`` taps at ``dilation``."""
    return dilation * (kernel_size - 1) + 1


def window_offsets(kernel_size: Sequence[int], dilation: int) -> List[Tuple[int, ...]]:
    """All neighbour offsets of a centred window (one tuple per neighbour, one entry per spatial axis)."""
    return list(itertools.product(*[[dilation * (i - (k - 1) // 2) for i in range(k)] for k in kernel_size]))


class _NeighborWindows:
    """The neighbour offsets of a dilated window over a spatial size, as slices into a zero-padded tensor."""

    def __init__(self, size: Sequence[int], kernel_size: Sequence[int], dilation: int, device: torch.device):
        self.radius = [dilation * ((k - 1) // 2) for k in kernel_size]
        self.pad = []  # F.pad order: last axis first
        for r in reversed(self.radius):
            self.pad += [r, r]
        self.slices = [tuple(slice(r + o, r + o + s) for r, o, s in zip(self.radius, offset, size))
                       for offset in window_offsets(kernel_size, dilation)]
        inside = F.pad(torch.ones(tuple(size), dtype=torch.bool, device=device), self.pad)
        self.outside = ~torch.stack([inside[window] for window in self.slices])  # (K, *S)

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pad)

    def view(self, padded: torch.Tensor, j: int) -> torch.Tensor:
        """Neighbour j of every position: a view (B, h, d, *S) into the padded (B, h, d, *S_padded)."""
        return padded[(slice(None), slice(None), slice(None), *self.slices[j])]

    def centre(self, padded: torch.Tensor) -> torch.Tensor:
        """The unpadded part of a padded tensor."""
        return padded[(slice(None), slice(None), slice(None), *[slice(r, p - r) for r, p in
                                                                zip(self.radius, padded.shape[3:])])]


class _DilatedNeighborhoodAttention(torch.autograd.Function):
    """softmax_j(scale <q, k_j>) v_j over the dilated neighbours j; hand-written backward, neighbour by neighbour.

    Saves q, k, v (unpadded) and the probabilities (B, h, K, *S); never (K x d) unfolded keys/values.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, q, k, v, kernel_size, dilation, scale):
        windows = _NeighborWindows(q.shape[3:], kernel_size, dilation, q.device)
        k_padded, v_padded = windows.padded(k), windows.padded(v)
        logits = q.new_empty((q.shape[0], q.shape[1], len(windows.slices), *q.shape[3:]))
        for j in range(len(windows.slices)):
            torch.sum(q * windows.view(k_padded, j), dim=2, out=logits[:, :, j])
        probabilities = logits.mul_(scale).masked_fill_(windows.outside, float("-inf")).softmax(2)
        out = torch.zeros_like(q)
        for j in range(len(windows.slices)):
            out.addcmul_(probabilities[:, :, j:j + 1], windows.view(v_padded, j))
        ctx.save_for_backward(q, k, v, probabilities)
        ctx.windows, ctx.scale = windows, scale
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        q, k, v, probabilities = ctx.saved_tensors
        windows = ctx.windows
        grad_out = grad_out.contiguous()
        v_padded = windows.padded(v)
        grad_v_padded = torch.zeros_like(v_padded)
        grad_probabilities = torch.empty_like(probabilities)
        for j in range(len(windows.slices)):
            windows.view(grad_v_padded, j).addcmul_(probabilities[:, :, j:j + 1], grad_out)
            torch.sum(grad_out * windows.view(v_padded, j), dim=2, out=grad_probabilities[:, :, j])
        del v_padded
        # softmax backward dS_j = P_j (dP_j - sum_i P_i dP_i), times the logit scale
        grad_logits = grad_probabilities.sub_((probabilities * grad_probabilities).sum(2, keepdim=True))
        grad_logits.mul_(probabilities).mul_(ctx.scale)
        k_padded = windows.padded(k)
        grad_q = torch.zeros_like(q)
        grad_k_padded = torch.zeros_like(k_padded)
        for j in range(len(windows.slices)):
            grad_q.addcmul_(grad_logits[:, :, j:j + 1], windows.view(k_padded, j))
            windows.view(grad_k_padded, j).addcmul_(grad_logits[:, :, j:j + 1], q)
        return grad_q, windows.centre(grad_k_padded), windows.centre(grad_v_padded), None, None, None


def dilated_neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: Sequence[int],
                                   dilation: int, scale: float) -> torch.Tensor:
    """Each position attends to its dilated neighbourhood; out-of-image neighbours are masked out.

    q, k, v: (B, h, d, *S) -> (B, h, d, *S); logits are scale * <q, k_j>.
    The k^dim neighbour keys/values are views into one zero-padded copy of k and v (no unfold); the backward
    is written by hand and accumulates in place, offset by offset.
    """
    return _DilatedNeighborhoodAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(),
                                                tuple(kernel_size), int(dilation), float(scale))


class MultiScaleDilatedAttention(nn.Module):
    """DilateFormer's MSDA for 2D/3D: one head group per dilation, each attending to its dilated k^d window.

    Args:
        conv_op: nn.Conv2d or nn.Conv3d; decides the number of spatial axes.
        channels: C; must be divisible by ``num_heads``.
        num_heads: total heads; must be divisible by ``len(dilations)`` (each dilation gets as many heads).
        dilations: one head group per entry.
        kernel_size: window taps per axis (int or one per axis; 1 on an axis = no neighbours along it).
        qkv_bias: bias of the q/k/v projection.

    Shapes: forward (B, C, *S) -> (B, C, *S); forward_tokens (B, *S, C) -> (B, *S, C).
    Each spatial axis with a window > 1 must be at least ``max(dilations) * (k - 1) + 1`` long.
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, num_heads: int, dilations: Sequence[int] = (1, 2, 3),
                 kernel_size: Union[int, Sequence[int]] = 3, qkv_bias: bool = True):
        super().__init__()
        self.kernel_size = [int(k) for k in maybe_convert_scalar_to_list(conv_op, kernel_size)]
        self.dilations = [int(d) for d in dilations]
        if len(self.kernel_size) != convert_conv_op_to_dim(conv_op):
            raise ValueError(f"MultiScaleDilatedAttention: kernel_size {self.kernel_size} needs one entry per spatial "
                             f"axis of {conv_op.__name__}.")
        check_attention_settings(channels, num_heads, self.dilations, self.kernel_size, "MultiScaleDilatedAttention")
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        self.proj = nn.Linear(channels, channels)

    def minimum_size(self) -> List[int]:
        """Smallest spatial size per axis that holds the widest dilated window."""
        return [dilated_window_extent(k, max(self.dilations)) if k > 1 else 1 for k in self.kernel_size]

    def check_size(self, size: Sequence[int]):
        """Raises ValueError if a spatial size is smaller than the widest dilated window."""
        too_small = [axis for axis, (s, m) in enumerate(zip(size, self.minimum_size())) if s < m]
        if too_small:
            raise ValueError(
                f"MultiScaleDilatedAttention: feature map {list(size)} is smaller than the dilated window "
                f"{self.minimum_size()} (kernel {self.kernel_size}, dilation {max(self.dilations)}) on axis "
                f"{too_small}; use smaller dilations or global attention at this resolution.")

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, *size, channels = tokens.shape
        self.check_size(size)
        groups = len(self.dilations)
        heads_per_group = self.num_heads // groups
        qkv = self.qkv(tokens).view(batch, -1, 3, groups, heads_per_group, self.head_dim)
        qkv = qkv.permute(2, 3, 0, 4, 5, 1).reshape(3, groups, batch, heads_per_group, self.head_dim, *size)
        q, k, v = qkv  # (groups, B, h_g, d, *S) each
        out = torch.stack([dilated_neighborhood_attention(q[g], k[g], v[g], self.kernel_size, dilation, self.scale)
                           for g, dilation in enumerate(self.dilations)])  # (groups, B, h_g, d, *S)
        out = out.permute(1, *range(4, 4 + len(size)), 0, 2, 3).reshape(batch, *size, channels)
        return self.proj(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x.movedim(1, -1)).movedim(-1, 1)


class GlobalSelfAttention(nn.Module):
    """Multi-head self-attention over all positions (DilateFormer's deep-stage attention), 2D/3D.

    Shapes: forward (B, C, *S) -> (B, C, *S); forward_tokens (B, *S, C) -> (B, *S, C).
    Memory and time grow with (prod S)^2 unless a fused kernel is used: meant for low-resolution stages.
    """

    def __init__(self, channels: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        check_attention_settings(channels, num_heads, [1], [1], "GlobalSelfAttention")
        self.num_heads = num_heads
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        self.proj = nn.Linear(channels, channels)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, *size, channels = tokens.shape
        qkv = self.qkv(tokens).view(batch, -1, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, d) each
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, *size, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x.movedim(1, -1)).movedim(-1, 1)


def check_attention_settings(channels: int, num_heads: int, dilations: Sequence[int], kernel_size: Sequence[int],
                             where: str):
    """Raises ValueError (naming ``where``) unless heads, channels, dilations and window are consistent."""
    if num_heads < 1 or channels % num_heads:
        raise ValueError(f"{where}: channels={channels} is not divisible by num_heads={num_heads}.")
    if not dilations or any(d < 1 for d in dilations):
        raise ValueError(f"{where}: dilations {list(dilations)} must be positive integers (at least one).")
    if num_heads % len(dilations):
        raise ValueError(f"{where}: num_heads={num_heads} is not divisible by the number of dilations "
                         f"{len(dilations)} (dilations {list(dilations)}); every dilation needs as many heads.")
    if any(k < 1 or k % 2 == 0 for k in kernel_size):
        raise ValueError(f"{where}: attention window {list(kernel_size)} must be odd on every axis.")


def make_attention(kind: str, conv_op: Type[_ConvNd], channels: int, num_heads: int, dilations: Sequence[int],
                   kernel_size: Union[int, Sequence[int]]) -> nn.Module:
    """'msda' -> MultiScaleDilatedAttention, 'global' -> GlobalSelfAttention."""
    if kind == "msda":
        return MultiScaleDilatedAttention(conv_op, channels, num_heads, dilations, kernel_size)
    if kind == "global":
        return GlobalSelfAttention(channels, num_heads)
    raise ValueError(f"unknown attention kind {kind!r}; expected one of {ATTENTION_KINDS}.")


def maybe_checkpoint(function, x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """function(x); with ``checkpointing`` and gradients on, its activations are recomputed in the backward pass."""
    if checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(function, x, use_reentrant=False)
    return function(x)


class TokenMLP(nn.Sequential):
    """Channels-last MLP (B, *S, C) -> (B, *S, C): Linear(C, ratio*C), GELU, Linear(ratio*C, C)."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        hidden = int(channels * mlp_ratio)
        super().__init__(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))


class AttentionBlock(nn.Module):
    """DilateFormer's transformer block for 2D/3D: x + dwconv(x), then pre-norm attention and pre-norm MLP.

    Args:
        conv_op: nn.Conv2d or nn.Conv3d.
        channels: C.
        kind: 'msda' (dilated local windows) or 'global' (all positions).
        num_heads, dilations, kernel_size: of the attention (dilations and kernel_size only for 'msda');
            kernel_size is also the positional-encoding depthwise conv's kernel.
        mlp_ratio: hidden width of the MLP relative to C (4 in DilateFormer).
        checkpointing: store only the block's input and recompute the block in the backward pass (activation
            checkpointing: about 20 feature maps fewer stored per block, one more forward pass of it).

    Shapes: (B, C, *S) -> (B, C, *S).
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, kind: str, num_heads: int,
                 dilations: Sequence[int] = (1, 2, 3), kernel_size: Union[int, Sequence[int]] = 3,
                 mlp_ratio: float = 4.0, checkpointing: bool = False):
        super().__init__()
        kernel_size = [int(k) for k in maybe_convert_scalar_to_list(conv_op, kernel_size)]
        self.positional_encoding = conv_op(channels, channels, kernel_size, padding=[(k - 1) // 2 for k in kernel_size],
                                           groups=channels)
        self.norm1 = nn.LayerNorm(channels)
        self.attention = make_attention(kind, conv_op, channels, num_heads, dilations, kernel_size)
        self.norm2 = nn.LayerNorm(channels)
        self.mlp = TokenMLP(channels, mlp_ratio)
        self.channels = channels
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.kind = kind
        self.checkpointing = checkpointing
        self.neighbours = int(np.prod(kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self._forward, x, self.checkpointing)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = depthwise_layout(x)  # channels-last: fast depthwise conv, and free movedim to tokens below
        tokens = (x + self.positional_encoding(x)).movedim(1, -1)
        tokens = tokens + self.attention.forward_tokens(self.norm1(tokens))
        tokens = tokens + self.mlp(self.norm2(tokens))
        return tokens.movedim(-1, 1).contiguous()

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> np.int64:
        """Activation estimate at spatial size ``size`` (see ``dmk.feature_map_estimate``)."""
        if self.checkpointing:  # only its output (its input is stored by the layer before)
            return feature_map_estimate(size, self.channels)
        # layout copy, pos. enc. sum, norm, q, k, v, attention output, residual sum, norm, MLP hidden x2, output
        per_position = 10 * self.channels + 2 * int(self.mlp_ratio * self.channels)
        # attention probabilities (msda: one per head and neighbour; global: fused kernels keep one per head)
        per_position += self.num_heads * (self.neighbours if self.kind == "msda" else 1)
        return feature_map_estimate(size, per_position)
