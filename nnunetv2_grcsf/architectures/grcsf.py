"""GRCSF network: an nnU-Net U-Net with Global (GCU) and Region (RCU) Compensation Units, 2D and 3D.

What the paper states (Wang, Chen, Yang, Kim, "Improving Lesion Segmentation in Medical Images by Global
and Regional Feature Compensation", arXiv 2502.08675, abstract only; no official code): a U-shaped
backbone; GCUs preserve global context and fine detail during multiscale downsampling; an RCU fuses
self-supervised MAE residual maps into the segmentation features by patch-based cross-attention,
weighted by a patch-level importance score from the backbone's global spatial features.

Our design (see blocks/gcu.py and blocks/rcu.py for the units):

- Backbone: exactly the U-Net the nnU-Net plans describe, from dynamic_network_architectures'
  PlainConvEncoder (plans with ``n_conv_per_stage``) or ResidualEncoder (ResEnc plans with
  ``n_blocks_per_stage``) and UNetDecoder, subclassed, not copied. Their state-dict keys are unchanged
  (``encoder.stages.*``, ``encoder.stem.*``, ``decoder.*``), so the weights of a PlainConvUNet /
  ResidualEncoderUNet of the same plans and encoder input channels load into GRCSFUNet with ``strict=False``
  (only the GCU/RCU weights are then missing).
- GCU: one after every encoder stage whose stride product is > 1 (keys ``encoder.global_compensation.<stage>``);
  each is exactly the identity at initialization (a zero-initialized output scale, or with
  ``gcu_start='zero_projection'`` a zero-initialized projection, blocks/gcu.py).
- Input routing (input_routing.py): with the RCU on, the input channels listed in ``residual_channels`` (MAE
  residual maps, see nnunetv2_grcsf.residual_channels) are split off: only the image channels go through the
  encoder, the residual map (B, K, *S) goes to the RCUs; with ``residual_in_encoder`` the encoder reads the residual
  maps too, as extra input channels. With the RCU off every input channel is an image channel.
- RCU: at the resolution stages ``rcu_stages`` (default the two finest, (0, 1)), the decoder's skip connection is
  fused with the residual map before the stage's convolutions (concat with the upsampled features, then the
  plans' convs), so the convolutions process the fused features and the result reaches the segmentation (and
  deep-supervision) outputs. Fusing on the skip keeps the decoder's convs and their weights those of the plans.
  Token patches of ``rcu_patch_size`` pixels (default 8 per axis, the MAE's patch edge, capped to a divisor of
  the strides' product; see blocks/rcu.py); the importance score comes from the bottleneck features.

Shapes: input (B, C_in, *S), S divisible by prod(strides) per axis -> logits (B, num_classes, *S), or with
``decoder.deep_supervision`` a list of n_stages - 1 logits, full resolution first, then each coarser decoder
stage (B, num_classes, *(S / prod(strides[:i + 1]))).
"""
from typing import List, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He, init_last_bn_before_add_to_0
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd

from nnunetv2_grcsf.architectures.blocks.gcu import GlobalCompensationUnit
from nnunetv2_grcsf.architectures.helpers import AddedUnits, stage_sizes
from nnunetv2_grcsf.architectures.input_routing import (DEFAULT_RCU_STAGES, ResidualMapRoutingUNet,
                                                        region_compensation_units)


class GRCSFEncoder(nn.Module):
    """Shared part of the GRCSF encoders: the backbone encoder's stages, each downsampling one followed by a GCU.

    Mixed into a dynamic_network_architectures encoder (PlainConvEncoder or ResidualEncoder), whose
    constructor builds the stages; ``add_global_compensation`` then adds the GCUs.
    Shapes: image (B, C_img, *S) -> skips [(B, features_per_stage[i], *(S / prod(strides[:i + 1])))], i < n_stages.
    """

    def add_global_compensation(self, stage_input_channels: Sequence[int], use_gcu: bool, gcu_start: str):
        """One GCU per stage with a stride product > 1 (none if ``use_gcu`` is False), starting as ``gcu_start``;
        built and initialized from random numbers of their own (helpers.AddedUnits)."""
        self.global_compensation = AddedUnits("global_compensation", lambda: {
            str(stage): GlobalCompensationUnit(self.conv_op, stage_input_channels[stage], self.output_channels[stage],
                                               stride, self.norm_op, self.norm_op_kwargs, start=gcu_start)
            for stage, stride in enumerate(self.strides) if use_gcu and np.prod(stride) > 1})

    def embed_input(self, image: torch.Tensor) -> torch.Tensor:
        """What feeds stage 0 (a stem, for encoders that have one)."""
        return image

    def forward(self, image: torch.Tensor) -> List[torch.Tensor]:
        x = self.embed_input(image)
        skips = []
        for stage, stage_module in enumerate(self.stages):
            out = stage_module(x)
            if str(stage) in self.global_compensation:
                out = self.global_compensation[str(stage)](x, out)
            skips.append(out)
            x = out
        return skips

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        output = super().compute_conv_feature_map_size(input_size)
        for stage, size in enumerate(stage_sizes(input_size, self.strides)):
            if str(stage) in self.global_compensation:
                output += self.global_compensation[str(stage)].compute_conv_feature_map_size(size)
        return output


class GRCSFPlainConvEncoder(GRCSFEncoder, PlainConvEncoder):
    """PlainConvEncoder (nnU-Net's default plans) with GCUs; arguments as PlainConvEncoder plus ``use_gcu`` and
    ``gcu_start``."""

    def __init__(self, input_channels: int, n_stages: int, features_per_stage, conv_op: Type[_ConvNd], kernel_sizes,
                 strides, n_conv_per_stage, use_gcu: bool = True, gcu_start: str = "zero_scale",
                 **plain_encoder_kwargs):
        super().__init__(input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                         n_conv_per_stage, return_skips=True, **plain_encoder_kwargs)
        self.add_global_compensation([input_channels, *self.output_channels[:-1]], use_gcu, gcu_start)


class GRCSFResidualEncoder(GRCSFEncoder, ResidualEncoder):
    """ResidualEncoder (nnU-Net's ResEnc plans) with GCUs; arguments as ResidualEncoder plus ``use_gcu`` and
    ``gcu_start``."""

    def __init__(self, input_channels: int, n_stages: int, features_per_stage, conv_op: Type[_ConvNd], kernel_sizes,
                 strides, n_blocks_per_stage, use_gcu: bool = True, gcu_start: str = "zero_scale",
                 **residual_encoder_kwargs):
        super().__init__(input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                         n_blocks_per_stage, return_skips=True, **residual_encoder_kwargs)
        stem_channels = self.stem.output_channels
        self.add_global_compensation([stem_channels, *self.output_channels[:-1]], use_gcu, gcu_start)

    def embed_input(self, image: torch.Tensor) -> torch.Tensor:
        return self.stem(image)


class GRCSFDecoder(UNetDecoder):
    """UNetDecoder whose skip connections at the stages in ``rcu_stages`` are fused with the residual map by a
    Region Compensation Unit before the stage's convolutions.

    ``rcu_stages`` counts resolution stages as the plans do (0 = full resolution); the RCUs' layout is
    :func:`~nnunetv2_grcsf.architectures.input_routing.region_compensation_units` (global features: the bottleneck).
    Shapes: skips as GRCSFEncoder returns them, residual_map (B, K, *S) or None -> logits as UNetDecoder.
    """

    def __init__(self, encoder: GRCSFEncoder, num_classes: int, n_conv_per_stage, deep_supervision: bool,
                 nonlin_first: bool = False, residual_map_channels: int = 0,
                 rcu_stages: Union[str, Sequence[int]] = DEFAULT_RCU_STAGES, rcu_patch_size=None,
                 rcu_num_heads: int = 2, rcu_window: int = 3):
        super().__init__(encoder, num_classes, n_conv_per_stage, deep_supervision, nonlin_first=nonlin_first)
        self.region_compensation = region_compensation_units(
            "GRCSFUNet", encoder.conv_op, encoder.output_channels, encoder.strides, residual_map_channels,
            rcu_stages, rcu_patch_size, rcu_num_heads, rcu_window)

    def forward(self, skips: List[torch.Tensor], residual_map: torch.Tensor = None):
        bottleneck = skips[-1]
        lower_resolution = bottleneck
        seg_outputs = []
        for s in range(len(self.stages)):
            x = self.transpconvs[s](lower_resolution)
            resolution_stage = len(self.stages) - 1 - s
            skip = skips[-(s + 2)]
            if str(resolution_stage) in self.region_compensation:
                skip = self.region_compensation[str(resolution_stage)](skip, residual_map, bottleneck)
            x = self.stages[s](torch.cat((x, skip), 1))
            if self.deep_supervision or resolution_stage == 0:
                seg_outputs.append(self.seg_layers[s](x))
            lower_resolution = x
        seg_outputs = seg_outputs[::-1]  # full resolution first
        return seg_outputs if self.deep_supervision else seg_outputs[0]

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        output = super().compute_conv_feature_map_size(input_size)
        sizes = stage_sizes(input_size, self.encoder.strides)
        for stage, rcu in self.region_compensation.items():
            output += rcu.compute_conv_feature_map_size(sizes[int(stage)])
        return output


class GRCSFUNet(ResidualMapRoutingUNet):
    """GRCSF on nnU-Net's U-Net; takes the plans' arch_kwargs (PlainConvUNet or ResidualEncoderUNet form).

    Backbone arguments are those of PlainConvUNet (``n_conv_per_stage``) or of ResidualEncoderUNet
    (``n_blocks_per_stage``, ``block``, ``bottleneck_channels``, ``stem_channels``): exactly one of
    ``n_conv_per_stage`` / ``n_blocks_per_stage`` must be given and selects the encoder. Our arguments:

    - residual_channels: input channel indices that are MAE residual maps (the rest are image channels);
      required (non-empty) when ``use_rcu``; ignored otherwise (then all channels are image channels).
    - use_gcu / use_rcu: the ablation switches (no GCU modules / no RCU modules and no channel split).
    - gcu_start: how each GCU starts as the identity, 'zero_scale' (default) or 'zero_projection'
      (blocks/gcu.py, GCU_STARTS).
    - rcu_stages: resolution stages (0 = full resolution) whose skip connection an RCU fuses with the residual
      map; default (0, 1); ``"every"``: every decoder stage whose stride divides the token patch
      (input_routing.region_compensation_units).
    - rcu_patch_size: RCU token patch size in pixels (int or per axis); None -> 8 per axis, capped to a divisor
      of the strides' product (blocks/rcu.py, default_token_patch_size).
    - rcu_num_heads: RCU attention heads (head h has distance scale 0.5 * 2^h patches).
    - rcu_window: patches per axis each pixel attends to (odd).
    - residual_in_encoder: the encoder also reads the residual maps, as extra input channels (with the RCU on;
      input_routing.ResidualMapRoutingUNet).
    - rcu_attention_layout: every RCU's attention layout (blocks/rcu.py; None: by the device, the same function).

    Shapes: see the module docstring.
    """

    without_rcu_hint = "the GCU-only variant (use_rcu=False, e.g. GRCSFTrainer_noRCU)"

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: Union[int, List[int], Tuple[int, ...]],
                 conv_op: Type[_ConvNd], kernel_sizes, strides, *, num_classes: int, n_conv_per_stage_decoder,
                 n_conv_per_stage=None, n_blocks_per_stage=None, conv_bias: bool = False,
                 norm_op: Union[None, Type[nn.Module]] = None, norm_op_kwargs: dict = None,
                 dropout_op: Union[None, Type[_DropoutNd]] = None, dropout_op_kwargs: dict = None,
                 nonlin: Union[None, Type[nn.Module]] = None, nonlin_kwargs: dict = None,
                 deep_supervision: bool = False, nonlin_first: bool = False,
                 block: Union[Type[BasicBlockD], Type[BottleneckD]] = BasicBlockD, bottleneck_channels=None,
                 stem_channels: int = None, residual_channels: Sequence[int] = (), use_gcu: bool = True,
                 use_rcu: bool = True, rcu_stages: Union[str, Sequence[int]] = DEFAULT_RCU_STAGES, rcu_patch_size=None,
                 rcu_num_heads: int = 2, rcu_window: int = 3, residual_in_encoder: bool = False,
                 rcu_attention_layout: Optional[str] = None, gcu_start: str = "zero_scale"):
        super().__init__()
        if (n_conv_per_stage is None) == (n_blocks_per_stage is None):
            raise ValueError("GRCSFUNet: give exactly one of n_conv_per_stage (PlainConvUNet plans) and "
                             "n_blocks_per_stage (ResidualEncoderUNet plans).")
        self.route_channels(input_channels, residual_channels, use_rcu, residual_in_encoder)

        common = dict(conv_bias=conv_bias, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs, dropout_op=dropout_op,
                      dropout_op_kwargs=dropout_op_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs)
        backbone = (len(self.encoder_channels), n_stages, features_per_stage, conv_op, kernel_sizes, strides)
        if n_conv_per_stage is not None:
            self.encoder = GRCSFPlainConvEncoder(*backbone, n_conv_per_stage, use_gcu=use_gcu, gcu_start=gcu_start,
                                                 nonlin_first=nonlin_first, **common)
            self.key_to_stem = "encoder.stages.0"
            self.keys_to_in_proj = ("encoder.stages.0.0.convs.0.all_modules.0", "encoder.stages.0.0.convs.0.conv")
        else:
            self.encoder = GRCSFResidualEncoder(*backbone, n_blocks_per_stage, use_gcu=use_gcu, gcu_start=gcu_start,
                                                block=block, bottleneck_channels=bottleneck_channels,
                                                stem_channels=stem_channels, **common)
            self.key_to_stem = "encoder.stem"
            self.keys_to_in_proj = ("encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0")
        self.key_to_encoder = "encoder"  # stem, stages and GCUs
        self.decoder = GRCSFDecoder(self.encoder, num_classes, n_conv_per_stage_decoder, deep_supervision,
                                    nonlin_first=nonlin_first, residual_map_channels=len(self.residual_channels),
                                    rcu_stages=rcu_stages, rcu_patch_size=rcu_patch_size,
                                    rcu_num_heads=rcu_num_heads, rcu_window=rcu_window)
        self.set_rcu_attention_layout(rcu_attention_layout)
        self.size_divisor = np.prod(self.encoder.strides, axis=0).tolist()

    def check_input_size(self, size: Sequence[int]):
        """Raises if the spatial input size is not divisible by the product of the strides (which the RCU's token
        patch size divides)."""
        if any(s % d for s, d in zip(size, self.size_divisor)):
            raise ValueError(
                f"GRCSFUNet: input size {list(size)} is not divisible by {self.size_divisor}, the product of the "
                f"plans' 'strides' (arch_kwargs) per axis. The configuration's 'patch_size' must be a multiple of it "
                f"on every axis.")

    @staticmethod
    def initialize(module):
        """nnU-Net's initialization (He for every conv, the last norm of a residual block zero), then each GCU back
        to the identity (``network.apply`` visits a module after its children)."""
        InitWeights_He(1e-2)(module)
        init_last_bn_before_add_to_0(module)
        if isinstance(module, GlobalCompensationUnit):
            module.reset_to_identity()
