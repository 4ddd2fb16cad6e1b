"""Triton kernels of the compressed saved inputs of Linear (csrc/ops.cpp, memkernels/reference.py).

The host functions have the ops' signatures and return values (memkernels/ops/_cuda.py registers
them as the CUDA kernels of torch.ops.memkernels.*). Every input is 2-D [rows, cols]; each row is
coded on its own into packed_nbytes(cols, bits) bytes, in the layout of memkernels/triton/pack.py:

    auxiliary_sign_forward(x, eps, nonnegative)
        -> (x + eps * s(x), signs uint8 [rows, ceil(cols / 8)])
        s(x) = +1 / -1 for x > 0 / otherwise (1 / 0 when nonnegative); signs are [x > 0], 1 bit each
        (Woo & Jeon, ICLR 2023: auxiliary sign activation)
    quantize_groups(x, bits, group_size, seed)
        -> (codes uint8 [rows, ceil(cols / 8) * bits],
            stats bfloat16 [rows, ceil(cols / group_size), 2])
        per group of group_size columns: min rounded down and scale = (max - min) / (2**bits - 1)
        rounded up to bfloat16, code = floor((x - min) / scale + u) clamped to [0, 2**bits - 1],
        u from Philox (seed, counter (c // 4, 0, r, 0)): stochastic rounding, unbiased (ActNN, GACT)
    dequantize_groups(codes, stats, cols, bits, group_size, lo, step, dtype) -> [rows, cols]
        min + scale * code, or lo + step * code without stats (the sign code), saturated at the
        largest finite value of dtype
    weight_grad_from_codes(grad_out, codes, stats, cols, bits, group_size, lo, step) -> [out, cols]
        grad_out^T @ x_hat, x_hat dequantized tile by tile inside the GEMM and never whole

Group codes take bits 1, 2, 4 or 8: a value never straddles a byte, so the GEMM finds code (r, c)
at byte c * bits // 8 of row r, shift c * bits % 8; 3-bit codes are not offered here (no group
code needs them, and the GEMM's dequantize-on-load would have to read across bytes).

Bit-identical to the reference, on GPU and under TRITON_INTERPRET=1:
- float32 divisions are tl.math.div_rn (Triton's `/` is approximate on NVIDIA GPUs), and the
  dequantizing kernels launch with enable_fp_fusion=False, so min + scale * code is not an FMA;
- float32 -> bfloat16 is rounded to nearest even by bit arithmetic (the interpreter truncates);
- stats are written and read as their int16 bit patterns.
As in memkernels/triton/activations.py, the kernels call no @triton.jit function of triton's own
standard library (tl.philox, tl.min, tl.max, tl.zeros): those fail under the interpreter when
triton was imported before TRITON_INTERPRET was set. Philox and the group min/max are written out
below with builtins only.
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from memkernels.activations.spec import packed_nbytes
from memkernels.ops._checks import CODE_BITS  # noqa: F401  (the code widths these kernels take)
from memkernels.ops._checks import (check_auxiliary_sign_forward, check_dequantize_groups, check_quantize_groups,
                                    check_weight_grad_from_codes)
from memkernels.triton.activations import _check_runs_on, _interpreted, _packed_input
from memkernels.triton.pack import BLOCK_GROUPS, cdiv, pack_groups, unpack_groups

INF = tl.constexpr(float("inf"))
BF16_NAN = tl.constexpr(0x7FC0)  # torch's bfloat16 NaN
BF16_MAX = tl.constexpr(torch.finfo(torch.bfloat16).max)  # 0x7F7F: float32's largest lie above it
NOISE_SCALE = tl.constexpr(2.0 ** -24)
# Philox4x32-10 (Salmon et al. 2011): the constants of at::Philox4_32 and tl.philox.
PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
PHILOX_KEY_B = tl.constexpr(0xBB67AE85)
PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """The 4 uint32 outputs of Philox4x32-10 for counters c0..c3 (uint32 tensors) and key (k0, k1):
    tl.philox's rounds (reference.philox4x32), written out for the interpreter."""
    for _ in tl.static_range(10):
        prev0 = c0
        prev2 = c2
        c0 = tl.umulhi(prev2, PHILOX_ROUND_B) ^ c1 ^ k0
        c2 = tl.umulhi(prev0, PHILOX_ROUND_A) ^ c3 ^ k1
        c1 = prev2 * PHILOX_ROUND_B
        c3 = prev0 * PHILOX_ROUND_A
        k0 = k0 + PHILOX_KEY_A
        k1 = k1 + PHILOX_KEY_B
    return c0, c1, c2, c3


@triton.jit
def _minimum(a, b):
    return tl.minimum(a, b)


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _reduce_items(x, IS_MAX: tl.constexpr):
    """[N, QUADS, 4] -> [N]: the max (IS_MAX) or min of each item's values, by tl.reduce over the
    tile's own axes with combine functions of this module (not tl.max/tl.min, see the module
    docstring). A tree of reshape + split took 23 ms for 25M values on an H100, and a reduce of the
    tile reshaped to [N, QUADS * 4] gave wrong codes there (the interpreter's were right)."""
    if IS_MAX:
        return tl.reduce(tl.reduce(x, 2, _maximum), 1, _maximum)
    else:
        return tl.reduce(tl.reduce(x, 2, _minimum), 1, _minimum)


@triton.jit
def _tile_slots(pid, rows, num_groups8, tiles_per_row_block, BLOCK_ROWS: tl.constexpr,
                BLOCK_GROUPS: tl.constexpr):
    """(row, group, valid) [BLOCK_ROWS * BLOCK_GROUPS] of program pid: a [BLOCK_ROWS, BLOCK_GROUPS]
    tile of packed 8-column groups, flattened; int64 indices."""
    tile_rows = pid // tiles_per_row_block
    tile_groups = pid % tiles_per_row_block
    row = tile_rows * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    group = tile_groups * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS).to(tl.int64)
    N: tl.constexpr = BLOCK_ROWS * BLOCK_GROUPS
    row_of = tl.reshape(row[:, None] + group[None, :] * 0, (N,))
    group_of = tl.reshape(group[None, :] + row[:, None] * 0, (N,))
    return row_of, group_of, (row_of < rows) & (group_of < num_groups8)


@triton.jit
def _round_bfloat16_bits(v, UP: tl.constexpr):
    """float32 v rounded to a bfloat16 value toward +inf (UP) or -inf, as float32 bits (uint32):
    truncating the low 16 bits rounds toward zero; step one bfloat16 ulp away from zero where that
    went the wrong way (reference._round_bfloat16)."""
    trunc_bits = v.to(tl.uint32, bitcast=True) & 0xFFFF0000
    trunc = trunc_bits.to(tl.float32, bitcast=True)
    if UP:
        wrong = trunc < v
    else:
        wrong = trunc > v
    return tl.where(wrong, trunc_bits + 0x10000, trunc_bits)


@triton.jit
def _bfloat16_bits(v):
    """float32 -> bfloat16 bits (uint32 < 2**16), rounded to nearest even, NaN -> 0x7FC0: torch's
    rule, by bit arithmetic (the interpreter's float32 -> bfloat16 cast truncates)."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    return tl.where(v != v, BF16_NAN, rounded)


@triton.jit
def _round_to(v, dtype: tl.constexpr):
    """v (float32 or float64) in `dtype`, rounded to nearest (even)."""
    if dtype == tl.bfloat16:
        return _bfloat16_bits(v.to(tl.float32)).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def _to_element(v, ptr):
    """v (float32 or float64) in the element type of ptr, rounded to nearest (even)."""
    return _round_to(v, ptr.dtype.element_ty)


@triton.jit
def _load_bfloat16(ptr, mask):
    """float32 of the bfloat16 bit patterns (int16) at ptr; 0 where masked."""
    bits = tl.load(ptr, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
    return (bits << 16).to(tl.float32, bitcast=True)


@triton.jit
def _scaled_difference(a, b, d):
    """(a - b) / d, from the halves where a - b overflows (reference.scaled_difference)."""
    over = tl.abs(a - b) == INF
    half = tl.where(over, 0.5, 1.0)
    return tl.math.div_rn(a * half - b * half, d) * tl.where(over, 2.0, 1.0)


@triton.jit
def _dequantized(low, scale, q, BITS: tl.constexpr, BOUND: tl.constexpr):
    """low + scale * q rounded once, from halves where scale * (2**BITS - 1) overflows, saturated
    at +-BOUND, NaN kept (reference.dequantized)."""
    over = tl.abs(scale * ((1 << BITS) - 1)) == INF
    value = (low * tl.where(over, 0.5, 1.0) + (scale * tl.where(over, 0.5, 1.0)) * q) * tl.where(over, 2.0, 1.0)
    return tl.maximum(tl.minimum(value, BOUND, propagate_nan=tl.PropagateNan.ALL), -BOUND,
                      propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _load_stat_pairs(ptr, mask):
    """float32 (min, scale) of the bfloat16 pairs read as one int32 each at ptr (little-endian: min
    in the low half); 0 where masked. One 4-byte load lets triton pipeline it (cp.async)."""
    pair = tl.load(ptr, mask=mask, other=0).to(tl.uint32, bitcast=True)
    return (pair << 16).to(tl.float32, bitcast=True), (pair & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["eps_bits"])
def _auxiliary_sign_kernel(x_ptr, x_aux_ptr, signs_ptr, rows, cols, num_groups8,
                           tiles_per_row_block, x_stride_row, x_stride_col, eps_bits,
                           NONNEGATIVE: tl.constexpr, FP64: tl.constexpr,
                           BLOCK_ROWS: tl.constexpr, BLOCK_GROUPS: tl.constexpr):
    """x_aux = x + eps * s(x) and the packed bits [x > 0] of a tile of packed 8-column groups.

    eps comes as the bits of a float64 (a float kernel argument would be float32): float64 x adds
    it whole, other dtypes add it rounded to float32, as the reference's eps * s in the compute
    dtype does.
    """
    row, group, valid = _tile_slots(tl.program_id(0).to(tl.int64), rows, num_groups8,
                                    tiles_per_row_block, BLOCK_ROWS, BLOCK_GROUPS)
    col = group[:, None] * 8 + tl.arange(0, 8)[None, :]
    mask = valid[:, None] & (col < cols)
    x = tl.load(x_ptr + row[:, None] * x_stride_row + col * x_stride_col, mask=mask, other=0.0)
    eps = eps_bits.to(tl.int64).to(tl.float64, bitcast=True)
    if FP64:
        x = x.to(tl.float64)
    else:
        x = x.to(tl.float32)
        eps = eps.to(tl.float32)
    positive = x > 0
    if NONNEGATIVE:
        s = tl.where(positive, 1.0, 0.0).to(x.dtype)
    else:
        s = tl.where(positive, 1.0, -1.0).to(x.dtype)
    x_aux = x + eps * s
    tl.store(x_aux_ptr + row[:, None] * cols + col, _to_element(x_aux, x_aux_ptr), mask=mask)
    # Rows of the packed signs are contiguous: group g of row r is byte r * num_groups8 + g.
    pack_groups(positive.to(tl.int32), signs_ptr, row * num_groups8 + group, valid, 1)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _quantize_kernel(x_ptr, codes_ptr, stats_ptr, rows, cols, num_groups, num_groups8,
                     x_stride_row, x_stride_col, seed_lo, seed_hi, BITS: tl.constexpr,
                     GROUP_SIZE: tl.constexpr, LOG2_QUADS: tl.constexpr, BLOCK_ITEMS: tl.constexpr):
    """Codes and (min, scale) of BLOCK_ITEMS consecutive (row, group) items, row-major: a
    [BLOCK_ITEMS, QUADS, 4] tile of their columns, one Philox call a quad (its 4 outputs are the
    noise of 4 consecutive columns)."""
    QUADS: tl.constexpr = 1 << LOG2_QUADS
    TOP: tl.constexpr = (1 << BITS) - 1
    item = tl.program_id(0).to(tl.int64) * BLOCK_ITEMS + tl.arange(0, BLOCK_ITEMS).to(tl.int64)
    row = item // num_groups
    group = item % num_groups
    valid = row < rows
    first = group * GROUP_SIZE  # the group's first column
    quads = tl.arange(0, QUADS)
    in_group = quads[:, None] * 4 + tl.arange(0, 4)[None, :]  # [QUADS, 4]
    col = first[:, None, None] + in_group[None, :, :]
    mask = valid[:, None, None] & (in_group[None, :, :] < GROUP_SIZE) & (col < cols)
    x = tl.load(x_ptr + row[:, None, None] * x_stride_row + col * x_stride_col, mask=mask,
                other=0.0)
    x = x.to(tl.float32)

    lo = _reduce_items(tl.where(mask, x, INF), False)
    hi = _reduce_items(tl.where(mask, x, -INF), True)
    bad = tl.where(mask & ((x != x) | (tl.abs(x) == INF)), 1, 0)
    nonfinite = _reduce_items(bad, True) != 0
    # Groups near float32's range stay finite, as in reference.group_stats: min at least
    # -BF16_MAX, scale at most BF16_MAX, (max - min) / top without overflow.
    mn = _round_bfloat16_bits(lo, False).to(tl.float32, bitcast=True)
    mn = tl.where(mn < -BF16_MAX, -BF16_MAX, mn)
    top = tl.full((BLOCK_ITEMS,), TOP, tl.float32)
    scale = _round_bfloat16_bits(_scaled_difference(hi, mn, top), True).to(tl.float32, bitcast=True)
    scale = tl.where(scale > BF16_MAX, BF16_MAX, scale)
    # A group with NaN or +-Inf gets NaN stats, so every code of it is 0.
    min_bits = tl.where(nonfinite, BF16_NAN, mn.to(tl.uint32, bitcast=True) >> 16)
    scale_bits = tl.where(nonfinite, BF16_NAN, scale.to(tl.uint32, bitcast=True) >> 16)
    stats = tl.join(min_bits, scale_bits).to(tl.uint16).to(tl.int16, bitcast=True)
    tl.store(stats_ptr + item[:, None] * 2 + tl.arange(0, 2)[None, :], stats,
             mask=valid[:, None])
    mn = (min_bits << 16).to(tl.float32, bitcast=True)[:, None, None]
    scale = (scale_bits << 16).to(tl.float32, bitcast=True)[:, None, None]

    # u of value (row, c): output c % 4 of Philox(seed, (c // 4, 0, row, 0)), top 24 bits.
    counter = (first[:, None] // 4 + quads[None, :]).to(tl.uint32)  # [BLOCK_ITEMS, QUADS]
    zero = counter * 0
    out0, out1, out2, out3 = _philox(counter, zero, zero + row[:, None].to(tl.uint32), zero,
                                     seed_lo.to(tl.uint32), seed_hi.to(tl.uint32))
    # join(join(o0, o2), join(o1, o3))[., q, i, k] = o_(2i + k): quad q holds (o0, o1, o2, o3).
    outputs = tl.reshape(tl.join(tl.join(out0, out2), tl.join(out1, out3)),
                         (BLOCK_ITEMS, QUADS, 4))
    u = (outputs >> 8).to(tl.float32) * NOISE_SCALE
    q = tl.floor(_scaled_difference(x, mn, scale) + u)
    q = tl.where(q != q, 0.0, q)  # a non-finite group, or 0 / 0 in a constant one
    q = tl.minimum(tl.maximum(q, 0.0), TOP)
    code = tl.where(mask, q.to(tl.int32), 0)

    # A group's columns are whole packed 8-column groups (GROUP_SIZE % 8 == 0); rows of the codes
    # are contiguous, so packed group g of row r is word r * num_groups8 + g.
    slots = tl.arange(0, QUADS // 2)
    packed_group = first[:, None] // 8 + slots[None, :]
    store = valid[:, None] & (slots[None, :] < GROUP_SIZE // 8) & (packed_group < num_groups8)
    N: tl.constexpr = BLOCK_ITEMS * QUADS // 2
    pack_groups(tl.reshape(code, (N, 8)), codes_ptr,
                tl.reshape(row[:, None] * num_groups8 + packed_group, (N,)),
                tl.reshape(store, (N,)), BITS)


@triton.jit
def _dequantize_kernel(codes_ptr, stats_ptr, out_ptr, rows, cols, num_groups, num_groups8,
                       tiles_per_row_block, lo, step, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                       HAS_STATS: tl.constexpr, BOUND: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                       BLOCK_GROUPS: tl.constexpr):
    """min + scale * code (HAS_STATS) or lo + step * code for a tile of packed 8-column groups,
    saturated at +-BOUND (_dequantized)."""
    row, group, valid = _tile_slots(tl.program_id(0).to(tl.int64), rows, num_groups8,
                                    tiles_per_row_block, BLOCK_ROWS, BLOCK_GROUPS)
    # Rows of the codes are contiguous: packed group g of row r is word r * num_groups8 + g.
    q = unpack_groups(codes_ptr, row * num_groups8 + group, valid, BITS).to(tl.float32)
    if HAS_STATS:
        # The 8 columns of a packed group share one stats group (GROUP_SIZE % 8 == 0).
        at = (row * num_groups + group * 8 // GROUP_SIZE) * 2
        value = _dequantized(_load_bfloat16(stats_ptr + at, valid)[:, None],
                             _load_bfloat16(stats_ptr + at + 1, valid)[:, None], q, BITS, BOUND)
    else:
        value = _dequantized(lo, step, q, BITS, BOUND)
    col = group[:, None] * 8 + tl.arange(0, 8)[None, :]
    tl.store(out_ptr + row[:, None] * cols + col, _to_element(value, out_ptr),
             mask=valid[:, None] & (col < cols))


@triton.jit
def _weight_grad_kernel(grad_ptr, codes_ptr, stats_ptr, out_ptr, rows, out_features, cols,
                        tiles_out, tiles_cols, num_groups, row_bytes, grad_stride_row,
                        grad_stride_out, lo, step,
                        BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_STATS: tl.constexpr,
                        BOUND: tl.constexpr, IEEE: tl.constexpr, DOT_FLOAT32: tl.constexpr,
                        BLOCK_OUT: tl.constexpr,
                        BLOCK_COLS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                        SWIZZLE: tl.constexpr, WORD_CODES: tl.constexpr):
    """One [BLOCK_OUT, BLOCK_COLS] tile of grad_out^T @ x_hat, over rows in BLOCK_ROWS steps: each
    step loads a grad_out tile and the codes of an x_hat tile, dequantizes them in registers and
    accumulates tl.dot in float32; float64 accumulates outer products of single rows instead
    (BLOCK_ROWS == 1: triton 3.6 cannot lower a float64 tl.dot, which needs K >= 16).

    The tile is computed as its transpose, x_hat^T @ grad_out: the dequantized operand comes first,
    where Hopper's wgmma reads it from registers (as B it would be stored to shared memory and the
    dot waited on every step; as A the next step's dequantize overlaps the dot)."""
    # Programs in SWIZZLE-row bands of output tiles, so neighbours share grad_out and codes in L2.
    pid = tl.program_id(0)
    band = pid // (SWIZZLE * tiles_cols)
    first_out_tile = band * SWIZZLE
    band_height = tl.minimum(tiles_out - first_out_tile, SWIZZLE)
    tile_out = first_out_tile + (pid % (SWIZZLE * tiles_cols)) % band_height
    tile_cols = (pid % (SWIZZLE * tiles_cols)) // band_height

    offs_out = tile_out.to(tl.int64) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    offs_col = tile_cols.to(tl.int64) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    out_mask = offs_out < out_features
    col_mask = offs_col < cols
    # Code (r, c) is bits [shift, shift + BITS) of byte c * BITS // 8 of row r (BITS in 1, 2, 4, 8);
    # read in little-endian 4-byte words (WORD_CODES, rows of whole words), bits
    # [c * BITS % 32, + BITS) of word c * BITS // 32: a tile's columns are PER_WORD codes of each
    # of its words, in order.
    if WORD_CODES:
        PER_WORD: tl.constexpr = 32 // BITS
        tl.static_assert(BLOCK_COLS % PER_WORD == 0)
        offs_word = tile_cols.to(tl.int64) * (BLOCK_COLS // PER_WORD) + tl.arange(0, BLOCK_COLS // PER_WORD)
        word_mask = offs_word < row_bytes // 4
        word_shift = tl.arange(0, PER_WORD) * BITS
    else:
        byte = offs_col * BITS // 8
        shift = (offs_col * BITS % 8).to(tl.int32)
    group = offs_col // GROUP_SIZE
    dtype = grad_ptr.dtype.element_ty
    if dtype == tl.float64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    acc = tl.full((BLOCK_COLS, BLOCK_OUT), 0, acc_dtype)
    for first_row in range(0, rows, BLOCK_ROWS):
        offs_row = first_row + tl.arange(0, BLOCK_ROWS).to(tl.int64)
        row_mask = offs_row < rows
        grad = tl.load(grad_ptr + offs_row[:, None] * grad_stride_row
                       + offs_out[None, :] * grad_stride_out,
                       mask=row_mask[:, None] & out_mask[None, :], other=0.0)
        mask = row_mask[:, None] & col_mask[None, :]
        if WORD_CODES:
            words = tl.load(codes_ptr + offs_row[:, None] * (row_bytes // 4) + offs_word[None, :],
                            mask=row_mask[:, None] & word_mask[None, :], other=0)
            q = (words[:, :, None] >> word_shift[None, None, :]) & ((1 << BITS) - 1)
            q = tl.reshape(q, (BLOCK_ROWS, BLOCK_COLS)).to(tl.float32)
        else:
            packed = tl.load(codes_ptr + offs_row[:, None] * row_bytes + byte[None, :], mask=mask,
                             other=0)
            q = ((packed.to(tl.int32) >> shift[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
        if HAS_STATS and GROUP_SIZE % BLOCK_COLS == 0:
            # The tile's columns lie in one group: a row's (min, scale) is one pair, loaded once.
            low, scale = _load_stat_pairs(stats_ptr + offs_row * num_groups
                                          + tile_cols.to(tl.int64) * BLOCK_COLS // GROUP_SIZE, row_mask)
            x_hat = _dequantized(low[:, None], scale[:, None], q, BITS, BOUND)
        elif HAS_STATS:
            low, scale = _load_stat_pairs(stats_ptr + offs_row[:, None] * num_groups + group[None, :], mask)
            x_hat = _dequantized(low, scale, q, BITS, BOUND)
        else:
            x_hat = _dequantized(lo, step, q, BITS, BOUND)
        # Rows past the end must add nothing (lo need not be 0); NaN of a non-finite group stays.
        x_hat = tl.where(mask, x_hat, 0.0)
        if DOT_FLOAT32:
            # The interpreter's dot multiplies the bit patterns of bfloat16 as integers: dot the
            # float32 values of the 16-bit operands instead (their products are exact in float32).
            grad = grad.to(tl.float32)
            x_hat = _round_to(x_hat, dtype).to(tl.float32)
        else:
            x_hat = x_hat.to(dtype)
        x_hat_t = tl.trans(x_hat)  # [BLOCK_COLS, BLOCK_ROWS]
        if dtype == tl.float64:
            tl.static_assert(BLOCK_ROWS == 1)
            acc += x_hat_t * grad  # [BLOCK_COLS, 1] * [1, BLOCK_OUT]
        elif IEEE:
            acc = tl.dot(x_hat_t, grad, acc=acc, input_precision="ieee", out_dtype=acc_dtype)
        else:
            acc = tl.dot(x_hat_t, grad, acc=acc, out_dtype=acc_dtype)
    tl.store(out_ptr + offs_out[None, :] * cols + offs_col[:, None], _to_element(acc, out_ptr),
             mask=out_mask[None, :] & col_mask[:, None])


# ---- host side ----


def _float64_bits(value) -> int:
    """The bits of float(value) as a signed int64: a float64 kernel argument."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _stats_bits(stats):
    """stats as int16 bit patterns, contiguous (the kernels read bfloat16 by its bits)."""
    return stats.contiguous().view(torch.int16)


def _saturation_bound(dtype: torch.dtype) -> float:
    """The largest finite value of `dtype` that float32 holds: dequantized values saturate there."""
    return min(torch.finfo(dtype).max, torch.finfo(torch.float32).max)


def _dequantize_launch_options() -> dict:
    # No FMA: min + scale * code rounds the product, as torch does. The interpreter takes no
    # compile options.
    return {} if _interpreted() else {"enable_fp_fusion": False}


def _tiles(rows: int, cols: int) -> tuple[int, int, dict]:
    """(programs, programs per block of rows, block sizes) of the row kernels: [BLOCK_ROWS,
    BLOCK_GROUPS] packed 8-column groups a program, BLOCK_GROUPS * 8 columns of BLOCK_ROWS rows,
    about 1024 values (8192 under the interpreter, where each program costs the same numpy calls
    whatever its size). The tiles are flattened into grid axis 0 (axis 1 holds at most 65535)."""
    slots = 1024 if _interpreted() else BLOCK_GROUPS
    block_groups = min(BLOCK_GROUPS, triton.next_power_of_2(cdiv(cols, 8)))
    block_rows = max(1, slots // block_groups)
    per_row_block = cdiv(cdiv(cols, 8), block_groups)
    programs = cdiv(rows, block_rows) * per_row_block
    return programs, per_row_block, dict(BLOCK_ROWS=block_rows, BLOCK_GROUPS=block_groups)


def auxiliary_sign_forward(x, eps, nonnegative):
    """(x + eps * s(x) [rows, cols] in x's dtype, signs uint8 [rows, ceil(cols / 8)]):
    s(x) = +1 / -1 for x > 0 / otherwise (1 / 0 when `nonnegative`), the bits [x > 0] packed one
    a value.

    Computed in float32 (float64 for float64 x, eps then unrounded), as the reference does.
    """
    check_auxiliary_sign_forward(x)
    _check_runs_on(x, "x")
    rows, cols = x.shape
    x_aux = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    signs = torch.empty((rows, packed_nbytes(cols, 1)), dtype=torch.uint8, device=x.device)
    if x.numel():
        programs, per_row_block, blocks = _tiles(rows, cols)
        _auxiliary_sign_kernel[(programs,)](
            x, x_aux, signs, rows, cols, cdiv(cols, 8), per_row_block, x.stride(0),
            x.stride(1), _float64_bits(eps), NONNEGATIVE=bool(nonnegative),
            FP64=x.dtype == torch.float64, **blocks)
    return x_aux, signs


def quantize_groups(x, bits, group_size, seed):
    """(codes uint8 [rows, ceil(cols / 8) * bits], stats bfloat16 [rows, ceil(cols / group_size),
    2]) of x [rows, cols]: per group (min, scale) rounded outward to bfloat16 (NaN for a group
    holding NaN or +-Inf) and code = floor((x - min) / scale + u) clamped to [0, 2**bits - 1] (NaN -> 0),
    u = top 24 bits of Philox output c % 4 at key `seed` and counter (c // 4, 0, r, 0) times 2**-24.

    seed: an int64 scalar tensor on the CPU (read with .item(), no device sync).
    """
    check_quantize_groups(x, bits, group_size, seed)
    _check_runs_on(x, "x")
    rows, cols = x.shape
    groups = cdiv(cols, group_size)
    codes = torch.empty((rows, packed_nbytes(cols, bits)), dtype=torch.uint8, device=x.device)
    stats = torch.empty((rows, groups, 2), dtype=torch.bfloat16, device=x.device)
    if x.numel():
        key = int(seed.item()) & 0xFFFFFFFFFFFFFFFF
        # A program's tile holds whole groups: one wider than the row (a group_size meant as "the
        # whole row") is the row itself, the same codes and stats from a tile of the row's width,
        # not of group_size (a group of 2**21 exceeded triton's largest tensor; 2**18 spilled 46 KB
        # a thread on a GPU).
        kernel_group = min(group_size, cdiv(cols, 8) * 8)
        quads = triton.next_power_of_2(kernel_group // 4)
        # About 1024 values a program (8192 under the interpreter), whole groups.
        items = max(1, (8192 if _interpreted() else 1024) // (quads * 4))
        _quantize_kernel[(cdiv(rows * groups, items),)](
            x, codes, stats.view(torch.int16), rows, cols, groups, cdiv(cols, 8),
            x.stride(0), x.stride(1), key & 0xFFFFFFFF, key >> 32, BITS=bits,
            GROUP_SIZE=kernel_group, LOG2_QUADS=quads.bit_length() - 1, BLOCK_ITEMS=items,
            num_warps=4, **_dequantize_launch_options())
    return codes, stats


def dequantize_groups(codes, stats, cols, bits, group_size, lo, step, dtype):
    """[rows, cols] of `dtype`: min + scale * code with (min, scale) of the code's group from
    `stats`, or lo + step * code (lo, step rounded to float32) when stats is None; computed in
    float32 and saturated at dtype's largest finite value (_dequantized)."""
    check_dequantize_groups(codes, stats, cols, bits, group_size, dtype)
    _check_runs_on(codes, "codes")
    rows = codes.shape[0]
    out = torch.empty((rows, cols), dtype=dtype, device=codes.device)
    if out.numel():
        programs, per_row_block, blocks = _tiles(rows, cols)
        stats_bits = codes if stats is None else _stats_bits(stats)
        _dequantize_kernel[(programs,)](
            _packed_input(codes), stats_bits, out, rows, cols, cdiv(cols, group_size),
            cdiv(cols, 8), per_row_block, float(lo), float(step), BITS=bits,
            GROUP_SIZE=group_size, HAS_STATS=stats is not None, BOUND=_saturation_bound(dtype),
            **blocks, **_dequantize_launch_options())
    return out


def _gemm_blocks(dtype, has_stats: bool, cols: int) -> dict:
    """Tile sizes of _weight_grad_kernel. Under the interpreter each tile costs a handful of numpy
    calls whatever its size, so fewer, larger tiles are faster there. float64 takes one row a step
    (outer products, no tl.dot) on GPU and under the interpreter alike. The 16-bit sizes are the
    fastest of 12 tried on an H100 (bfloat16, 8192 rows, GPT-2's 768 x 3072 and 3072 x 768): 3x
    faster than 128 x 128 x 32 tiles without stats, 2x with. That was before the kernel took x_hat
    as the register operand and read codes and stats in words; not retimed since. Where cols is
    not a multiple of 16 the 128 x 256 float32 accumulator's stores cannot be vectorized, and ptxas
    spilled 700-830 bytes a thread (sm_90, triton 3.6): tiles of 64 columns (142 registers) do not."""
    if dtype == torch.float64:
        return dict(BLOCK_OUT=32, BLOCK_COLS=64, BLOCK_ROWS=1, num_warps=4)
    if _interpreted():
        return dict(BLOCK_OUT=32, BLOCK_COLS=64, BLOCK_ROWS=32, num_warps=4)
    if dtype in (torch.float16, torch.bfloat16):
        if has_stats:
            return dict(BLOCK_OUT=256, BLOCK_COLS=128 if cols % 16 == 0 else 64, BLOCK_ROWS=64, num_warps=8,
                        num_stages=3)
        return dict(BLOCK_OUT=128, BLOCK_COLS=64, BLOCK_ROWS=64, num_warps=4, num_stages=4)
    # float32 "ieee" dots run on FMA units: smaller tiles, over 8 warps (with 4, ptxas spilled a
    # few registers of the 4-bit word path on sm_80 and sm_90).
    return dict(BLOCK_OUT=64, BLOCK_COLS=64, BLOCK_ROWS=16, num_warps=8, num_stages=2)


def weight_grad_from_codes(grad_out, codes, stats, cols, bits, group_size, lo, step):
    """grad_out [rows, out]^T @ x_hat [rows, cols] -> [out, cols] in grad_out's dtype, x_hat the
    values the codes stand for (dequantize_groups), dequantized tile by tile in the GEMM.

    Accumulates in float32 (float64 for float64); bfloat16 / float16 grad_out multiplies x_hat
    rounded to its dtype on the tensor cores, float32 multiplies exactly (input_precision "ieee",
    as torch's float32 matmul). grad_out may have any strides.
    """
    check_weight_grad_from_codes(grad_out, codes, stats, cols, bits, group_size)
    _check_runs_on(grad_out, "grad_out")
    rows, out_features = grad_out.shape
    grad_weight = torch.empty((out_features, cols), dtype=grad_out.dtype, device=grad_out.device)
    if grad_weight.numel():
        blocks = _gemm_blocks(grad_out.dtype, stats is not None, cols)
        upcast = _interpreted() and grad_out.dtype in (torch.float16, torch.bfloat16)
        tiles_out = cdiv(out_features, blocks["BLOCK_OUT"])
        tiles_cols = cdiv(cols, blocks["BLOCK_COLS"])
        # Codes in 4-byte words where rows are whole words, stats as one int32 a pair: loads of 4
        # bytes or more, which triton pipelines (cp.async) ahead of the dequantize and the dot.
        word_codes = packed_nbytes(cols, bits) % 4 == 0
        codes = _packed_input(codes).view(torch.int32) if word_codes else codes.contiguous()
        _weight_grad_kernel[(tiles_out * tiles_cols,)](
            grad_out, codes, codes if stats is None else _packed_input(stats).view(torch.int32),
            grad_weight, rows, out_features, cols, tiles_out, tiles_cols,
            cdiv(cols, group_size),
            packed_nbytes(cols, bits), grad_out.stride(0), grad_out.stride(1), float(lo),
            float(step), BITS=bits, GROUP_SIZE=group_size, HAS_STATS=stats is not None,
            BOUND=_saturation_bound(grad_out.dtype), IEEE=grad_out.dtype == torch.float32 or upcast, DOT_FLOAT32=upcast,
            SWIZZLE=8, WORD_CODES=word_codes, **blocks)
    return grad_weight
