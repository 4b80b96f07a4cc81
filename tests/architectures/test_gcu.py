"""GlobalCompensationUnit: identity at initialization, gradients within two steps, the detail path as
space-to-depth + 1x1 projection, the global context, shapes in 2D/3D (anisotropic strides included), errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_grcsf.architectures.blocks.gcu import GCU_STARTS, GlobalCompensationUnit


def stage_output_for(stage_input: torch.Tensor, out_channels: int, stride) -> torch.Tensor:
    """A stand-in for an nnU-Net encoder stage: a strided 3x3 conv (padding 1)."""
    conv_op = nn.Conv2d if stage_input.ndim == 4 else nn.Conv3d
    return conv_op(stage_input.shape[1], out_channels, 3, stride, 1)(stage_input)


def trained_a_little(gcu: GlobalCompensationUnit) -> GlobalCompensationUnit:
    """Moves what starts at zero (the scale, or the detail projection and the context's output layer) away from 0,
    as the first optimizer steps do."""
    with torch.no_grad():
        if gcu.start == "zero_scale":
            gcu.scale.normal_(0, 0.5)
        else:
            gcu.detail_projection.weight.normal_(0, 0.5)
            gcu.context.mlp[-1].weight.normal_(0, 0.5)
    return gcu


@pytest.mark.parametrize("conv_op, input_size, stride, output_size", [
    (nn.Conv2d, (16, 24), (2, 2), (8, 12)),
    (nn.Conv2d, (16, 24), (2, 1), (8, 24)),
    (nn.Conv2d, (16, 24), 2, (8, 12)),
    (nn.Conv3d, (8, 16, 12), (2, 2, 2), (4, 8, 6)),
    (nn.Conv3d, (8, 16, 12), (1, 2, 2), (8, 8, 6)),
])
@pytest.mark.parametrize("start", GCU_STARTS)
def test_identity_at_initialization_and_the_stage_output_shape(conv_op, input_size, stride, output_size, start):
    torch.manual_seed(0)
    gcu = GlobalCompensationUnit(conv_op, 4, 6, stride, start=start)
    stage_input = torch.randn(2, 4, *input_size)
    stage_output = stage_output_for(stage_input, 6, stride)
    out = gcu(stage_input, stage_output)
    assert out.shape == (2, 6, *output_size)
    assert torch.equal(out, stage_output), "a new GCU must leave the backbone exactly as it is"
    assert not torch.allclose(trained_a_little(gcu)(stage_input, stage_output), stage_output)


@pytest.mark.parametrize("conv_op, stride", [(nn.Conv2d, (2, 2)), (nn.Conv3d, (1, 2, 2))])
def test_every_parameter_gets_a_gradient_within_two_sgd_steps(conv_op, stride):
    """At initialization only the scale gets a gradient (the rest is multiplied by it); after one step every
    parameter does."""
    torch.manual_seed(0)
    gcu = GlobalCompensationUnit(conv_op, 3, 5, stride)
    dims = 3 if conv_op is nn.Conv3d else 2
    stage_input = torch.randn(2, 3, *[8] * dims)
    stage_output = stage_output_for(stage_input, 5, stride).detach()
    target = torch.randn_like(stage_output)
    optimizer = torch.optim.SGD(gcu.parameters(), lr=0.1)
    for step in range(2):
        optimizer.zero_grad()
        (gcu(stage_input, stage_output) - target).square().mean().backward()
        with_gradient = {name for name, p in gcu.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        if step == 0:
            assert with_gradient == {"scale"}
        optimizer.step()
    assert with_gradient == {name for name, _ in gcu.named_parameters()}


@pytest.mark.parametrize("conv_op, stride", [(nn.Conv2d, (2, 2)), (nn.Conv3d, (1, 2, 2))])
def test_a_zero_projection_start_learns_its_detail_projection_from_the_first_step(conv_op, stride):
    """Started by a zero-initialized projection, the detail projection (every weight its own gradient, as any
    conv's) and the context's output layer get gradients at the first step; every parameter after one step. One
    SGD step at the same rate moves the function far more than for a unit started by a zero scale."""
    dims = 3 if conv_op is nn.Conv3d else 2
    torch.manual_seed(0)
    stage_input = torch.randn(2, 16, *[8] * dims)
    stage_output = stage_output_for(stage_input, 8, stride).detach()
    target = torch.randn_like(stage_output)
    moved = {}
    for start in GCU_STARTS:
        torch.manual_seed(0)
        gcu = GlobalCompensationUnit(conv_op, 16, 8, stride, start=start)
        optimizer = torch.optim.SGD(gcu.parameters(), lr=0.01)
        for step in range(2):
            optimizer.zero_grad()
            (gcu(stage_input, stage_output) - target).square().mean().backward()
            with_gradient = {name for name, p in gcu.named_parameters() if p.grad is not None and p.grad.abs().sum()}
            if step == 0 and start == "zero_projection":
                assert with_gradient == {"detail_projection.weight", "context.mlp.2.weight", "context.mlp.2.bias"}
                assert isinstance(gcu.detail_norm, nn.Identity) and gcu.scale is None
            optimizer.step()
            if step == 0:
                with torch.no_grad():
                    moved[start] = (gcu(stage_input, stage_output) - stage_output).norm() / stage_output.norm()
        assert with_gradient == {name for name, _ in gcu.named_parameters()}
    assert moved["zero_projection"] > 5 * moved["zero_scale"]


def test_an_unknown_start_is_a_clear_error():
    with pytest.raises(ValueError, match="start 'zero' is not one of"):
        GlobalCompensationUnit(nn.Conv2d, 2, 4, 2, start="zero")


@pytest.mark.parametrize("in_channels, out_channels", [(2, 4), (4, 4)])
def test_detail_path_is_a_space_to_depth_rearrangement_then_a_1x1_projection(in_channels, out_channels):
    """The stride block of every output cell, rearranged to C_in * prod(stride) channels (pixel-unshuffle),
    then projected by a 1x1 conv: it sees every input value once (the rearrangement is lossless; the
    projection keeps C_out of C_in * prod(stride) dimensions)."""
    torch.manual_seed(0)
    gcu = GlobalCompensationUnit(nn.Conv2d, in_channels, out_channels, 2)
    stage_input = torch.randn(1, in_channels, 8, 6)
    space_to_depth = F.pixel_unshuffle(stage_input, 2)  # (1, C_in * 4, 4, 3), channel c * 4 + (i * 2 + j)
    weight = gcu.detail_projection.weight  # (C_out, C_in, 2, 2)
    assert space_to_depth.shape[1] == 4 * in_channels
    expected = F.conv2d(space_to_depth, weight.reshape(out_channels, 4 * in_channels, 1, 1))
    assert torch.allclose(gcu.detail_projection(stage_input), expected, atol=1e-6)


def test_global_context_reaches_every_output_position():
    """A change of the stage input at one corner changes the compensation at the opposite corner (global
    context; no norm here, whose statistics would also carry it); a strided conv could not carry it there."""
    torch.manual_seed(0)
    gcu = trained_a_little(GlobalCompensationUnit(nn.Conv3d, 2, 4, (1, 2, 2), norm_op=nn.Identity)).eval()
    stage_input = torch.randn(1, 2, 4, 16, 16)
    stage_output = torch.zeros(1, 4, 4, 8, 8)
    changed = stage_input.clone()
    changed[0, :, 0, 0, 0] += 3.0
    with torch.no_grad():
        far_corner = (gcu(changed, stage_output) - gcu(stage_input, stage_output))[0, :, -1, -1, -1]
    assert far_corner.abs().max() > 1e-4


def test_uses_the_given_norm_op_and_defaults_to_instance_norm():
    assert isinstance(GlobalCompensationUnit(nn.Conv3d, 2, 4, 2).detail_norm, nn.InstanceNorm3d)
    gcu = GlobalCompensationUnit(nn.Conv2d, 2, 4, 2, norm_op=nn.BatchNorm2d, norm_op_kwargs={"eps": 1e-3})
    assert isinstance(gcu.detail_norm, nn.BatchNorm2d) and gcu.detail_norm.eps == 1e-3


def test_stage_output_of_another_size_is_a_clear_error():
    gcu = GlobalCompensationUnit(nn.Conv2d, 2, 4, 2)
    stage_input = torch.randn(1, 2, 9, 8)
    with pytest.raises(ValueError, match="divisible by the stride"):
        gcu(stage_input, stage_output_for(stage_input, 4, 2))
