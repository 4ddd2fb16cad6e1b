"""Feedback alignment (FA, Lillicrap et al. 2016) for Linear and Conv2d: the backward to the input
uses a fixed random matrix B of the weight's shape in place of W, so the input gradient is
``grad_out @ B`` (Linear) or the transposed convolution of grad_out with B (Conv2d); the weight and
bias gradients are exact. B is never stored: it is regenerated from Philox by ``seed`` and
``layer`` (memkernels.reference.feedback_matrix) in every backward. Its entries are uniform in
[-scale, scale]; the default scale 1 / sqrt(fan_in) is the bound of torch's default initialisation
of W, so B is distributed as W was at initialisation.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from memkernels import ops
from memkernels.compress.coded_input import layer_inputs
from memkernels.ops._checks import FLOAT32_OVERFLOW  # the kernels compute B in float32
from memkernels.reference import check_feedback_key


def check_key(seed, layer) -> tuple[int, int]:
    """(seed, layer) as ints: integers (numpy's too) in the ranges check_feedback_key sets."""
    for name, value in (("seed", seed), ("layer", layer)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    check_feedback_key(int(seed), int(layer))
    return int(seed), int(layer)


def check_scale(scale) -> float | None:
    """scale as a float: None (the default) or a positive number, finite in float32."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < scale < FLOAT32_OVERFLOW:
        raise ValueError(f"scale must be None or a positive finite number (in float32), got {scale!r}")
    return float(scale)


def fan_in(weight: torch.Tensor) -> int:
    """in of a Linear (out, in) weight, in / groups * kh * kw of a Conv2d one."""
    return math.prod(weight.shape[1:])


def default_scale(weight: torch.Tensor) -> float:
    """1 / sqrt(fan_in) of a Linear or Conv2d weight."""
    return 1.0 / math.sqrt(max(1, fan_in(weight)))


def feedback_weight(weight: torch.Tensor, seed: int, layer: int, scale: float) -> torch.Tensor:
    """B shaped like `weight` (out, fan_in...) in its dtype: rows of the identity projected onto B,
    which is B itself (e = I). Used where B meets a convolution rather than a matmul; freed after."""
    eye = torch.eye(weight.shape[0], dtype=torch.float32, device=weight.device)
    b = ops.feedback_project(eye, seed, layer, fan_in(weight), scale)
    return b.view(weight.shape).to(weight.dtype)


class _FALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, seed, layer, scale):
        ctx.save_for_backward(x)  # W is not needed: B takes its place
        ctx.feedback = (seed, layer, scale)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        seed, layer, scale = ctx.feedback
        rows = math.prod(x.shape[:-1])  # not -1: either size may be 0
        g = grad_out.reshape(rows, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = ops.feedback_project(g.contiguous(), seed, layer, x.shape[-1], scale).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = g.t() @ x.reshape(rows, x.shape[-1])
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, None, None, None


class _FAConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, seed, layer, scale, stride, padding, dilation, groups):
        ctx.save_for_backward(x)
        ctx.weight_shape = weight.shape
        ctx.feedback = (seed, layer, scale)
        ctx.conv = (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        seed, layer, scale = ctx.feedback
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            b = feedback_weight(grad_out.new_empty(ctx.weight_shape), seed, layer, scale)
            grad_x = torch.nn.grad.conv2d_input(x.shape, b, grad_out, *ctx.conv)
        if ctx.needs_input_grad[1]:
            grad_w = torch.nn.grad.conv2d_weight(x, ctx.weight_shape, grad_out, *ctx.conv)
        if ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


def fa_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seed: int, layer: int,
              scale: float | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) whose backward sends grad_out @ B to x (B: (out, in), Philox).
    Keeps x for backward, as F.linear does, but not W."""
    seed, layer = check_key(seed, layer)
    scale = check_scale(scale)
    x, weight, bias = layer_inputs(x, weight, bias, 2, "(out_features, in_features)")
    scale = default_scale(weight) if scale is None else scale
    return _FALinearFunction.apply(x, weight, bias, seed, layer, scale)


def _conv_padding(padding) -> tuple[int, int]:
    if padding == "valid":
        return (0, 0)
    if isinstance(padding, str):
        raise NotImplementedError(f"FA Conv2d takes padding as ints or 'valid', got {padding!r}")
    return tuple(padding) if isinstance(padding, (tuple, list)) else (padding, padding)


def fa_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seed: int, layer: int,
              scale: float | None = None, stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """F.conv2d whose backward sends the transposed convolution of grad_out with B (weight's shape,
    regenerated in backward) to x, (N, C, H, W) or unbatched (C, H, W). Padding: ints or 'valid'."""
    seed, layer = check_key(seed, layer)
    x, weight, bias = layer_inputs(x, weight, bias, 4, "(out_channels, in_channels / groups, kh, kw)")
    if x.dim() == 3:  # unbatched, as F.conv2d takes it; the backward's conv2d_input wants 4-D
        return fa_conv2d(x[None], weight, bias, seed, layer, scale, stride, padding, dilation, groups)[0]
    pair = torch.nn.modules.utils._pair
    scale = check_scale(scale)
    scale = default_scale(weight) if scale is None else scale
    return _FAConv2dFunction.apply(x, weight, bias, seed, layer, scale, pair(stride),
                                   _conv_padding(padding), pair(dilation), groups)


def fa_conv2d_forward(conv: nn.Conv2d, x: torch.Tensor, seed: int, layer: int, scale: float | None = None):
    """conv's own forward with FA's backward: padding_mode and 'same' pad explicitly first, as
    nn.Conv2d._conv_forward does ('same' may pad unevenly)."""
    padding = conv.padding
    if conv.padding_mode != "zeros" or isinstance(padding, str):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x, padding = F.pad(x, conv._reversed_padding_repeated_twice, mode), 0
    return fa_conv2d(x, conv.weight, conv.bias, seed, layer, scale, conv.stride, padding, conv.dilation, conv.groups)


class FALinear(nn.Linear):
    """nn.Linear trained by feedback alignment: backward sends grad_out @ B to the input.

    Same parameters and state_dict as nn.Linear. ``seed`` and ``layer`` name B (give each layer of
    a model its own ``layer``); ``scale`` bounds its entries (default 1 / sqrt(in_features)).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 seed: int = 0, layer: int = 0, scale: float | None = None):
        super().__init__(in_features, out_features, bias, device, dtype)
        (self.seed, self.layer), self.scale = check_key(seed, layer), check_scale(scale)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return fa_linear(input, self.weight, self.bias, self.seed, self.layer, self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}, layer={self.layer}, scale={self.scale}"


class FAConv2d(nn.Conv2d):
    """nn.Conv2d trained by feedback alignment: backward sends conv_transpose(grad_out, B) to the
    input, B of the weight's shape regenerated from (seed, layer). Arguments as nn.Conv2d's."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 seed: int = 0, layer: int = 0, scale: float | None = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        (self.seed, self.layer), self.scale = check_key(seed, layer), check_scale(scale)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return fa_conv2d_forward(self, input, self.seed, self.layer, self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}, layer={self.layer}, scale={self.scale}"
