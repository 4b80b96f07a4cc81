"""Multi-scale dilated attention (blocks/msda.py): shapes, exactness against hand-computed attention, memory."""
import itertools

import pytest
import torch
from torch import nn

from nnunetv2_grcsf.architectures.blocks.msda import (AttentionBlock, GlobalSelfAttention,
                                                      MultiScaleDilatedAttention, dilated_neighborhood_attention)

CONV = {2: nn.Conv2d, 3: nn.Conv3d}


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def neighbour_mask(size, kernel_size, dilation):
    """(N, N) bool: key position m is in query position n's dilated window (computed from coordinates)."""
    positions = torch.tensor(list(itertools.product(*[range(s) for s in size])))
    offset = positions[None, :, :] - positions[:, None, :]  # key - query, (N, N, dims)
    mask = torch.ones(len(positions), len(positions), dtype=torch.bool)
    for axis, k in enumerate(kernel_size):
        radius = dilation * ((k - 1) // 2)
        mask &= (offset[..., axis].abs() <= radius) & (offset[..., axis] % dilation == 0)
    return mask


def reference_attention(module, x, masks):
    """By hand: qkv projection, per head softmax(q k^T * scale) v over the allowed keys, heads concatenated, proj.

    x (B, C, *S); masks: one (N, N) bool mask (or None = all keys) per head group, in channel order.
    """
    batch, channels, *size = x.shape
    tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
    q, k, v = module.qkv(tokens).chunk(3, dim=-1)
    heads = module.num_heads
    head_dim = channels // heads
    outputs = []
    for h in range(heads):
        part = slice(h * head_dim, (h + 1) * head_dim)
        logits = q[..., part] @ k[..., part].transpose(1, 2) * head_dim ** -0.5
        mask = masks[h * len(masks) // heads]
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        outputs.append(logits.softmax(-1) @ v[..., part])
    out = module.proj(torch.cat(outputs, -1))
    return out.transpose(1, 2).reshape(batch, channels, *size)


@pytest.mark.parametrize("dim", [2, 3])
def test_window_covering_the_whole_input_is_exactly_full_attention(dim):
    """A 2^dim input: the 3-tap window at dilation 1 of every position covers every position."""
    torch.manual_seed(0)
    q, k, v = [torch.randn(2, 3, 4, *[2] * dim) for _ in range(3)]  # (B, heads, head_dim, *S)
    flat = [t.flatten(3) for t in (q, k, v)]  # (B, h, d, N)
    logits = flat[0].transpose(-1, -2) @ flat[1] * 0.5  # (B, h, N, N)
    expected = (logits.softmax(-1) @ flat[2].transpose(-1, -2)).transpose(-1, -2).reshape(q.shape)
    assert torch.allclose(dilated_neighborhood_attention(q, k, v, [3] * dim, 1, 0.5), expected, atol=1e-6)


@pytest.mark.parametrize("dim", [2, 3])
def test_msda_with_one_dilation_on_a_window_sized_input_matches_global_attention_at_the_centre(dim):
    """3^dim input, dilation 1: the centre position sees every position, exactly as global attention does."""
    torch.manual_seed(0)
    msda = MultiScaleDilatedAttention(CONV[dim], channels=8, num_heads=2, dilations=(1,))
    full = GlobalSelfAttention(channels=8, num_heads=2)
    full.load_state_dict(msda.state_dict())
    x = torch.randn(2, 8, *[3] * dim)
    centre = (slice(None), slice(None), *[1] * dim)
    with torch.no_grad():
        assert torch.allclose(msda(x)[centre], full(x)[centre], atol=1e-5)
        assert torch.allclose(full(x), reference_attention(full, x, [None]), atol=1e-5)


@pytest.mark.parametrize("dim, size, kernel_size, dilations", [
    (2, (3, 3), 3, (1,)),
    (2, (5, 7), 3, (1, 2)),
    (3, (5, 5, 6), 3, (1, 2)),
    (3, (7, 4, 7), (3, 1, 3), (2, 3)),  # anisotropic plans: no neighbours along axis 1
])
def test_msda_equals_masked_full_attention_per_dilation_group(dim, size, kernel_size, dilations):
    torch.manual_seed(0)
    msda = MultiScaleDilatedAttention(CONV[dim], channels=16, num_heads=4, dilations=dilations,
                                      kernel_size=kernel_size)
    kernel = [kernel_size] * dim if isinstance(kernel_size, int) else list(kernel_size)
    x = torch.randn(2, 16, *size)
    masks = [neighbour_mask(size, kernel, d) for d in dilations]
    with torch.no_grad():
        assert torch.allclose(msda(x), reference_attention(msda, x, masks), atol=1e-5)


@pytest.mark.parametrize("dim, size, kernel_size, dilations", [
    (2, (5, 7), 3, (1, 2)),
    (3, (5, 5, 6), 3, (1, 2)),
    (3, (7, 4, 7), (3, 1, 3), (2, 3)),
])
def test_msda_gradients_equal_those_of_masked_full_attention(dim, size, kernel_size, dilations):
    """The whole module (projections in the channel-first layout, all groups in one autograd node, regions instead
    of padding) against autograd through the hand-computed reference: input and every parameter."""
    torch.manual_seed(0)
    msda = MultiScaleDilatedAttention(CONV[dim], channels=16, num_heads=4, dilations=dilations,
                                      kernel_size=kernel_size).double()
    kernel = [kernel_size] * dim if isinstance(kernel_size, int) else list(kernel_size)
    masks = [neighbour_mask(size, kernel, d) for d in dilations]
    x = torch.randn(2, 16, *size, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 16, *size, dtype=torch.float64)
    inputs = [x, *msda.parameters()]
    ours = torch.autograd.grad(msda(x), inputs, grad)
    reference = torch.autograd.grad(reference_attention(msda, x, masks), inputs, grad)
    for name, a, b in zip(["input"] + [n for n, _ in msda.named_parameters()], ours, reference):
        assert torch.allclose(a, b, atol=1e-10), name


def test_hand_written_backward_matches_autograd_of_the_reference():
    torch.manual_seed(0)
    q, k, v = [torch.randn(1, 2, 3, 4, 5, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda a, b, c: dilated_neighborhood_attention(a, b, c, (3, 3, 3), 2, 0.7),
                                    (q, k, v))


def test_3d_attention_stores_no_unfolded_keys_or_values():
    """Saved for backward: q, k, v and one probability per head and neighbour, not 27 copies of k and v."""
    torch.manual_seed(0)
    batch, heads, head_dim, size = 2, 2, 8, (6, 7, 8)
    q, k, v = [torch.randn(batch, heads, head_dim, *size, requires_grad=True) for _ in range(3)]
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dilated_neighborhood_attention(q, k, v, (3, 3, 3), 1, 0.5)
    element = q.element_size() * batch * heads * torch.Size(size).numel()
    assert sum(saved.values()) <= element * (3 * head_dim + 27)
    assert sum(saved.values()) < element * 2 * 27 * head_dim / 4  # unfold would store 2 * 27 * head_dim


@pytest.mark.parametrize("dim, kind", [(2, "msda"), (3, "msda"), (2, "global"), (3, "global")])
def test_attention_block_shapes_and_gradients(dim, kind):
    torch.manual_seed(0)
    block = AttentionBlock(CONV[dim], channels=16, kind=kind, num_heads=4, dilations=(1, 2))
    x = torch.randn(2, 16, *[5] * dim, requires_grad=True)
    out = block(x)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert x.grad is not None and all(p.grad is not None for p in block.parameters())


def test_checkpointing_gives_the_same_output_and_gradients():
    torch.manual_seed(0)
    plain = AttentionBlock(nn.Conv3d, channels=8, kind="msda", num_heads=2, dilations=(1, 2))
    checkpointed = AttentionBlock(nn.Conv3d, channels=8, kind="msda", num_heads=2, dilations=(1, 2),
                                  checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 8, 5, 6, 5)
    outputs = [block(x) for block in (plain, checkpointed)]
    assert torch.allclose(outputs[0], outputs[1])
    for out in outputs:
        out.square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


@pytest.mark.parametrize("kwargs, match", [
    (dict(channels=16, num_heads=3, dilations=(1, 2, 3)), r"channels=16 is not divisible by num_heads=3"),
    (dict(channels=16, num_heads=2, dilations=(1, 2, 3, 4)), r"num_heads=2 is not divisible by the number of "
                                                              r"dilations 4"),
    (dict(channels=16, num_heads=4, dilations=(1, 2), kernel_size=2), r"must be odd"),
    (dict(channels=16, num_heads=4, dilations=(0, 1)), r"positive"),
])
def test_inconsistent_settings_are_named_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiScaleDilatedAttention(nn.Conv2d, **kwargs)


def test_feature_map_smaller_than_the_dilated_window_is_a_named_error():
    msda = MultiScaleDilatedAttention(nn.Conv3d, channels=8, num_heads=2, dilations=(1, 3))
    with pytest.raises(ValueError, match=r"feature map \[8, 6, 8\] is smaller than the dilated window "
                                         r"\[7, 7, 7\].*axis \[1\]"):
        msda(torch.randn(1, 8, 8, 6, 8))
