"""Region Compensation Unit (RCU) of GRCSF: MAE residual maps fused into pixel-level features.

What the paper states (Wang, Chen, Yang, Kim, arXiv 2502.08675, abstract only; no official code):
the RCU uses self-supervised residual maps (the pixel-wise difference between an MAE reconstruction and
the image) through a *patch-based cross-attention* that integrates regional (patch) and pixel-level
features, and a *patch-level importance score* computed from the backbone's global spatial features
weights the fusion.

Everything below that level is our design (an unofficial 3D reimplementation, GitHub parvezamu/MICCAI2026_Submission,
reads the abstract similarly: residual maps enter several decoder levels, cross-attention with decoder
queries, a sigmoid importance; none of its code is used here):

- Residual tokens: the full-resolution residual map (B, K, *S) (K residual-map channels, e.g. one per MAE
  mask ratio) is cut into non-overlapping patches of ``patch_size`` pixels (their own size, not tied to the
  backbone's strides; GRCSFUNet's default is 8 per axis, the MAE's patch edge, see
  :func:`default_token_patch_size`), each linearly embedded (the map of a conv with kernel = stride =
  ``patch_size``, computed as patch flattening + matmul) into C channels and LayerNorm-ed, on the token grid
  T = S / patch_size; a linear key/value projection follows.
- Patch-based cross-attention: queries are a 1x1 projection of the pixel-level features (B, C, *S_f) (S_f =
  S / ``feature_stride``); every pixel attends to the tokens of its own patch and of the neighbouring
  patches, a window of ``window``^d patches (tokens beyond the border do not take part). A local window keeps
  the cost linear in the pixels (a global one costs N_pixels x N_patches) and a residual patch's influence
  near it. The values are C wide: the attention is linear in them, so the value projection also plays the
  output projection's role (no per-pixel output projection). Four layouts compute the same attention
  (``ATTENTION_LAYOUTS``, each tested against an explicit softmax(QK^T)V and against SDPA, forward and backward;
  their CPU times: benchmarks/results/rcu_attention_cpu.md):
  'sdpa', by default on CUDA (every device but the CPU): ``torch.nn.functional.scaled_dot_product_attention``
  over the pixels grouped by patch, the bias and log priors as its additive mask; for float16/bfloat16 inputs
  (autocast) every backend computes the logits and the softmax in float32 (the fused kernels accumulate in
  float32, the math backend upcasts), so they cannot overflow.
  'sdpa_folded': the same without a mask, the bias (by its exact low-rank factors) and the log priors folded into
  extra query and key channels, so that CUDA can take its flash kernels; a candidate there (on the CPU 1.1-1.3x
  SDPA's time).
  'keys_first', by default on the CPU, where SDPA takes its math path (the mask carries the learned importance):
  plain matmuls laid out keys first, the softmax over the second-to-last axis, in float32 at least: torch's CPU
  softmax over a last axis as short as a window (9 or 27 keys) is several times slower (README's speed section).
  'window_sum': no regrouping of the pixels, one broadcast product and sum per window offset on the features' own
  layout (elementwise ops that torch.compile fuses); a candidate for CUDA under torch.compile (eager on the CPU
  3-4x (2D) to 11-13x (3D) SDPA's time).
  Which layout CUDA should use is measured by ``benchmarks/rcu_attention_speed.py --device cuda [--compile]``.
- Position: a fixed, not learned, relative position bias in the attention logits, computed from the grid:
  -d^2 / (2 sigma_h^2) for head h, d = the distance in patch units between the query pixel (where it lies in
  its patch) and the key patch's centre, sigma_h = 0.5 * 2^h (head 0 looks mostly at the pixel's own patch,
  later heads wider). Relative, so it holds at any input size (sliding-window inference); the tokens
  themselves carry no absolute position (as in Swin's windows).
- Pixel-level path: the residual map, average-pooled to the feature resolution, through a 1x1 conv to C
  channels: where an anomaly lies inside a patch survives at the features' full resolution.
- Patch-level importance: a two-layer 1x1-conv MLP on the backbone's global features (in GRCSFUNet the
  bottleneck, on a grid coarser than the tokens) gives a logit per position, linearly interpolated to the
  token grid; its sigmoid s is one score in (0, 1) per patch. It weights the fusion three ways: log s is added
  to the patch's attention logits (its attention weight is proportional to s), it scales the patch's value,
  and it scales the pixel path over the patch's pixels. A patch of score 0 thus contributes nothing: changing
  the residual map inside it changes no output.
- Fusion: features + attention output + s * pixel path, without a learnable output scale: the unit acts from
  the first step (the decoder convolutions that follow normalize what they get). In GRCSFUNet and FIASUNet the
  fused features are the decoder's skip connection at that resolution, before the stage's convolutions.

Interface (reused by the FIAS-based networks)::

    rcu = RegionCompensationUnit(conv_op, feature_channels=C, residual_channels=K, global_channels=G,
                                 patch_size=(p_1, ..., p_d), feature_stride=(r_1, ..., r_d))
    out = rcu(features, residual_map, global_features)
    # features        (B, C, *S_f)  pixel-level features, S_f = S / feature_stride
    # residual_map    (B, K, *S)    MAE residual maps, S divisible by patch_size per axis
    # global_features (B, G, *S_g)  backbone global features; T = S / patch_size a multiple of S_g per axis
    # out             (B, C, *S_f)

``patch_size`` must be divisible by ``feature_stride`` per axis. 2D and 3D share one code path: ``conv_op``
(nn.Conv2d or nn.Conv3d) decides.
"""
import itertools
import math
from typing import List, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, get_matching_pool_op, \
    maybe_convert_scalar_to_list
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnunetv2_grcsf.architectures.helpers import feature_map_estimate

DEFAULT_TOKEN_PATCH_EDGE = 8  # the MAE's patch edge (nnunetv2_grcsf.mae presets)
EXCLUDED_LOG_WEIGHT = -1000.0  # exp() of it is 0 in float32, and it fits float16
#: windowed_cross_attention's layouts, the same function
ATTENTION_LAYOUTS = ("sdpa", "sdpa_folded", "keys_first", "window_sum")


def default_token_patch_size(strides: Sequence[Sequence[int]], edge: int = DEFAULT_TOKEN_PATCH_EDGE) -> List[int]:
    """Token patch size per axis: ``edge`` (the MAE's patch edge), capped to a divisor of the product of the
    strides on that axis (gcd), so that every input nnU-Net accepts (divisible by that product) is divisible by it.

    E.g. strides with products (32, 32) -> (8, 8); (16, 32, 32) -> (8, 8, 8); (4, 32, 32) -> (4, 8, 8).
    """
    return [math.gcd(edge, int(p)) for p in np.prod(np.array(strides), axis=0)]


def split_into_patches(x: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """(B, K, *S) -> (B, M, K * prod(patch_size)): each non-overlapping patch flattened (N-D space-to-depth).

    M = prod(S / patch_size), patches in row-major order of the patch grid.
    """
    batch, channels, *size = x.shape
    grid = [s // p for s, p in zip(size, patch_size)]
    interleaved = [n for g, p in zip(grid, patch_size) for n in (g, p)]
    x = x.reshape(batch, channels, *interleaved)
    dims = len(size)
    grid_axes = [2 + 2 * i for i in range(dims)]
    within_patch_axes = [3 + 2 * i for i in range(dims)]
    return x.permute(0, *grid_axes, 1, *within_patch_axes).reshape(batch, math.prod(grid), -1)


def group_pixels_by_patch(x: torch.Tensor, grid: Sequence[int], heads: int, pixels_last: bool = False
                          ) -> torch.Tensor:
    """(B, h * c, *(grid * q)) -> (B * M, h, prod(q), c): the pixels of each patch, per head (M = prod(grid));
    (B * M, h, c, prod(q)) with ``pixels_last``."""
    batch, channels, *size = x.shape
    dims = len(size)
    within = [s // g for s, g in zip(size, grid)]
    x = x.reshape(batch, heads, channels // heads, *[n for g, q in zip(grid, within) for n in (g, q)])
    grid_axes = [3 + 2 * i for i in range(dims)]
    within_axes = [4 + 2 * i for i in range(dims)]
    if pixels_last:
        return x.permute(0, *grid_axes, 1, 2, *within_axes).reshape(batch * math.prod(grid), heads,
                                                                    channels // heads, math.prod(within))
    return x.permute(0, *grid_axes, 1, *within_axes, 2).reshape(batch * math.prod(grid), heads, math.prod(within),
                                                                 channels // heads)


def ungroup_pixels(x: torch.Tensor, batch: int, grid: Sequence[int], within: Sequence[int],
                   pixels_last: bool = False) -> torch.Tensor:
    """Inverse of :func:`group_pixels_by_patch`: (B * M, h, prod(q), c), or (B * M, h, c, prod(q)) with
    ``pixels_last``, -> (B, h * c, *(grid * q))."""
    dims = len(grid)
    heads, channels = x.shape[1], x.shape[2 if pixels_last else 3]
    if pixels_last:  # axes: 0 batch, 1..d grid, d+1 heads, d+2 channels, d+3..2d+2 within
        x = x.reshape(batch, *grid, heads, channels, *within)
        order = [0, dims + 1, dims + 2] + [a for i in range(dims) for a in (1 + i, dims + 3 + i)]
    else:  # axes: 0 batch, 1..d grid, d+1 heads, d+2..2d+1 within, 2d+2 channels
        x = x.reshape(batch, *grid, heads, *within, channels)
        order = [0, dims + 1, 2 * dims + 2] + [a for i in range(dims) for a in (1 + i, dims + 2 + i)]
    return x.permute(*order).reshape(batch, heads * channels, *[g * q for g, q in zip(grid, within)])


def window_offsets(window: int, dims: int) -> torch.Tensor:
    """(window^d, d) offsets of a window's patches from its centre patch, in patch units, row-major."""
    centre = (window - 1) // 2
    return torch.tensor(list(itertools.product(range(window), repeat=dims)), dtype=torch.float64) - centre


def gather_windows(padded: torch.Tensor, window: int, heads: int) -> torch.Tensor:
    """(B, h, c, *(T + window - 1)) token grid padded by (window - 1) / 2 per side -> (B * M, h, window^d, c):
    each token's window of neighbours, in the order of :func:`window_offsets`."""
    batch, _, channels, *padded_grid = padded.shape
    dims = len(padded_grid)
    grid = [g - window + 1 for g in padded_grid]
    shifted = [padded[(Ellipsis, *[slice(o, o + g) for o, g in zip(offset, grid)])]
               for offset in itertools.product(range(window), repeat=dims)]
    x = torch.stack(shifted, dim=3)  # (B, h, c, W, *T)
    return x.permute(0, *range(4, 4 + dims), 1, 3, 2).reshape(batch * math.prod(grid), heads, window ** dims,
                                                               channels)


def distance_bias(pixels_per_patch: Sequence[int], window: int, sigmas: Sequence[float]) -> torch.Tensor:
    """(1, h, prod(q), window^d) attention bias -d^2 / (2 sigma_h^2), d = distance (patch units) between a pixel
    (its centre, at its place inside its patch) and the centre of each window patch."""
    dims = len(pixels_per_patch)
    pixel = torch.tensor(list(itertools.product(*[range(q) for q in pixels_per_patch])), dtype=torch.float64)
    pixel = (pixel + 0.5) / torch.tensor(pixels_per_patch, dtype=torch.float64) - 0.5  # in (-0.5, 0.5)
    squared = (pixel[:, None, :] - window_offsets(window, dims)[None]).square().sum(-1)  # (Q, W)
    sigmas = torch.tensor(sigmas, dtype=torch.float64).view(-1, 1, 1)
    return (-squared[None] / (2 * sigmas ** 2)).unsqueeze(0).float()


def low_rank_factors(bias: torch.Tensor, tolerance: float = 1e-7) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact low-rank factors of a per-head bias (1, h, Q, W): (1, h, Q, r) and (1, h, W, r) whose product is the
    bias (an SVD in float64, the singular values split evenly; r the largest numerical rank of the heads; in the
    bias's dtype). A distance bias has rank d + 2 at most (|x|^2 - 2 x.o + |o|^2): r = 4 in 2D, 5 in 3D."""
    u, singular, v_transposed = torch.linalg.svd(bias.double(), full_matrices=False)
    rank = int((singular > tolerance * singular.amax(-1, keepdim=True)).sum(-1).max())
    root = singular[..., :rank].sqrt()
    return ((u[..., :rank] * root[..., None, :]).to(bias.dtype),
            (v_transposed[..., :rank, :].transpose(-1, -2) * root[..., None, :]).to(bias.dtype))


def windowed_cross_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, log_prior: torch.Tensor,
                             num_heads: int, window: int, bias: torch.Tensor, layout: Optional[str] = None,
                             bias_factors: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Every pixel attends to the tokens of its patch's window; multi-head.

    query (B, C, *(T * q)) pixel queries; key, value (B, C, *T) patch tokens; log_prior (B, 1, *T) a log-weight
    per token (added to its logits: attention weights proportional to exp(logit) * exp(log_prior)); bias
    (1, h, prod(q), window^d) added to the logits by position (pixel within its patch, window patch).
    Tokens beyond the border do not exist (weight 0): they get EXCLUDED_LOG_WEIGHT. Returns (B, C, *(T * q)).

    Head h: softmax_j(q_h . k_hj / sqrt(C / h) + log_prior_j + bias_hj) v_hj, computed in one of four layouts
    (``layout``, see :data:`ATTENTION_LAYOUTS`; None: :func:`default_attention_layout`), the same function:
    'sdpa' the pixels grouped by patch (B * M, h, prod(q), c) against their window's tokens (B * M, h, window^d, c),
    the bias and log priors as SDPA's additive mask; 'sdpa_folded' the same grouping, the bias and priors folded
    into extra query and key channels (:func:`folded_sdpa_attention`; ``bias_factors``, the bias's
    :func:`low_rank_factors`, computed here by an SVD if not given, a graph break under torch.compile: the RCU
    holds them); 'keys_first' the same grouping through :func:`keys_first_attention`; 'window_sum' no grouping:
    :func:`window_sum_attention`.
    """
    layout = default_attention_layout(query) if layout is None else layout
    if layout not in ATTENTION_LAYOUTS:
        raise ValueError(f"windowed_cross_attention: layout {layout!r} is not one of {ATTENTION_LAYOUTS}.")
    batch, channels, *size = query.shape
    grid = list(key.shape[2:])
    within = [s // g for s, g in zip(size, grid)]
    pad = [(window - 1) // 2] * (2 * len(grid))
    prior = F.pad(log_prior.clamp(min=EXCLUDED_LOG_WEIGHT), pad, value=EXCLUDED_LOG_WEIGHT)  # (B, 1, *(T + w - 1))
    if layout == "window_sum":
        return window_sum_attention(query, key, value, prior, num_heads, window, bias)
    per_head = [batch, num_heads, channels // num_heads, *grid]
    window_prior = gather_windows(prior.unsqueeze(1), window, 1)  # (B * M, 1, window^d, 1)
    keys = gather_windows(F.pad(key.reshape(per_head), pad), window, num_heads)
    values = gather_windows(F.pad(value.reshape(per_head), pad), window, num_heads)
    if layout == "keys_first":
        attended = keys_first_attention(group_pixels_by_patch(query, grid, num_heads, pixels_last=True), keys,
                                        values, bias.transpose(-1, -2), window_prior)
        return ungroup_pixels(attended, batch, grid, within, pixels_last=True)
    if layout == "sdpa_folded":
        attended = folded_sdpa_attention(group_pixels_by_patch(query, grid, num_heads), keys, values, window_prior,
                                         *(bias_factors or low_rank_factors(bias)))
        return ungroup_pixels(attended, batch, grid, within)
    attended = F.scaled_dot_product_attention(group_pixels_by_patch(query, grid, num_heads), keys, values,
                                              attn_mask=(bias + window_prior.transpose(-1, -2)).to(query.dtype))
    return ungroup_pixels(attended, batch, grid, within)


def default_attention_layout(query: torch.Tensor) -> str:
    """'keys_first' on CPU tensors (measured faster there: README's speed section), 'sdpa' elsewhere."""
    return "keys_first" if query.is_cpu else "sdpa"


def keys_first_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         *masks: torch.Tensor) -> torch.Tensor:
    """SDPA's attention laid out keys first, for the CPU: queries (N, h, c, Q), keys and values (N, h, W, c) and
    additive masks, each broadcastable to (N, h, W, Q) -> (N, h, c, Q), the softmax over the W keys on the
    second-to-last axis (torch's CPU softmax over a last axis of a few keys is slow). Computed in float32 at least
    (autocast off) and cast back to the queries' dtype, as SDPA's math path does."""
    compute_dtype = torch.promote_types(queries.dtype, torch.float32)
    with torch.autocast(queries.device.type, enabled=False):
        logits = torch.matmul(keys.to(compute_dtype) * keys.shape[-1] ** -0.5, queries.to(compute_dtype))
        for mask in masks:
            logits = logits + mask.to(compute_dtype)
        attended = torch.matmul(values.to(compute_dtype).transpose(-1, -2), torch.softmax(logits, dim=-2))
    return attended.to(queries.dtype)


def folded_sdpa_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, window_prior: torch.Tensor,
                          query_factor: torch.Tensor, key_factor: torch.Tensor) -> torch.Tensor:
    """SDPA without a mask: queries (N, h, Q, c), keys and values (N, h, W, c), window_prior (N, 1, W, 1) (each
    key's log prior) and the bias's low-rank factors (1, h, Q, r), (1, h, W, r) -> (N, h, Q, c).

    logit = q.k / sqrt(c) + prior_j + bias_pj, with bias = F_q F_k^T, is the scaled dot product of
    q' = [q, F_q / s, 1 / s] and k' = [k, F_k / s, prior / s] (s = c^-1/4: the extra channels carry the scale,
    split evenly between the two so that neither grows large in float16); q', k' and v are zero-padded to a
    multiple of 8 channels. Without a mask and with equal head sizes, SDPA can take its fused flash kernels on CUDA
    (with a mask it takes the memory-efficient or the math kernel, and computes a mask gradient)."""
    batch, heads, pixels, channels = queries.shape
    window = keys.shape[2]
    scale, root = channels ** -0.5, channels ** -0.25
    dtype = queries.dtype
    extra_queries = torch.cat([query_factor.to(dtype) / root,
                               torch.full_like(query_factor[..., :1], 1 / root, dtype=dtype)], -1)
    extra_keys = torch.cat([key_factor.to(dtype).expand(batch, heads, window, -1),
                            window_prior.to(dtype).expand(batch, heads, window, 1)], -1) / root
    width = channels + extra_keys.shape[-1]
    padding = (0, -(-width // 8) * 8 - width)
    q = F.pad(torch.cat([queries, extra_queries.expand(batch, heads, pixels, -1)], -1), padding)
    k = F.pad(torch.cat([keys.to(dtype), extra_keys], -1), padding)
    v = F.pad(values.to(dtype), (0, q.shape[-1] - channels))
    return F.scaled_dot_product_attention(q, k, v, scale=scale)[..., :channels]


def window_sum_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prior: torch.Tensor,
                         num_heads: int, window: int, bias: torch.Tensor) -> torch.Tensor:
    """The windowed attention without regrouping the pixels: query (B, C, *(T * q)) is viewed (no copy) as
    (B, h, c, T_1, q_1, ..., T_d, q_d), and for each of the window^d offsets the shifted token grid of the padded
    key (B, C, *T) is broadcast over the q pixels of every patch: one logit map per offset (a product and a sum
    over c), a softmax across the offsets, and the value maps summed with those weights. Only elementwise ops and
    reductions on the features' own layout (torch.compile fuses them). ``prior`` is the log prior already padded
    to (B, 1, *(T + window - 1)) with EXCLUDED_LOG_WEIGHT. Computed in float32 at least (autocast off), cast back
    to the query's dtype. Returns (B, C, *(T * q))."""
    batch, channels, *size = query.shape
    grid = list(key.shape[2:])
    within = [s // g for s, g in zip(size, grid)]
    pad = [(window - 1) // 2] * (2 * len(grid))
    head_channels = channels // num_heads
    compute_dtype = torch.promote_types(query.dtype, torch.float32)

    def patch_token(tokens: torch.Tensor, offset: Sequence[int]) -> torch.Tensor:
        """(..., *(T + window - 1)) -> the token at ``offset`` of each patch's window, (..., T_1, 1, ..., T_d, 1)."""
        return tokens[(Ellipsis, *[item for o, g in zip(offset, grid) for item in (slice(o, o + g), None)])]

    with torch.autocast(query.device.type, enabled=False):
        queries = query.to(compute_dtype).reshape(batch, num_heads, head_channels,
                                                  *[n for g, q in zip(grid, within) for n in (g, q)])
        keys = F.pad(key.to(compute_dtype).reshape(batch, num_heads, head_channels, *grid), pad)
        values = F.pad(value.to(compute_dtype).reshape(batch, num_heads, head_channels, *grid), pad)
        # (1, h, 1, q_1, ..., 1, q_d, window^d): the bias of a pixel within its patch, per window patch
        pixel_bias = bias.to(compute_dtype).reshape(1, num_heads, *[n for q in within for n in (1, q)], -1)
        offsets = list(itertools.product(range(window), repeat=len(grid)))  # window_offsets' order
        logits = torch.stack([(queries * patch_token(keys, offset)).sum(2) * head_channels ** -0.5
                              + patch_token(prior.to(compute_dtype), offset) + pixel_bias[..., j]
                              for j, offset in enumerate(offsets)], dim=2)  # (B, h, window^d, T_1, q_1, ...)
        weights = torch.softmax(logits, dim=2)
        attended = sum(weights[:, :, j:j + 1] * patch_token(values, offset) for j, offset in enumerate(offsets))
    return attended.reshape(batch, channels, *size).to(query.dtype)


class ResidualTokenizer(nn.Module):
    """Residual map (B, K, *S) -> normalized patch tokens (B, M, D), M = prod(T), T = S / patch_size (row-major).

    Linear patch embedding (a conv with kernel = stride = ``patch_size``, computed as patch flattening + matmul,
    much faster than such a large-kernel conv on CPU), then LayerNorm. Each token depends on its patch only.
    """

    def __init__(self, residual_channels: int, embed_channels: int, patch_size: Sequence[int]):
        super().__init__()
        self.patch_size = list(patch_size)
        self.patch_embedding = nn.Linear(residual_channels * math.prod(patch_size), embed_channels)
        self.norm = nn.LayerNorm(embed_channels)

    def forward(self, residual_map: torch.Tensor) -> torch.Tensor:
        return self.norm(self.patch_embedding(split_into_patches(residual_map, self.patch_size)))


class PatchImportanceScore(nn.Module):
    """Global features (B, G, *S_g) -> the logit of one importance score in (0, 1) per patch, (B, 1, *T).

    A two-layer 1x1-conv MLP gives a logit per global position, linearly interpolated to the token grid T
    (a multiple of S_g per axis), then a sigmoid.
    """

    def __init__(self, conv_op: Type[_ConvNd], global_channels: int, hidden_channels: int):
        super().__init__()
        self.score = nn.Sequential(conv_op(global_channels, hidden_channels, kernel_size=1),
                                   nn.LeakyReLU(negative_slope=0.01),
                                   conv_op(hidden_channels, 1, kernel_size=1))
        self.mode = {2: "bilinear", 3: "trilinear"}[convert_conv_op_to_dim(conv_op)]

    def forward(self, global_features: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """The score logits (B, 1, *T); the score is their sigmoid."""
        logits = self.score(global_features)
        if list(logits.shape[2:]) != list(grid):
            logits = F.interpolate(logits, size=list(grid), mode=self.mode, align_corners=False)
        return logits


class RegionCompensationUnit(nn.Module):
    """Fuses MAE residual maps into pixel-level features; see the module docstring for the design.

    Args:
        conv_op: nn.Conv2d or nn.Conv3d; decides 2D/3D.
        feature_channels: C, channels of the pixel-level features (input and output), also the token width.
        residual_channels: K, number of residual-map channels.
        global_channels: G, channels of the global features that score the patches.
        patch_size: token patch edge per axis, in pixels of the residual map (int or sequence of length d).
        feature_stride: the features' downsampling relative to the residual map, per axis; divides patch_size.
        num_heads: attention heads; must divide C.
        window: patches per axis each pixel attends to (odd): its own and (window - 1) / 2 on each side.
        importance_hidden_channels: width of the importance MLP.
        attention_layout: one of :data:`ATTENTION_LAYOUTS` (see :func:`windowed_cross_attention`), or None
            (default): :func:`default_attention_layout`, chosen per call by the device.

    Shapes: features (B, C, *S_f), residual_map (B, K, *S), global_features (B, G, *S_g) with
    S_f = S / feature_stride, S divisible by patch_size and T = S / patch_size a multiple of S_g, per axis
    ->  (B, C, *S_f).
    """

    def __init__(self, conv_op: Type[_ConvNd], feature_channels: int, residual_channels: int, global_channels: int,
                 patch_size: Union[int, Sequence[int]], feature_stride: Union[int, Sequence[int]] = 1,
                 num_heads: int = 2, window: int = 3, importance_hidden_channels: int = 32,
                 attention_layout: Optional[str] = None):
        super().__init__()
        dims = convert_conv_op_to_dim(conv_op)
        self.patch_size = [int(p) for p in maybe_convert_scalar_to_list(conv_op, patch_size)]
        self.feature_stride = [int(r) for r in maybe_convert_scalar_to_list(conv_op, feature_stride)]
        if len(self.patch_size) != dims or len(self.feature_stride) != dims:
            raise ValueError(f"RegionCompensationUnit: patch_size {self.patch_size} and feature_stride "
                             f"{self.feature_stride} must have one entry per spatial axis of {conv_op.__name__}.")
        if any(p % r for p, r in zip(self.patch_size, self.feature_stride)):
            raise ValueError(f"RegionCompensationUnit: patch_size {self.patch_size} is not divisible by the "
                             f"features' stride {self.feature_stride}; use a larger patch size or finer features.")
        if feature_channels % num_heads:
            raise ValueError(f"RegionCompensationUnit: feature_channels={feature_channels} is not divisible by "
                             f"num_heads={num_heads}.")
        if window < 1 or window % 2 == 0:
            raise ValueError(f"RegionCompensationUnit: window={window} must be a positive odd number of patches.")
        self.num_heads, self.window, self.feature_channels = num_heads, window, feature_channels
        if attention_layout not in (None, *ATTENTION_LAYOUTS):
            raise ValueError(f"RegionCompensationUnit: attention_layout {attention_layout!r} is not None or one of "
                             f"{ATTENTION_LAYOUTS}.")
        self.attention_layout = attention_layout
        self.pixels_per_patch = [p // r for p, r in zip(self.patch_size, self.feature_stride)]
        self.tokenizer = ResidualTokenizer(residual_channels, feature_channels, self.patch_size)
        self.key_value = nn.Linear(feature_channels, 2 * feature_channels)
        self.query = conv_op(feature_channels, feature_channels, kernel_size=1)
        self.importance = PatchImportanceScore(conv_op, global_channels, importance_hidden_channels)
        self.pool = (get_matching_pool_op(conv_op, pool_type="avg")(self.feature_stride, self.feature_stride)
                     if math.prod(self.feature_stride) > 1 else nn.Identity())
        self.pixel_projection = conv_op(residual_channels, feature_channels, kernel_size=1, bias=False)
        self.register_buffer("attention_bias", distance_bias(self.pixels_per_patch, window,
                                                             [0.5 * 2 ** h for h in range(num_heads)]),
                             persistent=False)
        query_factor, key_factor = low_rank_factors(self.attention_bias)  # for the 'sdpa_folded' layout
        self.register_buffer("attention_bias_query_factor", query_factor, persistent=False)
        self.register_buffer("attention_bias_key_factor", key_factor, persistent=False)

    def _check_shapes(self, features: torch.Tensor, residual_map: torch.Tensor,
                      global_features: torch.Tensor) -> List[int]:
        size, residual_size = list(features.shape[2:]), list(residual_map.shape[2:])
        if any(s % p for s, p in zip(residual_size, self.patch_size)):
            raise ValueError(f"RegionCompensationUnit: residual map size {residual_size} is not divisible by "
                             f"its patch_size {self.patch_size} on every axis.")
        grid = [s // p for s, p in zip(residual_size, self.patch_size)]
        if [s * r for s, r in zip(size, self.feature_stride)] != residual_size:
            raise ValueError(f"RegionCompensationUnit: features of size {size} at stride {self.feature_stride} do "
                             f"not match the residual map size {residual_size}.")
        if any(t % g for t, g in zip(grid, global_features.shape[2:])):
            raise ValueError(f"RegionCompensationUnit: global features have grid {list(global_features.shape[2:])},"
                             f" but the token grid {grid} (residual map {residual_size} / patch_size "
                             f"{self.patch_size}) must be a multiple of it on every axis.")
        return grid

    def forward(self, features: torch.Tensor, residual_map: torch.Tensor,
                global_features: torch.Tensor) -> torch.Tensor:
        grid = self._check_shapes(features, residual_map, global_features)
        batch = features.shape[0]

        importance_logits = self.importance(global_features, grid)  # (B, 1, *T)
        importance = torch.sigmoid(importance_logits)
        tokens = self.tokenizer(residual_map)  # (B, M, C)
        key, value = self.key_value(tokens).transpose(1, 2).reshape(batch, -1, *grid).chunk(2, dim=1)
        attended = windowed_cross_attention(self.query(features), key, value * importance,
                                            F.logsigmoid(importance_logits), self.num_heads, self.window,
                                            self.attention_bias, self.attention_layout,
                                            (self.attention_bias_query_factor, self.attention_bias_key_factor))
        # the projection is linear without bias: scaling its K input channels by the score scales its output
        pixel_importance = F.interpolate(importance, size=list(features.shape[2:]), mode="nearest")
        return features + attended + self.pixel_projection(self.pool(residual_map) * pixel_importance)

    def compute_conv_feature_map_size(self, feature_size: Sequence[int]) -> np.int64:
        """Activation memory this unit adds at feature size S_f, in dynamic_network_architectures' units
        (helpers.feature_map_estimate): the queries and the attention output (C + heads each per pixel) stored
        for the backward pass; the tokens are negligible."""
        return feature_map_estimate(feature_size, 2 * (self.feature_channels + self.num_heads))
