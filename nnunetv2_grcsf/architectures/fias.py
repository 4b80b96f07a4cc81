"""FIAS network: dual-path (dilated attention + depthwise multi-kernel) encoder and MixAtt decoder, 2D and 3D.

What the paper states (Xiwei Liu, Min Xu, Qirong Ho, "FIAS: Feature Imbalance-Aware Medical Image Segmentation
with Dynamic Fusion and Mixing Attention", arXiv 2411.10881, ISBI 2025; abstract only): a dual-path encoder
whose global path is DilateFormer (long-range features) and whose local path is a Depthwise Multi-Kernel
convolution (fine detail); a Context-Aware Fusion block that dynamically balances the two; a MixAtt decoder
that combines self-attention and Monte Carlo attention. The blocks' own docstrings (blocks/msda.py, dmk.py,
caf.py, mixatt.py) say what they take from DilateFormer and SvANet and what is ours.

Our design of the network, on nnU-Net's plans (the constructor takes the plans' arch_kwargs, PlainConvUNet or
ResidualEncoderUNet form; ``conv_op`` alone decides 2D or 3D):

- Resolution stages, features, strides and kernels are the plans'. Each stage has a kind (``stage_attention``):
  'conv'   the plans' own stage (StackedConvBlocks of ``n_conv_per_stage`` convs, or, with ResEnc plans,
           ``n_blocks_per_stage`` residual blocks after the ResEnc stem);
  'msda'   a strided conv (the stage's stride), then dual-path units: an MSDA transformer block (global
           path) and a DMK block (local path) on the same input, fused by CAF;
  'global' the same with global self-attention in the transformer block.
  Dual-path units per stage: the plans' depth minus one (the first conv/block becomes the strided conv),
  at least one. Default kinds map DilateFormer's layout onto the plans: DilateFormer embeds with convs down
  to 1/4 resolution, then has two MSDA stages (1/4, 1/8) and global attention deeper, so the default is
  ('conv', 'conv', 'msda', 'msda', 'global', ...) with the bottleneck always 'global'. Attention at the two
  finest resolutions is by far the most expensive (memory ~ C x prod(S)); it can be switched on per stage.
- MSDA dilations (1, 2, 3) with one head group per dilation, as DilateFormer. The attention width is decoupled
  from the stage's channels (blocks/msda.py): heads of ``attention_head_dim`` (16) channels, by default as many
  as fit C (a multiple of the number of dilations at 'msda' stages, at least one per group; default_num_heads),
  unless ``num_heads`` is given.
- Decoder (MixAtt): per stage, as nnU-Net's UNetDecoder, a transposed conv (the stage's stride), concat with
  the skip, ``n_conv_per_stage_decoder`` convs, then MixingAttention (x + self-attention + x * Monte Carlo channel
  attention) whose token mixing is the attention of that resolution's encoder stage (none at 'conv' stages), and
  a 1x1 segmentation head. Heads exist at every stage
  (deep supervision, always built so weights load either way); ``decoder.deep_supervision`` chooses the output.
- Beyond the paper: with ``use_rcu``, the MAE residual channels listed in ``residual_channels`` are split off
  the input and fused into the decoder's skip connections of the resolution stages ``rcu_stages`` (default the
  two finest) by GRCSF's RegionCompensationUnit (blocks/rcu.py), before the stage's convolutions, exactly as
  GRCSFUNet does (input_routing.py). Without ``use_rcu`` every input channel is an image channel.

Memory and speed (what is ours, none of it changes the function): at 'msda' stages, the high-resolution ones,
every encoder dual-path unit is activation-checkpointed, and the decoder's token mixing there too
(``activation_checkpointing``, on by default); 'global' stages hold a quarter or less of the positions, where
recomputing would cost as much compute as at 'msda' stages for little memory, so they are not. On CUDA the
MSDA runs as one fused flex_attention kernel with a block-sparse mask, everything else as plain PyTorch ops
(cuDNN); on the CPU the MSDA and the depthwise convs use custom autograd functions with faster backward passes
(blocks/msda.py, helpers.depthwise_conv). Measured cost: README and benchmarks/results.

torch.compile: on the CPU path (the MSDA's loop) TorchDynamo captures the whole network in one graph, 2D and 3D,
with and without the RCU (Monte Carlo draws are tensors, and the CPU-only custom autograd functions step aside
under compilation for their plain versions). On CUDA the MSDA's flex_attention runs outside the network's graph,
compiled on its own, and the MSDA stages and MixAtt blocks holding it run eagerly (blocks/msda.py); the rest is
compiled (FIASTrainer compiles with static shapes). Mixed precision: the MSDA's and the CPU global attention's
logits and softmax run in float32 (see blocks/msda.py).

Shapes: input (B, C_in, *S), S divisible by prod(strides) per axis -> logits (B, num_classes, *S), or with
``decoder.deep_supervision`` a list of n_stages - 1 logits, full resolution first, then each coarser decoder
stage (B, num_classes, *(S / prod(strides[:i + 1]))).
"""
from typing import List, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.helper import get_matching_convtransp, maybe_convert_scalar_to_list
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD, StackedResidualBlocks
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU, StackedConvBlocks
from dynamic_network_architectures.initialization.weight_init import InitWeights_He, init_last_bn_before_add_to_0
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd

from nnunetv2_grcsf.architectures.blocks.caf import ContextAwareFusion
from nnunetv2_grcsf.architectures.blocks.dmk import DepthwiseMultiKernelConv
from nnunetv2_grcsf.architectures.blocks.mixatt import MixingAttention
from nnunetv2_grcsf.architectures.blocks.msda import (IMPLEMENTATIONS, AttentionBlock, MultiScaleDilatedAttention,
                                                      check_attention_settings, dilated_window_extent)
from nnunetv2_grcsf.architectures.helpers import (feature_map_estimate, maybe_checkpoint, maybe_eager,
                                                  per_axis_kernel, stage_sizes)
from nnunetv2_grcsf.architectures.input_routing import (DEFAULT_RCU_STAGES, ResidualMapRoutingUNet,
                                                        region_compensation_units)

STAGE_KINDS = ("conv", "msda", "global")
DEFAULT_MSDA_DILATIONS = (1, 2, 3)


def default_stage_attention(n_stages: int) -> List[str]:
    """DilateFormer's layout on the plans' stages: ('conv', 'conv', 'msda', 'msda', 'global', ...), last 'global'.

    DilateFormer embeds with convs down to 1/4 resolution, then has two MSDA stages and global attention deeper;
    the bottleneck is always global (it is small, and too small for the dilated windows in shallow plans).
    """
    kinds = (["conv", "conv", "msda", "msda"] + ["global"] * n_stages)[:n_stages]
    if kinds[-1] == "msda":
        kinds[-1] = "global"
    return kinds


def msda_window(kernel_size: Sequence[int], dilations: Sequence[int]) -> List[int]:
    """Extent per axis of the widest MSDA window (kernel 3 at the largest dilation; 1 on axes of kernel 1)."""
    return [dilated_window_extent(3, max(dilations)) if k > 1 else 1 for k in kernel_size]


def stage_attention_for_patch_size(patch_size: Sequence[int], strides: Sequence[Sequence[int]],
                                   kernel_sizes: Sequence[Sequence[int]],
                                   msda_dilations: Sequence[int] = DEFAULT_MSDA_DILATIONS) -> List[str]:
    """The default layout (:func:`default_stage_attention`) for a known patch size: every 'msda' stage whose
    feature map at ``patch_size`` is smaller than its MSDA window becomes 'global' (its few tokens are cheap to
    attend to globally). The FIAS trainers pass this, so that every patch size nnU-Net plans builds."""
    kinds = default_stage_attention(len(strides))
    for stage, size in enumerate(stage_sizes(patch_size, strides)):
        if kinds[stage] == "msda" and any(s < w for s, w in zip(size, msda_window(kernel_sizes[stage],
                                                                                     msda_dilations))):
            kinds[stage] = "global"
    return kinds


def default_num_heads(features: int, kind: str, dilations: Sequence[int], head_dim: int) -> int:
    """As many heads of ``head_dim`` channels as fit ``features`` (attention width <= features, so never costlier
    than width = features), a multiple of the number of dilations at 'msda' stages (one head group per dilation),
    at least one head per group."""
    groups = len(dilations) if kind == "msda" else 1
    return groups * max(1, features // (head_dim * groups))


def _per_stage(value, n: int, name: str) -> list:
    """An int (or None) for every stage, or a sequence checked to have one entry per stage."""
    if value is None or isinstance(value, (int, np.integer, str)):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"FIASUNet: {name} has {len(value)} entries, expected one per stage ({n}).")
    return value


class DualPathUnit(nn.Module):
    """Global path (attention block) and local path (DMK) on the same input, fused by CAF.

    With ``checkpointing`` (and gradients on) the whole unit is recomputed in the backward pass and only its
    input is kept (stored anyway as the previous layer's output); its attention block should then not
    checkpoint itself.
    Shapes: (B, C, *S) -> (B, C, *S).
    """

    def __init__(self, global_path: AttentionBlock, local_path: DepthwiseMultiKernelConv, fusion: ContextAwareFusion,
                 checkpointing: bool = False):
        super().__init__()
        self.global_path = global_path
        self.local_path = local_path
        self.fusion = fusion
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self._forward, x, self.checkpointing)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fusion(self.global_path(x), self.local_path(x))

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> np.int64:
        if self.checkpointing:  # its output (its input is stored by the layer before)
            return feature_map_estimate(size, self.fusion.channels)
        return (self.global_path.compute_conv_feature_map_size(size) +
                self.local_path.compute_conv_feature_map_size(size) + self.fusion.compute_conv_feature_map_size(size))


class DualPathStage(nn.Module):
    """FIAS encoder stage: strided conv (ConvDropoutNormReLU), then ``n_units`` DualPathUnits.

    ``checkpointing``: each DualPathUnit is recomputed in the backward pass (see DualPathUnit).
    Shapes: (B, C_in, *S) -> (B, C, *(S / stride)).
    """

    def __init__(self, n_units: int, conv_op: Type[_ConvNd], input_channels: int, channels: int, kernel_size,
                 stride, attention: str, num_heads: int, dilations: Sequence[int], dmk_kernel_sizes: Sequence[int],
                 mlp_ratio: float, conv_kwargs: dict, nonlin_first: bool, checkpointing: bool, head_dim: int = None):
        super().__init__()
        self.down = ConvDropoutNormReLU(conv_op, input_channels, channels, kernel_size, stride,
                                        nonlin_first=nonlin_first, **conv_kwargs)
        local_kwargs = {key: conv_kwargs[key]
                        for key in ("conv_bias", "norm_op", "norm_op_kwargs", "nonlin", "nonlin_kwargs")}
        self.units = nn.Sequential(*[
            DualPathUnit(AttentionBlock(conv_op, channels, attention, num_heads, dilations,
                                        per_axis_kernel(3, kernel_size), mlp_ratio, head_dim=head_dim),
                         DepthwiseMultiKernelConv(conv_op, channels, dmk_kernel_sizes, kernel_size, **local_kwargs),
                         ContextAwareFusion(conv_op, channels), checkpointing)
            for _ in range(n_units)])
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # eagerly around MSDA's flex_attention (helpers.maybe_eager)
        return maybe_eager(self._forward, x, self.units[0].global_path.attention_outside_graph(x))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.units(self.down(x))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        output = self.down.compute_conv_feature_map_size(input_size)
        size = [i // s for i, s in zip(input_size, self.stride)]
        return output + sum(unit.compute_conv_feature_map_size(size) for unit in self.units)


class FIASEncoder(nn.Module):
    """Dual-path encoder on the plans' stages; see the module docstring for the stage kinds.

    Offers the attributes nnU-Net-style decoders read (output_channels, strides, kernel_sizes, conv_op, norm,
    dropout, nonlin settings). ``residual_blocks`` (block, bottleneck_channels per stage, stem_channels) selects
    the ResEnc form: a stem conv and residual blocks at 'conv' stages.
    Shapes: (B, C_in, *S) -> skips [(B, features_per_stage[i], *(S / prod(strides[:i + 1])))], i < n_stages.
    """

    def __init__(self, input_channels: int, features_per_stage: Sequence[int], conv_op: Type[_ConvNd],
                 kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]], depths: Sequence[int],
                 stage_attention: Sequence[str], num_heads: Sequence[int], dilations: Sequence[int],
                 dmk_kernel_sizes: Sequence[int], mlp_ratio: float, conv_kwargs: dict, nonlin_first: bool = False,
                 residual_blocks: Optional[dict] = None, checkpointing: bool = False, head_dim: int = None):
        super().__init__()
        if residual_blocks is None:
            self.stem = None
            stage_input = input_channels
        else:
            stem_channels = residual_blocks["stem_channels"] or features_per_stage[0]
            self.stem = StackedConvBlocks(1, conv_op, input_channels, stem_channels, kernel_sizes[0], 1,
                                          **conv_kwargs)
            stage_input = stem_channels
        stages = []
        for s, kind in enumerate(stage_attention):
            if kind != "conv":
                stage = DualPathStage(max(1, depths[s] - 1), conv_op, stage_input, features_per_stage[s],
                                      kernel_sizes[s], strides[s], kind, num_heads[s], dilations, dmk_kernel_sizes,
                                      mlp_ratio, conv_kwargs, nonlin_first, checkpointing and kind == "msda",
                                      head_dim)
            elif residual_blocks is None:
                stage = StackedConvBlocks(depths[s], conv_op, stage_input, features_per_stage[s], kernel_sizes[s],
                                          strides[s], nonlin_first=nonlin_first, **conv_kwargs)
            else:
                stage = StackedResidualBlocks(depths[s], conv_op, stage_input, features_per_stage[s], kernel_sizes[s],
                                              strides[s], block=residual_blocks["block"],
                                              bottleneck_channels=residual_blocks["bottleneck_channels"][s],
                                              **conv_kwargs)
            stages.append(stage)
            stage_input = features_per_stage[s]
        self.stages = nn.ModuleList(stages)
        self.output_channels = list(features_per_stage)
        self.strides = [list(s) for s in strides]
        self.kernel_sizes = [list(k) for k in kernel_sizes]
        self.stage_attention = list(stage_attention)
        self.head_dim = head_dim
        self.conv_op = conv_op
        self.conv_bias = conv_kwargs["conv_bias"]
        self.norm_op, self.norm_op_kwargs = conv_kwargs["norm_op"], conv_kwargs["norm_op_kwargs"]
        self.dropout_op, self.dropout_op_kwargs = conv_kwargs["dropout_op"], conv_kwargs["dropout_op_kwargs"]
        self.nonlin, self.nonlin_kwargs = conv_kwargs["nonlin"], conv_kwargs["nonlin_kwargs"]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if self.stem is not None:
            x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        output = np.int64(0)
        if self.stem is not None:
            output += self.stem.compute_conv_feature_map_size(input_size)
        for stage, size in zip(self.stages, [list(input_size)] + stage_sizes(input_size, self.strides)):
            output += stage.compute_conv_feature_map_size(size)
        return output


class FIASDecoderStage(nn.Module):
    """Transposed conv up, concat with the skip, the plans' decoder convs, then MixingAttention.

    Shapes: below (B, C_below, *S_below), skip (B, C, *S) -> (B, C, *S), S = S_below * stride.
    """

    def __init__(self, encoder: FIASEncoder, level: int, n_convs: int, mixing: MixingAttention, nonlin_first: bool):
        super().__init__()
        stride = encoder.strides[level + 1]
        channels = encoder.output_channels[level]
        self.transpconv = get_matching_convtransp(encoder.conv_op)(encoder.output_channels[level + 1], channels, stride,
                                                                   stride, bias=encoder.conv_bias)
        self.convs = StackedConvBlocks(n_convs, encoder.conv_op, 2 * channels, channels, encoder.kernel_sizes[level], 1,
                                       encoder.conv_bias, encoder.norm_op, encoder.norm_op_kwargs, encoder.dropout_op,
                                       encoder.dropout_op_kwargs, encoder.nonlin, encoder.nonlin_kwargs, nonlin_first)
        self.mixing = mixing
        self.channels = channels

    def forward(self, below: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.mixing(self.convs(torch.cat((self.transpconv(below), skip), 1)))

    def compute_conv_feature_map_size(self, size: Sequence[int]) -> np.int64:
        transposed = np.prod([self.channels, *size], dtype=np.int64)
        return (transposed + self.convs.compute_conv_feature_map_size(size) +
                self.mixing.compute_conv_feature_map_size(size))


class FIASDecoder(nn.Module):
    """MixAtt decoder with UNetDecoder's contract: ``forward(skips)`` and ``deep_supervision``.

    Stages are ordered as computed (lowest resolution first). With ``residual_map_channels`` > 0, the skip
    connections at the resolution stages ``rcu_stages`` (0 = full resolution) pass through a
    RegionCompensationUnit before the stage's convolutions (input_routing.region_compensation_units).
    Shapes: skips as FIASEncoder returns them (+ residual_map (B, K, *S) with RCUs) -> logits, see the module
    docstring.
    """

    def __init__(self, encoder: FIASEncoder, num_classes: int, n_conv_per_stage: Sequence[int],
                 deep_supervision: bool, num_heads: Sequence[int], dilations: Sequence[int],
                 mc_pool_sizes: Sequence[int] = (1, 2, 3), mc_shuffle_positions: bool = True,
                 nonlin_first: bool = False, residual_map_channels: int = 0,
                 rcu_stages: Union[str, Sequence[int]] = DEFAULT_RCU_STAGES, rcu_patch_size=None,
                 rcu_num_heads: int = 2, checkpointing: bool = False, rcu_window: int = 3):
        super().__init__()
        self.deep_supervision = deep_supervision
        self.num_classes = num_classes
        n_levels = len(encoder.output_channels)
        stages, seg_layers = [], []
        for level in range(n_levels - 2, -1, -1):
            kind = encoder.stage_attention[level]
            mixing = MixingAttention(encoder.conv_op, encoder.output_channels[level],
                                     None if kind == "conv" else kind, num_heads[level], dilations,
                                     encoder.kernel_sizes[level], pool_sizes=mc_pool_sizes,
                                     shuffle_positions=mc_shuffle_positions,
                                     checkpointing=checkpointing and kind == "msda", head_dim=encoder.head_dim)
            stages.append(FIASDecoderStage(encoder, level, n_conv_per_stage[n_levels - 2 - level], mixing,
                                           nonlin_first))
            seg_layers.append(encoder.conv_op(encoder.output_channels[level], num_classes, 1, 1, 0, bias=True))
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(seg_layers)
        self.strides = encoder.strides

        self.region_compensation = region_compensation_units(
            "FIASUNet", encoder.conv_op, encoder.output_channels, encoder.strides, residual_map_channels, rcu_stages,
            rcu_patch_size, rcu_num_heads, rcu_window)

    def forward(self, skips: List[torch.Tensor], residual_map: torch.Tensor = None):
        bottleneck = skips[-1]
        below = bottleneck
        seg_outputs = []
        for s, stage in enumerate(self.stages):
            level = len(self.stages) - 1 - s
            skip = skips[level]
            if str(level) in self.region_compensation:
                skip = self.region_compensation[str(level)](skip, residual_map, bottleneck)
            below = stage(below, skip)
            if self.deep_supervision or level == 0:
                seg_outputs.append(self.seg_layers[s](below))
        seg_outputs = seg_outputs[::-1]  # full resolution first
        return seg_outputs if self.deep_supervision else seg_outputs[0]

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """IMPORTANT: input_size is the encoder's input size (as for UNetDecoder)."""
        sizes = stage_sizes(input_size, self.strides)
        output = np.int64(0)
        for s, stage in enumerate(self.stages):
            level = len(self.stages) - 1 - s
            output += stage.compute_conv_feature_map_size(sizes[level])
            if str(level) in self.region_compensation:
                output += self.region_compensation[str(level)].compute_conv_feature_map_size(sizes[level])
            if self.deep_supervision or level == 0:
                output += np.prod([self.num_classes, *sizes[level]], dtype=np.int64)
        return output


class FIASUNet(ResidualMapRoutingUNet):
    """FIAS on nnU-Net's plans; takes the plans' arch_kwargs (PlainConvUNet or ResidualEncoderUNet form).

    Backbone arguments are those of PlainConvUNet (``n_conv_per_stage``) or ResidualEncoderUNet
    (``n_blocks_per_stage``, ``block``, ``bottleneck_channels``, ``stem_channels``); exactly one of
    ``n_conv_per_stage`` / ``n_blocks_per_stage`` must be given. Our arguments:

    - stage_attention: per stage 'conv', 'msda' or 'global' (see the module docstring); default
      ('conv', 'conv', 'msda', 'msda', 'global', ...), the last stage 'global'.
    - num_heads: attention heads, one int or one per stage; None -> as many heads of attention_head_dim channels
      as fit the stage's features (a multiple of the number of dilations at 'msda' stages; default_num_heads).
    - attention_head_dim: channels per head; the attention width is num_heads * attention_head_dim.
    - msda_dilations: one MSDA head group per dilation (heads must be divisible by their number); DilateFormer's
      (1, 2, 3) by default.
    - dmk_kernel_sizes: the DMK's depthwise kernels.
    - mlp_ratio: transformer MLP width relative to the features.
    - mc_pool_sizes, mc_shuffle_positions: Monte Carlo attention grid sizes and position shuffling.
    - activation_checkpointing: recompute in the backward pass, instead of storing their activations,
      (1) every encoder dual-path unit at 'msda' stages (attention block, DMK and CAF; about 30 feature maps of
      the stage fewer per unit, for one more forward pass of it), (2) the decoder's token mixing at 'msda'
      levels. The same function and gradients either way.
    - residual_channels, use_rcu, rcu_stages, rcu_patch_size, rcu_num_heads, rcu_window: as GRCSFUNet's (MAE
      residual channels fused by the RegionCompensationUnit; residual_channels is ignored without use_rcu).
    - msda_implementation: every MSDA's implementation (blocks/msda.py): 'auto' (flex_attention on CUDA tensors,
      the loop elsewhere), 'flex' or 'loop' (the same function; 'loop' on CUDA is plain PyTorch ops, for a GPU
      where flex_attention does not compile).
    - rcu_attention_layout: every RCU's attention layout (blocks/rcu.py; None: by the device, the same function).

    The input's spatial size is checked in ``forward`` (``check_input_size``): divisible by the product of the
    strides, and every MSDA stage at least as large as its widest dilated window.
    Shapes: see the module docstring.
    """

    without_rcu_hint = "FIAS without the RCU (use_rcu=False, e.g. FIASTrainer)"

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: Union[int, List[int], Tuple[int, ...]],
                 conv_op: Type[_ConvNd], kernel_sizes, strides, *, num_classes: int, n_conv_per_stage_decoder,
                 n_conv_per_stage=None, n_blocks_per_stage=None, conv_bias: bool = False,
                 norm_op: Union[None, Type[nn.Module]] = None, norm_op_kwargs: dict = None,
                 dropout_op: Union[None, Type[_DropoutNd]] = None, dropout_op_kwargs: dict = None,
                 nonlin: Union[None, Type[nn.Module]] = None, nonlin_kwargs: dict = None,
                 deep_supervision: bool = False, nonlin_first: bool = False,
                 block: Union[Type[BasicBlockD], Type[BottleneckD]] = BasicBlockD, bottleneck_channels=None,
                 stem_channels: int = None, stage_attention: Sequence[str] = None,
                 num_heads: Union[None, int, Sequence[int]] = None, attention_head_dim: int = 16,
                 msda_dilations: Sequence[int] = DEFAULT_MSDA_DILATIONS, dmk_kernel_sizes: Sequence[int] = (3, 5, 7),
                 mlp_ratio: float = 4.0, mc_pool_sizes: Sequence[int] = (1, 2, 3), mc_shuffle_positions: bool = True,
                 activation_checkpointing: bool = True, residual_channels: Sequence[int] = (), use_rcu: bool = False,
                 rcu_stages: Union[str, Sequence[int]] = DEFAULT_RCU_STAGES, rcu_patch_size=None,
                 rcu_num_heads: int = 2, rcu_window: int = 3, msda_implementation: str = "auto",
                 rcu_attention_layout: Optional[str] = None):
        super().__init__()
        if msda_implementation not in IMPLEMENTATIONS:
            raise ValueError(f"FIASUNet: msda_implementation {msda_implementation!r} is not one of {IMPLEMENTATIONS}.")
        if (n_conv_per_stage is None) == (n_blocks_per_stage is None):
            raise ValueError("FIASUNet: give exactly one of n_conv_per_stage (PlainConvUNet plans) and "
                             "n_blocks_per_stage (ResidualEncoderUNet plans).")
        self.route_channels(input_channels, residual_channels, use_rcu)

        features = _per_stage(features_per_stage, n_stages, "features_per_stage")
        kernel_sizes = [maybe_convert_scalar_to_list(conv_op, k) for k in _per_stage(kernel_sizes, n_stages,
                                                                                     "kernel_sizes")]
        strides = [maybe_convert_scalar_to_list(conv_op, s) for s in _per_stage(strides, n_stages, "strides")]
        depths = _per_stage(n_conv_per_stage if n_blocks_per_stage is None else n_blocks_per_stage, n_stages,
                            "n_conv_per_stage" if n_blocks_per_stage is None else "n_blocks_per_stage")
        decoder_depths = _per_stage(n_conv_per_stage_decoder, n_stages - 1, "n_conv_per_stage_decoder")
        stage_attention = default_stage_attention(n_stages) if stage_attention is None else list(stage_attention)
        heads = _per_stage(num_heads, n_stages, "num_heads")
        self.msda_dilations = [int(d) for d in msda_dilations]
        heads = [default_num_heads(f, kind, self.msda_dilations, attention_head_dim) if h is None else h
                 for f, h, kind in zip(features, heads, stage_attention)]
        self.attention_head_dim = attention_head_dim
        self._check_stage_settings(stage_attention, features, heads, kernel_sizes, n_stages)

        conv_kwargs = dict(conv_bias=conv_bias, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, dropout_op=dropout_op,
                           dropout_op_kwargs=dropout_op_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs)
        residual_blocks = None if n_blocks_per_stage is None else dict(
            block=block, bottleneck_channels=_per_stage(bottleneck_channels, n_stages, "bottleneck_channels"),
            stem_channels=stem_channels)
        self.encoder = FIASEncoder(len(self.encoder_channels), features, conv_op, kernel_sizes, strides, depths,
                                   stage_attention, heads, self.msda_dilations, dmk_kernel_sizes, mlp_ratio,
                                   conv_kwargs, nonlin_first, residual_blocks, activation_checkpointing,
                                   attention_head_dim)
        self.decoder = FIASDecoder(self.encoder, num_classes, decoder_depths, deep_supervision, heads,
                                   self.msda_dilations, mc_pool_sizes, mc_shuffle_positions, nonlin_first,
                                   len(self.residual_channels), rcu_stages, rcu_patch_size, rcu_num_heads,
                                   activation_checkpointing, rcu_window)

        self.key_to_encoder = "encoder"  # stem (ResEnc form) and stages
        if residual_blocks is None:
            self.key_to_stem = "encoder.stages.0"
            first_conv = "encoder.stages.0.convs.0" if stage_attention[0] == "conv" else "encoder.stages.0.down"
        else:
            self.key_to_stem = "encoder.stem"
            first_conv = "encoder.stem.convs.0"
        self.keys_to_in_proj = (f"{first_conv}.conv", f"{first_conv}.all_modules.0")
        self.size_divisor = np.prod(strides, axis=0).tolist()
        for module in self.modules():  # encoder and decoder MSDA alike
            if isinstance(module, MultiScaleDilatedAttention):
                module.implementation = msda_implementation
        self.set_rcu_attention_layout(rcu_attention_layout)

    def _check_stage_settings(self, stage_attention: Sequence[str], features: Sequence[int], heads: Sequence[int],
                              kernel_sizes: Sequence[Sequence[int]], n_stages: int):
        if len(stage_attention) != n_stages or any(kind not in STAGE_KINDS for kind in stage_attention):
            raise ValueError(f"FIASUNet: stage_attention {list(stage_attention)} must have one entry per stage "
                             f"({n_stages}), each one of {STAGE_KINDS}.")
        for stage, kind in enumerate(stage_attention):
            if kind == "conv":
                continue
            where = (f"FIASUNet encoder stage {stage} ({features[stage]} features, stage_attention '{kind}', "
                     f"num_heads {heads[stage]})")
            dilations = self.msda_dilations if kind == "msda" else [1]
            check_attention_settings(features[stage], heads[stage], self.attention_head_dim, dilations,
                                     per_axis_kernel(3, kernel_sizes[stage]),
                                     where + (f", msda_dilations {self.msda_dilations}" if kind == "msda" else ""))

    def check_input_size(self, size: Sequence[int]):
        """Raises ValueError, naming the stage and setting, if the network cannot process spatial size ``size``."""
        if len(size) != len(self.size_divisor):
            raise ValueError(f"FIASUNet: input has spatial size {list(size)}; these plans have "
                             f"{len(self.size_divisor)} spatial axes.")
        if any(s % d for s, d in zip(size, self.size_divisor)):
            raise ValueError(
                f"FIASUNet: input size {list(size)} is not divisible by {self.size_divisor}, the product of the "
                f"plans' 'strides' (arch_kwargs) per axis. The configuration's 'patch_size' must be a multiple of "
                f"it on every axis.")
        for stage, (kind, stage_size) in enumerate(zip(self.encoder.stage_attention,
                                                       stage_sizes(size, self.encoder.strides))):
            if kind != "msda":
                continue
            window = msda_window(self.encoder.kernel_sizes[stage], self.msda_dilations)
            if any(s < w for s, w in zip(stage_size, window)):
                raise ValueError(
                    f"FIASUNet: encoder stage {stage} has feature map {stage_size} at input size {list(size)}, "
                    f"smaller than its MSDA window {window} (kernel 3 at dilation {max(self.msda_dilations)}, "
                    f"msda_dilations {self.msda_dilations}). Use smaller msda_dilations, or stage_attention "
                    f"'global' or 'conv' for stage {stage}, or a larger patch size.")

    @staticmethod
    def initialize(module: nn.Module):
        """He init for convs (as nnU-Net), truncated normal (std 0.02) for linear layers (as DilateFormer)."""
        InitWeights_He(1e-2)(module)
        init_last_bn_before_add_to_0(module)
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
