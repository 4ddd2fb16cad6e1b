"""Autograd of the fused activations: forward keeps f'(x) (or its k-bit code) and nothing else;
with bits=None, Sigmoid and Tanh keep y and Hardswish x instead (TORCH_BACKWARD), and the others
x where recomputing f'(x) costs less than writing and reading it (keeps_input). ReLU, LeakyReLU
and Hardsigmoid, whose f' takes two values, keep one exact bit whatever bits is.

The autograd nodes are C++ (csrc/autograd.cpp, the ops memkernels::activation and
memkernels::gated): a Python autograd.Function adds host time to every call, and on CUDA runs
Python on autograd's device thread in backward. They keep the derivative, the code, x or y as saved
tensors and the tables (levels) aside: shared constants of a few hundred bytes, not per-call
activations, so the bytes that autograd keeps per call are exactly the activation's.

Backward is once-differentiable: it multiplies by the kept f'(x), which has no f'' in it, so a
backward with ``create_graph=True`` (gradient penalties, Hessian-vector products) raises rather
than give a gradient whose own derivative would miss the f''(x) term. The exception is the exact
mode of TORCH_BACKWARD: its backward is torch's, twice differentiable as torch's is.

Calls that no gradient can need (``no_grad``, ``inference_mode``, an input that does not require
grad) compute y alone and keep nothing.
"""
from __future__ import annotations

import math

import torch

from memkernels import ops
from memkernels.activations.spec import TORCH_BACKWARD, TWO_VALUED, Activation, Keep, check_bits

_device_tables: dict = {}


def device_table(act: int, bits: int, p0: float, p1: float, device: torch.device):
    """(borders, levels, value_levels) of activation `act` for `bits` on `device`, cached.

    Under torch.compile the lookup is the op memkernels::activation_table, which takes p0, p1 as
    they come, symbolic floats included (dynamic=True makes a module's float attributes and a
    function's float defaults symbolic, and a Python-side lookup cannot key on those)."""
    if torch.compiler.is_compiling():
        return torch.ops.memkernels.activation_table(act, bits, p0, p1, device)
    return _cached_table(act, bits, p0, p1, device)


def _cached_table(act: int, bits: int, p0: float, p1: float, device: torch.device):
    key = (int(act), bits, _one_nan(p0), _one_nan(p1), torch.device(device))
    entry = _device_tables.get(key)
    if entry is None:
        from memkernels.activations.tables import get_table
        t = get_table(act, bits, p0, p1)
        entry = tuple(v.to(device) for v in (t.borders, t.levels, t.value_levels))
        _device_tables[key] = entry
    return entry


def _one_nan(p) -> float:
    """p as a float, every NaN as the one object math.nan: NaN != NaN, and a dict matches a key's
    own object first, so a NaN parameter finds its table instead of adding one each call."""
    p = float(p)
    return p if p == p else math.nan


@torch.library.custom_op("memkernels::activation_table", mutates_args=())
def _activation_table(act: int, bits: int, p0: float, p1: float,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The table of :func:`device_table` as an op, for torch.compile: copies (at most 256 floats
    each), so that no compiled graph holds or reuses the cached tensors' memory."""
    return tuple(t.clone() for t in _cached_table(act, bits, p0, p1, device))


@_activation_table.register_fake
def _(act, bits, p0, p1, device):
    torch._check(bits in (1, 2, 3, 4, 8), lambda: f"bits must be one of 1, 2, 3, 4, 8, got {bits}")
    n = 2 if act in TWO_VALUED else 2 ** bits  # their table is the exact 1-bit one whatever bits is
    return (torch.empty(n - 1, device=device), torch.empty(n, device=device),
            torch.empty(n, device=device))


def effective_bits(act: int, bits) -> int:
    """The kernels' bits for a user's `bits`: ReLU and LeakyReLU always keep their exact 1 bit."""
    bits = check_bits(bits)
    return 1 if act in TWO_VALUED else bits


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd would record a call on `tensors`: else only the forward values are needed."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def dense_order(*tensors: torch.Tensor):
    """The dims of the first tensor by decreasing stride when that permutation makes every tensor
    contiguous (a dense layout such as channels_last, shared by all), else None.

    The kernels run on x.permute(order), contiguous, and the outputs are permuted back: they then
    keep x's layout, as torch's element-wise ops do, and k-bit codes follow the order of the
    permuted view in forward and backward alike. Other layouts (overlapping, with gaps) are
    copied to a contiguous tensor by the ops and give contiguous outputs."""
    x = tensors[0]
    if x.dim() < 2 or x.is_contiguous():
        return None
    order = list(range(x.dim()))
    for i in range(1, len(order)):  # a stable insertion sort: torch.compile traces it (not sorted(key=))
        j = i
        while j > 0 and x.stride(order[j - 1]) < x.stride(order[j]):
            order[j - 1], order[j] = order[j], order[j - 1]
            j -= 1
    if all(t.permute(order).is_contiguous() for t in tensors):
        return order
    return None


def _inverse(order):
    inverse = [0] * len(order)
    for i, d in enumerate(order):
        inverse[d] = i
    return inverse


# Exact modes that keep x, the bytes of f'(x), and compute f'(x) from it in backward
# (activation_backward_from_input, with the forward's own f': torch's silu_backward, say, gives
# NaN at +-inf). Forward then writes y alone: an fp32 element moves 8 + 12 bytes forward and back,
# not 12 + 12, and allocates one output, as torch's does. On the CPU this pays where f' costs about
# what y does, one exp that both share: SiLU, Softplus and the ELUs; and for GELU's two forms in
# float32, whose 4-byte elements outweigh recomputing erf or tanh (in 16-bit floats the CPU spends
# more on that than on the bytes, and on Mish's extra exp in any dtype). On CUDA, where these
# kernels are bound by memory traffic, every one.
KEEPS_INPUT_ON_CPU = frozenset({Activation.SILU, Activation.SOFTPLUS, Activation.ELU, Activation.SELU,
                                Activation.CELU})
KEEPS_FLOAT32_INPUT_ON_CPU = frozenset({Activation.GELU, Activation.GELU_TANH})
# From this size on, every activation keeps x on the CPU too: glibc maps blocks of 32 MB and more
# fresh (its largest mmap threshold), so f'(x) would be one more output whose first touch faults
# in every page, and those faults cost more than recomputing f' (erf, tanh, Mish's exp and log1p).
FRESH_PAGES_BYTES = 32 << 20


def keeps_input(act: int, x: torch.Tensor) -> bool:
    """Whether the exact mode of `act` (one not in TORCH_BACKWARD or TWO_VALUED) keeps x, not f'(x)."""
    return (x.is_cuda or act in KEEPS_INPUT_ON_CPU
            or (x.dtype == torch.float32 and act in KEEPS_FLOAT32_INPUT_ON_CPU)
            or x.numel() * x.element_size() >= FRESH_PAGES_BYTES)


def check_floating_input(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32, "
                        f"float64), got {t.dtype}")


def activation(x: torch.Tensor, act: Activation, p0: float = 0.0, p1: float = 0.0,
               bits: int | None = None) -> torch.Tensor:
    """y = f(x) for activation `act`, keeping for backward only f'(x): in x's dtype when bits is
    None (or y, or x, of the same bytes, which f' is computed from exactly: Sigmoid, Tanh: y;
    Hardswish and keeps_input: x), else a packed code of `bits` bits an element (ReLU, LeakyReLU,
    Hardsigmoid: 1 exact bit in either case). Any shape; same shape and dtype out, and x's
    layout when it is dense (channels_last, a transpose). Where no gradient can be needed, y alone
    is computed (the same values) and nothing is kept."""
    check_floating_input("input", x)
    kernel_bits = effective_bits(act, bits)
    order = dense_order(x)
    if order is not None:
        x = x.permute(order)
    if not needs_grad(x):
        y = ops.activation_value(x, int(act), p0, p1)
    elif kernel_bits == 0 and (act in TORCH_BACKWARD or keeps_input(act, x)):
        # x must be contiguous: a strided x would keep its whole base alive. Its copy is made here,
        # where autograd records it (for the second backward of TORCH_BACKWARD's).
        keep = Keep.TORCH if act in TORCH_BACKWARD else Keep.INPUT
        y = ops.activation(x.contiguous(), int(act), p0, p1, 0, int(keep), None, None)
    else:
        borders = levels = None
        if kernel_bits:
            borders, levels, _ = device_table(int(act), kernel_bits, p0, p1, x.device)
        y = ops.activation(x, int(act), p0, p1, kernel_bits, int(Keep.DERIVATIVE), borders, levels)
    return y if order is None else y.permute(_inverse(order))


def gated(a: torch.Tensor, b: torch.Tensor, act: Activation, bits: int | None = None) -> torch.Tensor:
    """y = f(a) * b (a, b of one shape and dtype), keeping (a, b) when bits is None and
    (k-bit code of a, b) otherwise; then grad_b uses the interval mean of f(a). y keeps the
    layout of a and b when they share a dense one."""
    check_floating_input("a", a)
    check_floating_input("b", b)
    bits = check_bits(bits)
    order = dense_order(a, b) if a.shape == b.shape else None
    b_is_view = b._base is not None
    if order is not None:
        a, b = a.permute(order), b.permute(order)
    if not needs_grad(a, b):
        y, _ = ops.gated_forward(a, b, int(act), 0, None)
    else:
        borders = levels = value_levels = None
        if bits:
            borders, levels, value_levels = device_table(int(act), bits, 0.0, 0.0, a.device)
        y = ops.gated(a, b, int(act), bits, b_is_view, borders, levels, value_levels)
    return y if order is None else y.permute(_inverse(order))
