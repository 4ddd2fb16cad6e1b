"""Triton kernels of every op in csrc/ops.cpp: fused activations that keep f'(x) for backward.

The host functions here have the ops' signatures and return values (memkernels/ops/_cuda.py
registers them as the CUDA kernels of torch.ops.memkernels.*); memkernels/reference.py is their
specification:

    activation_forward(x, activation, p0, p1, bits, borders) -> (y, saved)
        y = f(x) in x's dtype; saved = f'(x) in x's dtype (bits == 0) or the packed k-bit code of
        x (Hardsigmoid: -|x|) among `borders`, (ceil(numel / 8) * bits,) uint8
    activation_backward(grad_out, saved, bits, levels) -> grad_out * f'(x)  (f' = levels[code])
    activation_backward_from_input(grad_out, x, activation, p0, p1) -> grad_out * f'(x)
    gated_forward(a, b, activation, bits, borders) -> (f(a) * b, code of a or empty uint8)
    gated_backward(grad_out, saved_a, b, activation, bits, levels, value_levels)
        -> (g * b * f'(a), g * f(a))
    pack_bits(codes, bits) -> packed ; unpack_bits(packed, bits, numel) -> codes

Every kernel works on [BLOCK_GROUPS, 8] tiles of the flattened tensors, one row a group of the
packed layout, so the forward packs codes straight from registers and the backward unpacks
them without a uint8 code tensor in between. One kernel covers every activation: the activation
is a constexpr, so each (activation, bits) pair compiles to its own straight-line code.

Math is in float32 (float64 for float64 tensors), as in the reference. Only exp, log and erf
are used, because those are what triton.language offers on GPU and under the CPU interpreter
alike (libdevice's tanh/expm1/log1p do not run in the interpreter): expm1, log1p and tanh are
built from them below, accurate near 0. The kernels call no @triton.jit function of triton's
own standard library (tl.sum, tl.zeros, tl.sigmoid): those fail under the interpreter when
triton was imported before TRITON_INTERPRET was set, and tests reload this module then.
"""
from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from memkernels.activations.spec import Activation, packed_nbytes
from memkernels.activations.spec import SELU_ALPHA as _SELU_ALPHA
from memkernels.activations.spec import SELU_SCALE as _SELU_SCALE
from memkernels.ops._checks import (check_activation_backward, check_activation_backward_from_input,
                                    check_activation_forward, check_activation_value, check_gated_backward,
                                    check_gated_forward, check_pack_bits, check_unpack_bits)
from memkernels.triton.pack import (BLOCK_GROUPS, cdiv, group_offsets, pack_bits_kernel,
                                    pack_groups, unpack_bits_kernel, unpack_groups)

RELU = tl.constexpr(int(Activation.RELU))
LEAKY_RELU = tl.constexpr(int(Activation.LEAKY_RELU))
GELU = tl.constexpr(int(Activation.GELU))
GELU_TANH = tl.constexpr(int(Activation.GELU_TANH))
SILU = tl.constexpr(int(Activation.SILU))
MISH = tl.constexpr(int(Activation.MISH))
SOFTPLUS = tl.constexpr(int(Activation.SOFTPLUS))
ELU = tl.constexpr(int(Activation.ELU))
SELU = tl.constexpr(int(Activation.SELU))
CELU = tl.constexpr(int(Activation.CELU))
SIGMOID = tl.constexpr(int(Activation.SIGMOID))
TANH = tl.constexpr(int(Activation.TANH))
HARDSWISH = tl.constexpr(int(Activation.HARDSWISH))
HARDSIGMOID = tl.constexpr(int(Activation.HARDSIGMOID))

SELU_ALPHA = tl.constexpr(_SELU_ALPHA)
SELU_SCALE = tl.constexpr(_SELU_SCALE)
SQRT1_2 = tl.constexpr(0.70710678118654752440)
INV_SQRT_2PI = tl.constexpr(0.39894228040143267794)
SQRT_2_OVER_PI = tl.constexpr(0.79788456080286535588)
GELU_TANH_CUBIC = tl.constexpr(0.044715)
INF = tl.constexpr(float("inf"))


@triton.jit
def _expm1(x):
    # Where exp(x) - 1 cancels (|x| < 0.5), Kahan's (u - 1) * x / log(u) with u = exp(x) rounded:
    # the rounding error of u cancels between numerator and log(u).
    u = tl.exp(x)
    um1 = u - 1.0
    small = tl.where(u == 1.0, x, um1 * (x / tl.log(u)))
    return tl.where(tl.abs(x) < 0.5, small, um1)


@triton.jit
def _log1p(x):
    # Kahan's log(u) * x / (u - 1) with u = 1 + x rounded, where log(1 + x) would cancel.
    u = 1.0 + x
    small = tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))
    return tl.where(tl.abs(x) < 0.5, small, tl.log(u))


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh(-|x|) = expm1(-2|x|) / (2 + expm1(-2|x|)): no overflow, no cancellation near 0. -|x|
    # is x itself at +-0.0 (a select, not -abs), and _expm1 keeps it: tanh(+-0.0) = +-0.0, as torch's.
    e = _expm1(2.0 * tl.where(x > 0, -x, x))
    t = e / (2.0 + e)
    return tl.where(x > 0, -t, t)


@triton.jit
def _softplus(x, beta, threshold):
    bx = x * beta
    return tl.where(bx > threshold, x, _log1p(tl.exp(bx)) / beta)


@triton.jit
def _finite(x, big):
    # torch.nan_to_num(x, posinf=big, neginf=-big) without touching NaN: derivatives at +-inf
    # are their finite limits, evaluated at +-big.
    return tl.where(tl.abs(x) == INF, tl.where(x > 0, big, -big), x)


@triton.jit
def _clamp(x, lo, hi):
    # torch.clamp: NaN stays NaN (both comparisons are false).
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _value_and_derivative(x, p0, p1, ACT: tl.constexpr):
    """(f(x), f'(x)) of activation ACT in x's (compute) dtype; f'(NaN) = NaN, f'(+-inf) finite.

    The formulas are memkernels/reference.py's, term by term; unused results are dropped by the
    compiler. Constants multiply from the right: the interpreter keeps `constexpr * tensor` a
    constexpr, which math functions then reject.
    """
    zero = tl.full(x.shape, 0, x.dtype)
    one = zero + 1.0
    if ACT == RELU:
        value = tl.where(x < 0, zero, x)  # -0.0 and NaN (not < 0) pass through, as torch's
        deriv = tl.where(x > 0, one, zero)
    elif ACT == LEAKY_RELU:
        value = tl.where(x > 0, x, x * p0)
        deriv = tl.where(x > 0, one, one * p0)
    elif ACT == GELU:
        value = 0.5 * x * (1.0 + tl.math.erf(x * SQRT1_2))
        xf = _finite(x, 40.0)
        cdf = 0.5 * (1.0 + tl.math.erf(xf * SQRT1_2))
        pdf = tl.exp(-0.5 * xf * xf) * INV_SQRT_2PI
        deriv = cdf + xf * pdf
    elif ACT == GELU_TANH:
        value = 0.5 * x * (1.0 + _tanh((x + x * x * x * GELU_TANH_CUBIC) * SQRT_2_OVER_PI))
        # 0.5 (1 + t) + 0.5 x (1 - t^2) u' with t = tanh(u), as s + 2 x s s' u' with
        # s = sigmoid(2u) = (1 + t) / 2 and s' = sigmoid(-2u) = (1 - t) / 2: 1 + t cancels where
        # x ~ -4 and 1 - t where x ~ 4, and an error of 1e-7 there (a GPU's exp, an ulp of t)
        # is 1e-6 of the gradient. e = exp(-2|u|) in (0, 1] gives both without overflow.
        xf = _finite(x, 40.0)
        two_u = (xf + xf * xf * xf * GELU_TANH_CUBIC) * (2.0 * SQRT_2_OVER_PI)
        e = tl.exp(-tl.abs(two_u))
        big = 1.0 / (1.0 + e)
        small = e * big
        s = tl.where(two_u >= 0, big, small)
        s_neg = tl.where(two_u >= 0, small, big)
        inner_slope = (1.0 + xf * xf * (3.0 * GELU_TANH_CUBIC)) * SQRT_2_OVER_PI
        deriv = s + 2.0 * xf * s * s_neg * inner_slope
    elif ACT == SILU:
        value = x * _sigmoid(x)
        xf = _finite(x, 100.0)
        s = _sigmoid(xf)
        deriv = s * (1.0 + xf * (1.0 - s))
    elif ACT == MISH:
        value = x * _tanh(_softplus(x, 1.0, 20.0))
        xf = _finite(x, 100.0)
        t = _tanh(_softplus(xf, 1.0, 20.0))
        deriv = t + xf * _sigmoid(xf) * (1.0 - t * t)
    elif ACT == SOFTPLUS:
        value = _softplus(x, p0, p1)
        deriv = tl.where(x * p0 > p1, one, _sigmoid(x * p0))
    elif ACT == ELU:
        value = tl.where(x < 0, p0 * _expm1(x), x)  # x at +-0.0: torch's signed zero
        deriv = tl.where(x > 0, one, p0 * tl.exp(x))
    elif ACT == SELU:
        value = tl.where(x < 0, _expm1(x) * SELU_ALPHA, x) * SELU_SCALE
        deriv = tl.where(x > 0, one, tl.exp(x) * SELU_ALPHA) * SELU_SCALE
    elif ACT == CELU:
        value = tl.where(x < 0, p0 * _expm1(x / p0), x)
        deriv = tl.where(x > 0, one, tl.exp(x / p0))
    elif ACT == SIGMOID:
        value = _sigmoid(x)
        deriv = value * (1.0 - value)
    elif ACT == TANH:
        value = _tanh(x)
        deriv = 1.0 - value * value
    elif ACT == HARDSWISH:
        value = x * _clamp(x + 3.0, 0.0, 6.0) / 6.0
        deriv = tl.where(x <= -3.0, zero, tl.where(x < 3.0, x / 3.0 + 0.5, one))
    else:
        tl.static_assert(ACT == HARDSIGMOID, "unknown activation id")
        value = _clamp(x + 3.0, 0.0, 6.0) / 6.0
        deriv = tl.where((x > -3.0) & (x < 3.0), one / 6.0, zero)
    return value, tl.where(x != x, x, deriv)


@triton.jit
def _codes(x, borders_ptr, BITS: tl.constexpr):
    """#{j : borders[j] < x} (int32) for float32 or float64 x (float32 borders are compared
    exactly with either); NaN compares false everywhere and gets 0."""
    code = tl.full(x.shape, 0, tl.int32)
    if BITS <= 4:
        # At most 15 borders: compare with each, loaded once a program as a scalar.
        for j in tl.static_range((1 << BITS) - 1):
            code += (tl.load(borders_ptr + j) < x).to(tl.int32)
    else:
        # 255 borders: binary search, BITS gathers. `code` is the count so far; probing
        # borders[code + half - 1] decides whether the next `half` borders are all below x.
        for step in tl.static_range(BITS):
            probe = code + (1 << (BITS - 1 - step))
            code = tl.where(tl.load(borders_ptr + probe - 1) < x, probe, code)
    return code


@triton.jit
def _to_compute(x, FP64: tl.constexpr):
    # tl.cast, not x.to: x may be a float kernel argument, a Python float under the interpreter.
    if FP64:
        return tl.cast(x, tl.float64)
    else:
        return tl.cast(x, tl.float32)


@triton.jit
def _forward_kernel(x_ptr, b_ptr, y_ptr, deriv_ptr, packed_ptr, borders_ptr, numel, num_groups,
                    p0_hi, p0_lo, p1_hi, p1_lo, ACT: tl.constexpr, BITS: tl.constexpr,
                    GATED: tl.constexpr, FP64: tl.constexpr, SAVE: tl.constexpr, BLOCK_GROUPS: tl.constexpr):
    """y = f(x) (GATED: f(x) * b); with SAVE, also: BITS == 0 and not GATED: deriv = f'(x);
    BITS > 0: packed code.

    Pointers a configuration does not use are passed as x and never read.
    """
    groups, elements = group_offsets(tl.program_id(0), BLOCK_GROUPS)
    mask = elements < numel
    x_in = tl.load(x_ptr + elements, mask=mask, other=0.0)
    x = _to_compute(x_in, FP64)
    # A float kernel argument is float32; float64 parameters come as hi + lo float32 parts.
    p0 = _to_compute(p0_hi, FP64) + _to_compute(p0_lo, FP64)
    p1 = _to_compute(p1_hi, FP64) + _to_compute(p1_lo, FP64)
    value, deriv = _value_and_derivative(x, p0, p1, ACT)
    if GATED:
        value = value * _to_compute(tl.load(b_ptr + elements, mask=mask, other=0.0), FP64)
    tl.store(y_ptr + elements, value.to(y_ptr.dtype.element_ty), mask=mask)
    if not SAVE:
        pass
    elif BITS == 0:
        if not GATED:
            tl.store(deriv_ptr + elements, deriv.to(deriv_ptr.dtype.element_ty), mask=mask)
    else:
        # Codes compare x (Hardsigmoid: -|x|) exactly, in float64 for float64, with float32
        # borders, as reference.activation_codes does.
        if ACT == HARDSIGMOID:
            code_input = -tl.abs(x)
        else:
            code_input = x
        code = tl.where(mask, _codes(code_input, borders_ptr, BITS), 0)
        pack_groups(code, packed_ptr, groups, groups < num_groups, BITS)


@triton.jit
def _backward_kernel(grad_ptr, saved_ptr, b_ptr, levels_ptr, value_levels_ptr, grad_in_ptr,
                     grad_b_ptr, numel, num_groups, p0_hi, p0_lo, p1_hi, p1_lo, ACT: tl.constexpr,
                     BITS: tl.constexpr, GATED: tl.constexpr, FROM_INPUT: tl.constexpr,
                     FP64: tl.constexpr, GRAD_BROADCAST: tl.constexpr, BLOCK_GROUPS: tl.constexpr):
    """grad_in = g * f'(x) (GATED: grad_in = g * b * f'(a), grad_b = g * f(a)); not gated with
    BITS > 0, 0 where the level is 0.

    g is grad's elements, or with GRAD_BROADCAST its one element, the same for all (grad an
    expanded scalar: see _broadcasts_one_value). BITS == 0: saved is f'(x) itself, or x
    (FROM_INPUT; GATED: a), f' then computed from it with parameters p0, p1; BITS > 0: saved is
    the packed code and f', f are levels[code], value_levels[code]. Unused pointers are passed as
    grad and never read.
    """
    groups, elements = group_offsets(tl.program_id(0), BLOCK_GROUPS)
    mask = elements < numel
    if GRAD_BROADCAST:
        g = _to_compute(tl.load(grad_ptr), FP64)
    else:
        g = _to_compute(tl.load(grad_ptr + elements, mask=mask, other=0.0), FP64)
    if BITS == 0:
        saved = _to_compute(tl.load(saved_ptr + elements, mask=mask, other=0.0), FP64)
        if GATED or FROM_INPUT:
            p0 = _to_compute(p0_hi, FP64) + _to_compute(p0_lo, FP64)
            p1 = _to_compute(p1_hi, FP64) + _to_compute(p1_lo, FP64)
            value, deriv = _value_and_derivative(saved, p0, p1, ACT)
        else:
            deriv = saved
    else:
        # Masked groups unpack to code 0, always a valid index into the tables.
        code = unpack_groups(saved_ptr, groups, groups < num_groups, BITS)
        deriv = _to_compute(tl.load(levels_ptr + code), FP64)
        if GATED:
            value = _to_compute(tl.load(value_levels_ptr + code), FP64)
    if GATED:
        b = _to_compute(tl.load(b_ptr + elements, mask=mask, other=0.0), FP64)
        grad_in = g * b * deriv
        tl.store(grad_in_ptr + elements, grad_in.to(grad_in_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_b_ptr + elements, (g * value).to(grad_b_ptr.dtype.element_ty), mask=mask)
    else:
        grad_in = g * deriv
        if BITS > 0:
            # A zero level is a zero gradient, inf or NaN in g too (torch's ReLU backward).
            grad_in = tl.where(deriv == 0.0, 0.0, grad_in)
        tl.store(grad_in_ptr + elements, grad_in.to(grad_in_ptr.dtype.element_ty), mask=mask)


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _interpreted() -> bool:
    # Kernels decorated while TRITON_INTERPRET=1 run on CPU tensors through the interpreter.
    return not isinstance(_forward_kernel, triton.runtime.JITFunction)


def _runs_on(device: torch.device) -> bool:
    """Whether these kernels take tensors on `device`: CUDA, or the CPU under the interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and _interpreted())


def _check_runs_on(t, name):
    """t is on a device these kernels run on (the op's checks, memkernels/ops/_checks.py, come first)."""
    torch._check(_runs_on(t.device),
                 lambda: f"{name} must be a CUDA tensor (CPU tensors run these Triton kernels only under "
                         f"TRITON_INTERPRET=1), got {t.device}")


def _packed_input(t):
    """Contiguous and 8-byte aligned: kernels read a group's packed bytes as one word."""
    t = t.contiguous()
    return t if t.data_ptr() % 8 == 0 else t.clone()


def _to_float32(p: float) -> float:
    """p rounded to the nearest float32 (inf beyond its range), as torch rounds it; by struct, about
    a fifteenth of a torch.tensor's host time, which a small tensor's call paid four times."""
    try:
        return struct.unpack("f", struct.pack("f", p))[0]
    except OverflowError:
        return math.copysign(math.inf, p)


def _split_float(p: float) -> tuple[float, float]:
    # p = hi + lo with hi, lo float32: exact enough for float64 math, exactly hi for float32.
    hi = _to_float32(p)
    return hi, _to_float32(p - hi)


def _grid(numel: int) -> tuple[int]:
    return (cdiv(cdiv(numel, 8), BLOCK_GROUPS),)


def _forward(x, b, activation, p0, p1, bits, borders, gated, save=True):
    numel = x.numel()
    y = torch.empty_like(x)
    if bits == 0:
        saved = torch.empty(0, dtype=torch.uint8, device=x.device) if gated or not save else torch.empty_like(x)
    else:
        saved = torch.empty(packed_nbytes(numel, bits), dtype=torch.uint8, device=x.device)
    if numel:
        p0_hi, p0_lo = _split_float(p0)
        p1_hi, p1_lo = _split_float(p1)
        _forward_kernel[_grid(numel)](
            x, x if b is None else b, y, saved if bits == 0 and not gated else x,
            saved if bits else x, x if borders is None else borders.contiguous(),
            numel, cdiv(numel, 8), p0_hi, p0_lo, p1_hi, p1_lo, ACT=activation, BITS=bits,
            GATED=gated, FP64=x.dtype == torch.float64, SAVE=save, BLOCK_GROUPS=BLOCK_GROUPS)
    return y, saved


def _broadcasts_one_value(t) -> bool:
    """Whether t holds one value broadcast to every element: each dim of more than one element
    has stride 0 (an expanded scalar, what autograd hands the activation's backward for y.sum()).
    The backward kernel reads such a gradient as that one value, where a contiguous copy would
    allocate a full-size tensor that torch's own backward does not."""
    return t.numel() > 0 and all(size == 1 or stride == 0 for size, stride in zip(t.shape, t.stride()))


def _backward(grad_out, saved, b, activation, bits, levels, value_levels, gated, from_input=False,
              p0=0.0, p1=0.0):
    """The backward kernel's outputs, contiguous; grad_out is contiguous or broadcasts one value,
    every other tensor is contiguous."""
    broadcast = _broadcasts_one_value(grad_out)
    if not broadcast:
        grad_out = grad_out.contiguous()
    numel = grad_out.numel()
    grad_in = torch.empty(grad_out.shape, dtype=grad_out.dtype, device=grad_out.device)
    grad_b = torch.empty_like(grad_in) if gated else None
    if numel:
        p0_hi, p0_lo = _split_float(p0)
        p1_hi, p1_lo = _split_float(p1)
        _backward_kernel[_grid(numel)](
            grad_out, saved, grad_out if b is None else b,
            grad_out if levels is None else levels.contiguous(),
            grad_out if value_levels is None else value_levels.contiguous(),
            grad_in, grad_out if grad_b is None else grad_b, numel, cdiv(numel, 8),
            p0_hi, p0_lo, p1_hi, p1_lo, ACT=activation, BITS=bits, GATED=gated, FROM_INPUT=from_input,
            FP64=grad_out.dtype == torch.float64, GRAD_BROADCAST=broadcast, BLOCK_GROUPS=BLOCK_GROUPS)
    return grad_in, grad_b


def activation_forward(x, activation, p0, p1, bits, borders):
    """(f(x), saved): saved = f'(x) in x's dtype and shape (bits == 0) or the packed code of x,
    (ceil(numel / 8) * bits,) uint8, code = #{borders < x} (Hardsigmoid: < -|x|) for borders
    (2**bits - 1,) float32."""
    check_activation_forward(x, activation, bits, borders)
    _check_runs_on(x, "x")
    return _forward(x.contiguous(), None, int(activation), float(p0), float(p1), bits, borders,
                    gated=False)


def activation_value(x, activation, p0, p1):
    """f(x) alone, the values of activation_forward: for calls no gradient can need."""
    check_activation_value(x, activation)
    _check_runs_on(x, "x")
    return _forward(x.contiguous(), None, int(activation), float(p0), float(p1), 0, None, gated=False,
                    save=False)[0]


def activation_backward(grad_out, saved, bits, levels):
    """grad_out * f'(x): f'(x) = saved (bits == 0) or levels[code] (levels (2**bits,) float32)."""
    check_activation_backward(grad_out, saved, bits, levels)
    _check_runs_on(grad_out, "grad_out")
    saved = _packed_input(saved) if bits else saved.contiguous()
    return _backward(grad_out, saved, None, 0, bits, levels, None, gated=False)[0]


def activation_backward_from_input(grad_out, x, activation, p0, p1):
    """grad_out * f'(x), f'(x) computed from x as activation_forward computes it."""
    check_activation_backward_from_input(grad_out, x, activation)
    _check_runs_on(grad_out, "grad_out")
    return _backward(grad_out, x.contiguous(), None, int(activation), 0, None, None,
                     gated=False, from_input=True, p0=float(p0), p1=float(p1))[0]


def gated_forward(a, b, activation, bits, borders):
    """(f(a) * b, code): code is a's packed code (bits > 0) or an empty uint8 tensor (bits == 0)."""
    check_gated_forward(a, b, activation, bits, borders)
    _check_runs_on(a, "a")
    return _forward(a.contiguous(), b.contiguous(), int(activation), 0.0, 0.0, bits, borders,
                    gated=True)


def gated_backward(grad_out, saved_a, b, activation, bits, levels, value_levels):
    """(g * b * f'(a), g * f(a)); saved_a is a itself (bits == 0) or its packed code, then
    f'(a), f(a) are levels[code], value_levels[code] ((2**bits,) float32 each)."""
    check_gated_backward(grad_out, saved_a, b, activation, bits, levels, value_levels)
    _check_runs_on(grad_out, "grad_out")
    saved_a = _packed_input(saved_a) if bits else saved_a.contiguous()
    return _backward(grad_out, saved_a, b.contiguous(), int(activation), bits,
                     levels, value_levels, gated=True)


def pack_bits(codes, bits):
    """Pack uint8 codes (read flattened; values < 2**bits) into (ceil(numel / 8) * bits,) uint8.

    Bits of a code at or above `bits` are dropped rather than spilled into its neighbours.
    """
    check_pack_bits(codes, bits)
    _check_runs_on(codes, "codes")
    codes = codes.contiguous()
    numel = codes.numel()
    packed = torch.empty(packed_nbytes(numel, bits), dtype=torch.uint8, device=codes.device)
    if numel:
        pack_bits_kernel[_grid(numel)](codes, packed, numel, cdiv(numel, 8), BITS=bits,
                                       BLOCK_GROUPS=BLOCK_GROUPS)
    return packed


def unpack_bits(packed, bits, numel):
    """The first `numel` codes of a packed k-bit code, (numel,) uint8."""
    check_unpack_bits(packed, bits, numel)
    _check_runs_on(packed, "packed")
    codes = torch.empty(numel, dtype=torch.uint8, device=packed.device)
    if numel:
        unpack_bits_kernel[_grid(numel)](_packed_input(packed), codes, numel,
                                         cdiv(numel, 8), BITS=bits,
                                         BLOCK_GROUPS=BLOCK_GROUPS)
    return codes
