"""Monte Carlo channel attention and mixing attention (blocks/mixatt.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_grcsf.architectures.blocks.mixatt import (MixingAttention, MonteCarloChannelAttention,
                                                        _ChannelAndSpatialScaling, scale_channels_and_positions)

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
ADAPTIVE_POOL = {2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.mark.parametrize("dim, size", [(2, (7, 5)), (3, (5, 4, 7))])
def test_eval_is_deterministic_and_uses_the_global_average_pool(dim, size):
    torch.manual_seed(0)
    attention = MonteCarloChannelAttention(CONV[dim], channels=8).eval()
    x = torch.randn(2, 8, *size)
    with torch.no_grad():
        expected = x * attention.excitation(x.mean(tuple(range(2, 2 + dim)), keepdim=True))
        outputs = [attention(x) for _ in range(5)]
    assert all(torch.equal(out, outputs[0]) for out in outputs)
    assert torch.allclose(outputs[0], expected, atol=1e-6)


@pytest.mark.parametrize("dim, size", [(2, (7, 5)), (3, (5, 4, 7))])
def test_training_descriptor_is_one_cell_of_a_random_adaptive_pooling_grid(dim, size):
    """Without shuffling, every draw is a cell of adaptive_avg_pool to 1, 2 or 3 per side; several differ."""
    torch.manual_seed(0)
    attention = MonteCarloChannelAttention(CONV[dim], channels=4, shuffle_positions=False).train()
    x = torch.randn(1, 4, *size)
    cells = torch.cat([ADAPTIVE_POOL[dim](x, grid).flatten(2) for grid in (1, 2, 3)], dim=2)  # (1, 4, 1+2^d+3^d)
    drawn = set()
    for _ in range(40):
        descriptor = attention.descriptor(x).flatten(2)  # (1, 4, 1)
        matches = (cells - descriptor).abs().amax(dim=1).squeeze(0) < 1e-5
        assert matches.any(), "the descriptor is not a cell of the adaptive pooling"
        drawn.add(int(matches.nonzero()[0]))
    assert len(drawn) > 5  # stochastic over grids and cells


def test_shuffled_descriptor_is_random_and_an_unbiased_estimate_of_the_global_average():
    torch.manual_seed(0)
    attention = MonteCarloChannelAttention(nn.Conv2d, channels=4).train()
    x = torch.randn(1, 4, 6, 6)
    draws = torch.stack([attention.descriptor(x).flatten() for _ in range(600)])
    assert len({tuple(d.tolist()) for d in draws}) > 100
    assert torch.allclose(draws.mean(0), x.mean((2, 3)).flatten(), atol=0.08)


def test_channel_and_spatial_scaling_gradients():
    torch.manual_seed(0)
    inputs = (torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True),
              torch.rand(2, 3, 1, 1, dtype=torch.float64, requires_grad=True),
              torch.rand(2, 1, 4, 5, dtype=torch.float64, requires_grad=True))
    assert torch.allclose(_ChannelAndSpatialScaling.apply(*inputs), inputs[0] * inputs[1] * inputs[2])
    assert torch.autograd.gradcheck(_ChannelAndSpatialScaling.apply, inputs)


@pytest.mark.parametrize("dim, attention", [(2, "msda"), (3, "msda"), (2, "global"), (3, "global"), (2, None),
                                            (3, None)])
def test_mixing_attention_shapes_and_every_parameter_learns(dim, attention):
    torch.manual_seed(0)
    mixing = MixingAttention(CONV[dim], channels=16, attention=attention, num_heads=4, dilations=(1, 2)).train()
    x = torch.randn(2, 16, *[5] * dim, requires_grad=True)
    out = mixing(x)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert x.grad.abs().sum() > 0
    for name, parameter in mixing.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert (mixing.attention is None) == (attention is None)


def test_mixing_attention_checkpointing_gives_the_same_output_and_gradients():
    torch.manual_seed(0)
    plain = MixingAttention(nn.Conv3d, channels=8, attention="msda", num_heads=2, dilations=(1, 2)).eval()
    checkpointed = MixingAttention(nn.Conv3d, channels=8, attention="msda", num_heads=2, dilations=(1, 2),
                                   checkpointing=True).eval()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 8, 5, 6, 5)
    outputs = [module(x) for module in (plain, checkpointed)]
    assert torch.allclose(outputs[0], outputs[1])
    for out in outputs:
        out.square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


@pytest.mark.parametrize("attention", ["msda", None])
def test_gates_applied_by_the_scaling_are_the_forward(attention):
    """gates(x) is what the FIAS decoder keeps (the product is recomputed where it is used): same output."""
    torch.manual_seed(0)
    mixing = MixingAttention(nn.Conv3d, channels=8, attention=attention, num_heads=2, dilations=(1, 2)).train()
    x = torch.randn(2, 8, 5, 6, 5)
    torch.manual_seed(1)
    expected = mixing(x)
    torch.manual_seed(1)  # the same Monte Carlo draw
    mixed, channel_weights, spatial_weights = mixing.gates(x)
    assert channel_weights.shape == (2, 8, 1, 1, 1) and spatial_weights.shape == (2, 1, 5, 6, 5)
    assert torch.equal(scale_channels_and_positions(mixed, channel_weights, spatial_weights), expected)


def test_bad_pool_sizes_are_a_named_error():
    with pytest.raises(ValueError, match=r"pool_sizes \[0, 2\] must be positive"):
        MonteCarloChannelAttention(nn.Conv2d, channels=8, pool_sizes=(0, 2))
