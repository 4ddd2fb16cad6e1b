"""Which activations exist, their ids shared with the C++/Triton kernels, and their parameters.

The integer ids are part of the op schemas (``activation: int``) and must match
``enum class Activation`` in csrc/activations.h. Every activation takes at most two float
parameters ``p0, p1``; their meaning per activation is listed in ``PARAMS``. Also the rule that
every fused activation's backward shares, once_differentiable, with its error.
"""
from __future__ import annotations

import enum
import functools
import numbers

import torch

VALID_BITS = (1, 2, 3, 4, 8)


class Activation(enum.IntEnum):
    RELU = 0
    LEAKY_RELU = 1  # p0 = negative_slope
    GELU = 2  # erf form
    GELU_TANH = 3
    SILU = 4
    MISH = 5
    SOFTPLUS = 6  # p0 = beta, p1 = threshold
    ELU = 7  # p0 = alpha
    SELU = 8
    CELU = 9  # p0 = alpha
    SIGMOID = 10
    TANH = 11
    HARDSWISH = 12
    HARDSIGMOID = 13


# Parameter names (in p0, p1 order) and torch's defaults.
PARAMS: dict[Activation, tuple[tuple[str, float], ...]] = {
    Activation.LEAKY_RELU: (("negative_slope", 0.01),),
    Activation.SOFTPLUS: (("beta", 1.0), ("threshold", 20.0)),
    Activation.ELU: (("alpha", 1.0),),
    Activation.CELU: (("alpha", 1.0),),
}

# Activations whose derivative takes two values: kept in 1 exact bit whatever `bits` says.
TWO_VALUED = (Activation.RELU, Activation.LEAKY_RELU, Activation.HARDSIGMOID)

# Activations whose code is that of -|x|, not x: Hardsigmoid's f' is 1/6 on (-3, 3) and 0 outside
# (and at +-3 and NaN), which one border, -3, on -|x| codes exactly in one bit.
CODES_NEGATED_MAGNITUDE = (Activation.HARDSIGMOID,)

# Exact mode of the activations whose f' costs less to recompute than to write: they keep what
# torch keeps, the output (Sigmoid: f' = y (1 - y), Tanh: 1 - y^2) or the input (Hardswish), the
# same bytes as f'(x), so forward writes y alone; backward is torch's own, twice differentiable.
# Maps the activation to (keeps the output, torch's backward op); csrc/autograd.cpp calls the same.
TORCH_BACKWARD = {
    Activation.SIGMOID: (True, torch.ops.aten.sigmoid_backward),
    Activation.TANH: (True, torch.ops.aten.tanh_backward),
    Activation.HARDSWISH: (False, torch.ops.aten.hardswish_backward),
}


class Keep(enum.IntEnum):
    """What the op memkernels::activation keeps for backward (its `keep` argument)."""
    DERIVATIVE = 0  # activation_forward's saved: f'(x), or its packed code with bits > 0
    INPUT = 1  # x; backward computes f'(x) from it (activation_backward_from_input)
    TORCH = 2  # what torch keeps (TORCH_BACKWARD); backward is torch's op


# The activations that may gate a GLU: y = f(a) * b.
GATES = (Activation.SILU, Activation.GELU, Activation.GELU_TANH)

# The error of a backward with create_graph=True through the fused activations, whose backward
# multiplies by the kept f'(x) and has no f'' in it (once_differentiable below; the C++ nodes of
# csrc/autograd.cpp get this text from memkernels.ops).
SECOND_DERIVATIVE_ERROR = (
    "memkernels' fused activations keep only f'(x) for backward, so they have no second derivative: "
    "a backward with create_graph=True (gradient penalties, Hessian-vector products, MAML) through "
    "mk.functional / mk.nn activations or mk.elementwise is not supported. Use torch's activation "
    "where a second derivative is needed (mk.convert(..., exclude=...) leaves chosen modules alone); "
    "exact (bits=None) Sigmoid, Tanh and Hardswish keep what torch keeps and have one.")

def once_differentiable(backward):
    """Mark an autograd.Function's backward as having no derivative itself: it raises
    SECOND_DERIVATIVE_ERROR when called with create_graph=True (the engine turns grad mode on in
    backward exactly then).

    torch.autograd.function.once_differentiable raises only later, and only on a path through a
    grad_out that requires grad. A gradient of ``y.sum()`` has none, yet it depends on x through
    f''(x): a second derivative taken from it with respect to x would silently miss that term."""

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        if torch.is_grad_enabled():
            raise RuntimeError(SECOND_DERIVATIVE_ERROR)
        return backward(ctx, *grad_outputs)

    return wrapper


SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


def default_params(act: Activation) -> tuple[float, float]:
    """(p0, p1) at torch's defaults; unused slots are 0."""
    values = [v for _, v in PARAMS.get(act, ())]
    return tuple(values + [0.0] * (2 - len(values)))  # type: ignore[return-value]


def check_bits(bits) -> int:
    """Map the user's ``bits`` (None or 1, 2, 3, 4, 8) to the kernels' int (0 = exact)."""
    if bits is None:
        return 0
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise ValueError(f"bits must be None or one of {VALID_BITS}, got {bits!r}")
    return bits


def check_param(name: str, value) -> None:
    """An activation's float parameter (alpha, beta, ...): a real number (a symbolic one under
    torch.compile, or a one-element tensor, which the op reads as a float)."""
    if isinstance(value, bool) or not (isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat))
                                       or (isinstance(value, torch.Tensor) and value.numel() == 1)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes of a k-bit code of `numel` elements: groups of 8 elements take `bits` bytes."""
    return (numel + 7) // 8 * bits
