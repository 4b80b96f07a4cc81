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
  3D). We never materialize that: for each neighbour offset, the positions whose neighbour lies inside the map
  and those neighbours are two slice *views* of the unpadded q and k / v, and logits and weighted values are
  accumulated offset by offset, for all head groups (one dilation each) in one custom autograd function whose
  hand-written backward does the same. It saves q, k, v and the attention probabilities (k^d per head and
  position, not per channel): about 3C + 27C / head_dim floats per position in 3D (4.7 C with head_dim 16)
  instead of DilateFormer's 2 * 27 C for the unfolded keys and values alone. Under CUDA autocast it computes
  in float32.
- Speed: the q/k/v projection is computed as W @ tokens^T, which writes q, k, v directly in the channel-first
  layout (3, groups, heads, head_dim, B, *S) the neighbour loop runs on, and the output projection reads that
  layout transposed, so no permuted copies are made; no padded copies either (borders are slice regions).
  Measured against the earlier per-group, zero-padded formulation (module forward + backward, CPU, one
  thread): 3D Hippocampus stage 2 (2 x 128 x 10 x 14 x 10) 82 -> 55 ms, BraTS6 stage 2 (1 x 128 x 24 x 40 x
  40) 1200 -> 695 ms, 2D BUSI256 stage 2 (2 x 128 x 56 x 64) 85 -> 62 ms; the same function (equal to 1e-5)
  and the same stored tensors.
- Borders: DilateFormer's zero padding lets out-of-image neighbours take part in the softmax with logit 0 and
  value 0. We leave them out instead (logit -inf), so a window that covers the whole input is exactly global
  attention. A feature map smaller than the dilated window ``dilation * (k - 1) + 1`` on an axis would leave
  that group attending to little more than itself; :meth:`MultiScaleDilatedAttention.check_size` rejects it.
- ``kernel_size`` may differ per axis (nnU-Net plans for anisotropic data have kernel 1 on some axes: the
  window then has size 1 there).
- Layout: the attention modules take (B, C, *S); internally, and in the blocks, tokens are channels-last
  (B, *S, C) so LayerNorm and the projections are plain ``nn.LayerNorm`` / ``nn.Linear`` as in DilateFormer.
- Global attention uses ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels where available).
- The block's depthwise positional-encoding conv uses ``dmk.depthwise_conv`` (PyTorch's CPU backward of
  depthwise convs is slow, see dmk.py); its parameters are those of the ``nn.Conv`` module it is stored in.
"""
import itertools
import math
from typing import List, Sequence, Tuple, Type, Union

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, maybe_convert_scalar_to_list
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnunetv2_grcsf.architectures.blocks.dmk import depthwise_conv, depthwise_layout, feature_map_estimate

ATTENTION_KINDS = ("msda", "global")


def dilated_window_extent(kernel_size: int, dilation: int) -> int:
    """Positions spanned along one axis by a window of ``kernel_size`` taps at ``dilation``."""
    return dilation * (kernel_size - 1) + 1


def window_offsets(kernel_size: Sequence[int], dilation: int) -> List[Tuple[int, ...]]:
    """All neighbour offsets of a centred window (one tuple per neighbour, one entry per spatial axis)."""
    return list(itertools.product(*[[dilation * (i - (k - 1) // 2) for i in range(k)] for k in kernel_size]))


def neighbour_regions(size: Sequence[int], kernel_size: Sequence[int], dilation: int) -> List[Tuple[tuple, tuple]]:
    """Per neighbour offset of the dilated window: (query slices, key slices), one slice per spatial axis.

    The query slices select the positions whose neighbour at that offset lies inside the map, the key slices
    those neighbours (the same region shifted by the offset). Positions outside a region have no neighbour
    there: their logit is -inf (masked out), as if the map were not padded.
    """
    regions = []
    for offset in window_offsets(kernel_size, dilation):
        queries = tuple(slice(max(0, -o), min(s, s - o)) for o, s in zip(offset, size))
        keys = tuple(slice(max(0, o), min(s, s + o)) for o, s in zip(offset, size))
        regions.append((queries, keys))
    return regions


def _at(tensor: torch.Tensor, spatial: tuple) -> torch.Tensor:
    """The view of ``tensor`` (..., *S) at the spatial slices ``spatial`` (its last axes)."""
    return tensor[(Ellipsis, *spatial)]


def _scratch_view(scratch: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A contiguous view of ``like``'s shape at the start of the flat buffer ``scratch`` (no allocation)."""
    return scratch[:like.numel()].view(like.shape)


class _MultiDilationNeighborhoodAttention(torch.autograd.Function):
    """Every head group attends to its dilated neighbourhood; hand-written backward, neighbour by neighbour.

    qkv: (3, G, h, d, *T) with T = (B, *S) -> out (G, h, d, *T); group g uses dilations[g]. Logits
    scale * <q, k_j> for the neighbours j in the window, softmax over j; neighbours outside the map are left
    out. Keys and values are never gathered: each neighbour offset is a pair of slice views (query region, key
    region) of the unpadded tensors, and logits and weighted values are accumulated offset by offset.
    Saves qkv and the probabilities (G, h, K, *T), K = prod(kernel_size).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, qkv, kernel_size, dilations, scale):
        size = qkv.shape[5:]
        neighbours = math.prod(kernel_size)
        probabilities = qkv.new_empty((qkv.shape[1], qkv.shape[2], neighbours, *qkv.shape[4:]))
        out = qkv.new_zeros(qkv.shape[1:])
        scratch = qkv.new_empty(qkv[0, 0].numel())  # q * k_j of one group, reused for every neighbour
        for g, dilation in enumerate(dilations):
            q, k, v = qkv[0, g], qkv[1, g], qkv[2, g]  # (h, d, *T) each
            logits = probabilities[g].fill_(float("-inf"))  # (h, K, *T)
            regions = neighbour_regions(size, kernel_size, dilation)
            for j, (queries, keys) in enumerate(regions):
                q_j = _at(q, queries)
                torch.sum(torch.mul(q_j, _at(k, keys), out=_scratch_view(scratch, q_j)), dim=1,
                          out=_at(logits[:, j], queries))
            # softmax over the neighbours, in place (the centre is always inside: the max is finite)
            logits.mul_(scale)
            logits.sub_(logits.amax(1, keepdim=True)).exp_()
            logits.div_(logits.sum(1, keepdim=True))
            for j, (queries, keys) in enumerate(regions):
                _at(out[g], queries).addcmul_(_at(logits[:, j:j + 1], queries), _at(v, keys))
        ctx.save_for_backward(qkv, probabilities)
        ctx.kernel_size, ctx.dilations, ctx.scale = kernel_size, dilations, scale
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        qkv, probabilities = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        size = qkv.shape[5:]
        grad_qkv = torch.zeros_like(qkv)
        grad_logits = torch.empty_like(probabilities[0])  # one group at a time
        scratch = qkv.new_empty(qkv[0, 0].numel())
        for g, dilation in enumerate(ctx.dilations):
            q, k, v = qkv[0, g], qkv[1, g], qkv[2, g]
            grad_q, grad_k, grad_v = grad_qkv[0, g], grad_qkv[1, g], grad_qkv[2, g]
            p, grad = probabilities[g], grad_out[g]
            grad_logits.zero_()
            regions = neighbour_regions(size, ctx.kernel_size, dilation)
            for j, (queries, keys) in enumerate(regions):
                grad_j = _at(grad, queries)
                _at(grad_v, keys).addcmul_(_at(p[:, j:j + 1], queries), grad_j)
                torch.sum(torch.mul(grad_j, _at(v, keys), out=_scratch_view(scratch, grad_j)), dim=1,
                          out=_at(grad_logits[:, j], queries))
            # softmax backward dS_j = P_j (dP_j - sum_i P_i dP_i), times the logit scale
            weighted = torch.mul(p, grad_logits).sum(1, keepdim=True)
            grad_logits.sub_(weighted).mul_(p).mul_(ctx.scale)
            for j, (queries, keys) in enumerate(regions):
                grad_logits_j = _at(grad_logits[:, j:j + 1], queries)
                _at(grad_q, queries).addcmul_(grad_logits_j, _at(k, keys))
                _at(grad_k, keys).addcmul_(grad_logits_j, _at(q, queries))
        return grad_qkv, None, None, None


def multi_dilation_neighborhood_attention(qkv: torch.Tensor, kernel_size: Sequence[int], dilations: Sequence[int],
                                          scale: float) -> torch.Tensor:
    """MSDA's attention step: head group g attends to its window at ``dilations[g]``; outside neighbours left out.

    qkv: (3, G, h, d, B, *S) (queries, keys, values; G = len(dilations) groups of h heads of size d)
    -> (G, h, d, B, *S). Logits are scale * <q, k_j>. Memory: saves qkv and the probabilities
    (G, h, prod(kernel_size), B, *S); temporaries of one group's (h, d, B, *S). See
    :class:`_MultiDilationNeighborhoodAttention`.
    """
    return _MultiDilationNeighborhoodAttention.apply(qkv.contiguous(), tuple(int(k) for k in kernel_size),
                                                     tuple(int(d) for d in dilations), float(scale))


def dilated_neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: Sequence[int],
                                   dilation: int, scale: float) -> torch.Tensor:
    """Each position attends to its dilated neighbourhood (one dilation); out-of-image neighbours left out.

    q, k, v: (B, h, d, *S) -> (B, h, d, *S); logits are scale * <q, k_j>. One group of
    :func:`multi_dilation_neighborhood_attention` (which MultiScaleDilatedAttention calls for all groups at once).
    """
    qkv = torch.stack([t.movedim(0, 2) for t in (q, k, v)])[:, None]  # (3, 1, h, d, B, *S)
    return multi_dilation_neighborhood_attention(qkv, kernel_size, [dilation], scale)[0].movedim(2, 0)


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
        # q, k, v channel-first, (3C, B * prod(S)) = (3, G, h, d, B, *S): the projection writes that layout
        # directly (W @ tokens^T), so no permuted copy is made before the attention or after it
        flat = tokens.reshape(-1, channels)
        if self.qkv.bias is None:
            qkv = torch.mm(self.qkv.weight, flat.t())
        else:
            qkv = torch.addmm(self.qkv.bias[:, None], self.qkv.weight, flat.t())
        qkv = qkv.view(3, len(self.dilations), -1, self.head_dim, batch, *size)
        out = multi_dilation_neighborhood_attention(qkv, self.kernel_size, self.dilations, self.scale)
        return self.proj(out.view(channels, -1).t()).view(batch, *size, channels)  # (G, h, d) = channel order

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


def maybe_checkpoint(function, x: Union[torch.Tensor, Tuple[torch.Tensor, ...]], checkpointing: bool):
    """function(x) (function(*x) for a tuple); with ``checkpointing`` and gradients on, only the inputs are kept
    and function's activations are recomputed in the backward pass (non-reentrant activation checkpointing)."""
    inputs = x if isinstance(x, tuple) else (x,)
    if checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(function, *inputs, use_reentrant=False)
    return function(*inputs)


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
        encoding = depthwise_conv(x, self.positional_encoding.weight, self.positional_encoding.bias)
        tokens = (x + encoding).movedim(1, -1)
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
