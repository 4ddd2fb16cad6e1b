"""Plain-PyTorch references: the specification every kernel is held to in tests.

Nothing here is fast; everything here is obvious. Math is done in float32 (float64 for
float64 inputs) and cast to the input dtype once, as the kernels do.

Packed codes. A k-bit code of N elements is a uint8 tensor of ``ceil(N / 8) * k`` bytes. Element
``i`` lives in group ``g = i // 8`` at slot ``j = i % 8``: bits ``[j*k, j*k + k)`` of the
little-endian integer formed by bytes ``packed[g*k : g*k + k]``. So k = 3 packs 8 elements into
3 bytes, and no bit is wasted but the padding of the last group.

Codes of an activation. ``code(x) = #{j : borders[j] < x}`` for sorted float32 ``borders`` of
length ``2**k - 1`` (torch.bucketize with right=False), x compared exactly (a float64 x is not
rounded to float32 first); NaN gets code 0. Backward multiplies the
incoming gradient by ``levels[code]``. An activation's code is that of x, except Hardsigmoid's,
which is that of -|x| (``activation_codes``).
"""
from __future__ import annotations

import math

import torch

from memkernels.activations.spec import (CODES_NEGATED_MAGNITUDE, SELU_ALPHA, SELU_SCALE, TORCH_BACKWARD,
                                         Activation, Keep, once_differentiable)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _compute_value(x: torch.Tensor, act: int, p0: float = 0.0, p1: float = 0.0) -> torch.Tensor:
    """f(x), computed in float32 (float64 for float64) and returned in that compute dtype."""
    act = Activation(act)
    x = x.to(_compute_dtype(x))
    # Where f(+-0.0) is zero, it is x itself (ReLU and the ELUs select x but where x < 0), so the
    # sign of zero is torch's; NaN is not < 0 either, and passes through.
    if act == Activation.RELU:
        return torch.where(x < 0, torch.zeros_like(x), x)
    if act == Activation.LEAKY_RELU:
        return torch.where(x > 0, x, x * p0)
    if act == Activation.GELU:
        return 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    if act == Activation.GELU_TANH:
        k = math.sqrt(2.0 / math.pi)
        return 0.5 * x * (1.0 + torch.tanh(k * (x + 0.044715 * x * x * x)))
    if act == Activation.SILU:
        return x * torch.sigmoid(x)
    if act == Activation.MISH:
        return x * torch.tanh(torch.nn.functional.softplus(x))
    if act == Activation.SOFTPLUS:
        bx = x * p0
        return torch.where(bx > p1, x, torch.log1p(torch.exp(bx)) / p0)
    if act == Activation.ELU:
        return torch.where(x < 0, p0 * torch.expm1(x), x)
    if act == Activation.SELU:
        return SELU_SCALE * torch.where(x < 0, SELU_ALPHA * torch.expm1(x), x)
    if act == Activation.CELU:
        return torch.where(x < 0, p0 * torch.expm1(x / p0), x)
    if act == Activation.SIGMOID:
        return torch.sigmoid(x)
    if act == Activation.TANH:
        return torch.tanh(x)
    if act == Activation.HARDSWISH:
        return x * torch.clamp(x + 3.0, 0.0, 6.0) / 6.0
    if act == Activation.HARDSIGMOID:
        return torch.clamp(x + 3.0, 0.0, 6.0) / 6.0
    raise AssertionError(act)


def activation_derivative(x: torch.Tensor, act: int, p0: float = 0.0, p1: float = 0.0) -> torch.Tensor:
    """f'(x) in the compute dtype. At x = +-inf it is the limit (finite); at NaN it is NaN."""
    act = Activation(act)
    x = x.to(_compute_dtype(x))
    one = torch.ones_like(x)
    nan = torch.isnan(x)
    if act == Activation.RELU:
        d = (x > 0).to(x.dtype)
    elif act == Activation.LEAKY_RELU:
        d = torch.where(x > 0, one, one * p0)
    elif act == Activation.GELU:
        xf = torch.nan_to_num(x, posinf=40.0, neginf=-40.0)
        cdf = 0.5 * (1.0 + torch.erf(xf * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * xf * xf) * (1.0 / math.sqrt(2.0 * math.pi))
        d = cdf + xf * pdf
    elif act == Activation.GELU_TANH:
        k = math.sqrt(2.0 / math.pi)
        xf = torch.nan_to_num(x, posinf=40.0, neginf=-40.0)
        t = torch.tanh(k * (xf + 0.044715 * xf * xf * xf))
        d = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * xf * xf)
    elif act == Activation.SILU:
        xf = torch.nan_to_num(x, posinf=100.0, neginf=-100.0)
        s = torch.sigmoid(xf)
        d = s * (1.0 + xf * (1.0 - s))
    elif act == Activation.MISH:
        xf = torch.nan_to_num(x, posinf=100.0, neginf=-100.0)
        t = torch.tanh(torch.nn.functional.softplus(xf))
        d = t + xf * torch.sigmoid(xf) * (1.0 - t * t)
    elif act == Activation.SOFTPLUS:
        bx = x * p0
        d = torch.where(bx > p1, one, torch.sigmoid(bx))
    elif act == Activation.ELU:
        d = torch.where(x > 0, one, p0 * torch.exp(x))
    elif act == Activation.SELU:
        d = SELU_SCALE * torch.where(x > 0, one, SELU_ALPHA * torch.exp(x))
    elif act == Activation.CELU:
        d = torch.where(x > 0, one, torch.exp(x / p0))
    elif act == Activation.SIGMOID:
        s = torch.sigmoid(x)
        d = s * (1.0 - s)
    elif act == Activation.TANH:
        t = torch.tanh(x)
        d = 1.0 - t * t
    elif act == Activation.HARDSWISH:
        # torch takes the outer pieces at x = +-3 exactly: 0 at -3, 1 at 3.
        d = torch.where(x <= -3.0, 0.0 * one, torch.where(x < 3.0, x / 3.0 + 0.5, one))
    elif act == Activation.HARDSIGMOID:
        d = torch.where((x > -3.0) & (x < 3.0), one / 6.0, 0.0 * one)
    else:
        raise AssertionError(act)
    return torch.where(nan, x, d)


def codes(x: torch.Tensor, borders: torch.Tensor) -> torch.Tensor:
    """Interval index of every element of x (flattened), uint8: #{j : borders[j] < x}; NaN -> 0."""
    x = x.reshape(-1).to(_compute_dtype(x))
    c = torch.bucketize(x, borders.to(x.device, torch.float32).to(x.dtype), right=False)
    return torch.where(torch.isnan(x), torch.zeros_like(c), c).to(torch.uint8)


def activation_codes(x: torch.Tensor, act: int, borders: torch.Tensor) -> torch.Tensor:
    """codes() of what activation `act` codes: x, or -|x| for Hardsigmoid (its two-valued f' is
    1/6 exactly where -|x| > -3)."""
    return codes(-x.abs() if act in CODES_NEGATED_MAGNITUDE else x, borders)


def pack_bits(codes_u8: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D uint8 tensor of values < 2**bits into ceil(N/8)*bits bytes (layout above)."""
    n = codes_u8.numel()
    groups = (n + 7) // 8
    c = torch.zeros(groups * 8, dtype=torch.int64, device=codes_u8.device)
    c[:n] = codes_u8.reshape(-1).to(torch.int64)
    shifts = torch.arange(8, device=c.device, dtype=torch.int64) * bits
    words = (c.view(groups, 8) << shifts).sum(dim=1)  # disjoint bit fields: sum == or
    byte_shifts = torch.arange(bits, device=c.device, dtype=torch.int64) * 8
    out = (words[:, None] >> byte_shifts) & 0xFF
    return out.reshape(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of pack_bits: the first `numel` codes, uint8."""
    groups = packed.numel() // bits
    b = packed.reshape(groups, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, device=b.device, dtype=torch.int64) * 8
    words = (b << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, device=b.device, dtype=torch.int64) * bits
    c = (words[:, None] >> shifts) & ((1 << bits) - 1)
    return c.reshape(-1)[:numel].to(torch.uint8)


def activation_value(x, act, p0=0.0, p1=0.0):
    """Reference of op activation_value: f(x) in x's dtype."""
    return _compute_value(x, act, p0, p1).to(x.dtype)


def activation_forward(x, act, p0, p1, bits, borders):
    """Reference of the op ``memkernels::activation_forward``: (f(x), saved).

    bits == 0: saved = f'(x) in x's dtype and shape. bits > 0: saved = packed activation_codes.
    """
    y = activation_value(x, act, p0, p1)
    if bits == 0:
        return y, activation_derivative(x, act, p0, p1).to(x.dtype)
    return y, pack_bits(activation_codes(x, act, borders), bits)


def activation_backward(grad_out, saved, bits, levels):
    """Reference of ``memkernels::activation_backward``: grad_out * f'(x) (or levels[code]). A zero
    level gives a zero gradient whatever grad_out holds (inf, NaN), as torch's backward of ReLU and
    Hardsigmoid gives where their derivative is 0."""
    cd = _compute_dtype(grad_out)
    if bits == 0:
        return (grad_out.to(cd) * saved.to(cd)).to(grad_out.dtype)
    c = unpack_bits(saved, bits, grad_out.numel()).long()
    d = levels.to(grad_out.device, cd)[c].view(grad_out.shape)
    return torch.where(d == 0, 0.0, grad_out.to(cd) * d).to(grad_out.dtype)


def activation_backward_from_input(grad_out, x, act, p0=0.0, p1=0.0):
    """Reference of ``memkernels::activation_backward_from_input``: grad_out * f'(x), f' from x."""
    cd = _compute_dtype(grad_out)
    return (grad_out.to(cd) * activation_derivative(x, act, p0, p1)).to(grad_out.dtype)


def gated_forward(a, b, act, bits, borders):
    """Reference of ``memkernels::gated_forward``: (y, code) with y = f(a) * b.

    bits > 0: code = packed code of a (backward keeps code and b). bits == 0: code is an empty
    uint8 tensor (backward keeps a and b themselves, exact).
    """
    cd = _compute_dtype(a)
    y = (_compute_value(a, act) * b.to(cd)).to(a.dtype)
    if bits == 0:
        return y, torch.empty(0, dtype=torch.uint8, device=a.device)
    return y, pack_bits(codes(a, borders), bits)


def gated_backward(grad_out, saved_a, b, act, bits, levels, value_levels):
    """Reference of ``memkernels::gated_backward``: (grad_a, grad_b).

    grad_a = g * b * f'(a), grad_b = g * f(a); with bits > 0, f'(a) and f(a) are the
    piecewise-constant levels[code] and value_levels[code].
    """
    cd = _compute_dtype(grad_out)
    g = grad_out.to(cd)
    if bits == 0:
        d = activation_derivative(saved_a, act)
        v = _compute_value(saved_a, act)
    else:
        c = unpack_bits(saved_a, bits, grad_out.numel()).long()
        d = levels.to(g.device, cd)[c].view(g.shape)
        v = value_levels.to(g.device, cd)[c].view(g.shape)
    return (g * b.to(cd) * d).to(grad_out.dtype), (g * v).to(grad_out.dtype)


# The differentiable ops memkernels::activation and memkernels::gated: their autograd (csrc/autograd.cpp)
# in Python, on the reference kernels above.

class _Activation(torch.autograd.Function):
    """Keep.DERIVATIVE and Keep.INPUT."""

    @staticmethod
    def forward(ctx, x, act, p0, p1, bits, keep, borders, levels):
        ctx.act, ctx.p0, ctx.p1, ctx.bits, ctx.keep, ctx.levels = act, p0, p1, bits, keep, levels
        if keep == Keep.INPUT:
            ctx.save_for_backward(x)
            return activation_value(x, act, p0, p1)
        y, saved = activation_forward(x, act, p0, p1, bits, borders)
        ctx.save_for_backward(saved)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (kept,) = ctx.saved_tensors
        if ctx.keep == Keep.INPUT:
            grad_in = activation_backward_from_input(grad_out, kept, ctx.act, ctx.p0, ctx.p1)
        elif ctx.act == Activation.LEAKY_RELU and grad_out.dtype == torch.float64:
            # the slope at full precision: a float32 level would round it
            positive = unpack_bits(kept, 1, grad_out.numel()).view(grad_out.shape).bool()
            grad_in = torch.where(positive, grad_out, grad_out * ctx.p0)
        else:
            grad_in = activation_backward(grad_out, kept, ctx.bits, ctx.levels)
        return grad_in, None, None, None, None, None, None, None


class _TorchBackward(torch.autograd.Function):
    """Keep.TORCH: y or x kept (TORCH_BACKWARD), backward torch's op; with create_graph=True the kept
    y comes back with its grad_fn, so that op differentiates again."""

    @staticmethod
    def forward(ctx, x, act):
        y = activation_value(x, act)
        keeps_output, ctx.torch_backward = TORCH_BACKWARD[act]
        ctx.save_for_backward(y if keeps_output else x)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        (kept,) = ctx.saved_tensors
        return ctx.torch_backward(grad_out, kept), None


def activation(x, act, p0, p1, bits, keep, borders, levels):
    """Reference of ``memkernels::activation``: f(x); backward keeps what `keep` (Keep) says:
    activation_forward's saved (f'(x) or the packed code), x, or torch's (y or x, backward torch's
    op). Float64 LeakyReLU multiplies by its slope at full precision."""
    if keep == Keep.TORCH:
        if act not in TORCH_BACKWARD:
            raise RuntimeError(f"keep = 2 (torch's backward) serves Sigmoid, Tanh and Hardswish, got activation id {act}")
        return _TorchBackward.apply(x, act)
    return _Activation.apply(x, act, p0, p1, bits, keep, borders, levels)


class _Gated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, act, bits, copy_b, borders, levels, value_levels):
        ctx.act, ctx.bits, ctx.levels, ctx.value_levels = act, bits, levels, value_levels
        y, code = gated_forward(a, b, act, bits, borders)
        ctx.save_for_backward(a if bits == 0 else code,
                              b.clone(memory_format=torch.contiguous_format) if bits and copy_b else b)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        saved_a, b = ctx.saved_tensors
        grad_a, grad_b = gated_backward(grad_out, saved_a, b, ctx.act, ctx.bits, ctx.levels, ctx.value_levels)
        return grad_a, grad_b, None, None, None, None, None, None


def gated(a, b, act, bits, copy_b, borders, levels, value_levels):
    """Reference of ``memkernels::gated``: f(a) * b; backward keeps (a, b) or (code of a, b), b
    copied when copy_b and bits > 0."""
    return _Gated.apply(a, b, act, bits, copy_b, borders, levels, value_levels)


# Compressed saved inputs (memkernels/compress). Inputs are 2-D [rows, cols]; each row's codes are
# packed on their own into packed_nbytes(cols, bits) bytes (see csrc/ops.cpp).

def rounding_noise(seed: int, rows: int, cols: int) -> torch.Tensor:
    """u [rows, cols] float32 in [0, 1) of quantize_groups: value (r, c) takes output c % 4 of
    Philox4x32-10 with key `seed` (low word first) and counter (c // 4, 0, r, 0), as ATen's
    at::Philox4_32(seed, subsequence=r, offset=c // 4) gives it; its top 24 bits scaled by 2**-24."""
    r = torch.arange(rows, dtype=torch.int64)[:, None].expand(rows, cols)
    c = torch.arange(cols, dtype=torch.int64)[None, :].expand(rows, cols)
    zero = torch.zeros_like(c)
    outputs = torch.stack(philox4x32(c // 4, zero, r & _UINT32, r >> 32, seed & _UINT32, (seed >> 32) & _UINT32))
    chosen = outputs.gather(0, (c % 4).expand(rows, cols)[None])[0]
    return (chosen >> 8).to(torch.float32) * 2.0 ** -24


def _round_bfloat16(v: torch.Tensor, up: bool) -> torch.Tensor:
    """float32 v rounded to a bfloat16 value toward +inf (up) or -inf, returned as float32."""
    bits = v.view(torch.int32).to(torch.int64) & _UINT32
    trunc = ((bits & 0xFFFF0000) - ((bits & 0x80000000) << 1)).to(torch.int32).view(torch.float32)
    # Truncation rounds toward zero; step one bf16 ulp away from zero where that went the wrong way.
    wrong = (trunc < v) if up else (trunc > v)
    step = ((bits & 0xFFFF0000) + 0x10000 - ((bits & 0x80000000) << 1)).to(torch.int32).view(torch.float32)
    return torch.where(wrong, step, trunc)


BFLOAT16_MAX = torch.finfo(torch.bfloat16).max  # 0x7F7F: float32's largest values lie above it


def scaled_difference(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor | float) -> torch.Tensor:
    """(a - b) / d in float32, rounded as if float32's exponent had no bound where a - b
    overflows (a and b finite, more than float32's largest value apart): from the halves then,
    a * 0.5 - b * 0.5 (exact halvings, one rounding), divided, doubled (exact)."""
    over = (a - b).abs() == math.inf
    half = torch.where(over, 0.5, 1.0)
    return (a * half - b * half) / d * (1 / half)


def dequantized(low: torch.Tensor, scale: torch.Tensor, q: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """low + scale * q in float32 with one rounding (scale * q, a bfloat16 times a code of at most 8
    bits, is exact), saturated at the largest finite value of `dtype` (NaN stays NaN): the top code
    of a group reaching the dtype's largest values stands for a value up to a scale above them.
    Where scale * (2**bits - 1) overflows, the group is computed from halves (exact) and doubled."""
    over = (scale * ((1 << bits) - 1)).abs() == math.inf
    half = torch.where(over, 0.5, 1.0)
    bound = min(torch.finfo(dtype).max, torch.finfo(torch.float32).max)
    return ((low * half + (scale * half) * q) * (1 / half)).clamp(-bound, bound)


def group_stats(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """(min, scale) of every group of x [rows, cols], float32 [rows, groups, 2], bf16-representable.

    min is rounded down and scale = (max - min) / (2**bits - 1) rounded up, so that every value of
    the group lies in [min, min + scale * (2**bits - 1)]. A group holding NaN or +-Inf gets NaN.
    Groups near float32's range stay finite: (max - min) / top is computed without overflow
    (scaled_difference); a min below bfloat16's range (under -3.39e38) becomes -BFLOAT16_MAX, and
    its values below that get code 0; a scale above it (1-bit codes of such a group) becomes
    BFLOAT16_MAX.
    """
    rows, cols = x.shape
    groups = -(-cols // group_size)
    xf = x.to(torch.float32)
    padded = torch.full((rows, groups * group_size), float("nan"), dtype=torch.float32, device=x.device)
    padded[:, :cols] = xf
    g = padded.view(rows, groups, group_size)
    present = torch.arange(groups * group_size, device=x.device).view(groups, group_size) < cols
    lo = torch.where(present, g, torch.inf).amin(dim=2)
    hi = torch.where(present, g, -torch.inf).amax(dim=2)
    finite = torch.where(present, torch.isfinite(g), True).all(dim=2)
    mn = _round_bfloat16(lo, up=False).clamp(min=-BFLOAT16_MAX)
    scale = _round_bfloat16(scaled_difference(hi, mn, float((1 << bits) - 1)), up=True).clamp(max=BFLOAT16_MAX)
    nan = torch.full_like(mn, float("nan"))
    return torch.stack([torch.where(finite, mn, nan), torch.where(finite, scale, nan)], dim=2)


def quantize_groups(x: torch.Tensor, bits: int, group_size: int, seed: torch.Tensor):
    """Reference of ``memkernels::quantize_groups``: (codes uint8 [rows, packed bytes of a row],
    stats bfloat16 [rows, groups, 2])."""
    rows, cols = x.shape
    stats = group_stats(x, bits, group_size)
    per_col = stats.repeat_interleave(group_size, dim=1)[:, :cols]  # [rows, cols, 2]
    mn, scale = per_col[..., 0], per_col[..., 1]
    u = rounding_noise(int(seed), rows, cols).to(x.device)
    q = torch.floor(scaled_difference(x.to(torch.float32), mn, scale) + u)
    # NaN q (a non-finite group, or 0 / 0 in a constant one) gets code 0.
    q = torch.where(torch.isnan(q), 0.0, q).clamp(0, (1 << bits) - 1).to(torch.uint8)
    codes = torch.stack([pack_bits(row, bits) for row in q]) if rows else \
        torch.empty((0, (cols + 7) // 8 * bits), dtype=torch.uint8, device=x.device)
    return codes.reshape(rows, (cols + 7) // 8 * bits), stats.to(torch.bfloat16)


def auxiliary_sign_forward(x: torch.Tensor, eps: float, nonnegative: bool):
    """Reference of ``memkernels::auxiliary_sign_forward``: (x + eps * s(x), packed [x > 0])."""
    rows, cols = x.shape
    positive = x > 0
    cd = _compute_dtype(x)
    s = positive.to(cd) if nonnegative else torch.where(positive, 1.0, -1.0).to(cd)
    x_aux = (x.to(cd) + eps * s).to(x.dtype)
    signs = torch.stack([pack_bits(row, 1) for row in positive.to(torch.uint8)]) if rows else \
        torch.empty((0, (cols + 7) // 8), dtype=torch.uint8, device=x.device)
    return x_aux, signs.reshape(rows, (cols + 7) // 8)


def dequantize_groups(codes, stats, cols, bits, group_size, lo, step, dtype):
    """Reference of ``memkernels::dequantize_groups``: [rows, cols] of `dtype`."""
    return _dequantized_values(codes, stats, cols, bits, group_size, lo, step, dtype).to(dtype)


def _dequantized_values(codes, stats, cols, bits, group_size, lo, step, dtype):
    """float32 [rows, cols]: min + scale * code (lo + step * code without stats), dequantized()
    saturating at the range of `dtype`."""
    q = torch.stack([unpack_bits(row, bits, cols) for row in codes]).to(torch.float32) if codes.shape[0] \
        else torch.empty((0, cols), dtype=torch.float32, device=codes.device)
    if stats is None:
        return dequantized(torch.tensor(float(lo), dtype=torch.float32), torch.tensor(float(step), dtype=torch.float32),
                           q, bits, dtype)
    per_col = stats.to(torch.float32).repeat_interleave(group_size, dim=1)[:, :cols]
    return dequantized(per_col[..., 0], per_col[..., 1], q, bits, dtype)


def weight_grad_from_codes(grad_out, codes, stats, cols, bits, group_size, lo, step):
    """Reference of ``memkernels::weight_grad_from_codes``: grad_out^T @ x_hat in float32 (float64
    for float64), cast to grad_out's dtype; x_hat saturates at the range of grad_out's dtype."""
    cd = _compute_dtype(grad_out)
    x_hat = _dequantized_values(codes, stats, cols, bits, group_size, lo, step, grad_out.dtype).to(cd)
    return (grad_out.to(cd).t() @ x_hat).to(grad_out.dtype)


# ---- random feedback matrices ----------------------------------------------------------------
#
# B (rows, cols) of layer `layer` is never stored: every kernel regenerates it from Philox4x32-10
# exactly as Triton's tl.randint4x(key, offset) does, so CPU, Triton and CUDA give the same bits:
#
#   key     = (seed, layer) as two uint32 words: Triton's 64-bit seed (layer << 32) | seed
#   counter = (offset mod 2**32, offset >> 32, 0, 0),  offset = (row // 4) * cols + col
#   r       = word (row % 4) of Philox4x32-10(counter, key)   (one call gives 4 rows of a column)
#   B[row, col] = float32(int32(r)) * float32(scale * 2**-31)
#
# so B is uniform in [-scale, scale] (mean 0, variance scale**2 / 3). Both factors of the last
# product are exact float32 numbers (an int32 rounds to float32 the same way everywhere, and
# scale * 2**-31 only shifts the exponent), so the one rounding of the product is the same on
# every device. B depends on nothing else: not on the tiling, the batch size or the device.

_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_UINT32 = 0xFFFFFFFF
PHILOX_ROUNDS = 10  # tl.randint's default


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 as triton.language.random.philox_impl computes it, on int64 tensors holding
    uint32 values (products of two uint32 fit in 64 bits only unsigned, so they are split)."""
    def mul_hi_lo(a: int, x: torch.Tensor):
        # a * x = a * (x_hi * 2**16 + x_lo): each part < 2**48, no int64 overflow.
        lo_part = a * (x & 0xFFFF)
        hi_part = a * (x >> 16)
        low = (lo_part + ((hi_part & 0xFFFF) << 16))
        high = (hi_part >> 16) + (low >> 32)
        return high & _UINT32, low & _UINT32

    for _ in range(rounds):
        hi_b, lo_b = mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _UINT32
        k1 = (k1 + _PHILOX_KEY_B) & _UINT32
    return c0, c1, c2, c3


def check_feedback_key(seed: int, layer: int) -> None:
    """The key words must be uint32; layer < 2**31 keeps Triton's 64-bit seed positive."""
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if not 0 <= layer < 2**31:
        raise ValueError(f"layer must be in [0, 2**31), got {layer}")


def feedback_matrix(seed: int, layer: int, rows: int, cols: int, scale: float,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """The feedback matrix B (rows, cols), float32, materialised (see the comment above)."""
    check_feedback_key(seed, layer)
    row = torch.arange(rows, device=device, dtype=torch.int64)[:, None]
    col = torch.arange(cols, device=device, dtype=torch.int64)[None, :]
    offset = (row // 4) * cols + col
    zero = torch.zeros_like(offset)
    words = philox4x32(offset & _UINT32, offset >> 32, zero, zero, seed, layer)
    r = torch.stack(words).gather(0, (row % 4).expand(rows, cols)[None])[0]
    r = torch.where(r >= 2**31, r - 2**32, r)  # the int32 of the same bits
    step = torch.tensor(scale, dtype=torch.float32) * 2.0**-31
    return r.to(torch.float32) * step.to(device)


def feedback_project(e, seed, layer, out_features, scale, derivative):
    """Reference of ``memkernels::feedback_project``: (e @ B) * derivative, B = feedback_matrix(
    seed, layer, e.shape[1], out_features, scale); derivative (N, out_features) or None.
    Computed in float32 (float64 for float64) and cast to e's dtype once."""
    cd = _compute_dtype(e)
    b = feedback_matrix(seed, layer, e.shape[1], out_features, scale, e.device).to(cd)
    out = e.to(cd) @ b
    if derivative is not None:
        out = out * derivative.to(cd)
    return out.to(e.dtype)
