"""Multi-scale dilated attention (MSDA) and the attention blocks of FIAS's global encoder path, 2D and 3D.

What the papers state:

- FIAS (Liu, Xu, Ho, arXiv 2411.10881, abstract): the global path of the dual-path encoder is DilateFormer,
  which captures long-range global features.
- DilateFormer (Jiao et al., IEEE TMM 2023; code: JIAOJIAYUASD/dilateformer, ``models/dilateformer.py``):
  a 1x1 projection makes queries, keys and values; heads are split into one group per dilation (1, 2, 3; heads
  divisible by the number of dilations); in each group every position attends to its kernel-3 neighbourhood
  sampled at that group's dilation (softmax over the k^2 neighbours, scale head_dim^-0.5); the groups are
  concatenated and linearly projected. A block is: depthwise-conv positional encoding, pre-norm (LayerNorm)
  MSDA, pre-norm MLP with ratio 4 and GELU. MSDA in the two high-resolution stages, plain global self-attention
  in the deeper ones.

Our choices:

- Attention width decoupled from the stage's channels: q, k and v are projected from C channels to
  ``num_heads * head_dim`` (groups x heads per group x head_dim) and the attention output back to C. So
  DilateFormer's three groups (dilations 1, 2, 3) fit every nnU-Net channel count (32 * 2^k, 320), which are
  never divisible into three equal channel groups.
- One code path for 2D and 3D (``conv_op`` decides): the neighbourhood is k^d positions (27 in 3D).
  ``kernel_size`` may differ per axis (anisotropic plans have kernel 1 on some axes: the window is 1 there).
- Borders (masked, not zero-padded): DilateFormer's zero padding lets out-of-map neighbours take part in the
  softmax with logit 0 and value 0. We leave them out (logit -inf), so every position attends to the neighbours
  that exist, and a window covering the whole map is exactly global attention. A map smaller than the widest
  dilated window ``dilation * (k - 1) + 1`` on an axis would leave a group attending to little more than itself:
  :meth:`MultiScaleDilatedAttention.check_size` rejects it.
- Two implementations of the same function, chosen per call (``implementation='auto'``):
  'flex' (CUDA tensors): ``torch.nn.attention.flex_attention`` over all positions of the map (tokens in
  row-major order), one mask per head group (:func:`neighbourhood_mask_mod`) and a block-sparse
  :class:`BlockMask` built from the window offsets (:func:`neighbourhood_block_mask`): only the
  (128 x 128)-position blocks that hold a neighbour pair are computed, nothing of size N^2 is stored, and the
  fused kernel keeps its softmax statistics in float32 (float16/bfloat16 AMP is safe). The call always goes
  through flex_attention compiled on its own (the eager flex_attention is an unfused dense reference), outside
  the graph torch.compile makes of the network (:func:`flex_neighbourhood_attention`); the modules holding it
  (AttentionBlock here, FIAS's MSDA stages and MixAtt) then run eagerly, one graph break each
  (helpers.maybe_eager): inlined into FIAS's graph, flex_attention failed to compile with inductor on CUDA.
  Its compiled kernel needs head_dim >= 16 (the default). The block mask costs O(H (N / 128)^2) indices; in
  row-major order a block of 128 queries needs the key blocks of the 3 planes x 3 rows around it (in 3D), so the
  kernel evaluates more logits than the k^d neighbours (masked inside each block), still O(N) memory and work
  linear in N for a fixed plane size.
  'loop' (CPU, and the oracle the flex path is tested against): keys and values are never gathered
  (DilateFormer's unfold stores k^d copies of them, 27 in 3D): for each neighbour offset, the positions whose
  neighbour lies inside the map and those neighbours are slice views, and logits and weighted values are
  accumulated offset by offset. It computes in float32 whatever the autocast dtype (logits q.k of float16 inputs
  can overflow float16). Under torch.compile it is plain PyTorch ops (:func:`loop_neighbourhood_attention`,
  traced without graph breaks; zero-padded k and v, stored with q, k, v and one probability per head, neighbour
  and position); on eager CPU tensors the same function runs as one custom autograd function with a
  hand-written backward (:class:`_CPUNeighbourhoodAttention`: no padded copies, several times faster on the CPU).
- Global attention (deep stages) uses ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels on
  CUDA, which accumulate the softmax in float32); on the CPU under a float16/bfloat16 autocast it runs in float32.
"""
import functools
import itertools
import math
from typing import List, Sequence, Tuple, Type, Union

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, maybe_convert_scalar_to_list
from timm.layers import Mlp
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.nn.modules.conv import _ConvNd

from nnunetv2_grcsf.architectures.helpers import depthwise_conv, feature_map_estimate, maybe_checkpoint, maybe_eager

ATTENTION_KINDS = ("msda", "global")
IMPLEMENTATIONS = ("auto", "flex", "loop")
FLEX_BLOCK_SIZE = 128  # flex_attention's default sparse block size
HALF_DTYPES = (torch.float16, torch.bfloat16)

_compiled_flex_attention = None


def dilated_window_extent(kernel_size: int, dilation: int) -> int:
    """Positions spanned along one axis by a window of ``kernel_size`` taps at ``dilation``."""
    return dilation * (kernel_size - 1) + 1


def window_offsets(kernel_size: Sequence[int], dilation: int) -> List[Tuple[int, ...]]:
    """All neighbour offsets of a centred window (one tuple per neighbour, one entry per spatial axis)."""
    return list(itertools.product(*[[dilation * (i - (k - 1) // 2) for i in range(k)] for k in kernel_size]))


def _outside_map(size: Sequence[int], offsets: Sequence[Tuple[int, ...]], device) -> torch.Tensor:
    """(K, *S) bool: the neighbour at offset j of position n lies outside the map."""
    outside = torch.zeros(len(offsets), *size, dtype=torch.bool, device=device)
    for axis, extent in enumerate(size):
        position = torch.arange(extent, device=device)
        shifted = position[None] + torch.tensor([o[axis] for o in offsets], device=device)[:, None]  # (K, s)
        view = [len(offsets)] + [extent if a == axis else 1 for a in range(len(size))]
        outside = outside | ((shifted < 0) | (shifted >= extent)).view(view)
    return outside


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


class _CPUNeighbourhoodAttention(torch.autograd.Function):
    """CPU speed: :func:`loop_neighbourhood_attention` with a hand-written backward, neighbour by neighbour.

    qkv: (3, G, h, d, *T) with T = (B, *S) -> out (G, h, d, *T); group g uses dilations[g]. Logits
    scale * <q, k_j> for the neighbours j in the window, softmax over j; neighbours outside the map are left
    out. Keys and values are never gathered: each neighbour offset is a pair of slice views (query region, key
    region) of the unpadded tensors, and logits and weighted values are accumulated offset by offset.
    Saves qkv and the probabilities (G, h, K, *T), K = prod(kernel_size). The same function and gradients as
    the plain ops of :func:`loop_neighbourhood_attention`, several times faster on the CPU (in-place accumulation
    into slice views, no padded copies); used on eager CPU tensors only (TorchDynamo cannot trace its in-place
    ``out=`` accumulation without graph breaks).
    """

    @staticmethod
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


def loop_neighbourhood_attention(qkv: torch.Tensor, kernel_size: Sequence[int], dilations: Sequence[int],
                                 scale: float, cpu_backward: bool = None) -> torch.Tensor:
    """MSDA's attention step in plain PyTorch ops: head group g attends to its window at ``dilations[g]``.

    qkv: (3, G, h, d, B, *S) (queries, keys, values; G = len(dilations) groups of h heads of size d), channel-first
    so that the spatial axes are the last ones -> (G, h, d, B, *S), float32 (float64 stays float64). Logits are
    scale * <q, k_j> over the neighbours j of the window; neighbours outside the map are left out (-inf).
    Keys and values are zero-padded once per group and read at one slice view per neighbour offset.
    ``cpu_backward`` (default: on eager CPU tensors) computes the same with :class:`_CPUNeighbourhoodAttention`.
    """
    if qkv.dtype in HALF_DTYPES:
        qkv = qkv.float()
    if cpu_backward is None:
        cpu_backward = qkv.device.type == "cpu" and not torch.compiler.is_compiling()
    if cpu_backward:
        return _CPUNeighbourhoodAttention.apply(qkv.contiguous(), tuple(int(k) for k in kernel_size),
                                                tuple(int(d) for d in dilations), float(scale))
    size = qkv.shape[5:]
    outputs = []
    for group, dilation in enumerate(dilations):
        q, k, v = qkv[0, group], qkv[1, group], qkv[2, group]  # (h, d, B, *S)
        radius = [dilation * ((w - 1) // 2) for w in kernel_size]
        padding = [p for r in reversed(radius) for p in (r, r)]
        k, v = F.pad(k, padding), F.pad(v, padding)
        offsets = window_offsets(kernel_size, dilation)
        views = [(Ellipsis, *[slice(r + o, r + o + s) for r, o, s in zip(radius, offset, size)])
                 for offset in offsets]
        logits = torch.stack([(q * k[view]).sum(1) for view in views], 1)  # (h, K, B, *S)
        outside = _outside_map(size, offsets, qkv.device)[None, :, None]  # (1, K, 1, *S)
        probabilities = torch.softmax(logits.mul(scale).masked_fill(outside, float("-inf")), dim=1)
        out = probabilities[:, :1] * v[views[0]]
        for j in range(1, len(views)):
            out = out + probabilities[:, j:j + 1] * v[views[j]]
        outputs.append(out)
    return torch.stack(outputs)


def neighbourhood_mask_mod(size: Sequence[int], kernel_size: Sequence[int], dilation_of_head: torch.Tensor):
    """flex_attention mask: key kv_idx is in the dilated window of query q_idx (row-major positions of ``size``),
    with head h's dilation ``dilation_of_head[h]``."""
    strides = [math.prod(size[axis + 1:]) for axis in range(len(size))]
    radii = [(k - 1) // 2 for k in kernel_size]

    def mask_mod(batch, head, q_idx, kv_idx):
        dilation = dilation_of_head[head]
        allowed = q_idx >= 0
        for extent, stride, radius in zip(size, strides, radii):
            difference = (kv_idx // stride) % extent - (q_idx // stride) % extent
            allowed = allowed & (difference.abs() <= dilation * radius) & (difference % dilation == 0)
        return allowed

    return mask_mod


def neighbourhood_block_mask(size: Sequence[int], kernel_size: Sequence[int], dilations: Sequence[int],
                             heads_per_group: int, device, block_size: int = FLEX_BLOCK_SIZE) -> BlockMask:
    """The BlockMask of MSDA over the row-major positions of ``size``: for each head and block of ``block_size``
    queries, the key blocks that hold a neighbour of one of them (from the window offsets: O(N K) work and
    (H, N / block_size, N / block_size) block indices, nothing of size N^2), with the exact
    :func:`neighbourhood_mask_mod` applied inside each block. Plain tensor ops only.
    """
    positions = math.prod(size)
    n_blocks = -(-positions // block_size)
    coordinates = torch.stack(torch.meshgrid(*[torch.arange(s, device=device) for s in size], indexing="ij"),
                              -1).view(positions, len(size))
    extent = torch.tensor(list(size), device=device)
    strides = torch.tensor([math.prod(size[axis + 1:]) for axis in range(len(size))], device=device)
    query_block = (torch.arange(positions, device=device) // block_size)[None]  # (1, N)
    rows = []
    for dilation in dilations:
        offsets = torch.tensor(window_offsets(kernel_size, dilation), device=device)  # (K, dims)
        neighbours = coordinates[None] + offsets[:, None]  # (K, N, dims)
        inside = ((neighbours >= 0) & (neighbours < extent)).all(-1)
        key_block = torch.where(inside, (neighbours * strides).sum(-1) // block_size, n_blocks)  # (K, N)
        adjacency = torch.zeros(n_blocks, n_blocks + 1, dtype=torch.bool, device=device)
        adjacency[query_block.expand_as(key_block), key_block] = True
        rows.append(adjacency[:, :n_blocks])
    adjacency = torch.stack(rows).repeat_interleave(heads_per_group, 0)[None]  # (1, H, n_blocks, n_blocks)
    kv_num_blocks = adjacency.sum(-1, dtype=torch.int32)
    kv_indices = torch.argsort(adjacency.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    dilation_of_head = torch.tensor(list(dilations), device=device).repeat_interleave(heads_per_group)
    return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, BLOCK_SIZE=block_size,
                                    mask_mod=neighbourhood_mask_mod(size, kernel_size, dilation_of_head),
                                    seq_lengths=(positions, positions))


@functools.lru_cache(maxsize=64)
def cached_block_mask(size: Tuple[int, ...], kernel_size: Tuple[int, ...], dilations: Tuple[int, ...],
                      heads_per_group: int, device: torch.device) -> BlockMask:
    """:func:`neighbourhood_block_mask`, built once per map size and device (a few small kernels each time
    otherwise; the same mask object also keeps the compiled kernel's guards stable)."""
    return neighbourhood_block_mask(size, kernel_size, dilations, heads_per_group, device)


def fused_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask,
                         scale: float) -> torch.Tensor:
    """flex_attention, compiled once per process (one kernel per shape); the CPU runs it uncompiled (dense
    reference; no backward there). q, k, v (B, H, N, d) -> (B, H, N, d)."""
    global _compiled_flex_attention
    if q.device.type == "cpu":
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale)
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention(q, k, v, block_mask=block_mask, scale=scale)


@torch.compiler.disable(reason="MSDA's flex_attention kernel is compiled on its own, outside the network's graph")
def flex_neighbourhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: Sequence[int],
                                 kernel_size: Sequence[int], dilations: Sequence[int], scale: float) -> torch.Tensor:
    """MSDA's attention step by flex_attention: q, k, v (B, H, N, d), N = prod(size) positions in row-major order,
    H heads in len(dilations) equal groups -> (B, H, N, d).

    Never traced by torch.compile (one graph break where nnU-Net compiles the network): flex_attention inlined
    into a network's graph failed to compile with inductor on CUDA (an H200, torch 2.11) and is fragile with
    activation checkpointing around it (pytorch/pytorch issues 167116, 147879), while the standalone compiled
    flex_attention is its documented use."""
    block_mask = cached_block_mask(tuple(size), tuple(kernel_size), tuple(dilations), q.shape[1] // len(dilations),
                                   q.device)
    return fused_flex_attention(q, k, v, block_mask, scale)


class MultiScaleDilatedAttention(nn.Module):
    """DilateFormer's MSDA for 2D/3D: one head group per dilation, each attending to its dilated k^d window.

    Args:
        conv_op: nn.Conv2d or nn.Conv3d; decides the number of spatial axes.
        channels: C of the input and output.
        num_heads: total heads; must be divisible by ``len(dilations)`` (each dilation gets as many heads).
        dilations: one head group per entry (DilateFormer: 1, 2, 3).
        kernel_size: window taps per axis (int or one per axis; 1 on an axis = no neighbours along it).
        head_dim: width of a head; None -> C // num_heads. The attention width is num_heads * head_dim.
        qkv_bias: bias of the q/k/v projection.
        implementation: 'auto' (flex on CUDA tensors, loop elsewhere), 'flex' or 'loop' (see the module docstring).

    Shapes: forward (B, C, *S) -> (B, C, *S); forward_tokens (B, *S, C) -> (B, *S, C).
    Each spatial axis with a window > 1 must be at least ``max(dilations) * (k - 1) + 1`` long.
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, num_heads: int, dilations: Sequence[int] = (1, 2, 3),
                 kernel_size: Union[int, Sequence[int]] = 3, head_dim: int = None, qkv_bias: bool = True,
                 implementation: str = "auto"):
        super().__init__()
        self.kernel_size = [int(k) for k in maybe_convert_scalar_to_list(conv_op, kernel_size)]
        self.dilations = [int(d) for d in dilations]
        if len(self.kernel_size) != convert_conv_op_to_dim(conv_op):
            raise ValueError(f"MultiScaleDilatedAttention: kernel_size {self.kernel_size} needs one entry per spatial "
                             f"axis of {conv_op.__name__}.")
        self.head_dim = check_attention_settings(channels, num_heads, head_dim, self.dilations, self.kernel_size,
                                                 "MultiScaleDilatedAttention")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"MultiScaleDilatedAttention: implementation {implementation!r} is not one of "
                             f"{IMPLEMENTATIONS}.")
        self.implementation = implementation
        self.num_heads = num_heads
        self.width = num_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(channels, 3 * self.width, bias=qkv_bias)
        self.proj = nn.Linear(self.width, channels)

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

    def uses_flex(self, tokens: torch.Tensor) -> bool:
        """Whether the attention on ``tokens`` (or their map) runs flex_attention (outside torch.compile's graph)."""
        return self.implementation == "flex" or (self.implementation == "auto" and tokens.is_cuda)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, *size, channels = tokens.shape
        self.check_size(size)
        if self.uses_flex(tokens):
            qkv = self.qkv(tokens).view(batch, -1, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            out = flex_neighbourhood_attention(*qkv.unbind(0), size, self.kernel_size, self.dilations,
                                               self.scale)  # (B, H, N, d)
            return self.proj(out.transpose(1, 2).reshape(batch, *size, self.width))
        # channel-first q, k, v, (3 * width, B * N) = (3, G, h, d, B, *S): the projection writes that layout
        # directly (W @ tokens^T), and the output projection reads it transposed
        flat = tokens.reshape(-1, channels)
        weight, bias = self.qkv.weight, self.qkv.bias
        qkv = torch.mm(weight, flat.t()) if bias is None else torch.addmm(bias[:, None], weight, flat.t())
        qkv = qkv.view(3, len(self.dilations), -1, self.head_dim, batch, *size)
        out = loop_neighbourhood_attention(qkv, self.kernel_size, self.dilations, self.scale)
        return self.proj(out.reshape(self.width, -1).t().to(tokens.dtype)).view(batch, *size, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x.movedim(1, -1)).movedim(-1, 1)


class GlobalSelfAttention(nn.Module):
    """Multi-head self-attention over all positions (DilateFormer's deep-stage attention), 2D/3D.

    Args: channels C; num_heads; head_dim (None -> C // num_heads); attention width num_heads * head_dim.
    Shapes: forward (B, C, *S) -> (B, C, *S); forward_tokens (B, *S, C) -> (B, *S, C).
    Time grows with (prod S)^2 (memory too without a fused kernel): meant for low-resolution stages.
    """

    def __init__(self, channels: int, num_heads: int, head_dim: int = None, qkv_bias: bool = True):
        super().__init__()
        self.head_dim = check_attention_settings(channels, num_heads, head_dim, [1], [1], "GlobalSelfAttention")
        self.num_heads = num_heads
        self.width = num_heads * self.head_dim
        self.qkv = nn.Linear(channels, 3 * self.width, bias=qkv_bias)
        self.proj = nn.Linear(self.width, channels)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, *size, channels = tokens.shape
        qkv = self.qkv(tokens).view(batch, -1, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, d) each
        if not tokens.is_cuda and q.dtype in HALF_DTYPES:  # CPU kernels: logits in float32
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, *size, self.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x.movedim(1, -1)).movedim(-1, 1)


def check_attention_settings(channels: int, num_heads: int, head_dim: Union[None, int], dilations: Sequence[int],
                             kernel_size: Sequence[int], where: str) -> int:
    """Raises ValueError (naming ``where``) unless heads, dilations and window are consistent; returns head_dim
    (``head_dim``, or channels // num_heads if it is None)."""
    if num_heads < 1:
        raise ValueError(f"{where}: num_heads={num_heads} must be at least 1.")
    head_dim = channels // num_heads if head_dim is None else head_dim
    if head_dim < 1:
        raise ValueError(f"{where}: head_dim must be at least 1 (channels={channels}, num_heads={num_heads}).")
    if not dilations or any(d < 1 for d in dilations):
        raise ValueError(f"{where}: dilations {list(dilations)} must be positive integers (at least one).")
    if num_heads % len(dilations):
        raise ValueError(f"{where}: num_heads={num_heads} is not divisible by the number of dilations "
                         f"{len(dilations)} (dilations {list(dilations)}); every dilation needs as many heads.")
    if any(k < 1 or k % 2 == 0 for k in kernel_size):
        raise ValueError(f"{where}: attention window {list(kernel_size)} must be odd on every axis.")
    return head_dim


def make_attention(kind: str, conv_op: Type[_ConvNd], channels: int, num_heads: int, dilations: Sequence[int],
                   kernel_size: Union[int, Sequence[int]], head_dim: int = None) -> nn.Module:
    """'msda' -> MultiScaleDilatedAttention, 'global' -> GlobalSelfAttention (the attention modules' factory,
    used by AttentionBlock and MixingAttention; it lives beside the classes it builds)."""
    if kind == "msda":
        return MultiScaleDilatedAttention(conv_op, channels, num_heads, dilations, kernel_size, head_dim)
    if kind == "global":
        return GlobalSelfAttention(channels, num_heads, head_dim)
    raise ValueError(f"unknown attention kind {kind!r}; expected one of {ATTENTION_KINDS}.")


def attention_outside_graph(attention: Union[None, nn.Module], x: torch.Tensor) -> bool:
    """Whether ``attention`` (an attention module or None) runs outside torch.compile's graph on ``x``: MSDA's
    flex_attention (:func:`flex_neighbourhood_attention`); the modules holding it then run eagerly
    (helpers.maybe_eager)."""
    return isinstance(attention, MultiScaleDilatedAttention) and attention.uses_flex(x)


def attention_stored_per_position(attention: nn.Module, neighbours: int) -> int:
    """Elements an attention module stores per position for its backward: q, k, v, (loop: padded k, v),
    its output, the probabilities (per head and neighbour; global: fused kernels keep one per head)."""
    if isinstance(attention, MultiScaleDilatedAttention):
        return 6 * attention.width + attention.num_heads * neighbours
    return 4 * attention.width + attention.num_heads


class AttentionBlock(nn.Module):
    """DilateFormer's transformer block for 2D/3D: x + dwconv(x), then pre-norm attention and pre-norm MLP.

    Args:
        conv_op: nn.Conv2d or nn.Conv3d.
        channels: C.
        kind: 'msda' (dilated local windows) or 'global' (all positions).
        num_heads, dilations, kernel_size, head_dim: of the attention (dilations and kernel_size only for 'msda');
            kernel_size is also the positional-encoding depthwise conv's kernel.
        mlp_ratio: hidden width of the MLP relative to C (4 in DilateFormer; timm's Mlp with GELU).
        checkpointing: store only the block's input and recompute the block in the backward pass.

    Shapes: (B, C, *S) -> (B, C, *S).
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, kind: str, num_heads: int,
                 dilations: Sequence[int] = (1, 2, 3), kernel_size: Union[int, Sequence[int]] = 3,
                 mlp_ratio: float = 4.0, checkpointing: bool = False, head_dim: int = None):
        super().__init__()
        kernel_size = [int(k) for k in maybe_convert_scalar_to_list(conv_op, kernel_size)]
        self.positional_encoding = conv_op(channels, channels, kernel_size, padding=[(k - 1) // 2 for k in kernel_size],
                                           groups=channels)
        self.norm1 = nn.LayerNorm(channels)
        self.attention = make_attention(kind, conv_op, channels, num_heads, dilations, kernel_size, head_dim)
        self.norm2 = nn.LayerNorm(channels)
        self.mlp = Mlp(channels, int(channels * mlp_ratio), act_layer=nn.GELU)
        self.channels = channels
        self.mlp_ratio = mlp_ratio
        self.kind = kind
        self.checkpointing = checkpointing
        self.neighbours = int(np.prod(kernel_size)) if kind == "msda" else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return maybe_eager(maybe_checkpoint, (self._forward, x, self.checkpointing), self.attention_outside_graph(x))

    def attention_outside_graph(self, x: torch.Tensor) -> bool:
        """Whether its attention on ``x`` runs outside torch.compile's graph (MSDA's flex_attention): the block
        then runs eagerly (helpers.maybe_eager)."""
        return attention_outside_graph(self.attention, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        encoding = depthwise_conv(x, self.positional_encoding.weight, self.positional_encoding.bias)
        tokens = (x + encoding).movedim(1, -1)
        tokens = tokens + self.attention.forward_tokens(self.norm1(tokens))
        tokens = tokens + self.mlp(self.norm2(tokens))
        return tokens.movedim(-1, 1).contiguous()

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> np.int64:
        """Activation estimate at spatial size ``size`` (see ``helpers.feature_map_estimate``)."""
        if self.checkpointing:  # only its output (its input is stored by the layer before)
            return feature_map_estimate(size, self.channels)
        # pos. enc. output and sum, norm, residual sum, norm, MLP hidden x2, output; and the attention's
        per_position = 6 * self.channels + 2 * int(self.mlp_ratio * self.channels)
        return feature_map_estimate(size, per_position + attention_stored_per_position(self.attention,
                                                                                       self.neighbours))
