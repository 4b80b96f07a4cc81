"""Helpers shared by the blocks and networks (as dynamic-network-architectures' ``building_blocks/helper.py``).

- sizes: :func:`stage_sizes`, :func:`per_axis_kernel`, :func:`feature_map_estimate` (nnU-Net's memory units);
- activation checkpointing: :func:`maybe_checkpoint`; eager regions under torch.compile: :func:`maybe_eager`;
- units added to an nnU-Net backbone with random numbers of their own: :class:`AddedUnits`,
  :func:`separate_random_stream`;
- the depthwise conv of the FIAS blocks, :func:`depthwise_conv`: plain ``F.conv`` (cuDNN) on every device but the
  CPU, where a custom autograd function with a faster backward is used (see :class:`_CPUDepthwiseConv`).
"""
import hashlib
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}  # by number of spatial axes
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}  # by tensor dimension


def stage_sizes(input_size: Sequence[int], strides: Sequence[Sequence[int]]) -> List[List[int]]:
    """Spatial size after each encoder stage: [S / strides[0], S / (strides[0] * strides[1]), ...]."""
    sizes, size = [], list(input_size)
    for stride in strides:
        size = [s // t for s, t in zip(size, stride)]
        sizes.append(size)
    return sizes


def per_axis_kernel(kernel_size: int, plans_kernel: Sequence[int]) -> List[int]:
    """``kernel_size`` on every axis whose plans kernel is > 1, 1 elsewhere (anisotropic plans)."""
    return [kernel_size if k > 1 else 1 for k in plans_kernel]


def feature_map_estimate(size: Sequence[int], stored_per_position: float) -> np.int64:
    """A block's activation memory in the units of dynamic_network_architectures' compute_conv_feature_map_size.

    Those count one feature map per conv block (its output), while a conv-norm-nonlinearity block stores about
    two for the backward pass; so a block that stores ``stored_per_position`` elements per position (its output
    included) counts half of them, and nnU-Net's planners compare it in the same units as PlainConvUNet.
    """
    return np.int64(np.prod(size, dtype=np.int64) * stored_per_position / 2)


@contextmanager
def separate_random_stream(name: str) -> Iterator[None]:
    """Torch's CPU random numbers drawn inside come from a stream of their own; the global generator is left where
    it was.

    The stream is seeded from a hash of the global generator's state and ``name`` (nothing is drawn from the global
    generator): after ``torch.manual_seed(s)`` what is drawn inside is reproducible, differs between names, and
    does not shift what is drawn outside.
    """
    state = torch.random.get_rng_state()
    digest = hashlib.sha256(state.numpy().tobytes() + name.encode()).digest()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int.from_bytes(digest[:8], "little"))
        yield


class AddedUnits(nn.ModuleDict):
    """A ModuleDict of units added to an nnU-Net backbone (GRCSF's GCUs and RCUs), drawing their random numbers
    from a stream of their own (:func:`separate_random_stream`, one per ``name``).

    The units are built inside it (``build`` returns them by key) and initialized inside it (``apply``, which
    nnU-Net's ``network.apply(network.initialize)`` reaches), so the backbone's initial weights, and every random
    number drawn after the network is built (nnU-Net's batch sampling), are those of the backbone alone under the
    same seed: a run with the units and nnUNetTrainer's run with the same ``NNUNETV2_GRCSF_SEED`` start from the
    same U-Net, and two variants (e.g. with and without GCUs) start from the same weights of the units they share.
    State-dict keys are those of a plain ModuleDict.
    """

    def __init__(self, name: str, build: Callable[[], Dict[str, nn.Module]]):
        with separate_random_stream(name):
            units = build()
        super().__init__(units)
        self.stream_name = name

    def apply(self, fn):
        with separate_random_stream(self.stream_name):
            return super().apply(fn)


def maybe_checkpoint(function, x: Union[torch.Tensor, Tuple[torch.Tensor, ...]], checkpointing: bool):
    """function(x) (function(*x) for a tuple); with ``checkpointing`` and gradients on, only the inputs are kept
    and function's activations are recomputed in the backward pass (non-reentrant activation checkpointing)."""
    inputs = x if isinstance(x, tuple) else (x,)
    if checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(function, *inputs, use_reentrant=False)
    return function(*inputs)


def maybe_eager(function, x: Union[torch.Tensor, Tuple], eager: bool):
    """function(x) (function(*x) for a tuple); with ``eager``, through :func:`run_eagerly` (never traced by
    torch.compile)."""
    inputs = x if isinstance(x, tuple) else (x,)
    return run_eagerly(function, *inputs) if eager else function(*inputs)


@torch.compiler.disable(reason="a module holding a kernel compiled on its own (MSDA's flex_attention) runs eagerly")
def run_eagerly(function, *inputs):
    """function(*inputs), never traced by torch.compile: one graph break, the compiled graphs of the rest of the
    network on either side. For the modules whose forward calls a kernel compiled on its own: traced, TorchDynamo
    would break the graph inside them anyway, there inside an activation checkpoint (which it then runs untraced,
    the frames inside compiled on their own), so one clean break per module is chosen instead. (Measured on the
    CPU: a toy network of torch.nn containers around such a checkpoint had no graph at all; FIAS itself compiled
    around the break either way, with static shapes.)"""
    return function(*inputs)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """2D/3D ``x`` (B, C, *S) in channels-last memory format (PyTorch's CPU depthwise convs are fast in it)."""
    memory_format = CHANNELS_LAST.get(x.dim())
    return x if memory_format is None else x.contiguous(memory_format=memory_format)


class _CPUDepthwiseConv(torch.autograd.Function):
    """CPU only: stride-1 depthwise conv with odd kernels and 'same' padding, in channels-last layout, whose input
    gradient is one more forward conv.

    For stride 1 and padding (k - 1) / 2 the gradient of the input is the correlation of the output gradient with
    the kernel flipped on every spatial axis, which PyTorch's CPU kernels compute far faster than their depthwise
    ``convolution_backward`` (and both faster in channels-last). The weight's gradient is PyTorch's own. Under
    autocast the conv runs in the autocast dtype (as F.conv would) and the gradients come back in the inputs'
    dtypes. Not used on CUDA, where cuDNN's depthwise kernels are used through plain ``F.conv``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        x = channels_last(x)
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.dtypes, ctx.has_bias = list(padding), dtypes, bias is not None
        with torch.autocast(x.device.type, enabled=False):
            return CONV_FUNCTIONS[x.dim() - 2](x, weight, bias, padding=ctx.padding, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = channels_last(grad.to(x.dtype))
        axes = list(range(2, x.dim()))
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = CONV_FUNCTIONS[x.dim() - 2](grad, weight.flip(axes), None, padding=ctx.padding,
                                                 groups=x.shape[1]).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            ones = [1] * len(axes)
            grad_weight = torch.ops.aten.convolution_backward(
                grad, x, weight, None, ones, ctx.padding, ones, False, [0] * len(axes), x.shape[1],
                [False, True, False])[1].to(ctx.dtypes[1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum([0, *axes]).to(ctx.dtypes[2])
        return grad_x, grad_weight, grad_bias, None


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   cpu_backward: Optional[bool] = None) -> torch.Tensor:
    """Depthwise conv, stride 1, 'same' padding, odd kernel per axis; 2D and 3D.

    x (B, C, *S), weight (C, 1, *k), bias (C,) or None -> (B, C, *S). The function of
    ``F.conv{2,3}d(x, weight, bias, padding=(k - 1) // 2, groups=C)``; ``cpu_backward`` (default: on eager CPU
    tensors) computes it with :class:`_CPUDepthwiseConv` instead (same function and gradients, faster CPU backward;
    under torch.compile the plain conv is used, which inductor lowers itself).
    """
    if any(k % 2 == 0 for k in weight.shape[2:]):
        raise ValueError(f"depthwise_conv: kernel {list(weight.shape[2:])} must be odd on every axis.")
    padding = [(k - 1) // 2 for k in weight.shape[2:]]
    if cpu_backward is None:
        cpu_backward = x.device.type == "cpu" and not torch.compiler.is_compiling()
    if cpu_backward:
        return _CPUDepthwiseConv.apply(x, weight, bias, padding)
    return CONV_FUNCTIONS[x.dim() - 2](x, weight, bias, padding=padding, groups=x.shape[1])
