"""Autograd of the fused activations: forward keeps f'(x) (or its k-bit code) and nothing else.

The tables (borders, levels) travel as ctx attributes rather than through save_for_backward:
they are shared constants of a few hundred bytes, not per-call activations, so the bytes that
autograd keeps per call are exactly the derivative or the packed code.
"""
from __future__ import annotations

import torch

from memkernels import ops
from memkernels.activations.spec import TWO_VALUED, Activation, check_bits

_device_tables: dict = {}


@torch.compiler.assume_constant_result  # torch.compile takes the tables as constants, untraced
def device_table(act: int, bits: int, p0: float, p1: float, device: torch.device):
    """(borders, levels, value_levels) of activation `act` for `bits` on `device`, cached."""
    key = (int(act), bits, float(p0), float(p1), device)
    entry = _device_tables.get(key)
    if entry is None:
        from memkernels.activations.tables import get_table
        t = get_table(act, bits, p0, p1)
        entry = tuple(v.to(device) for v in (t.borders, t.levels, t.value_levels))
        _device_tables[key] = entry
    return entry


def effective_bits(act: int, bits) -> int:
    """The kernels' bits for a user's `bits`: ReLU and LeakyReLU always keep their exact 1 bit."""
    bits = check_bits(bits)
    return 1 if act in TWO_VALUED else bits


def keep_for_backward(ctx, saved: torch.Tensor, bits: int, levels) -> None:
    """Keep f'(x) (bits 0) or its packed code for :func:`grad_from_kept`."""
    ctx.save_for_backward(saved)
    ctx.bits, ctx.levels = bits, levels


def grad_from_kept(ctx, grad_out: torch.Tensor) -> torch.Tensor:
    """grad_out * f'(x), with f'(x) read back from what :func:`keep_for_backward` kept."""
    (saved,) = ctx.saved_tensors
    return ops.activation_backward(grad_out, saved, ctx.bits, ctx.levels)


class _ActivationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, act, p0, p1, bits, borders, levels):
        y, saved = ops.activation_forward(x, act, p0, p1, bits, borders)
        keep_for_backward(ctx, saved, bits, levels)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        return grad_from_kept(ctx, grad_out), None, None, None, None, None, None


class _GatedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, act, bits, borders, levels, value_levels):
        y, code = ops.gated_forward(a, b, act, bits, borders)
        if bits and b._base is not None:
            # b viewing a larger tensor (a half of [a, b]) would keep all of it alive: a's half too.
            b = b.clone(memory_format=torch.contiguous_format)
        ctx.save_for_backward(a if bits == 0 else code, b)
        ctx.act, ctx.bits, ctx.levels, ctx.value_levels = act, bits, levels, value_levels
        return y

    @staticmethod
    def backward(ctx, grad_out):
        saved_a, b = ctx.saved_tensors
        grad_a, grad_b = ops.gated_backward(grad_out, saved_a, b, ctx.act, ctx.bits, ctx.levels,
                                            ctx.value_levels)
        return grad_a, grad_b, None, None, None, None, None


def check_floating_input(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32, "
                        f"float64), got {t.dtype}")


def activation(x: torch.Tensor, act: Activation, p0: float = 0.0, p1: float = 0.0,
               bits: int | None = None) -> torch.Tensor:
    """y = f(x) for activation `act`, keeping for backward only f'(x): in x's dtype when bits is
    None, else a packed code of `bits` bits an element. Any shape; same shape and dtype out."""
    check_floating_input("input", x)
    bits = effective_bits(act, bits)
    borders = levels = None
    if bits:
        borders, levels, _ = device_table(act, bits, p0, p1, x.device)
    return _ActivationFunction.apply(x, int(act), float(p0), float(p1), bits, borders, levels)


def gated(a: torch.Tensor, b: torch.Tensor, act: Activation, bits: int | None = None) -> torch.Tensor:
    """y = f(a) * b (a, b of one shape and dtype), keeping (a, b) when bits is None and
    (k-bit code of a, b) otherwise; then grad_b uses the interval mean of f(a)."""
    check_floating_input("a", a)
    check_floating_input("b", b)
    bits = check_bits(bits)
    borders = levels = value_levels = None
    if bits:
        borders, levels, value_levels = device_table(act, bits, 0.0, 0.0, a.device)
    return _GatedFunction.apply(a, b, int(act), bits, borders, levels, value_levels)
