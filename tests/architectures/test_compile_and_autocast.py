"""What nnU-Net does to a network on CUDA, checked on the CPU: torch.compile and autocast (mixed precision).

nnU-Net compiles the network (``torch.compile``) and trains under ``torch.autocast``. Our networks have custom
autograd functions (MSDA's neighbourhood attention, the depthwise conv, MixAtt's scaling), activation
checkpointing and recomputed decoder outputs; these tests run them through TorchDynamo's tracing and AOT
autograd (backend ``aot_eager``: the graph capture of ``torch.compile`` without the C++/Triton code generation,
which needs a compiler or a GPU) and under CPU autocast in bfloat16, the CPU counterpart of CUDA's float16 AMP.
"""
import pytest
import torch
from conftest import build_network_from_plans

PLAIN_CONV_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
NETWORKS = {"GRCSF": "nnunetv2_grcsf.architectures.grcsf.GRCSFUNet",
            "FIAS": "nnunetv2_grcsf.architectures.fias.FIASUNet"}
# small real plans crops: 2d BUSI256 (MSDA stages 2-3 hold their windows at 96 x 96), 3d Hippocampus
CASES = [("Dataset802_BUSI256_nnUNetPlans", "2d", (64, 64)),
         ("Dataset804_Hippocampus_nnUNetPlans", "3d_fullres", (24, 24, 24))]

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def build(family: str, plans: str, configuration: str, size):
    """A network with the RCU (2 input channels: image + residual), MSDA where the crop allows it."""
    torch.manual_seed(0)
    extra = dict(input_channels=2, residual_channels=[1], use_rcu=True)
    if family == "FIAS":
        extra["stage_attention"] = ["conv", "msda", "msda", "global", "global", "global"][:6 if len(size) == 2 else 4]
        extra["msda_dilations"] = (1, 2)
    input_channels = extra.pop("input_channels")
    return build_network_from_plans(NETWORKS[family], plans, configuration, input_channels, 2, True, **extra)[0]


def loss_and_gradients(network, x):
    outputs = network(x)
    loss = sum(o.float().square().mean() for o in outputs)
    gradients = torch.autograd.grad(loss, [p for p in network.parameters() if p.requires_grad], allow_unused=True)
    return outputs, gradients


@pytest.mark.parametrize("family", list(NETWORKS))
@pytest.mark.parametrize("plans, configuration, size", CASES)
def test_compiled_network_gives_the_same_outputs_and_gradients(family, plans, configuration, size):
    torch._dynamo.reset()
    network = build(family, plans, configuration, size).train()
    x = torch.randn(2, 2, *size)
    torch.manual_seed(1)  # the same Monte Carlo draws (FIAS's MixAtt) in both runs
    eager_outputs, eager_gradients = loss_and_gradients(network, x)
    compiled = torch.compile(network, backend="aot_eager")
    torch.manual_seed(1)
    outputs, gradients = loss_and_gradients(compiled, x)
    for a, b in zip(eager_outputs, outputs):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    for (name, _), a, b in zip(network.named_parameters(), eager_gradients, gradients):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-3), name


def bfloat16_error(network, x):
    """Mean |logits under CPU autocast (bfloat16) - float32 logits| / std of the float32 logits (full resolution),
    and the gradients under autocast."""
    torch.manual_seed(1)
    reference, _ = loss_and_gradients(network, x)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs, gradients = loss_and_gradients(network, x)
    error = ((outputs[0].float() - reference[0]).abs().mean() / reference[0].std()).item()
    return error, outputs, gradients


@pytest.mark.parametrize("family", list(NETWORKS))
@pytest.mark.parametrize("plans, configuration, size", CASES)
def test_mixed_precision_trains_with_float32_gradients_and_plain_unet_precision(family, plans, configuration, size):
    """Under autocast every gradient is float32 and finite, and the logits are as close to float32's as nnU-Net's
    PlainConvUNet's are (measured: 0.8-1.2x its error for GRCSF, 0.2-0.7x for FIAS; bound 2x)."""
    x = torch.randn(2, 2, *size, generator=torch.Generator().manual_seed(5))
    error, outputs, gradients = bfloat16_error(build(family, plans, configuration, size).train(), x)
    assert all(o.dtype == torch.bfloat16 for o in outputs)  # the logits come from autocast's convs
    used = [g for g in gradients if g is not None]
    assert used and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in used)
    torch.manual_seed(0)
    plain = build_network_from_plans(PLAIN_CONV_UNET, plans, configuration, 2, 2, True)[0].train()
    plain_error, _, _ = bfloat16_error(plain, x)
    assert error < 2 * plain_error
