"""Fused activations from any element-wise function written with torch ops (nested forward-AD).

One forward-mode pass (torch.func.jvp with tangent 1) gives fn(x) and fn'(x) together; backward
keeps only fn'(x), in x's dtype or as a packed k-bit code whose table is fitted to fn' once, on
first use. Under torch.compile the jvp's ops fuse into one kernel with the function itself.
"""
from __future__ import annotations

import copy
import functools
import itertools
import weakref

import torch

from memkernels import ops, reference
from memkernels.activations.autograd import check_floating_input, needs_grad
from memkernels.activations.spec import check_bits, once_differentiable


def _value_and_derivative(fn, x):
    if any(stride == 0 and size > 1 for stride, size in zip(x.stride(), x.shape)):
        x = x.contiguous()  # jvp writes its tangent in x's layout, which an expanded x cannot hold
    return torch.func.jvp(fn, (x,), (torch.ones_like(x),))


def _no_other_grads(fn, *outputs) -> None:
    """fn's outputs on a detached x must not require grad: if they do, fn uses parameters or
    captured tensors that require grad, whose gradients fn'(x) alone cannot give."""
    if any(t.requires_grad for t in outputs):
        raise RuntimeError(
            f"mk.elementwise({_name(fn)}): fn uses tensors that require grad besides its input "
            "(parameters, or tensors it captures); mk.elementwise keeps only fn'(x) for backward, "
            "so their gradients cannot be computed. Freeze them (requires_grad_(False)), or call fn "
            "itself where they must train.")


def _same_shape(fn, x, y) -> None:
    if not isinstance(y, torch.Tensor) or not y.is_floating_point():
        got = y.dtype if isinstance(y, torch.Tensor) else type(y).__name__
        raise TypeError(f"mk.elementwise({_name(fn)}): fn must return a floating-point tensor, got {got}")
    if y.shape != x.shape:
        raise ValueError(f"mk.elementwise({_name(fn)}): fn must be element-wise, but it maps an input "
                         f"of shape {tuple(x.shape)} to {tuple(y.shape)}")


def _name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


class _ExactFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn):
        # With grad on here, a fn that uses tensors requiring grad gives outputs that require it;
        # on a detached x nothing else does, and no graph is built.
        with torch.enable_grad():
            y, d = _value_and_derivative(fn, x.detach())
        _no_other_grads(fn, y, d)
        _same_shape(fn, x, y)
        ctx.save_for_backward(d)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (d,) = ctx.saved_tensors
        return grad_out * d, None


class _CodedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn, bits, borders, levels):
        with torch.enable_grad():
            y = fn(x.detach())
        _no_other_grads(fn, y)
        _same_shape(fn, x, y)
        # The codes of the built-in activations' kernels, computed with torch ops for any fn.
        ctx.save_for_backward(ops.pack_bits(reference.codes(x.detach(), borders), bits))
        ctx.bits, ctx.levels = bits, levels  # the table aside, as memkernels::activation keeps it
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (code,) = ctx.saved_tensors
        return ops.activation_backward(grad_out, code, ctx.bits, ctx.levels), None, None, None, None


def check_elementwise(fn, x: torch.Tensor) -> bool:
    """Raise unless fn is element-wise at x as far as one more jvp can tell: for such a fn the
    jvp with any tangent v is fn'(x) * v, while a fn that mixes elements (softmax, cumsum, flip,
    t - t.mean()) gives another value for a tangent that is not constant. False where x gives
    nothing to compare (no finite derivative: sqrt at 0, NaN inputs)."""
    with torch.no_grad():
        x = x.detach().contiguous()  # one layout for both jvps (and an expanded x cannot hold a tangent)
        flat = torch.arange(x.numel(), device=x.device) % 7 + 1
        v = flat.to(x.dtype).reshape(x.shape)
        y, d = _value_and_derivative(fn, x)
        _same_shape(fn, x, y)
        _, jv = torch.func.jvp(fn, (x,), (v,))
        expected = d * v
        finite = torch.isfinite(expected) & torch.isfinite(jv)
        if not finite.any():
            return False
        error = (jv - expected)[finite].abs().max()
        tol = 1e-3 if x.dtype in (torch.float32, torch.float64) else 5e-2
        scale = expected[finite].abs().max()
        if error > tol * scale:
            raise ValueError(
                f"mk.elementwise({_name(fn)}): fn is not element-wise (an output element depends on "
                f"other input elements: its jvp differs from fn'(x) * v by {error.item():.3g}); "
                "mk.elementwise keeps the Jacobian's diagonal only, which gives wrong gradients for "
                "such a fn. Use fn itself.")
    return True


class Elementwise(torch.nn.Module):
    """y = fn(x) for an element-wise ``fn`` made of differentiable torch ops, keeping for backward
    only fn'(x) (``bits=None``, exact, x's dtype) or a packed ``bits``-bit code of it.

    The code's table is fitted on first use to fn' under a standard-normal input density, like
    the built-in tables, from fn on float64 CPU tensors (a module fn: a float64 CPU copy of it,
    whatever its parameters' dtype and device), and fitted again when a module fn's tensors have
    changed since (a compiled graph keeps the table it was compiled with). What ``fn`` must be:

    - element-wise: each output element depends only on the input element at the same index
      (fn'(x) is taken as the jvp with tangent 1, which is the Jacobian's diagonal only then).
      The output's shape must be the input's (checked on every call); on the first call in eager
      mode one more jvp checks that fn is element-wise at that input (ValueError if not).
    - without gradients of its own: fn'(x) gives x's gradient, not that of parameters or captured
      tensors inside fn (``lambda t: t * torch.sigmoid(beta * t)`` with ``beta`` a Parameter, an
      ``nn.PReLU``). Where such a tensor requires grad and autograd records the call, it raises a
      RuntimeError rather than leave their ``.grad`` silently None; frozen ones are fine.

    Backward is once-differentiable (a backward with create_graph=True raises). Where no gradient
    can be needed (``no_grad``, ``inference_mode``, an input that does not require grad) it is
    ``fn(x)``.
    """

    def __init__(self, fn, bits: int | None = None):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"fn must be callable (an element-wise function of a tensor), got {type(fn).__name__}")
        self.fn = fn
        self.bits = check_bits(bits) or None
        self._checked = False
        self._fitted = None  # (the state of fn's tensors it was fitted at, Table, {device: tensors})
        self._register()
        if not isinstance(fn, torch.nn.Module):
            # __name__, __doc__ of a function; not for a module fn, whose __wrapped__ would be a
            # second registration of fn (state_dict keys __wrapped__.* beside fn.*).
            functools.update_wrapper(self, fn, updated=())

    def _register(self):
        # The number torch.compile passes to _device_table in place of the module (see there).
        self._table_key = next(_TABLE_KEYS)
        _TABLE_MODULES[self._table_key] = self

    def __setstate__(self, state):
        # A copy (deepcopy, pickle) gets a number of its own: its fn may change apart from ours.
        super().__setstate__(state)
        self._register()

    def extra_repr(self) -> str:
        return f"fn={getattr(self.fn, '__name__', self.fn)!r}, bits={self.bits}"

    def table(self):
        """The fitted (borders, levels) Table of this function for ``bits``; fitted again when the
        tensors of a module fn have changed since (load_state_dict, an optimizer step)."""
        return self._fitted_entry()[1]

    def _fitted_entry(self):
        state = _tensor_state(self.fn)
        if self._fitted is None or self._fitted[0] != state:
            self._fitted = (state, _fit_table(self.fn, self.bits), {})
        return self._fitted

    def device_table(self, device: torch.device):
        """(borders, levels) of :meth:`table` on ``device``."""
        _, table, on_device = self._fitted_entry()
        if device not in on_device:
            on_device[device] = (table.borders.to(device), table.levels.to(device))
        return on_device[device]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_floating_input("input", x)
        # (A meta tensor has no values to compare: the check waits for a call with real ones.)
        if not self._checked and x.numel() > 0 and x.device.type != "meta" and not torch.compiler.is_compiling():
            self._checked = check_elementwise(self.fn, x)
        if not needs_grad(x):
            y = self.fn(x)
            if torch.is_grad_enabled():
                _no_other_grads(self.fn, y)
            _same_shape(self.fn, x, y)
            return y
        if self.bits is None:
            return _ExactFunction.apply(x, self.fn)
        borders, levels = _device_table(self._table_key, x.device)
        return _CodedFunction.apply(x, self.fn, self.bits, borders, levels)


def _tensor_state(fn) -> tuple:
    """What a table fitted to fn depends on besides fn itself: a module fn's tensors, each by its
    storage and version counter (which in-place updates, load_state_dict included, advance)."""
    if not isinstance(fn, torch.nn.Module):
        return ()
    return tuple((t.data_ptr(), t._version) for t in (*fn.parameters(), *fn.buffers()))


def _fit_table(fn, bits: int):
    from memkernels.activations.tables import fit_table
    with torch.no_grad():  # a fn with parameters that require grad fails later, with its own error
        try:
            # The fit's grid is float64 on the CPU: a module's own tensors must be too (a copy, so
            # that fn itself is left alone); PReLU's ops do not promote a float32 weight.
            f = copy.deepcopy(fn).to("cpu", torch.float64) if isinstance(fn, torch.nn.Module) else fn
            return fit_table(lambda t: _value_and_derivative(f, t)[1], f, bits)
        except RuntimeError as e:
            raise RuntimeError(
                f"mk.elementwise({_name(fn)}, bits={bits}): fitting the table of fn' evaluates fn on "
                f"float64 CPU tensors (a module fn on a float64 CPU copy of itself), where fn failed: {e}. "
                "Hold the tensors fn uses in a module passed as fn, or give bits=None.") from e


# Every Elementwise by its _table_key: the arguments of an assume_constant_result function must be
# constants to torch 2.11's compile, which a module is not.
_TABLE_MODULES: weakref.WeakValueDictionary[int, Elementwise] = weakref.WeakValueDictionary()
_TABLE_KEYS = itertools.count()


@torch.compiler.assume_constant_result  # torch.compile takes the table as a constant, untraced
def _device_table(table_key: int, device: torch.device):
    return _TABLE_MODULES[table_key].device_table(device)


def elementwise(fn=None, *, bits: int | None = None):
    """Wrap an element-wise function of torch ops into a fused activation (see Elementwise).

    Usable as ``mk.elementwise(fn, bits=3)`` or as a decorator ``@mk.elementwise(bits=3)``.
    """
    if fn is None:
        check_bits(bits)  # at the decorator's call, not when it is applied
        return lambda f: Elementwise(f, bits)
    return Elementwise(fn, bits)
