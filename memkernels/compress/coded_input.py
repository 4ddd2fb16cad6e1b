"""linear and conv2d whose autograd keeps only a code of the input (see memkernels.compress)."""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch
import torch.nn.functional as F

from memkernels import ops
from memkernels._autocast import autocast_inputs

MODES = ("asa", "int8", "int4", "int2")
_INT_BITS = {"int8": 8, "int4": 4, "int2": 2}


@dataclasses.dataclass(frozen=True)
class _CodeFormat:
    """How to read the codes [rows, packed bytes] and stats (for the sign code None, read with lo and
    step) that backward keeps of an input [rows, cols]: the arguments of the op dequantize_groups."""

    cols: int
    bits: int
    group_size: int
    lo: float = 0.0
    step: float = 0.0

    def weight_grad(self, grad_out: torch.Tensor, codes: torch.Tensor, stats) -> torch.Tensor:
        """grad_out [rows, out]^T @ x_hat -> [out, cols]."""
        return ops.weight_grad_from_codes(grad_out, codes, stats, self.cols, self.bits, self.group_size,
                                          self.lo, self.step)

    def dequantize(self, codes: torch.Tensor, stats, dtype: torch.dtype) -> torch.Tensor:
        return ops.dequantize_groups(codes, stats, self.cols, self.bits, self.group_size, self.lo,
                                     self.step, dtype)


def check_save(save, eps: float, nonnegative, group_size: int) -> None:
    """Raise ValueError / TypeError naming the bad argument of a compressed layer."""
    if save is not None and save not in MODES:
        raise ValueError(f"save must be None or one of {MODES}, got {save!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (0 < eps < math.inf):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if not (nonnegative is None or isinstance(nonnegative, bool)):
        raise TypeError(f"nonnegative must be None (detect), True or False, got {nonnegative!r}")
    if (isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size <= 0
            or group_size % 8):
        raise ValueError(f"group_size must be a positive multiple of 8, got {group_size!r}")


def _encode(x: torch.Tensor, save: str, eps: float, nonnegative, group_size: int, keep: bool, seed):
    """(what forward computes with, codes, stats, _CodeFormat) for x [rows, cols]; with keep False
    (no weight gradient to come) only the first, the rest None. seed: _draw_seed's."""
    if save == "asa":
        if nonnegative is None:  # one reduction; give nonnegative to skip it
            nonnegative = (x >= 0).all()
            if torch.compiler.is_compiling() or x.device.type == "meta":  # meta: no value to read either
                return _traced_sign_code(x, eps, nonnegative, group_size, keep)
            nonnegative = bool(nonnegative)
        x_aux, signs = ops.auxiliary_sign_forward(x, float(eps), nonnegative)
        if not keep:
            return x_aux, None, None, None
        lo, step = (0.0, 1.0) if nonnegative else (-1.0, 2.0)  # s(x) from the bit [x > 0]
        return x_aux, signs, None, _CodeFormat(x.shape[1], 1, group_size, lo, step)
    if not keep:
        return x, None, None, None
    bits = _INT_BITS[save]
    codes, stats = ops.quantize_groups(x, bits, group_size, seed)
    return x, codes, stats, _CodeFormat(x.shape[1], bits, group_size)


def _traced_sign_code(x: torch.Tensor, eps: float, nonnegative: torch.Tensor, group_size: int, keep: bool):
    """_encode's asa with the variant detected under torch.compile: nonnegative, a 0-dim bool tensor,
    is a value of the data, which cannot steer Python in a graph, so the choice flows as data (eager's
    results, at the cost of one where)."""
    x_signed, signs = ops.auxiliary_sign_forward(x, float(eps), False)  # the same bits in both variants
    x_aux = torch.where(nonnegative & (x <= 0), x, x_signed)  # s = 0, not -1, where x <= 0
    if not keep:
        return x_aux, None, None, None
    # s(x) = lo + step * bit: the ops take (lo, step) as floats fixed when tracing, or as every group's
    # (min, scale) in stats, read at run time.
    f = nonnegative.to(torch.bfloat16)
    groups = (x.shape[1] + group_size - 1) // group_size
    stats = torch.stack((f - 1, 2 - f)).expand(x.shape[0], groups, 2)
    return x_aux, signs, stats, _CodeFormat(x.shape[1], 1, group_size)


def layer_inputs(input, weight, bias, weight_dims: int, what: str):
    """(input, weight, bias) of a layer function, checked and under autocast: tensors (bias may be
    None), weight ``weight_dims``-D (``what`` names its layout), bias (out_features,); then, in the
    autocast dtype, a floating input with weight and bias on its device and of its dtype."""
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor) and not (name == "bias" and t is None):
            raise TypeError(f"{name} must be a torch.Tensor{' or None' if name == 'bias' else ''}, "
                            f"got {type(t).__name__}")
    if weight.dim() != weight_dims:
        raise ValueError(f"weight must be {weight_dims}-D {what}, got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) (out_features of weight "
                         f"{tuple(weight.shape)}), got {tuple(bias.shape)}")
    input, weight, bias = autocast_inputs(input, weight, bias)
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {input.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.device != input.device:
            raise ValueError(f"{name} must be on the device of input ({input.device}), got {t.device}")
        if t.dtype != input.dtype:
            raise TypeError(f"{name} must have the dtype of input ({input.dtype}), got {t.dtype}")
    return input, weight, bias


SECOND_DERIVATIVE_ERROR = (
    "the weight gradient of mk.nn.Linear / Conv2d with save= comes from a code of the input, not the "
    "input, so it has no derivative (with respect to the input, or through grad_out): a gradient "
    "taken through it (MAML's inner step, a penalty on weight gradients) would lack that term. Use "
    "save=None for layers whose weight gradient is differentiated; input gradients (g @ W) stay "
    "differentiable with create_graph=True.")


class _WithoutDerivative(torch.autograd.Function):
    """``value`` on the graphs of ``tensors`` (any None), with a backward that raises
    SECOND_DERIVATIVE_ERROR: a weight gradient from codes under create_graph=True, whose missing
    dependence on the input (and on grad_out, as it is returned detached) could not raise otherwise."""

    @staticmethod
    def forward(ctx, value, *tensors):
        return value

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(SECOND_DERIVATIVE_ERROR)


def _input_anchor(input: torch.Tensor, keep: bool):
    """A 0-dim tensor on input's graph that keeps none of input's memory (its nodes keep only
    sizes), for a second derivative to find the input through; None where none can come."""
    if keep and input.requires_grad:
        return input[..., :0].sum()
    return None


def _weight_grad_output(ctx, grad_weight: torch.Tensor, weight: torch.Tensor | None,
                        grad_out: torch.Tensor) -> torch.Tensor:
    """A weight gradient from codes as backward returns it: guarded under create_graph=True (the
    engine turns grad mode on in backward exactly then), on the graphs of the weight (where kept),
    the input and grad_out."""
    if torch.is_grad_enabled():
        return _WithoutDerivative.apply(grad_weight.detach(), weight, ctx.input_anchor, grad_out)
    return grad_weight


def _draw_seed(save, weight: torch.Tensor):
    """The seed of an int mode's stochastic rounding, from torch's default CPU generator, drawn
    whenever the weight is trainable, under no_grad too (where no code is kept): a forward under
    no_grad and its replay with grad (reentrant checkpointing, MEM-DFA's first pass) then leave the
    random stream alike, so dropout after the layer draws the same mask in both. None for asa and
    for a frozen weight, which draw nothing."""
    if save in _INT_BITS and weight.requires_grad:
        return torch.randint(0, 2 ** 62, (), dtype=torch.int64)
    return None


def _keeps_codes(weight: torch.Tensor) -> bool:
    """Whether a weight gradient may come: the codes serve nothing else, so a frozen weight (or no
    grad mode) keeps none, as torch's linear keeps no input then."""
    return torch.is_grad_enabled() and weight.requires_grad


class _CodedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, input_anchor, save, eps, nonnegative, group_size, keep, seed):
        ctx.input_anchor = input_anchor  # not saved_tensors: no bytes kept for the first backward
        x = input.reshape(math.prod(input.shape[:-1]), input.shape[-1])
        x_forward, codes, stats, ctx.code_format = _encode(x, save, eps, nonnegative, group_size, keep, seed)
        y = F.linear(x_forward, weight, bias)
        # The weight serves only the input gradient: under autocast it is a copy, kept (as by
        # torch's linear) only when that gradient can come.
        ctx.save_for_backward(weight if ctx.needs_input_grad[0] else None, codes, stats)
        ctx.input_shape, ctx.has_bias, ctx.weight_dtype = input.shape, bias is not None, weight.dtype
        return y.reshape(*input.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        weight, codes, stats = ctx.saved_tensors
        g = grad_y.reshape(math.prod(ctx.input_shape[:-1]), grad_y.shape[-1])
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = (g @ weight).reshape(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            grad_weight = _weight_grad_output(
                ctx, ctx.code_format.weight_grad(g, codes, stats).to(ctx.weight_dtype), weight, grad_y)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0).to(ctx.weight_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


def _as_nchw(x: torch.Tensor, from_nhwc: bool) -> torch.Tensor:
    """x [N, C, H, W], or x [N, H, W, C] seen as [N, C, H, W] (channels_last) when from_nhwc."""
    return x.permute(0, 3, 1, 2) if from_nhwc else x


class _CodedConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, input_anchor, stride, padding, dilation, groups, save, eps,
                nonnegative, group_size, keep, seed):
        ctx.input_anchor = input_anchor
        # Rows of the code in the input's memory order: a channels_last input is coded as
        # [N, H * W * C] and the convolution sees (and returns) channels_last, as torch's does.
        to_nhwc = not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last)
        x = input.permute(0, 2, 3, 1) if to_nhwc else input.contiguous()
        x_forward, codes, stats, ctx.code_format = _encode(x.reshape(x.shape[0], math.prod(x.shape[1:])), save,
                                                           eps, nonnegative, group_size, keep, seed)
        y = F.conv2d(_as_nchw(x_forward.view(x.shape), to_nhwc), weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(weight, codes, stats)
        ctx.conv = (x.shape, to_nhwc, bias is not None, stride, padding, dilation, groups)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        weight, codes, stats = ctx.saved_tensors
        coded_shape, to_nhwc, has_bias, stride, padding, dilation, groups = ctx.conv
        needs = ctx.needs_input_grad
        # The input's values matter only for the weight gradient: dequantized whole, for the
        # duration of this call (convolution_backward has no tile-wise form to hook into); without
        # one, a stand-in of the input's shape, as torch.nn.grad.conv2d_input passes.
        if needs[1]:
            x_hat = ctx.code_format.dequantize(codes, stats, weight.dtype).view(coded_shape)
        else:
            x_hat = grad_y.new_empty(1).expand(coded_shape)
        x_hat = _as_nchw(x_hat, to_nhwc)
        grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_y, x_hat, weight, [weight.shape[0]] if has_bias else None, stride,
            padding, dilation, False, [0, 0], groups, [needs[0], needs[1], has_bias and needs[2]])
        if needs[1]:
            grad_weight = _weight_grad_output(ctx, grad_weight, weight, grad_y)
        return (grad_input, grad_weight, grad_bias) + (None,) * 11


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, save: str | None = None,
           *, eps: float = 0.01, nonnegative: bool | None = None, group_size: int = 256) -> torch.Tensor:
    """torch.nn.functional.linear that keeps ``save``'s code of ``input`` for backward.

    input (..., in_features) float32/bfloat16/float16, weight (out_features, in_features), bias
    (out_features,) of input's dtype and device -> (..., out_features). ``save``: None | "asa" |
    "int8" | "int4" | "int2" (see memkernels.compress); ``eps`` and ``nonnegative`` (None: detect
    with one reduction over input) apply to "asa", ``group_size`` (a multiple of 8) to "intk".
    """
    check_save(save, eps, nonnegative, group_size)
    if save is None:
        return F.linear(input, weight, bias)
    input, weight, bias = layer_inputs(input, weight, bias, 2, "(out_features, in_features)")
    if input.dim() == 0 or input.shape[-1] != weight.shape[-1]:
        raise ValueError(f"input must be (..., {weight.shape[-1]}) for weight {tuple(weight.shape)}, "
                         f"got {tuple(input.shape)}")
    keep = _keeps_codes(weight)
    return _CodedLinear.apply(input, weight, bias, _input_anchor(input, keep), save, eps, nonnegative, group_size,
                              keep, _draw_seed(save, weight))


def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1, save: str | None = None, *, eps: float = 0.01,
           nonnegative: bool | None = None, group_size: int = 256) -> torch.Tensor:
    """torch.nn.functional.conv2d (integer padding) that keeps ``save``'s code of ``input`` for
    backward; input (N, C, H, W) or (C, H, W), arguments as in :func:`linear`."""
    check_save(save, eps, nonnegative, group_size)
    if save is None:
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    if isinstance(padding, str):
        raise ValueError("conv2d with save needs integer padding; mk.nn.Conv2d turns 'same' / 'valid' "
                         "into explicit padding")
    input, weight, bias = layer_inputs(input, weight, bias, 4, "(out_channels, in_channels / groups, kh, kw)")
    if input.dim() not in (3, 4):
        raise ValueError(f"input must be (N, C, H, W) or (C, H, W), got shape {tuple(input.shape)}")
    pair = torch.nn.modules.utils._pair
    batched = input if input.dim() == 4 else input.unsqueeze(0)
    keep = _keeps_codes(weight)
    y = _CodedConv2d.apply(batched, weight, bias, _input_anchor(batched, keep), pair(stride), pair(padding),
                           pair(dilation), groups, save, eps, nonnegative, group_size, keep, _draw_seed(save, weight))
    return y if input.dim() == 4 else y.squeeze(0)
