"""Triton kernel of feedback_project: out = (e @ B) * derivative, B generated tile by tile.

B (K, M) of (seed, layer) is regenerated inside the kernel from tl.randint4x, the rule of
memkernels/reference.py ("random feedback matrices"): key (layer << 32) | seed, offset
(row // 4) * M + col, word row % 4. A program owns a [BLOCK_N, BLOCK_M] tile of out and walks K
4 * BLOCK_QUADS rows at a time: one randint4x call on a [BLOCK_QUADS, BLOCK_M] tile of offsets gives
the four row-interleaved slices of B (rows 4q + w for w = 0..3), and each slice meets the columns
4q + w of e in its own tl.dot, so no interleaving of the slices is needed.

The dots take float32 operands in IEEE precision: B's entries are float32 values the CPU and CUDA
kernels produce bit for bit; TF32 would round them to 10 bits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from memkernels.ops._checks import check_feedback_project, scalar_type_name
from memkernels.triton.activations import _check_runs_on
from memkernels.triton.pack import cdiv

BLOCK_N = 64
BLOCK_M = 64
BLOCK_QUADS = 16  # 64 rows of B an iteration; tl.dot wants an inner size of 16 or more on GPU

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _add_slice_product(acc, word, step, e_ptr, rows, row_mask, k_index, k, e_stride_row, e_stride_col):
    """acc + e[rows, k_index] @ B[k_index, cols], the slice of B given by its Philox words."""
    b = word.to(tl.int32, bitcast=True).to(tl.float32) * step
    e = tl.load(e_ptr + rows[:, None] * e_stride_row + k_index[None, :] * e_stride_col,
                mask=row_mask[:, None] & (k_index < k)[None, :], other=0.0)
    return acc + tl.dot(e.to(tl.float32), b, input_precision="ieee")


@triton.jit
def _feedback_project_kernel(e_ptr, d_ptr, out_ptr, n, k, m, e_stride_row, e_stride_col, key, step,
                             HAS_DERIVATIVE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_QUADS: tl.constexpr):
    # One flat grid axis (axis 1 holds at most 65535 row tiles), column tiles fastest: the programs
    # running together share rows of e in L2.
    tile = tl.program_id(0).to(tl.int64)
    col_tiles = tl.cdiv(m, BLOCK_M)
    cols = tile % col_tiles * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tile // col_tiles * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for q0 in range(0, tl.cdiv(k, 4), BLOCK_QUADS):
        quads = q0 + tl.arange(0, BLOCK_QUADS).to(tl.int64)
        w0, w1, w2, w3 = tl.randint4x(key, quads[:, None] * m + cols[None, :])
        acc = _add_slice_product(acc, w0, step, e_ptr, rows, row_mask, quads * 4, k, e_stride_row, e_stride_col)
        acc = _add_slice_product(acc, w1, step, e_ptr, rows, row_mask, quads * 4 + 1, k, e_stride_row, e_stride_col)
        acc = _add_slice_product(acc, w2, step, e_ptr, rows, row_mask, quads * 4 + 2, k, e_stride_row, e_stride_col)
        acc = _add_slice_product(acc, w3, step, e_ptr, rows, row_mask, quads * 4 + 3, k, e_stride_row, e_stride_col)
    out_offsets = rows[:, None] * m + cols[None, :]
    mask = row_mask[:, None] & (cols < m)[None, :]
    if HAS_DERIVATIVE:
        acc *= tl.load(d_ptr + out_offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


def feedback_step(scale: float) -> float:
    """float32(scale) * 2**-31: an entry of B is int32(word) times this (exact in float32)."""
    return (torch.tensor(scale, dtype=torch.float32) * 2.0**-31).item()


def feedback_project(e: torch.Tensor, seed: int, layer: int, out_features: int, scale: float,
                     derivative: torch.Tensor | None) -> torch.Tensor:
    """(e @ B) * derivative: e (N, K) float16/bfloat16/float32 on CUDA (or CPU under
    TRITON_INTERPRET=1), out (N, out_features) in e's dtype, float32 accumulation."""
    check_feedback_project(e, seed, layer, out_features, scale, derivative)
    # What this kernel alone needs (the CUDA C++ kernel checks the same, csrc/cuda/feedback.cu).
    torch._check(e.dtype in _DTYPES,
                 lambda: f"e must be float32, bfloat16 or float16 for the Triton kernel, got "
                         f"{scalar_type_name(e.dtype)}")
    _check_runs_on(e, "e")
    n, k = e.shape
    if derivative is not None:
        derivative = derivative.contiguous()
    out = torch.empty((n, out_features), dtype=e.dtype, device=e.device)
    if out.numel() == 0:
        return out
    grid = (cdiv(out_features, BLOCK_M) * cdiv(n, BLOCK_N),)
    _feedback_project_kernel[grid](
        e, derivative if derivative is not None else out, out, n, k, out_features, e.stride(0), e.stride(1),
        (layer << 32) | seed, feedback_step(scale), HAS_DERIVATIVE=derivative is not None,
        BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M, BLOCK_QUADS=BLOCK_QUADS)
    return out
