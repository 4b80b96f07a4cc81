"""RegionCompensationUnit: the windowed attention against an explicit softmax(QK^T)V, locality, the importance
score, shapes in 2D/3D (anisotropic patches and strides included), gradients, float16 autocast, errors."""
import itertools

import pytest
import torch
from torch import nn

from nnunetv2_grcsf.architectures.blocks.rcu import (ATTENTION_LAYOUTS, RegionCompensationUnit,
                                                     default_token_patch_size, distance_bias, low_rank_factors,
                                                     split_into_patches, windowed_cross_attention)


def rcu_inputs(batch, feature_channels, residual_size, feature_stride, residual_channels, global_channels,
               global_grid):
    feature_size = [s // r for s, r in zip(residual_size, feature_stride)]
    return (torch.randn(batch, feature_channels, *feature_size), torch.randn(batch, residual_channels, *residual_size),
            torch.randn(batch, global_channels, *global_grid))


CASES = [  # conv_op, residual size S, patch size, feature stride, global grid
    (nn.Conv2d, (32, 24), (8, 8), (1, 1), (2, 3)),
    (nn.Conv2d, (32, 24), (8, 4), (2, 2), (4, 6)),  # features at half resolution, global grid = token grid
    (nn.Conv3d, (8, 16, 16), (2, 4, 4), (1, 1, 1), (1, 2, 2)),
    (nn.Conv3d, (8, 16, 16), (1, 4, 4), (1, 2, 2), (4, 2, 2)),  # anisotropic patch and stride
]


@pytest.mark.parametrize("conv_op, residual_size, patch_size, feature_stride, global_grid", CASES)
def test_output_has_the_feature_shape_and_every_parameter_gets_a_gradient(conv_op, residual_size, patch_size,
                                                                           feature_stride, global_grid):
    torch.manual_seed(0)
    rcu = RegionCompensationUnit(conv_op, 8, 2, 16, patch_size, feature_stride)
    features, residual_map, global_features = rcu_inputs(2, 8, residual_size, feature_stride, 2, 16, global_grid)
    out = rcu(features, residual_map, global_features)
    assert out.shape == features.shape
    out.square().sum().backward()
    for name, parameter in rcu.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def explicit_windowed_attention(query, key, value, log_prior, num_heads, window, bias):
    """softmax(Q K^T / sqrt(d) + log_prior + bias) V pixel by pixel, over the window patches inside the grid."""
    batch, channels, *size = query.shape
    grid = list(key.shape[2:])
    within = [s // g for s, g in zip(size, grid)]
    head_channels = channels // num_heads
    centre = (window - 1) // 2
    offsets = list(itertools.product(range(window), repeat=len(grid)))
    out = torch.zeros_like(query)
    for b, pixel in itertools.product(range(batch), itertools.product(*[range(s) for s in size])):
        patch = [p // q for p, q in zip(pixel, within)]
        inside = list(itertools.product(*[range(q) for q in within])).index(tuple(p % q for p, q in
                                                                                  zip(pixel, within)))
        for h in range(num_heads):
            heads = slice(h * head_channels, (h + 1) * head_channels)
            logits, values = [], []
            for w, offset in enumerate(offsets):
                neighbour = [p + o - centre for p, o in zip(patch, offset)]
                if all(0 <= n < g for n, g in zip(neighbour, grid)):
                    k = key[(b, heads, *neighbour)]
                    logits.append(query[(b, heads, *pixel)] @ k / head_channels ** 0.5 +
                                  log_prior[(b, 0, *neighbour)] + bias[0, h, inside, w])
                    values.append(value[(b, heads, *neighbour)])
            out[(b, heads, *pixel)] = torch.softmax(torch.stack(logits), 0) @ torch.stack(values)
    return out


def attention_inputs(size, grid, window, num_heads, dtype=torch.float64):
    torch.manual_seed(0)
    within = [s // g for s, g in zip(size, grid)]
    query = torch.randn(2, 4, *size, dtype=dtype)
    key, value = torch.randn(2, 4, *grid, dtype=dtype), torch.randn(2, 4, *grid, dtype=dtype)
    log_prior = torch.nn.functional.logsigmoid(3 * torch.randn(2, 1, *grid, dtype=dtype))
    bias = distance_bias(within, window, [0.5 * 2 ** h for h in range(num_heads)]).to(dtype)
    return query, key, value, log_prior, num_heads, window, bias


ATTENTION_CASES = [((8, 6), (4, 3), 3, 2), ((4, 4, 6), (2, 2, 3), 3, 1), ((6, 4), (3, 2), 5, 2)]


@pytest.mark.parametrize("layout", ATTENTION_LAYOUTS)
@pytest.mark.parametrize("size, grid, window, num_heads", ATTENTION_CASES)
def test_windowed_attention_equals_an_explicit_softmax_qkt_v(size, grid, window, num_heads, layout):
    inputs = attention_inputs(size, grid, window, num_heads)
    out = windowed_cross_attention(*inputs, layout=layout)
    assert torch.allclose(out, explicit_windowed_attention(*inputs), atol=1e-10)


@pytest.mark.parametrize("layout", ["sdpa_folded", "keys_first", "window_sum"])
@pytest.mark.parametrize("size, grid, window, num_heads", ATTENTION_CASES + [((16, 24, 8), (2, 3, 1), 3, 2)])
def test_each_attention_layout_equals_sdpa_forward_and_backward(size, grid, window, num_heads, layout):
    """Each layout against SDPA with its mask (the plain version), float32."""
    query, key, value, log_prior, *settings = attention_inputs(size, grid, window, num_heads, torch.float32)
    differentiable = [t.requires_grad_() for t in (query, key, value, log_prior)]
    output_gradient = torch.randn(query.shape, generator=torch.Generator().manual_seed(1))
    outputs, gradients = [], []
    for each in (layout, "sdpa"):
        outputs.append(windowed_cross_attention(*differentiable, *settings, layout=each))
        gradients.append(torch.autograd.grad(outputs[-1], differentiable, output_gradient))
    assert torch.allclose(*outputs, atol=1e-5)
    for cpu_gradient, sdpa_gradient in zip(*gradients):
        assert torch.allclose(cpu_gradient, sdpa_gradient, atol=1e-4)


@pytest.mark.parametrize("layout", ATTENTION_LAYOUTS)
def test_float16_attention_computes_logits_beyond_float16s_range_in_float32(layout):
    query, key, value, log_prior, *settings = attention_inputs((8, 6), (4, 3), 3, 2, torch.float32)
    query, key = 1e3 * query, 30 * key  # dot products of about 1e5, beyond float16's 65504
    with torch.autocast("cpu", dtype=torch.float16):
        out = windowed_cross_attention(query.half(), key.half(), value.half(), log_prior.half(), *settings,
                                       layout=layout)
    reference = windowed_cross_attention(query.half().float(), key.half().float(), value.half().float(),
                                         log_prior.half().float(), *settings, layout=layout)
    assert out.dtype == torch.float16 and torch.allclose(out.float(), reference, atol=1e-2)


@pytest.mark.parametrize("layout", ATTENTION_LAYOUTS)
def test_windowed_attention_compiles_without_graph_breaks(layout):
    inputs = attention_inputs((8, 6), (4, 3), 3, 2, torch.float32)
    torch._dynamo.reset()
    bias_factors = low_rank_factors(inputs[-1])  # as the RCU holds them (computing them is an SVD)
    explanation = torch._dynamo.explain(windowed_cross_attention)(*inputs, layout=layout, bias_factors=bias_factors)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_the_rcu_gives_the_same_output_with_every_attention_layout():
    torch.manual_seed(0)
    rcu = RegionCompensationUnit(nn.Conv3d, 8, 2, 16, (2, 4, 4), (1, 2, 2))
    inputs = rcu_inputs(2, 8, (8, 16, 16), (1, 2, 2), 2, 16, (4, 2, 2))
    outputs = []
    for layout in ATTENTION_LAYOUTS:
        rcu.attention_layout = layout
        outputs.append(rcu(*inputs))
    assert not torch.allclose(outputs[0], inputs[0], atol=1e-3)
    assert all(torch.allclose(outputs[0], other, atol=1e-5) for other in outputs[1:])


def test_an_unknown_attention_layout_is_refused():
    with pytest.raises(ValueError, match="window_sum"):
        RegionCompensationUnit(nn.Conv2d, 8, 1, 16, 4, attention_layout="flash")
    with pytest.raises(ValueError, match="window_sum"):
        windowed_cross_attention(*attention_inputs((8, 6), (4, 3), 3, 2), layout="flash")


@pytest.mark.parametrize("pixels_per_patch, rank", [((4, 4), 4), ((2, 4, 4), 5), ((1, 8, 8), 4)])
def test_low_rank_factors_give_the_distance_bias_back_at_rank_d_plus_2(pixels_per_patch, rank):
    bias = distance_bias(pixels_per_patch, 3, [0.5, 1.0])
    query_factor, key_factor = low_rank_factors(bias)
    assert query_factor.shape == (1, 2, bias.shape[2], rank) and key_factor.shape == (1, 2, bias.shape[3], rank)
    assert torch.allclose(query_factor @ key_factor.transpose(-1, -2), bias, atol=1e-5)


def test_distance_bias_prefers_the_pixels_own_patch_and_the_near_side():
    bias = distance_bias([4, 4], 3, [0.5])[0, 0]  # (16 pixels, 9 window patches), row-major; centre patch = 4
    assert (bias.argmax(dim=1) == 4).all()
    top_left, bottom_right = 0, 15  # pixels; window patches 0 (up-left) and 8 (down-right)
    assert bias[top_left, 0] > bias[top_left, 8] and bias[bottom_right, 8] > bias[bottom_right, 0]


@pytest.mark.parametrize("conv_op, residual_size, patch_size, feature_stride", [
    (nn.Conv2d, (48, 48), (8, 8), (1, 1)), (nn.Conv2d, (48, 48), (8, 8), (2, 2)),
    (nn.Conv3d, (12, 24, 24), (2, 4, 4), (1, 2, 2))])
def test_a_change_inside_one_patch_reaches_only_its_window(conv_op, residual_size, patch_size, feature_stride):
    """Locality: pixels whose window does not contain the changed patch keep exactly their output; pixels of the
    changed patch change."""
    torch.manual_seed(0)
    rcu = RegionCompensationUnit(conv_op, 8, 1, 16, patch_size, feature_stride, window=3).eval()
    grid = [s // p for s, p in zip(residual_size, patch_size)]
    features, residual_map, global_features = rcu_inputs(1, 8, residual_size, feature_stride, 1, 16, grid)
    patch = [g // 2 for g in grid]
    changed = residual_map.clone()
    changed[(0, 0, *[slice(t * p, (t + 1) * p) for t, p in zip(patch, patch_size)])] += 5.0
    with torch.no_grad():
        difference = (rcu(features, changed, global_features) - rcu(features, residual_map,
                                                                    global_features)).abs().amax(1)[0]
    within = [p // r for p, r in zip(patch_size, feature_stride)]
    token_of_pixel = torch.stack(torch.meshgrid(*[torch.arange(s) // q for s, q in zip(difference.shape, within)],
                                                indexing="ij"))
    chebyshev = (token_of_pixel - torch.tensor(patch).view(-1, *[1] * len(grid))).abs().amax(0)
    assert (difference[chebyshev > 1] == 0).all()
    assert (difference[chebyshev == 0] > 1e-3).all()


def scored_rcu(conv_op=nn.Conv2d, patch_size=(4, 4)):
    """An RCU whose importance logit is the (positive part of the) global features' single channel."""
    torch.manual_seed(0)
    rcu = RegionCompensationUnit(conv_op, 8, 1, 1, patch_size, importance_hidden_channels=1).eval()
    with torch.no_grad():
        first, last = rcu.importance.score[0], rcu.importance.score[2]
        first.weight.fill_(1.0), first.bias.zero_(), last.weight.fill_(1.0), last.bias.zero_()
    return rcu


def test_a_patch_with_zero_importance_contributes_nothing():
    """Patch (1, 1) gets importance 0, the others about 1: a change of the residual map inside patch (1, 1)
    changes no output at all; the same change in patch (1, 2) does."""
    rcu = scored_rcu()
    features, residual_map = torch.randn(1, 8, 16, 16), torch.randn(1, 1, 16, 16)
    global_features = torch.full((1, 1, 4, 4), 5.0)
    global_features[0, 0, 1, 1] = -1e6  # logit -1e4 after the LeakyReLU: score 0
    reference = rcu(features, residual_map, global_features)
    for patch, expect_change in [((1, 1), False), ((1, 2), True)]:
        changed = residual_map.clone()
        changed[0, 0, 4 * patch[0]:4 * patch[0] + 4, 4 * patch[1]:4 * patch[1] + 4] += 5.0
        with torch.no_grad():
            changes = not torch.equal(rcu(features, changed, global_features), reference)
        assert changes == expect_change, patch


def test_global_features_act_only_through_the_importance_score():
    rcu = scored_rcu()
    features, residual_map = torch.randn(1, 8, 16, 16), torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        low, high = (rcu(features, residual_map, torch.full((1, 1, 4, 4), v)) for v in (0.5, 4.0))
        assert not torch.allclose(low, high)  # different scores, different outputs
        rcu.importance.score[2].weight.zero_()  # every score sigmoid(0), whatever the global features
        low, high = (rcu(features, residual_map, torch.full((1, 1, 4, 4), v)) for v in (0.5, 4.0))
        assert torch.equal(low, high)


def test_the_residual_map_reaches_the_output_through_both_paths():
    """The pixel path alone (attention values zero) and the attention alone (pixel projection zero) each make
    the output depend on the residual map."""
    torch.manual_seed(0)
    inputs = rcu_inputs(1, 8, (16, 16), (1, 1), 1, 16, (2, 2))
    changed = (inputs[0], torch.randn_like(inputs[1]), inputs[2])
    for parameter in ["key_value", "pixel_projection"]:
        rcu = RegionCompensationUnit(nn.Conv2d, 8, 1, 16, (8, 8)).eval()
        with torch.no_grad():
            getattr(rcu, parameter).weight.zero_()
            if parameter == "key_value":
                rcu.key_value.bias.zero_()
            assert not torch.allclose(rcu(*inputs), rcu(*changed), atol=1e-4), f"{parameter} zeroed"


def test_float16_autocast_gives_finite_outputs_and_gradients():
    torch.manual_seed(0)
    rcu = RegionCompensationUnit(nn.Conv2d, 8, 1, 16, (4, 4))
    features, residual_map, global_features = rcu_inputs(2, 8, (16, 16), (1, 1), 1, 16, (2, 2))
    with torch.no_grad():  # queries and keys within float16's range, their dot products far beyond it
        rcu.query.weight.mul_(1e4)
        rcu.key_value.weight.mul_(20.0)
    queries = []
    rcu.query.register_forward_hook(lambda module, args, output: queries.append(output))
    with torch.autocast("cpu", dtype=torch.float16):
        out = rcu(features, residual_map, global_features)
    assert queries[0].dtype == torch.float16 and torch.isfinite(queries[0]).all() and queries[0].abs().max() > 1e3
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in rcu.parameters())


def test_default_token_patch_size_is_eight_where_the_strides_allow():
    assert default_token_patch_size([[1, 1], [2, 2], [2, 2], [2, 2], [2, 2], [2, 2]]) == [8, 8]
    assert default_token_patch_size([[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]]) == [2, 8, 8]
    assert default_token_patch_size([[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]) == [8, 8, 8]


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


def test_global_features_off_the_token_grid_are_a_clear_error():
    rcu = RegionCompensationUnit(nn.Conv2d, 8, 1, 16, (8, 8))
    with pytest.raises(ValueError, match="must be a multiple of it"):
        rcu(torch.randn(1, 8, 16, 16), torch.randn(1, 1, 16, 16), torch.randn(1, 16, 3, 3))


@pytest.mark.parametrize("kwargs, match", [(dict(num_heads=3), "not divisible by num_heads"),
                                           (dict(patch_size=(4, 4, 4)), "one entry per spatial axis"),
                                           (dict(feature_stride=(8, 8)), "not divisible by the features' stride"),
                                           (dict(window=2), "odd")])
def test_bad_settings_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RegionCompensationUnit(nn.Conv2d, 8, 1, 16, **{"patch_size": (4, 4), **kwargs})
