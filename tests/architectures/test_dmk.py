"""Depthwise multi-kernel convolution (blocks/dmk.py)."""
import pytest
import torch
from torch import nn

from nnunetv2_grcsf.architectures.blocks.dmk import DepthwiseMultiKernelConv

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def build(dim, channels=6, kernel_sizes=(3, 5, 7), plans_kernel=None):
    torch.manual_seed(0)
    return DepthwiseMultiKernelConv(CONV[dim], channels, kernel_sizes, plans_kernel, conv_bias=True,
                                    norm_op=NORM[dim], norm_op_kwargs={"eps": 1e-5, "affine": True},
                                    nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def reference(dmk, x):
    """The definition: x + PW(Nonlin(Norm(sum of the parallel depthwise convs)))."""
    summed = sum(conv(x) for conv in dmk.depthwise)
    return x + dmk.pointwise(dmk.nonlin(dmk.norm(summed)))


@pytest.mark.parametrize("dim, size", [(2, (9, 10)), (3, (5, 6, 7))])
def test_shape_and_equal_to_the_parallel_depthwise_convs(dim, size):
    dmk = build(dim)
    x = torch.randn(2, 6, *size, requires_grad=True)
    out = dmk(x)
    assert out.shape == x.shape
    out.square().sum().backward()
    grads = {name: p.grad.clone() for name, p in dmk.named_parameters()}
    dmk.zero_grad()
    expected = reference(dmk, x)
    assert torch.allclose(out, expected, atol=1e-5)
    expected.square().sum().backward()
    for name, p in dmk.named_parameters():  # every kernel size gets its own gradient, as if run separately
        assert torch.allclose(grads[name], p.grad, atol=1e-4, rtol=1e-4), name
    assert all(grads[f"depthwise.{i}.weight"].abs().sum() > 0 for i in range(3))


def test_plans_kernel_one_keeps_that_axis_flat():
    dmk = build(3, plans_kernel=[1, 3, 3])
    assert [tuple(conv.kernel_size) for conv in dmk.depthwise] == [(1, 3, 3), (1, 5, 5), (1, 7, 7)]
    assert all(conv.groups == 6 for conv in dmk.depthwise)  # depthwise
    x = torch.randn(1, 6, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(dmk(x), reference(dmk, x), atol=1e-5)


@pytest.mark.parametrize("kernel_sizes", [(3, 4), (), (0,)])
def test_even_or_missing_kernels_are_named_errors(kernel_sizes):
    with pytest.raises(ValueError, match="kernel_sizes .* must be odd positive ints"):
        build(2, kernel_sizes=kernel_sizes)
