"""Depthwise multi-kernel convolution (blocks/dmk.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_grcsf.architectures.blocks.dmk import DepthwiseMultiKernelConv
from nnunetv2_grcsf.architectures.helpers import depthwise_conv

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def build(dim, channels=6, kernel_sizes=(3, 5, 7), plans_kernel=None):
    torch.manual_seed(0)
    return DepthwiseMultiKernelConv(CONV[dim], channels, kernel_sizes, plans_kernel, conv_bias=True,
                                    norm_op=NORM[dim], norm_op_kwargs={"eps": 1e-5, "affine": True},
                                    nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def reference(dmk, x):
    """The definition: y = dense conv(x); x + PW(Nonlin(Norm(y + the parallel depthwise convs of y)))."""
    y = dmk.conv(x)
    summed = y + sum(conv(y) for conv in dmk.depthwise)
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
    assert all(grads[f"depthwise.{i}.weight"].abs().sum() > 0 for i in range(2))
    assert dmk.conv.groups == 1 and tuple(dmk.conv.kernel_size) == (3,) * dim  # the dense 3x3 conv first


def test_plans_kernel_one_keeps_that_axis_flat():
    dmk = build(3, plans_kernel=[1, 3, 3])
    assert tuple(dmk.conv.kernel_size) == (1, 3, 3)
    assert [tuple(conv.kernel_size) for conv in dmk.depthwise] == [(1, 5, 5), (1, 7, 7)]
    assert all(conv.groups == 6 for conv in dmk.depthwise)  # depthwise
    x = torch.randn(1, 6, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(dmk(x), reference(dmk, x), atol=1e-5)


@pytest.mark.parametrize("kernel_sizes", [(3, 4), (), (0,)])
def test_even_or_missing_kernels_are_named_errors(kernel_sizes):
    with pytest.raises(ValueError, match="kernel_sizes .* must be odd positive ints"):
        build(2, kernel_sizes=kernel_sizes)


@pytest.mark.parametrize("shape, kernel, bias", [((2, 3, 5, 6, 7), (3, 5, 3), True), ((2, 4, 7, 6), (5, 3), False),
                                                 ((1, 3, 4, 6, 5), (1, 7, 3), True)])
def test_depthwise_conv_is_the_conv_with_hand_written_gradients(shape, kernel, bias):
    """Same function as F.conv (groups = C, 'same' padding); gradients checked numerically (input by flipped conv)."""
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(shape[1], 1, *kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True) if bias else None
    conv = F.conv3d if len(kernel) == 3 else F.conv2d
    expected = conv(x, weight, b, padding=[(k - 1) // 2 for k in kernel], groups=shape[1])
    assert torch.allclose(depthwise_conv(x, weight, b, cpu_backward=True), expected)
    assert torch.autograd.gradcheck(lambda *inputs: depthwise_conv(*inputs, cpu_backward=True), (x, weight, b))


def test_cpu_depthwise_conv_has_the_plain_convs_gradients():
    """The CPU autograd function against plain F.conv (which CUDA and torch.compile use), float32."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 7, 5, requires_grad=True)
    weight = torch.randn(8, 1, 3, 7, 5, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)
    grad = torch.randn(2, 8, 6, 7, 5)
    results = []
    for cpu_backward in (True, False):
        out = depthwise_conv(x, weight, bias, cpu_backward=cpu_backward)
        results.append((out, *torch.autograd.grad(out, (x, weight, bias), grad)))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dim", [2, 3])
def test_dmk_traces_without_graph_breaks_and_runs_under_float16_autocast(dim):
    dmk = build(dim)
    x = torch.randn(2, 6, *[7] * dim, requires_grad=True)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(dmk)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    with torch.autocast("cpu", dtype=torch.float16):
        out = dmk(x)
    gradients = torch.autograd.grad(out.float().square().mean(), list(dmk.parameters()))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in gradients)


def test_depthwise_conv_with_an_even_kernel_is_a_named_error():
    with pytest.raises(ValueError, match=r"kernel \[3, 4\] must be odd"):
        depthwise_conv(torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 4), None)
