"""Context-aware fusion (blocks/caf.py)."""
import pytest
import torch
from torch import nn

from nnunetv2_grcsf.architectures.blocks.caf import ContextAwareFusion

CONV = {2: nn.Conv2d, 3: nn.Conv3d}


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def branches(dim, size, channels=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, channels, *size, generator=generator) for _ in range(2)]


@pytest.mark.parametrize("dim, size", [(2, (6, 7)), (3, (4, 5, 6))])
def test_shapes_and_weights_form_a_convex_combination(dim, size):
    torch.manual_seed(0)
    caf = ContextAwareFusion(CONV[dim], channels=8)
    global_features, local_features = branches(dim, size)
    fused = caf(global_features, local_features)
    weight = caf.global_weight(global_features, local_features)
    weights = torch.stack([weight, 1 - weight], 1)
    assert fused.shape == global_features.shape
    assert weights.shape == (2, 2, 8, *size)
    assert torch.allclose(weights.sum(1), torch.ones(()))
    assert ((weights > 0) & (weights < 1)).all()
    assert torch.allclose(fused, weights[:, 0] * global_features + weights[:, 1] * local_features, atol=1e-6)
    # the weights vary over channels and positions
    assert weights[:, 0].std(dim=1).mean() > 0 and weights[:, 0].flatten(2).std(dim=2).mean() > 0


@pytest.mark.parametrize("changed_branch", [0, 1])
def test_weights_react_to_either_branch(changed_branch):
    torch.manual_seed(0)
    caf = ContextAwareFusion(nn.Conv2d, channels=8)
    inputs = branches(2, (6, 7))
    weights = caf.global_weight(*inputs)
    inputs[changed_branch] = inputs[changed_branch] * 3 + 1
    changed_weights = caf.global_weight(*inputs)
    assert (weights - changed_weights).abs().max() > 1e-3


def test_gradients_reach_both_branches_and_every_parameter():
    torch.manual_seed(0)
    caf = ContextAwareFusion(nn.Conv3d, channels=8)
    global_features, local_features = [t.requires_grad_() for t in branches(3, (4, 5, 6))]
    caf(global_features, local_features).square().mean().backward()
    assert global_features.grad.abs().sum() > 0 and local_features.grad.abs().sum() > 0
    for name, parameter in caf.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_branches_of_different_shapes_are_a_named_error():
    caf = ContextAwareFusion(nn.Conv2d, channels=8)
    with pytest.raises(ValueError, match=r"branch shapes differ: global \(1, 8, 4, 4\), local \(1, 8, 4, 5\)"):
        caf(torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 5))


@pytest.mark.parametrize("dim, size", [(2, (6, 7)), (3, (4, 5, 6))])
def test_fusion_traces_without_graph_breaks_and_runs_under_float16_autocast(dim, size):
    torch.manual_seed(0)
    caf = ContextAwareFusion(CONV[dim], channels=8)
    inputs = [t.requires_grad_() for t in branches(dim, size)]
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(caf)(*inputs)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    with torch.autocast("cpu", dtype=torch.float16):
        out = caf(*inputs)
    gradients = torch.autograd.grad(out.float().square().mean(), list(caf.parameters()))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in gradients)
