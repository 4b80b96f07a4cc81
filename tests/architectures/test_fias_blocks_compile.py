"""The FIAS blocks compiled by torch.compile's inductor backend (C++ code generation on the CPU) give the eager
outputs and gradients. Slow: each compilation takes tens of seconds on the CPU. The fast tests check that
TorchDynamo traces every block without graph breaks (test_msda.py, test_mixatt.py, test_dmk.py, test_caf.py)."""
import pytest
import torch
from torch import nn

from nnunetv2_grcsf.architectures.blocks import (AttentionBlock, ContextAwareFusion, DepthwiseMultiKernelConv,
                                                 MixingAttention, MultiScaleDilatedAttention)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_cpu_thread"),
              pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")]


def blocks():
    torch.manual_seed(0)
    return {
        "msda block 2d": (AttentionBlock(nn.Conv2d, 16, "msda", 3, (1, 2, 3), head_dim=8), [(2, 16, 9, 8)]),
        "global block 3d": (AttentionBlock(nn.Conv3d, 16, "global", 2, head_dim=8), [(1, 16, 4, 5, 6)]),
        "mixatt 3d": (MixingAttention(nn.Conv3d, 16, "msda", 3, (1, 2, 3), head_dim=8).eval(), [(1, 16, 7, 7, 8)]),
        "dmk 3d": (DepthwiseMultiKernelConv(nn.Conv3d, 8, norm_op=nn.InstanceNorm3d, nonlin=nn.LeakyReLU),
                   [(2, 8, 6, 7, 8)]),
        "caf 3d": (ContextAwareFusion(nn.Conv3d, 8), [(2, 8, 6, 7, 8)] * 2),
    }


@pytest.mark.parametrize("name", list(blocks()))
def test_inductor_compiled_block_gives_the_eager_outputs_and_gradients(name):
    module, shapes = blocks()[name]
    inputs = [torch.randn(shape, generator=torch.Generator().manual_seed(i), requires_grad=True)
              for i, shape in enumerate(shapes)]
    parameters = list(module.parameters())
    torch._dynamo.reset()
    results = []
    for function in (module, torch.compile(module, backend="inductor", fullgraph=True)):
        out = function(*inputs)
        results.append((out, *torch.autograd.grad(out.square().mean(), inputs + parameters)))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-3)


def test_inductor_compiles_the_flex_attention_path_on_the_cpu(monkeypatch):
    """The flex path as on CUDA, where fused_flex_attention runs flex_attention compiled on its own (the CPU runs it
    uncompiled): that kernel, inductor's (forward; torch has no flex_attention backward on the CPU), with our block
    mask, inside a network compiled around it, against the loop."""
    from torch.nn.attention.flex_attention import flex_attention

    from nnunetv2_grcsf.architectures.blocks import msda as msda_module

    compiled_kernel = torch.compile(flex_attention, backend="inductor", dynamic=False)
    monkeypatch.setattr(msda_module, "fused_flex_attention", lambda q, k, v, block_mask, scale: compiled_kernel(
        q, k, v, block_mask=block_mask, scale=scale))
    torch.manual_seed(0)
    msda = MultiScaleDilatedAttention(nn.Conv3d, 16, 6, (1, 2, 3), head_dim=16)
    x = torch.randn(1, 16, 7, 7, 8)
    torch._dynamo.reset()
    with torch.no_grad():
        loop = msda(x)
        msda.implementation = "flex"
        assert torch.allclose(torch.compile(msda, backend="inductor")(x), loop, atol=1e-5)
