"""Monte Carlo channel attention and mixing attention (blocks/mixatt.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_grcsf.architectures.blocks.mixatt import MixingAttention, MonteCarloChannelAttention

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
ADAPTIVE_POOL = {2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.mark.parametrize("dim, size", [(2, (7, 5)), (3, (5, 4, 7))])
def test_eval_is_deterministic_and_uses_the_global_average_pool(dim, size):
    torch.manual_seed(0)
    attention = MonteCarloChannelAttention(CONV[dim], channels=8).eval()
    x = torch.randn(2, 8, *size)
    with torch.no_grad():
        excitation = attention.excitation
        pooled = x.mean(tuple(range(2, 2 + dim)), keepdim=True)
        expected = x * torch.sigmoid(excitation.fc2(torch.relu(excitation.fc1(pooled))))
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


@pytest.mark.parametrize("dim, attention", [(2, "msda"), (3, "msda"), (2, "global"), (3, "global"), (2, None),
                                            (3, None)])
def test_mixing_attention_shapes_and_every_parameter_learns(dim, attention):
    torch.manual_seed(0)
    mixing = MixingAttention(CONV[dim], channels=16, attention=attention, num_heads=3, dilations=(1, 2, 3),
                             head_dim=8).train()
    x = torch.randn(2, 16, *[7] * dim, requires_grad=True)
    out = mixing(x)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert x.grad.abs().sum() > 0
    for name, parameter in mixing.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert (mixing.attention is None) == (attention is None)


@pytest.mark.parametrize("attention", ["msda", None])
def test_output_is_identity_plus_self_attention_plus_monte_carlo_scaled_input(attention):
    """The scaffold's x + attention(x) + x * MC(x): with the attention's output projection zeroed and the channel
    weights sigmoid(0) = 1/2, the block is 1.5 x (not a gate that shrinks the features)."""
    torch.manual_seed(0)
    mixing = MixingAttention(nn.Conv3d, channels=8, attention=attention, num_heads=2, dilations=(1, 2)).train()
    x = torch.randn(2, 8, 5, 6, 5)
    torch.manual_seed(1)
    out = mixing(x)
    torch.manual_seed(1)  # the same Monte Carlo draw
    expected = x + x * mixing.channel_attention.weights(x)
    if attention is not None:
        expected = expected + mixing.self_attention(x)
    assert torch.allclose(out, expected, atol=1e-6)
    with torch.no_grad():
        mixing.channel_attention.excitation.fc2.weight.zero_()
        mixing.channel_attention.excitation.fc2.bias.zero_()
        if attention is not None:
            mixing.attention.proj.weight.zero_()
            mixing.attention.proj.bias.zero_()
        assert torch.allclose(mixing(x), 1.5 * x, atol=1e-6)


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


@pytest.mark.parametrize("dim, attention", [(2, "msda"), (3, "msda"), (3, None)])
@pytest.mark.parametrize("shuffle_positions", [True, False])
def test_training_block_traces_without_graph_breaks(dim, attention, shuffle_positions):
    """Monte Carlo draws are tensors: TorchDynamo traces one graph (no break, no per-draw Python number)."""
    torch._dynamo.reset()
    mixing = MixingAttention(CONV[dim], channels=16, attention=attention, num_heads=3, dilations=(1, 2, 3),
                             head_dim=8, shuffle_positions=shuffle_positions).train()
    explanation = torch._dynamo.explain(mixing)(torch.randn(1, 16, *[7] * dim, requires_grad=True))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_float16_autocast_on_cpu_gives_finite_output_and_gradients():
    torch.manual_seed(0)
    mixing = MixingAttention(nn.Conv3d, channels=16, attention="msda", num_heads=3, dilations=(1, 2, 3),
                             head_dim=8).train()
    x = torch.randn(2, 16, 7, 7, 7)
    with torch.autocast("cpu", dtype=torch.float16):
        out = mixing(x)
    gradients = torch.autograd.grad(out.float().square().mean(), list(mixing.parameters()))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in gradients)


def test_bad_pool_sizes_are_a_named_error():
    with pytest.raises(ValueError, match=r"pool_sizes \[0, 2\] must be positive"):
        MonteCarloChannelAttention(nn.Conv2d, channels=8, pool_sizes=(0, 2))
