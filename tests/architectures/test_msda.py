"""Multi-scale dilated attention (blocks/msda.py): exactness against hand-computed attention, the flex_attention
path against the loop oracle, the CPU autograd function against its plain version, memory, compile, autocast."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import create_mask

from nnunetv2_grcsf.architectures.blocks.msda import (AttentionBlock, GlobalSelfAttention, MultiScaleDilatedAttention,
                                                      cached_block_mask, loop_neighbourhood_attention,
                                                      neighbourhood_block_mask)

CONV = {2: nn.Conv2d, 3: nn.Conv3d}

pytestmark = [pytest.mark.usefixtures("one_cpu_thread"),
              pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")]


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

    x (B, C, *S); masks: one (N, N) bool mask (or None = all keys) per head group, in head order.
    """
    batch, channels, *size = x.shape
    tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
    q, k, v = module.qkv(tokens).chunk(3, dim=-1)
    heads, head_dim = module.num_heads, module.head_dim
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


def msda_and_masks(dim, size, kernel_size, dilations, channels=16, num_heads=None, head_dim=8, **kwargs):
    torch.manual_seed(0)
    num_heads = num_heads or 2 * len(dilations)
    msda = MultiScaleDilatedAttention(CONV[dim], channels, num_heads, dilations, kernel_size, head_dim, **kwargs)
    kernel = [kernel_size] * dim if isinstance(kernel_size, int) else list(kernel_size)
    return msda, [neighbour_mask(size, kernel, d) for d in dilations]


CASES = [(2, (3, 3), 3, (1,)),
         (2, (7, 8), 3, (1, 2, 3)),  # DilateFormer's dilations; width 6 heads x 8 = 48 from 16 channels
         (3, (7, 7, 8), 3, (1, 2, 3)),
         (3, (7, 4, 7), (3, 1, 3), (2, 3))]  # anisotropic plans: no neighbours along axis 1


@pytest.mark.parametrize("dim", [2, 3])
def test_window_covering_the_whole_input_is_exactly_full_attention(dim):
    """A 2^dim input: the 3-tap window at dilation 1 of every position covers every position."""
    torch.manual_seed(0)
    qkv = torch.randn(3, 1, 2, 4, 3, *[2] * dim)  # (3, G, h, d, B, *S)
    q, k, v = [t[0].flatten(3).permute(2, 0, 3, 1) for t in qkv]  # (B, h, N, d)
    expected = F.scaled_dot_product_attention(q, k, v, scale=0.5).permute(1, 3, 0, 2).reshape(qkv.shape[2:])
    for cpu_backward in (True, False):
        out = loop_neighbourhood_attention(qkv, [3] * dim, [1], 0.5, cpu_backward)[0]
        assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("dim", [2, 3])
def test_msda_with_one_dilation_on_a_window_sized_input_matches_global_attention_at_the_centre(dim):
    """3^dim input, dilation 1: the centre position sees every position, exactly as global attention does."""
    torch.manual_seed(0)
    msda = MultiScaleDilatedAttention(CONV[dim], channels=8, num_heads=2, dilations=(1,), head_dim=6)
    full = GlobalSelfAttention(channels=8, num_heads=2, head_dim=6)
    full.load_state_dict(msda.state_dict())
    x = torch.randn(2, 8, *[3] * dim)
    centre = (slice(None), slice(None), *[1] * dim)
    with torch.no_grad():
        assert torch.allclose(msda(x)[centre], full(x)[centre], atol=1e-5)
        assert torch.allclose(full(x), reference_attention(full, x, [None]), atol=1e-5)


@pytest.mark.parametrize("dim, size, kernel_size, dilations", CASES)
def test_msda_equals_masked_full_attention_per_dilation_group(dim, size, kernel_size, dilations):
    """Out-of-map neighbours are left out (masked, not zero-padded); head group g uses dilations[g]; the attention
    width (heads x head_dim) is independent of the channels."""
    msda, masks = msda_and_masks(dim, size, kernel_size, dilations)
    assert msda.qkv.out_features == 3 * msda.num_heads * 8 and msda.proj.in_features == msda.num_heads * 8
    x = torch.randn(2, 16, *size)
    with torch.no_grad():
        assert torch.allclose(msda(x), reference_attention(msda, x, masks), atol=1e-5)


@pytest.mark.parametrize("dim, size, kernel_size, dilations", CASES[1:])
def test_msda_gradients_equal_those_of_masked_full_attention(dim, size, kernel_size, dilations):
    """The whole module (the CPU autograd function) against autograd through the hand-computed reference."""
    msda, masks = msda_and_masks(dim, size, kernel_size, dilations)
    msda = msda.double()
    x = torch.randn(2, 16, *size, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 16, *size, dtype=torch.float64)
    inputs = [x, *msda.parameters()]
    ours = torch.autograd.grad(msda(x), inputs, grad)
    reference = torch.autograd.grad(reference_attention(msda, x, masks), inputs, grad)
    for name, a, b in zip(["input"] + [n for n, _ in msda.named_parameters()], ours, reference):
        assert torch.allclose(a, b, atol=1e-10), name


@pytest.mark.parametrize("kernel_size, dilations", [((3, 3, 3), (2,)), ((3, 1, 3), (1, 3))])
def test_cpu_autograd_function_equals_its_plain_version(kernel_size, dilations):
    """_CPUNeighbourhoodAttention (hand-written backward) against the plain ops used under torch.compile."""
    torch.manual_seed(0)
    qkv = torch.randn(3, len(dilations), 2, 3, 1, 7, 4, 7, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(qkv.shape[1:], dtype=torch.float64)
    results = []
    for cpu_backward in (True, False):
        out = loop_neighbourhood_attention(qkv, kernel_size, dilations, 0.7, cpu_backward)
        results.append((out, *torch.autograd.grad(out, qkv, grad)))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: loop_neighbourhood_attention(t, kernel_size, dilations, 0.7, True),
                                    (qkv[:, :, :1, :2, :, :4, :2, :3].detach().requires_grad_(),))


@pytest.mark.parametrize("dim, size, kernel_size, dilations", CASES[1:])
def test_flex_attention_path_equals_the_loop_oracle(dim, size, kernel_size, dilations):
    """implementation='flex' (chosen on CUDA) against 'loop', on the CPU (flex_attention's forward runs there)."""
    msda, _ = msda_and_masks(dim, size, kernel_size, dilations)
    x = torch.randn(2, 16, *size)
    with torch.no_grad():
        loop = msda(x)
        msda.implementation = "flex"
        assert torch.allclose(msda(x), loop, atol=1e-5)


@pytest.mark.parametrize("dim, size, kernel_size, dilations", CASES[1:])
def test_flex_mask_gives_the_loop_gradients(dim, size, kernel_size, dilations):
    """flex_attention has no backward on the CPU (torch 2.14): the flex path's mask (its mask_mod, evaluated densely)
    with autograd through dense attention gives the loop's gradients. The kernel's own backward is checked on CUDA
    (test_flex_attention_on_cuda_equals_the_loop_forward_and_backward)."""
    msda, _ = msda_and_masks(dim, size, kernel_size, dilations)
    block_mask = neighbourhood_block_mask(size, msda.kernel_size, msda.dilations, msda.num_heads // len(dilations),
                                          "cpu")
    positions = torch.Size(size).numel()
    mask = create_mask(block_mask.mask_mod, 1, msda.num_heads, positions, positions, "cpu")  # (1, H, N, N)
    x = torch.randn(2, 16, *size, requires_grad=True)
    tokens = x.flatten(2).transpose(1, 2)
    q, k, v = msda.qkv(tokens).view(2, positions, 3, msda.num_heads, msda.head_dim).permute(2, 0, 3, 1, 4)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=msda.scale)
    dense = msda.proj(dense.transpose(1, 2).reshape(2, positions, -1)).transpose(1, 2).reshape(x.shape)
    inputs = [x, *msda.parameters()]
    grad = torch.randn_like(x)
    for a, b in zip(torch.autograd.grad(dense, inputs, grad), torch.autograd.grad(msda(x), inputs, grad)):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size, kernel_size, dilations", [((10, 12, 14), (3, 3, 3), (1, 2, 3)),
                                                          ((40, 44), (3, 3), (1, 3))])
def test_block_mask_lists_exactly_the_blocks_holding_a_neighbour_pair(size, kernel_size, dilations):
    """Block sparsity without an N x N mask: our key blocks per query block are those where the dense mask has a
    pair, for every head, and fewer than all."""
    block_size = 64
    block_mask = neighbourhood_block_mask(size, kernel_size, dilations, 2, "cpu", block_size)
    positions = torch.Size(size).numel()
    dense = create_mask(block_mask.mask_mod, 1, 2 * len(dilations), positions, positions, "cpu")[0]
    n_blocks = -(-positions // block_size)
    padded = F.pad(dense, (0, n_blocks * block_size - positions, 0, n_blocks * block_size - positions))
    expected = padded.view(-1, n_blocks, block_size, n_blocks, block_size).any(4).any(2)  # (H, nq, nkv)
    listed = torch.zeros_like(expected)
    for h, q_block in itertools.product(range(expected.shape[0]), range(n_blocks)):
        count = int(block_mask.kv_num_blocks[0, h, q_block])
        listed[h, q_block, block_mask.kv_indices[0, h, q_block, :count].long()] = True
    assert torch.equal(listed, expected)
    assert expected.sum() < 0.8 * expected.numel()


def test_block_mask_is_built_once_per_size_and_device():
    first = cached_block_mask((10, 12), (3, 3), (1, 2, 3), 2, torch.device("cpu"))
    assert cached_block_mask((10, 12), (3, 3), (1, 2, 3), 2, torch.device("cpu")) is first
    built = neighbourhood_block_mask((10, 12), (3, 3), (1, 2, 3), 2, "cpu")
    assert torch.equal(first.kv_indices, built.kv_indices) and torch.equal(first.kv_num_blocks, built.kv_num_blocks)
    assert cached_block_mask((10, 14), (3, 3), (1, 2, 3), 2, torch.device("cpu")) is not first


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (flex_attention's fused kernel)")
@pytest.mark.parametrize("dim, size, kernel_size, dilations", CASES[1:])
def test_flex_attention_on_cuda_equals_the_loop_forward_and_backward(dim, size, kernel_size, dilations):
    msda, _ = msda_and_masks(dim, size, kernel_size, dilations, head_dim=16)
    msda = msda.cuda()
    x = torch.randn(2, 16, *size, device="cuda", requires_grad=True)
    grad = torch.randn_like(x)
    results = []
    for implementation in ("loop", "auto"):
        msda.implementation = implementation
        out = msda(x)
        results.append((out, *torch.autograd.grad(out, [x, *msda.parameters()], grad)))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)


def test_3d_attention_stores_no_unfolded_keys_or_values():
    """Saved for backward (CPU): q, k, v and one probability per head and neighbour, not 27 copies of k and v."""
    torch.manual_seed(0)
    heads, head_dim, batch, size = 2, 8, 2, (6, 7, 8)
    qkv = torch.randn(3, 1, heads, head_dim, batch, *size, requires_grad=True)
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loop_neighbourhood_attention(qkv, (3, 3, 3), (1,), 0.5)
    element = qkv.element_size() * batch * heads * torch.Size(size).numel()
    assert sum(saved.values()) <= element * (3 * head_dim + 27)
    assert sum(saved.values()) < element * 2 * 27 * head_dim / 4  # unfold would store 2 * 27 * head_dim


@pytest.mark.parametrize("dim, kind", [(2, "msda"), (3, "msda"), (2, "global"), (3, "global")])
def test_attention_block_shapes_and_gradients(dim, kind):
    torch.manual_seed(0)
    block = AttentionBlock(CONV[dim], channels=16, kind=kind, num_heads=3, dilations=(1, 2, 3), head_dim=8)
    x = torch.randn(2, 16, *[7] * dim, requires_grad=True)
    out = block(x)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert x.grad is not None and all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


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


@pytest.mark.parametrize("dim, kind", [(2, "msda"), (3, "msda"), (3, "global")])
def test_attention_block_compiles_without_graph_breaks(dim, kind):
    """TorchDynamo traces the block whole, training (the CPU autograd functions step aside for plain ops)."""
    torch._dynamo.reset()
    block = AttentionBlock(CONV[dim], channels=16, kind=kind, num_heads=3, dilations=(1, 2, 3), head_dim=8)
    explanation = torch._dynamo.explain(block)(torch.randn(1, 16, *[7] * dim, requires_grad=True))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_flex_path_is_one_graph_break_between_compiled_graphs():
    """The flex_attention step runs outside the network's graph (its kernel compiled on its own): the only break
    (reported once per enclosing frame), with the projections before and after it compiled."""
    torch._dynamo.reset()
    msda, _ = msda_and_masks(3, (7, 7, 8), 3, (1, 2, 3), implementation="flex")
    with torch.no_grad():
        explanation = torch._dynamo.explain(msda)(torch.randn(1, 16, 7, 7, 8))
    assert explanation.break_reasons
    assert all("compiled on its own" in str(reason.reason) for reason in explanation.break_reasons)
    assert explanation.graph_count >= 2


def dense_flex_attention(q, k, v, block_mask, scale):
    """flex_attention with its mask evaluated densely, through SDPA: the same function, with a CPU backward (the
    stand-in for the kernel in test_compile_and_autocast.py's FIAS flex-path test)."""
    positions = q.shape[2]
    mask = create_mask(block_mask.mask_mod, 1, q.shape[1], positions, positions, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@pytest.mark.parametrize("kind", ["msda", "global"])
def test_float16_autocast_on_cpu_gives_finite_output_and_gradients_close_to_float32(kind):
    """Logits and softmax run in float32 under a float16 autocast (inputs scaled so that float16 logits would
    overflow: |q.k| > 65504)."""
    torch.manual_seed(0)
    block = AttentionBlock(nn.Conv3d, channels=16, kind=kind, num_heads=3, dilations=(1, 2, 3), head_dim=8)
    with torch.no_grad():
        block.attention.qkv.weight.mul_(60)
    x = torch.randn(1, 16, 7, 7, 7)
    reference = block(x)
    with torch.autocast("cpu", dtype=torch.float16):
        out = block(x)
    gradients = torch.autograd.grad(out.float().square().mean(), list(block.parameters()))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in gradients)
    assert (out.float() - reference).abs().mean() < 0.05 * reference.abs().mean()


@pytest.mark.parametrize("kwargs, match", [
    (dict(channels=16, num_heads=4, dilations=(1, 2, 3)), r"num_heads=4 is not divisible by the number of "
                                                          r"dilations 3"),
    (dict(channels=16, num_heads=4, dilations=(1, 2), kernel_size=2), r"must be odd"),
    (dict(channels=16, num_heads=4, dilations=(0, 1)), r"positive"),
    (dict(channels=16, num_heads=32, dilations=(1, 2)), r"head_dim must be at least 1"),
    (dict(channels=16, num_heads=3, implementation="natten"), r"implementation 'natten' is not one of"),
])
def test_inconsistent_settings_are_named_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiScaleDilatedAttention(nn.Conv2d, **kwargs)


def test_feature_map_smaller_than_the_dilated_window_is_a_named_error():
    msda = MultiScaleDilatedAttention(nn.Conv3d, channels=8, num_heads=2, dilations=(1, 3))
    with pytest.raises(ValueError, match=r"feature map \[8, 6, 8\] is smaller than the dilated window "
                                         r"\[7, 7, 7\].*axis \[1\]"):
        msda(torch.randn(1, 8, 8, 6, 8))
