"""RegionCompensationUnit: shapes in 2D/3D (anisotropic patches included), gradients, dependence, errors."""
import pytest
import torch
from torch import nn

from nnunetv2_grcsf.architectures.blocks.rcu import RegionCompensationUnit, split_into_patches


def rcu_inputs(batch, feature_channels, feature_size, residual_channels, residual_size, global_channels, patch_size):
    grid = [s // p for s, p in zip(residual_size, patch_size)]
    return (torch.randn(batch, feature_channels, *feature_size), torch.randn(batch, residual_channels, *residual_size),
            torch.randn(batch, global_channels, *grid))


CASES = [  # conv_op, feature size S, residual size S_full, patch size
    (nn.Conv2d, (32, 24), (32, 24), (8, 8)),
    (nn.Conv2d, (16, 12), (32, 24), (8, 4)),  # features at half resolution
    (nn.Conv3d, (8, 16, 16), (8, 16, 16), (2, 4, 4)),
    (nn.Conv3d, (8, 8, 8), (8, 16, 16), (1, 4, 4)),  # anisotropic patch, features downsampled by (1, 2, 2)
]


@pytest.mark.parametrize("conv_op, feature_size, residual_size, patch_size", CASES)
def test_output_has_the_feature_shape(conv_op, feature_size, residual_size, patch_size):
    torch.manual_seed(0)
    rcu = RegionCompensationUnit(conv_op, 8, 2, 16, patch_size)
    features, residual_map, global_features = rcu_inputs(2, 8, feature_size, 2, residual_size, 16, patch_size)
    out = rcu(features, residual_map, global_features)
    assert out.shape == features.shape
    assert not torch.allclose(out, features)


@pytest.mark.parametrize("conv_op, feature_size, residual_size, patch_size", [CASES[1], CASES[3]])
def test_every_parameter_gets_a_gradient(conv_op, feature_size, residual_size, patch_size):
    torch.manual_seed(0)
    rcu = RegionCompensationUnit(conv_op, 8, 1, 16, patch_size, embed_channels=12, num_heads=3)
    rcu(*rcu_inputs(2, 8, feature_size, 1, residual_size, 16, patch_size)).square().sum().backward()
    for name, parameter in rcu.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("changed", ["residual_map", "global_features"])
def test_output_depends_on_the_residual_map_and_the_global_features(changed):
    torch.manual_seed(0)
    rcu = RegionCompensationUnit(nn.Conv3d, 8, 1, 16, (2, 4, 4)).eval()
    inputs = dict(zip(["features", "residual_map", "global_features"],
                      rcu_inputs(1, 8, (4, 8, 8), 1, (4, 8, 8), 16, (2, 4, 4))))
    reference = rcu(**inputs)
    inputs[changed] = torch.randn_like(inputs[changed])
    assert not torch.allclose(rcu(**inputs), reference, atol=1e-6)


def test_a_patch_with_zero_importance_contributes_nothing():
    """The importance score weights each patch's contribution: with all scores 0 the unit is the identity."""
    torch.manual_seed(0)
    rcu = RegionCompensationUnit(nn.Conv2d, 8, 1, 16, (4, 4)).eval()
    with torch.no_grad():
        last_conv = rcu.importance.score[2]
        last_conv.weight.zero_()
        last_conv.bias.fill_(-1e4)  # sigmoid -> 0
        rcu.output_projection.bias.zero_()
    features, residual_map, global_features = rcu_inputs(1, 8, (8, 8), 1, (8, 8), 16, (4, 4))
    assert torch.allclose(rcu(features, residual_map, global_features), features)


def test_patch_splitting_is_a_conv_with_kernel_equal_stride():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 6, 8)
    conv = nn.Conv3d(3, 5, (2, 3, 4), (2, 3, 4), bias=False)
    expected = conv(x).flatten(2).transpose(1, 2)
    assert torch.allclose(split_into_patches(x, (2, 3, 4)) @ conv.weight.reshape(5, -1).T, expected, atol=1e-5)


def test_residual_size_not_divisible_by_the_patch_size_is_a_clear_error():
    rcu = RegionCompensationUnit(nn.Conv2d, 8, 1, 16, (8, 8))
    with pytest.raises(ValueError, match=r"not divisible by its patch_size \[8, 8\]"):
        rcu(torch.randn(1, 8, 12, 16), torch.randn(1, 1, 12, 16), torch.randn(1, 16, 1, 2))


def test_global_features_off_the_patch_grid_are_a_clear_error():
    rcu = RegionCompensationUnit(nn.Conv2d, 8, 1, 16, (8, 8))
    with pytest.raises(ValueError, match="expected the patch grid"):
        rcu(torch.randn(1, 8, 16, 16), torch.randn(1, 1, 16, 16), torch.randn(1, 16, 4, 4))


@pytest.mark.parametrize("kwargs, match", [(dict(embed_channels=10, num_heads=3), "not divisible by num_heads"),
                                           (dict(patch_size=(4, 4, 4)), "one entry per spatial axis")])
def test_bad_settings_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RegionCompensationUnit(nn.Conv2d, 8, 1, 16, **{"patch_size": (4, 4), **kwargs})
