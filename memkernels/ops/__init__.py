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
from memkernels.activations.spec import packed_nbytes

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


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (< 2**bits), any shape -> 1-D uint8 of ceil(numel / 8) * bits bytes."""
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
    """[rows, cols] of `dtype`: min + scale * code (stats given) or lo + step * code."""
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
    # Outputs are contiguous whatever the input's strides: the kernels write them densely.
    # (memkernels.activations.autograd runs them on a contiguous permutation of a dense input,
    # so that what users get keeps the input's layout.)
    def _dense_like(t):
        return t.new_empty(t.shape)

    # The argument checks of the CPU kernels (csrc/cpu/activations.cpp, checks.h), with their
    # messages: a fake or meta call must fail where the real one would, not return a tensor.
    _FLOATING = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

    def _check_floating(t, name):
        torch._check(t.dtype in _FLOATING,
                     lambda: f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")

    def _check_like(t, name, ref, ref_name):
        torch._check(t.device == ref.device,
                     lambda: f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")
        torch._check(t.dtype == ref.dtype,
                     lambda: f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
        torch._check(t.shape == ref.shape,
                     lambda: f"{name} must have the shape of {ref_name} {list(ref.shape)}, got {list(t.shape)}")

    def _check_bits(bits):
        torch._check(bits in (0, 1, 2, 3, 4, 8),
                     lambda: f"bits must be 0 (exact) or one of 1, 2, 3, 4, 8, got {bits}")

    def _check_table(table, name, size, bits, like):
        torch._check(table is not None, lambda: f"{name} must be given when bits > 0 (bits = {bits})")
        torch._check(table.dtype == torch.float32, lambda: f"{name} must be float32, got {table.dtype}")
        torch._check(table.device == like.device,
                     lambda: f"{name} must be on {like.device}, got {table.device}")
        torch._check(table.numel() == size,
                     lambda: f"{name} must have {size} values for bits = {bits}, got {table.numel()}")

    def _check_saved(saved, name, bits, grad_out):
        if bits == 0:
            _check_like(saved, name, grad_out, "grad_out")
            return
        torch._check(saved.dtype == torch.uint8,
                     lambda: f"{name} must be the uint8 packed code when bits > 0, got {saved.dtype}")
        torch._check(saved.device == grad_out.device,
                     lambda: f"{name} must be on {grad_out.device}, got {saved.device}")
        want = packed_nbytes(grad_out.numel(), bits)
        torch._check(saved.numel() == want,
                     lambda: f"{name} must hold ceil(numel / 8) * bits = {want} bytes, got {saved.numel()}")

    @torch.library.register_fake("memkernels::activation_forward")
    def _(x, activation, p0, p1, bits, borders):
        _check_floating(x, "x")
        _check_bits(bits)
        if bits:
            _check_table(borders, "borders", 2 ** bits - 1, bits, x)
        return _dense_like(x), (_dense_like(x) if bits == 0 else _packed(x, x.numel(), bits))

    @torch.library.register_fake("memkernels::activation_value")
    def _(x, activation, p0, p1):
        _check_floating(x, "x")
        return _dense_like(x)

    @torch.library.register_fake("memkernels::activation_backward")
    def _(grad_out, saved, bits, levels):
        _check_floating(grad_out, "grad_out")
        _check_bits(bits)
        _check_saved(saved, "saved", bits, grad_out)
        if bits:
            _check_table(levels, "levels", 2 ** bits, bits, grad_out)
        return _dense_like(grad_out)

    @torch.library.register_fake("memkernels::activation_backward_from_input")
    def _(grad_out, x, activation, p0, p1):
        _check_floating(grad_out, "grad_out")
        _check_like(x, "x", grad_out, "grad_out")
        return _dense_like(grad_out)

    @torch.library.register_fake("memkernels::gated_forward")
    def _(a, b, activation, bits, borders):
        _check_floating(a, "a")
        _check_like(b, "b", a, "a")
        _check_bits(bits)
        if bits:
            _check_table(borders, "borders", 2 ** bits - 1, bits, a)
        code = _packed(a, a.numel(), bits) if bits else a.new_empty((0,), dtype=torch.uint8)
        return _dense_like(a), code

    @torch.library.register_fake("memkernels::gated_backward")
    def _(grad_out, saved_a, b, activation, bits, levels, value_levels):
        _check_floating(grad_out, "grad_out")
        _check_like(b, "b", grad_out, "grad_out")
        _check_bits(bits)
        _check_saved(saved_a, "saved_a", bits, grad_out)
        if bits:
            _check_table(levels, "levels", 2 ** bits, bits, grad_out)
            _check_table(value_levels, "value_levels", 2 ** bits, bits, grad_out)
        return _dense_like(grad_out), _dense_like(grad_out)

    @torch.library.register_fake("memkernels::pack_bits")
    def _(codes, bits):
        return _packed(codes, codes.numel(), bits)

    @torch.library.register_fake("memkernels::unpack_bits")
    def _(packed, bits, numel):
        return packed.new_empty((numel,), dtype=torch.uint8)

    def _packed_rows(t, rows, cols, bits):
        return t.new_empty((rows, packed_nbytes(cols, bits)), dtype=torch.uint8)

    # The group codes' checks (csrc/cpu/compress.cpp).
    def _check_rows(t, name):
        _check_floating(t, name)
        torch._check(t.dim() == 2, lambda: f"{name} must be 2-D [rows, cols], got shape {tuple(t.shape)}")

    def _check_code_format(bits, group_size):
        torch._check(bits in (1, 2, 4, 8), lambda: f"bits must be one of 1, 2, 4, 8, got {bits}")
        torch._check(group_size > 0 and group_size % 8 == 0,
                     lambda: f"group_size must be a positive multiple of 8, got {group_size}")

    def _num_groups(cols, group_size):
        return 0 if cols == 0 else (cols - 1) // group_size + 1

    def _check_codes(codes, stats, cols, bits, group_size):
        torch._check(cols >= 0, lambda: f"cols must be >= 0, got {cols}")
        _check_code_format(bits, group_size)
        row_bytes = packed_nbytes(cols, bits)
        torch._check(codes.dtype == torch.uint8, lambda: f"codes must be uint8, got {codes.dtype}")
        torch._check(codes.dim() == 2 and codes.shape[1] == row_bytes,
                     lambda: f"codes must be [rows, {row_bytes}] (ceil(cols / 8) * bits bytes a row for cols = "
                             f"{cols}, bits = {bits}), got shape {tuple(codes.shape)}")
        if stats is not None:
            groups = _num_groups(cols, group_size)
            torch._check(stats.dtype == torch.bfloat16, lambda: f"stats must be bfloat16, got {stats.dtype}")
            torch._check(stats.device == codes.device,
                         lambda: f"stats must be on the device of codes ({codes.device}), got {stats.device}")
            torch._check(tuple(stats.shape) == (codes.shape[0], groups, 2),
                         lambda: f"stats must be [rows, ceil(cols / group_size), 2] = [{codes.shape[0]}, "
                                 f"{groups}, 2], got {tuple(stats.shape)}")

    @torch.library.register_fake("memkernels::auxiliary_sign_forward")
    def _(x, eps, nonnegative):
        _check_rows(x, "x")
        return _dense_like(x), _packed_rows(x, x.shape[0], x.shape[1], 1)

    @torch.library.register_fake("memkernels::quantize_groups")
    def _(x, bits, group_size, seed):
        _check_rows(x, "x")
        _check_code_format(bits, group_size)
        torch._check(seed.dtype == torch.int64 and seed.numel() == 1 and seed.device.type == "cpu",
                     lambda: f"seed must be an int64 scalar tensor on the CPU, got {seed.dtype} of shape "
                             f"{tuple(seed.shape)} on {seed.device}")
        rows, cols = x.shape
        return (_packed_rows(x, rows, cols, bits),
                x.new_empty((rows, _num_groups(cols, group_size), 2), dtype=torch.bfloat16))

    @torch.library.register_fake("memkernels::dequantize_groups")
    def _(codes, stats, cols, bits, group_size, lo, step, dtype):
        _check_codes(codes, stats, cols, bits, group_size)
        return codes.new_empty((codes.shape[0], cols), dtype=dtype)

    @torch.library.register_fake("memkernels::weight_grad_from_codes")
    def _(grad_out, codes, stats, cols, bits, group_size, lo, step):
        _check_rows(grad_out, "grad_out")
        _check_codes(codes, stats, cols, bits, group_size)
        torch._check(codes.device == grad_out.device,
                     lambda: f"codes must be on the device of grad_out ({grad_out.device}), got {codes.device}")
        torch._check(codes.shape[0] == grad_out.shape[0],
                     lambda: f"codes must have a row for each of the {grad_out.shape[0]} rows of grad_out, "
                             f"got {codes.shape[0]}")
        return grad_out.new_empty((grad_out.shape[1], cols))

    @torch.library.register_fake("memkernels::feedback_project")
    def _(e, seed, layer, out_features, scale, derivative):
        torch._check(e.dim() == 2, lambda: f"e must be 2-D (batch, K), got shape {tuple(e.shape)}")
        _check_floating(e, "e")
        torch._check(out_features >= 0, lambda: f"out_features must be >= 0, got {out_features}")
        if derivative is not None:
            torch._check(derivative.device == e.device,
                         lambda: f"derivative must be on {e.device}, got {derivative.device}")
            torch._check(derivative.dtype == e.dtype,
                         lambda: f"derivative must have e's dtype ({e.dtype}), got {derivative.dtype}")
            torch._check(tuple(derivative.shape) == (e.shape[0], out_features),
                         lambda: f"derivative must have shape ({e.shape[0]}, {out_features}), got "
                                 f"{tuple(derivative.shape)}")
        return e.new_empty((e.shape[0], out_features))

    from memkernels.ops import _cuda  # noqa: E402,F401  (registers the CUDA kernels)
