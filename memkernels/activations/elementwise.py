"""Fused activations from any element-wise function written with torch ops (nested forward-AD).

One forward-mode pass (torch.func.jvp with tangent 1) gives fn(x) and fn'(x) together; backward
keeps only fn'(x), in x's dtype or as a packed k-bit code whose table is fitted to fn' once, on
first use. Under torch.compile the jvp's ops fuse into one kernel with the function itself.
"""
from __future__ import annotations

import functools

import torch

from memkernels import ops, reference
from memkernels.activations.autograd import check_floating_input, grad_from_kept, keep_for_backward
from memkernels.activations.spec import check_bits


def _value_and_derivative(fn, x):
    return torch.func.jvp(fn, (x,), (torch.ones_like(x),))


class _ExactFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn):
        y, d = _value_and_derivative(fn, x)
        ctx.save_for_backward(d)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        (d,) = ctx.saved_tensors
        return grad_out * d, None


class _CodedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn, bits, borders, levels):
        with torch.no_grad():
            y = fn(x)
        # The codes of the built-in activations' kernels, computed with torch ops for any fn.
        keep_for_backward(ctx, ops.pack_bits(reference.codes(x.detach(), borders), bits), bits, levels)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        return grad_from_kept(ctx, grad_out), None, None, None, None


class Elementwise(torch.nn.Module):
    """y = fn(x) for an element-wise ``fn`` made of differentiable torch ops, keeping for backward
    only fn'(x) (``bits=None``, exact, x's dtype) or a packed ``bits``-bit code of it.

    The code's table is fitted on first use to fn' under a standard-normal input density, like
    the built-in tables. ``fn`` must be element-wise: fn'(x) is taken as the jvp with tangent 1,
    which is the diagonal of the Jacobian only when each output depends on its own input alone.
    """

    def __init__(self, fn, bits: int | None = None):
        super().__init__()
        self.fn = fn
        self.bits = check_bits(bits) or None
        functools.update_wrapper(self, fn, updated=())

    def extra_repr(self) -> str:
        return f"fn={getattr(self.fn, '__name__', self.fn)!r}, bits={self.bits}"

    def table(self):
        """The fitted (borders, levels) Table of this function for ``bits``."""
        return _fitted_table(self.fn, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_floating_input("input", x)
        if self.bits is None:
            return _ExactFunction.apply(x, self.fn)
        borders, levels = _device_table(self.fn, self.bits, x.device)
        return _CodedFunction.apply(x, self.fn, self.bits, borders, levels)


@functools.lru_cache(maxsize=None)
def _fitted_table(fn, bits: int):
    from memkernels.activations.tables import fit_table
    return fit_table(lambda t: _value_and_derivative(fn, t)[1], fn, bits)


@torch.compiler.assume_constant_result  # torch.compile takes the table as a constant, untraced
def _device_table(fn, bits: int, device: torch.device):
    t = _fitted_table(fn, bits)
    return t.borders.to(device), t.levels.to(device)


def elementwise(fn=None, *, bits: int | None = None):
    """Wrap an element-wise function of torch ops into a fused activation (see Elementwise).

    Usable as ``mk.elementwise(fn, bits=3)`` or as a decorator ``@mk.elementwise(bits=3)``.
    """
    if fn is None:
        return lambda f: Elementwise(f, bits)
    return Elementwise(fn, bits)
