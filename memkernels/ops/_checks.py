"""The argument checks of the ops, as their CPU kernels make them (csrc/cpu/checks.h, activations.cpp,
pack_bits.cpp, compress.cpp, feedback.cpp): the same conditions, in the same order, with the same
messages, raised as RuntimeError through torch._check (TORCH_CHECK's exception in Python).

The fake kernels (memkernels/ops/__init__.py) call them, so that a fake or meta call fails where the
real one would, and so do the Triton kernels (memkernels/triton/activations.py, compress.py,
feedback.py), so that a user gets the same error from every device. This module needs neither
memkernels._C nor triton.

Values in the messages print as C++ prints them (dtypes by their ScalarType names, shapes as lists,
floats as %g): the messages are the CPU kernels' to the character.
"""
from __future__ import annotations

import torch

from memkernels.activations.spec import GATES, Activation, packed_nbytes

# How C++ prints a ScalarType (c10/core/ScalarType.h), for the dtypes an argument may come in.
_SCALAR_TYPE_NAMES = {
    torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short", torch.int32: "Int", torch.int64: "Long",
    torch.float16: "Half", torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16",
    torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}
_FLOATING = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Bits of a group code (quantize_groups and the ops that read its codes): a power of two, so that
# no value straddles a byte.
CODE_BITS = (1, 2, 4, 8)


def scalar_type_name(dtype: torch.dtype) -> str:
    """dtype as C++ prints it in a message: torch.int64 -> Long."""
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype))


def _check_floating_dtype(dtype: torch.dtype, name: str) -> None:
    torch._check(dtype in _FLOATING,
                 lambda: f"{name} must be float32, float64, bfloat16 or float16, got {scalar_type_name(dtype)}")


def check_floating(t: torch.Tensor, name: str) -> None:
    _check_floating_dtype(t.dtype, name)


def check_like(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    torch._check(t.device == ref.device,
                 lambda: f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")
    torch._check(t.dtype == ref.dtype,
                 lambda: f"{name} must have the dtype of {ref_name} ({scalar_type_name(ref.dtype)}), got {scalar_type_name(t.dtype)}")
    torch._check(t.shape == ref.shape,
                 lambda: f"{name} must have the shape of {ref_name} {list(ref.shape)}, got {list(t.shape)}")


# ---- activations (csrc/cpu/activations.cpp) ----

# kNumActivations of csrc/activations.h: the ids are 0 .. NUM_ACTIVATIONS - 1.
NUM_ACTIVATIONS = len(Activation)
_GATE_IDS = tuple(int(a) for a in GATES)


def check_bits(bits: int) -> None:
    torch._check(bits in (0, 1, 2, 3, 4, 8),
                 lambda: f"bits must be 0 (exact) or one of 1, 2, 3, 4, 8, got {bits}")


def check_activation(activation: int) -> None:
    """activation is the id of an activation (memkernels.activations.spec.Activation)."""
    torch._check(0 <= activation < NUM_ACTIVATIONS,
                 lambda: f"activation must be an id in [0, {NUM_ACTIVATIONS}) "
                         f"(memkernels.activations.spec.Activation), got {activation}")


def check_gate(activation: int) -> None:
    """activation is the id of an activation that may gate a GLU (spec.GATES)."""
    check_activation(activation)
    torch._check(activation in _GATE_IDS,
                 lambda: f"activation of a gated unit must be SILU, GELU or GELU_TANH, got id {activation}")


def check_table(table: torch.Tensor | None, name: str, size: int, bits: int, like: torch.Tensor) -> None:
    """A float32 table (borders, levels, value_levels) of `size` values, on the device of `like`."""
    torch._check(table is not None, lambda: f"{name} must be given when bits > 0 (bits = {bits})")
    torch._check(table.dtype == torch.float32, lambda: f"{name} must be float32, got {scalar_type_name(table.dtype)}")
    torch._check(table.device == like.device, lambda: f"{name} must be on {like.device}, got {table.device}")
    torch._check(table.numel() == size,
                 lambda: f"{name} must have 2**bits{' - 1' if size % 2 else ''} = {size} values for bits = {bits}, "
                         f"got {table.numel()}")


def check_saved(saved: torch.Tensor, name: str, bits: int, grad_out: torch.Tensor) -> None:
    """What forward kept: f'(x) like grad_out (bits == 0) or its uint8 code."""
    if bits == 0:
        check_like(saved, name, grad_out, "grad_out")
        return
    torch._check(saved.dtype == torch.uint8,
                 lambda: f"{name} must be the uint8 packed code when bits > 0, got {scalar_type_name(saved.dtype)}")
    torch._check(saved.device == grad_out.device, lambda: f"{name} must be on {grad_out.device}, got {saved.device}")
    numel = grad_out.numel()
    want = packed_nbytes(numel, bits)
    torch._check(saved.numel() == want,
                 lambda: f"{name} must hold ceil(numel / 8) * bits = {want} bytes for {numel} elements at bits = "
                         f"{bits}, got {saved.numel()}")


def check_activation_forward(x: torch.Tensor, activation: int, bits: int, borders: torch.Tensor | None) -> None:
    check_floating(x, "x")
    check_activation(activation)
    check_bits(bits)
    if bits:
        check_table(borders, "borders", 2 ** bits - 1, bits, x)


def check_activation_value(x: torch.Tensor, activation: int) -> None:
    check_floating(x, "x")
    check_activation(activation)


def check_activation_backward(grad_out: torch.Tensor, saved: torch.Tensor, bits: int,
                              levels: torch.Tensor | None) -> None:
    check_floating(grad_out, "grad_out")
    check_bits(bits)
    check_saved(saved, "saved", bits, grad_out)
    if bits:
        check_table(levels, "levels", 2 ** bits, bits, grad_out)


def check_activation_backward_from_input(grad_out: torch.Tensor, x: torch.Tensor, activation: int) -> None:
    check_floating(grad_out, "grad_out")
    check_like(x, "x", grad_out, "grad_out")
    check_activation(activation)


def check_gated_forward(a: torch.Tensor, b: torch.Tensor, activation: int, bits: int,
                        borders: torch.Tensor | None) -> None:
    check_floating(a, "a")
    check_like(b, "b", a, "a")
    check_gate(activation)
    check_bits(bits)
    if bits:
        check_table(borders, "borders", 2 ** bits - 1, bits, a)


def check_gated_backward(grad_out: torch.Tensor, saved_a: torch.Tensor, b: torch.Tensor, activation: int,
                         bits: int, levels: torch.Tensor | None, value_levels: torch.Tensor | None) -> None:
    check_floating(grad_out, "grad_out")
    check_like(b, "b", grad_out, "grad_out")
    check_gate(activation)
    check_bits(bits)
    check_saved(saved_a, "saved_a", bits, grad_out)
    if bits:
        check_table(levels, "levels", 2 ** bits, bits, grad_out)
        check_table(value_levels, "value_levels", 2 ** bits, bits, grad_out)


# ---- pack_bits, unpack_bits (csrc/cpu/pack_bits.cpp) ----


def _check_pack_bits(bits: int) -> None:
    torch._check(bits in (1, 2, 3, 4, 8), lambda: f"bits must be one of 1, 2, 3, 4, 8, got {bits}")


def check_pack_bits(codes: torch.Tensor, bits: int) -> None:
    """pack_bits's arguments (that every code is < 2**bits is checked while packing)."""
    torch._check(codes.dtype == torch.uint8, lambda: f"codes must be uint8, got {scalar_type_name(codes.dtype)}")
    _check_pack_bits(bits)


def check_unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> None:
    torch._check(packed.dtype == torch.uint8, lambda: f"packed must be uint8, got {scalar_type_name(packed.dtype)}")
    _check_pack_bits(bits)
    torch._check(numel >= 0, lambda: f"numel must be >= 0, got {numel}")
    want = packed_nbytes(numel, bits)
    torch._check(packed.numel() == want,
                 lambda: f"packed must hold ceil(numel / 8) * bits = {want} bytes for numel = {numel} at "
                         f"bits = {bits}, got {packed.numel()}")


# ---- group codes (csrc/cpu/compress.cpp) ----


def num_groups(cols: int, group_size: int) -> int:
    """ceil(cols / group_size), for cols >= 0 and group_size > 0."""
    return 0 if cols == 0 else (cols - 1) // group_size + 1


def _check_rows(t: torch.Tensor, name: str) -> None:
    check_floating(t, name)
    torch._check(t.dim() == 2, lambda: f"{name} must be 2-D [rows, cols], got shape {list(t.shape)}")


def _check_code_bits(bits: int) -> None:
    torch._check(bits in CODE_BITS, lambda: f"bits must be one of 1, 2, 4, 8, got {bits}")


def _check_group_size(group_size: int) -> None:
    torch._check(group_size > 0 and group_size % 8 == 0,
                 lambda: f"group_size must be a positive multiple of 8, got {group_size}")


def _check_codes_and_stats(codes: torch.Tensor, stats: torch.Tensor | None, cols: int, bits: int,
                           group_size: int) -> None:
    """codes uint8 [rows, ceil(cols / 8) * bits]; stats None or bfloat16 [rows, ceil(cols / group_size), 2]
    on the device of codes."""
    torch._check(cols >= 0, lambda: f"cols must be >= 0, got {cols}")
    _check_code_bits(bits)
    _check_group_size(group_size)
    row_bytes = packed_nbytes(cols, bits)
    torch._check(codes.dtype == torch.uint8, lambda: f"codes must be uint8, got {scalar_type_name(codes.dtype)}")
    torch._check(codes.dim() == 2 and codes.shape[1] == row_bytes,
                 lambda: f"codes must be [rows, {row_bytes}] (ceil(cols / 8) * bits bytes a row for cols = "
                         f"{cols}, bits = {bits}), got shape {list(codes.shape)}")
    if stats is None:
        return
    groups = num_groups(cols, group_size)
    torch._check(stats.dtype == torch.bfloat16, lambda: f"stats must be bfloat16, got {scalar_type_name(stats.dtype)}")
    torch._check(stats.device == codes.device,
                 lambda: f"stats must be on the device of codes ({codes.device}), got {stats.device}")
    torch._check(tuple(stats.shape) == (codes.shape[0], groups, 2),
                 lambda: f"stats must be [rows, ceil(cols / group_size), 2] = [{codes.shape[0]}, {groups}, 2], "
                         f"got shape {list(stats.shape)}")


def check_auxiliary_sign_forward(x: torch.Tensor) -> None:
    _check_rows(x, "x")


def check_quantize_groups(x: torch.Tensor, bits: int, group_size: int, seed: torch.Tensor) -> None:
    _check_rows(x, "x")
    _check_code_bits(bits)  # before the outputs are sized by it
    _check_group_size(group_size)
    torch._check(seed.dtype == torch.int64 and seed.numel() == 1 and seed.device.type == "cpu",
                 lambda: f"seed must be an int64 scalar tensor on the CPU, got {scalar_type_name(seed.dtype)} of shape "
                         f"{list(seed.shape)} on {seed.device}")


def check_dequantize_groups(codes: torch.Tensor, stats: torch.Tensor | None, cols: int, bits: int,
                            group_size: int, dtype: torch.dtype) -> None:
    _check_codes_and_stats(codes, stats, cols, bits, group_size)
    _check_floating_dtype(dtype, "dtype")


def check_weight_grad_from_codes(grad_out: torch.Tensor, codes: torch.Tensor, stats: torch.Tensor | None,
                                 cols: int, bits: int, group_size: int) -> None:
    _check_rows(grad_out, "grad_out")
    _check_codes_and_stats(codes, stats, cols, bits, group_size)
    torch._check(codes.device == grad_out.device,
                 lambda: f"codes must be on the device of grad_out ({grad_out.device}), got {codes.device}")
    torch._check(codes.shape[0] == grad_out.shape[0],
                 lambda: f"codes must have a row for each of the {grad_out.shape[0]} rows of grad_out, got "
                         f"{codes.shape[0]}")


# ---- feedback_project (csrc/cpu/feedback.cpp) ----


# The least magnitude that rounds to inf in float32 (static_cast<float>: halfway past its largest
# finite value, 2**128 - 2**104, a tie that rounds to even, which is inf).
FLOAT32_OVERFLOW = 2.0**128 - 2.0**103


def check_feedback_project(e: torch.Tensor, seed: int, layer: int, out_features: int, scale: float,
                           derivative: torch.Tensor | None) -> None:
    torch._check(e.dim() == 2, lambda: f"e must be 2-D (batch, K), got shape {list(e.shape)}")
    check_floating(e, "e")
    torch._check(0 <= seed < 2**32, lambda: f"seed must be in [0, 2**32), got {seed}")
    torch._check(0 <= layer < 2**31, lambda: f"layer must be in [0, 2**31), got {layer}")
    torch._check(out_features >= 0, lambda: f"out_features must be >= 0, got {out_features}")
    # The kernels compute in float32: a scale past its range would make B's entries inf.
    torch._check(abs(scale) < FLOAT32_OVERFLOW, lambda: f"scale must be a finite float32, got {scale:g}")
    if derivative is None:
        return
    torch._check(derivative.device == e.device, lambda: f"derivative must be on {e.device}, got {derivative.device}")
    torch._check(derivative.dtype == e.dtype,
                 lambda: f"derivative must have e's dtype ({scalar_type_name(e.dtype)}), got {scalar_type_name(derivative.dtype)}")
    torch._check(tuple(derivative.shape) == (e.shape[0], out_features),
                 lambda: f"derivative must have shape ({e.shape[0]}, {out_features}), got {list(derivative.shape)}")
