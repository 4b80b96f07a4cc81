"""GlobalCompensationUnit: shapes in 2D/3D (anisotropic strides included), gradients, losslessness, errors."""
import pytest
import torch
from torch import nn

from nnunetv2_grcsf.architectures.blocks.gcu import GlobalCompensationUnit


def stage_output_for(stage_input: torch.Tensor, out_channels: int, stride) -> torch.Tensor:
    """A stand-in for an nnU-Net encoder stage: a strided 3x3 conv (padding 1)."""
    conv_op = nn.Conv2d if stage_input.ndim == 4 else nn.Conv3d
    return conv_op(stage_input.shape[1], out_channels, 3, stride, 1)(stage_input)


@pytest.mark.parametrize("conv_op, input_size, stride, output_size", [
    (nn.Conv2d, (16, 24), (2, 2), (8, 12)),
    (nn.Conv2d, (16, 24), (2, 1), (8, 24)),
    (nn.Conv2d, (16, 24), 2, (8, 12)),
    (nn.Conv3d, (8, 16, 12), (2, 2, 2), (4, 8, 6)),
    (nn.Conv3d, (8, 16, 12), (1, 2, 2), (8, 8, 6)),
])
def test_output_has_the_stage_output_shape(conv_op, input_size, stride, output_size):
    torch.manual_seed(0)
    gcu = GlobalCompensationUnit(conv_op, 4, 6, stride)
    stage_input = torch.randn(2, 4, *input_size)
    stage_output = stage_output_for(stage_input, 6, stride)
    out = gcu(stage_input, stage_output)
    assert out.shape == (2, 6, *output_size)
    assert not torch.allclose(out, stage_output), "the compensation must change the stage output from the start"


@pytest.mark.parametrize("conv_op, stride", [(nn.Conv2d, (2, 2)), (nn.Conv3d, (1, 2, 2))])
def test_every_parameter_gets_a_gradient(conv_op, stride):
    torch.manual_seed(0)
    gcu = GlobalCompensationUnit(conv_op, 3, 5, stride)
    dims = 3 if conv_op is nn.Conv3d else 2
    stage_input = torch.randn(2, 3, *[8] * dims)
    gcu(stage_input, stage_output_for(stage_input, 5, stride)).square().sum().backward()
    for name, parameter in gcu.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("conv_op, size, stride", [(nn.Conv2d, (8, 8), (2, 2)), (nn.Conv3d, (4, 8, 8), (1, 2, 2))])
def test_every_input_position_reaches_the_compensation(conv_op, size, stride):
    """Lossless downsampling: unlike a strided 1x1 subsampling, no input position is skipped."""
    torch.manual_seed(0)
    gcu = GlobalCompensationUnit(conv_op, 2, 4, stride).eval()
    stage_input = torch.randn(1, 2, *size)
    stage_output = torch.zeros(1, 4, *[s // t for s, t in zip(size, stride)])
    reference = gcu(stage_input, stage_output)
    for position in [(0,) * len(size), tuple(s - 1 for s in size), tuple(1 for _ in size)]:
        changed = stage_input.clone()
        changed[(0, 0, *position)] += 1.0
        assert not torch.allclose(gcu(changed, stage_output), reference), position


def test_uses_the_given_norm_op_and_defaults_to_instance_norm():
    assert isinstance(GlobalCompensationUnit(nn.Conv3d, 2, 4, 2).detail_norm, nn.InstanceNorm3d)
    gcu = GlobalCompensationUnit(nn.Conv2d, 2, 4, 2, norm_op=nn.BatchNorm2d, norm_op_kwargs={"eps": 1e-3})
    assert isinstance(gcu.detail_norm, nn.BatchNorm2d) and gcu.detail_norm.eps == 1e-3


def test_stage_output_of_another_size_is_a_clear_error():
    gcu = GlobalCompensationUnit(nn.Conv2d, 2, 4, 2)
    stage_input = torch.randn(1, 2, 9, 8)
    with pytest.raises(ValueError, match="divisible by the stride"):
        gcu(stage_input, stage_output_for(stage_input, 4, 2))
