"""Typed entry points to the ops ``torch.ops.memkernels.*``, and their fake kernels.

Every op's schema lives in csrc/ops.cpp; its CPU kernel in csrc/cpu/, its CUDA kernels in
memkernels/triton/ and csrc/cuda/ (chosen in ``memkernels.ops._cuda``). The fake kernels below
give torch.compile and ``torch.library.opcheck`` the output shapes without running anything.

If the extension memkernels._C was not built, the ops run the plain-PyTorch reference
(memkernels/reference.py) after a one-time warning: correct, but slow and without memory fusion.
"""
from __future__ import annotations

import warnings

import torch

from memkernels import reference
from memkernels.activations.spec import SECOND_DERIVATIVE_ERROR, packed_nbytes
from memkernels.ops import _checks

try:
    from memkernels import _C  # noqa: F401  (registers the ops and their CPU kernels)
except ImportError as exc:  # the package is importable without its build
    _C = None
    _C_IMPORT_ERROR = exc
else:
    _C_IMPORT_ERROR = None

BUILD_HINT = "build it with `pip install --no-build-isolation .` (or `python setup.py build_ext --inplace`)"


def extension_loaded() -> bool:
    """Whether memkernels._C (the compiled kernels) is importable."""
    return _C is not None


_warned = False


def _fallback(name: str):
    """The reference implementation of op `name`, after a one-time warning."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"memkernels._C is not built ({_C_IMPORT_ERROR}); running the plain-PyTorch reference "
            f"ops, which are slow and keep no less memory while computing. To get the kernels, {BUILD_HINT}.",
            RuntimeWarning, stacklevel=3)
    return getattr(reference, name)


def _op(name: str):
    return getattr(torch.ops.memkernels, name) if _C is not None else _fallback(name)


def activation_forward(x: torch.Tensor, activation: int, p0: float, p1: float, bits: int,
                       borders: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x), saved): saved is f'(x) in x's dtype (bits 0) or the packed code, uint8 of
    ceil(numel / 8) * bits bytes."""
    return _op("activation_forward")(x, activation, p0, p1, bits, borders)


def activation_value(x: torch.Tensor, activation: int, p0: float, p1: float) -> torch.Tensor:
    """f(x) alone, the values of activation_forward bit for bit: for calls no gradient can need."""
    return _op("activation_value")(x, activation, p0, p1)


def activation_backward(grad_out: torch.Tensor, saved: torch.Tensor, bits: int,
                        levels: torch.Tensor | None) -> torch.Tensor:
    """grad_out * f'(x), f'(x) read from what activation_forward saved."""
    return _op("activation_backward")(grad_out, saved, bits, levels)


def activation_backward_from_input(grad_out: torch.Tensor, x: torch.Tensor, activation: int, p0: float,
                                   p1: float) -> torch.Tensor:
    """grad_out * f'(x), f'(x) computed from x (grad_out's shape and dtype), as activation_forward
    computes it."""
    return _op("activation_backward_from_input")(grad_out, x, activation, p0, p1)


def gated_forward(a: torch.Tensor, b: torch.Tensor, activation: int, bits: int,
                  borders: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(a) * b, code of a): the code is empty uint8 when bits == 0."""
    return _op("gated_forward")(a, b, activation, bits, borders)


def gated_backward(grad_out: torch.Tensor, saved_a: torch.Tensor, b: torch.Tensor, activation: int,
                   bits: int, levels: torch.Tensor | None,
                   value_levels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_a, grad_b) = (g * b * f'(a), g * f(a)); saved_a is a (bits 0) or its code."""
    return _op("gated_backward")(grad_out, saved_a, b, activation, bits, levels, value_levels)


def activation(x: torch.Tensor, activation: int, p0: float, p1: float, bits: int, keep: int,
               borders: torch.Tensor | None, levels: torch.Tensor | None) -> torch.Tensor:
    """f(x), differentiable; backward keeps (keep: memkernels.activations.spec.Keep)
    activation_forward's saved (f'(x) in x's dtype, or the packed code with bits > 0, whose f' is
    levels[code]), x itself, or what torch keeps (Sigmoid, Tanh: y; Hardswish: x)."""
    return _op("activation")(x, activation, p0, p1, bits, keep, borders, levels)


def gated(a: torch.Tensor, b: torch.Tensor, activation: int, bits: int, copy_b: bool,
          borders: torch.Tensor | None, levels: torch.Tensor | None,
          value_levels: torch.Tensor | None) -> torch.Tensor:
    """f(a) * b, differentiable: backward keeps (a, b), or (code of a, b) with bits > 0 (b copied
    when copy_b: it views a larger tensor)."""
    return _op("gated")(a, b, activation, bits, copy_b, borders, levels, value_levels)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (< 2**bits), any shape -> 1-D uint8 of ceil(numel / 8) * bits bytes.

    A code of 2**bits or more raises on CPU; on CUDA its low `bits` bits are packed (its neighbours
    stay intact): checking there would wait on the device every call."""
    return _op("pack_bits")(codes, bits)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The first `numel` codes of `packed`, 1-D uint8."""
    return _op("unpack_bits")(packed, bits, numel)


def auxiliary_sign_forward(x: torch.Tensor, eps: float,
                           nonnegative: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, cols] -> (x + eps * s(x) [rows, cols] in x's dtype, signs uint8 [rows, ceil(cols / 8)]):
    s(x) = +1 / -1 for x > 0 / otherwise (0/1 if `nonnegative`), the bits of [x > 0] packed."""
    return _op("auxiliary_sign_forward")(x, eps, nonnegative)


def quantize_groups(x: torch.Tensor, bits: int, group_size: int,
                    seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, cols] float -> (codes uint8 [rows, ceil(cols / 8) * bits],
    stats bfloat16 [rows, ceil(cols / group_size), 2] of (min, scale)), stochastically rounded
    with Philox keyed by `seed` (int64 scalar tensor on the CPU)."""
    return _op("quantize_groups")(x, bits, group_size, seed)


def dequantize_groups(codes: torch.Tensor, stats: torch.Tensor | None, cols: int, bits: int,
                      group_size: int, lo: float, step: float, dtype: torch.dtype) -> torch.Tensor:
    """[rows, cols] of `dtype`: min + scale * code (stats given) or lo + step * code, saturated at
    dtype's largest finite value (reference.dequantized)."""
    return _op("dequantize_groups")(codes, stats, cols, bits, group_size, lo, step, dtype)


def weight_grad_from_codes(grad_out: torch.Tensor, codes: torch.Tensor, stats: torch.Tensor | None,
                           cols: int, bits: int, group_size: int, lo: float, step: float) -> torch.Tensor:
    """grad_out [rows, out]^T @ x_hat [rows, cols] -> [out, cols] in grad_out's dtype, x_hat the
    values the codes stand for (as dequantize_groups), dequantized tile by tile."""
    return _op("weight_grad_from_codes")(grad_out, codes, stats, cols, bits, group_size, lo, step)


def feedback_project(e: torch.Tensor, seed: int, layer: int, out_features: int, scale: float,
                     derivative: torch.Tensor | None = None) -> torch.Tensor:
    """(e @ B) * derivative, (N, out_features) in e's dtype: e (N, K) float; B (K, out_features) the
    feedback matrix of (seed, layer), uniform in [-scale, scale], generated from Philox tile by tile
    and never stored (memkernels.reference.feedback_matrix); derivative (N, out_features) or None."""
    return _op("feedback_project")(e, seed, layer, out_features, scale, derivative)


def _packed(t: torch.Tensor, numel, bits: int) -> torch.Tensor:
    return t.new_empty((packed_nbytes(numel, bits),), dtype=torch.uint8)


if _C is not None:
    _C.set_second_derivative_error(SECOND_DERIVATIVE_ERROR)

    # Outputs are contiguous whatever the input's strides: the kernels write them densely.
    # (memkernels.activations.autograd runs them on a contiguous permutation of a dense input,
    # so that what users get keeps the input's layout.)
    def _dense_like(t):
        return t.new_empty(t.shape)

    # Each fake makes its CPU kernel's argument checks (memkernels/ops/_checks.py): a fake or meta
    # call must fail where the real one would, not return a tensor.
    @torch.library.register_fake("memkernels::activation_forward")
    def _(x, activation, p0, p1, bits, borders):
        _checks.check_activation_forward(x, activation, bits, borders)
        return _dense_like(x), (_dense_like(x) if bits == 0 else _packed(x, x.numel(), bits))

    @torch.library.register_fake("memkernels::activation_value")
    def _(x, activation, p0, p1):
        _checks.check_activation_value(x, activation)
        return _dense_like(x)

    @torch.library.register_fake("memkernels::activation_backward")
    def _(grad_out, saved, bits, levels):
        _checks.check_activation_backward(grad_out, saved, bits, levels)
        return _dense_like(grad_out)

    @torch.library.register_fake("memkernels::activation_backward_from_input")
    def _(grad_out, x, activation, p0, p1):
        _checks.check_activation_backward_from_input(grad_out, x, activation)
        return _dense_like(grad_out)

    @torch.library.register_fake("memkernels::gated_forward")
    def _(a, b, activation, bits, borders):
        _checks.check_gated_forward(a, b, activation, bits, borders)
        code = _packed(a, a.numel(), bits) if bits else a.new_empty((0,), dtype=torch.uint8)
        return _dense_like(a), code

    @torch.library.register_fake("memkernels::gated_backward")
    def _(grad_out, saved_a, b, activation, bits, levels, value_levels):
        _checks.check_gated_backward(grad_out, saved_a, b, activation, bits, levels, value_levels)
        return _dense_like(grad_out), _dense_like(grad_out)

    @torch.library.register_fake("memkernels::pack_bits")
    def _(codes, bits):
        _checks.check_pack_bits(codes, bits)
        return _packed(codes, codes.numel(), bits)

    @torch.library.register_fake("memkernels::unpack_bits")
    def _(packed, bits, numel):
        _checks.check_unpack_bits(packed, bits, numel)
        return packed.new_empty((numel,), dtype=torch.uint8)

    def _packed_rows(t, rows, cols, bits):
        return t.new_empty((rows, packed_nbytes(cols, bits)), dtype=torch.uint8)

    @torch.library.register_fake("memkernels::auxiliary_sign_forward")
    def _(x, eps, nonnegative):
        _checks.check_auxiliary_sign_forward(x)
        return _dense_like(x), _packed_rows(x, x.shape[0], x.shape[1], 1)

    @torch.library.register_fake("memkernels::quantize_groups")
    def _(x, bits, group_size, seed):
        _checks.check_quantize_groups(x, bits, group_size, seed)
        rows, cols = x.shape
        return (_packed_rows(x, rows, cols, bits),
                x.new_empty((rows, _checks.num_groups(cols, group_size), 2), dtype=torch.bfloat16))

    @torch.library.register_fake("memkernels::dequantize_groups")
    def _(codes, stats, cols, bits, group_size, lo, step, dtype):
        _checks.check_dequantize_groups(codes, stats, cols, bits, group_size, dtype)
        return codes.new_empty((codes.shape[0], cols), dtype=dtype)

    @torch.library.register_fake("memkernels::weight_grad_from_codes")
    def _(grad_out, codes, stats, cols, bits, group_size, lo, step):
        _checks.check_weight_grad_from_codes(grad_out, codes, stats, cols, bits, group_size)
        return grad_out.new_empty((grad_out.shape[1], cols))

    @torch.library.register_fake("memkernels::feedback_project")
    def _(e, seed, layer, out_features, scale, derivative):
        _checks.check_feedback_project(e, seed, layer, out_features, scale, derivative)
        return e.new_empty((e.shape[0], out_features))

    from memkernels.ops import _cuda  # noqa: E402,F401  (registers the CUDA kernels)
