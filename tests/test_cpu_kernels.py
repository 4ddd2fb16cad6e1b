"""The C++ CPU kernels of every memkernels op, held to memkernels/reference.py.

Calls torch.ops.memkernels.* directly (importing memkernels._C registers the ops), so nothing here
depends on the Python wrappers. Tolerances: float32 rel 1e-6 (abs 2e-6 where f or f' cancels to
near 0), bfloat16/float16 one ulp of the output dtype (the reference computes in float32 and casts
once, as the kernels do), float64 1e-12. Codes and packed bytes must be equal exactly.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("memkernels._C", reason="the C++ extension is not built (python setup.py build_ext --inplace)")

from _codes import exact_codes, float64_around_borders  # noqa: E402

from memkernels import reference as ref  # noqa: E402
from memkernels.activations.spec import (  # noqa: E402
    CODES_NEGATED_MAGNITUDE, GATES, VALID_BITS, Activation, default_params)

ops = torch.ops.memkernels

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SHAPES = ((1,), (7,), (1023,), (4097,), (3, 5, 7))

# Every activation at torch's defaults, and those with parameters at non-default ones too.
ACTIVATIONS = [(act, default_params(act)) for act in Activation] + [
    (Activation.LEAKY_RELU, (0.2, 0.0)),
    (Activation.SOFTPLUS, (2.0, 5.0)),
    (Activation.ELU, (0.7, 0.0)),
    (Activation.CELU, (1.3, 0.0)),
]
ACTIVATION_IDS = [f"{act.name}{p}" for act, p in ACTIVATIONS]

SPECIAL_VALUES = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e4, -1e4, 50.0, -50.0, 100.5, -100.5, 3.0, -3.0]


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def assert_matches(out: torch.Tensor, expected: torch.Tensor, factor: torch.Tensor | None = None) -> None:
    """out equals expected within the dtype's tolerance; NaN and +-inf exactly where expected has them.

    factor: for a product factor * f'(x) (a gradient), the absolute tolerance of f' scales with it.
    """
    assert out.dtype == expected.dtype and out.shape == expected.shape, (out.dtype, out.shape, expected.shape)
    o, e = out.double(), expected.double()
    atol = 2e-6 if factor is None else 2e-6 * factor.double().abs().clamp(min=1)
    finite = torch.isfinite(e)
    same_special = (torch.isnan(o) & torch.isnan(e)) | (o == e)
    bad = ~finite & ~same_special
    if expected.dtype == torch.float64:
        tol = 1e-12 + 1e-12 * e.abs()
    elif expected.dtype == torch.float32:
        tol = atol + 1e-6 * e.abs()
    else:  # one ulp of the output dtype at the expected value
        mag = expected.abs()
        ulp = (torch.nextafter(mag, torch.full_like(mag, math.inf)) - mag).double()
        tol = atol + ulp
    bad |= finite & ~((o - e).abs() <= tol)
    if bad.any():
        idx = bad.reshape(-1).nonzero()[:5].reshape(-1)
        raise AssertionError(
            f"{int(bad.sum())} mismatches of {bad.numel()} ({expected.dtype}); first at flat indices "
            f"{idx.tolist()}: got {o.reshape(-1)[idx].tolist()}, expected {e.reshape(-1)[idx].tolist()}")


def random_input(shape, dtype):
    return (torch.randn(shape) * 3).to(dtype)


def random_borders(bits):
    return torch.sort(torch.randn(2**bits - 1) * 2).values


def random_levels(bits):
    return torch.randn(2**bits)


# ---- activation_forward / activation_backward ----

@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act,params", ACTIVATIONS, ids=ACTIVATION_IDS)
def test_activation_exact(act, params, dtype, shape):
    x = random_input(shape, dtype)
    y, saved = ops.activation_forward(x, int(act), *params, 0, None)
    y_ref, saved_ref = ref.activation_forward(x, int(act), *params, 0, None)
    assert_matches(y, y_ref)
    assert_matches(saved, saved_ref)
    g = torch.randn(shape).to(dtype)
    assert_matches(ops.activation_backward(g, saved_ref, 0, None), ref.activation_backward(g, saved_ref, 0, None))
    from_input = ops.activation_backward_from_input(g, x, int(act), *params)
    assert_matches(from_input, ref.activation_backward_from_input(g, x, int(act), *params), factor=g)
    if dtype in (torch.float32, torch.float64):  # f' from x is forward's f', bit for bit
        assert torch.equal(from_input, ops.activation_backward(g, saved, 0, None))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act,params", ACTIVATIONS, ids=ACTIVATION_IDS)
def test_activation_coded_3bits(act, params, dtype, shape):
    x = random_input(shape, dtype)
    borders, levels = random_borders(3), random_levels(3)
    y, saved = ops.activation_forward(x, int(act), *params, 3, borders)
    y_ref, saved_ref = ref.activation_forward(x, int(act), *params, 3, borders)
    assert_matches(y, y_ref)
    assert torch.equal(saved, saved_ref)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", VALID_BITS)
@pytest.mark.parametrize("act", (Activation.GELU, Activation.HARDSIGMOID), ids=lambda a: a.name)
def test_activation_codes_every_bits(act, bits, dtype, shape):
    borders, levels = random_borders(bits), random_levels(bits)
    x = random_input(shape, dtype)
    x.view(-1)[: min(x.numel(), borders.numel())] = borders[: x.numel()].to(dtype)  # ties: borders < x is strict
    y, saved = ops.activation_forward(x, int(act), 0.0, 0.0, bits, borders)
    y_ref, saved_ref = ref.activation_forward(x, int(act), 0.0, 0.0, bits, borders)
    assert_matches(y, y_ref)
    assert saved.dtype == torch.uint8 and saved.numel() == (x.numel() + 7) // 8 * bits
    assert torch.equal(saved, saved_ref)
    g = torch.randn(shape).to(dtype)
    grad = ops.activation_backward(g, saved, bits, levels)
    assert_matches(grad, ref.activation_backward(g, saved_ref, bits, levels))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act,params", ACTIVATIONS, ids=ACTIVATION_IDS)
def test_activation_special_values(act, params, dtype):
    x = torch.tensor(SPECIAL_VALUES).to(dtype)
    y, saved = ops.activation_forward(x, int(act), *params, 0, None)
    y_ref, saved_ref = ref.activation_forward(x, int(act), *params, 0, None)
    assert_matches(y, y_ref)
    assert_matches(saved, saved_ref)
    assert torch.isfinite(saved[1:3]).all(), "f'(+-inf) must be the finite limit"
    g = torch.ones_like(x)
    from_input = ops.activation_backward_from_input(g, x, int(act), *params)
    assert_matches(from_input, ref.activation_backward_from_input(g, x, int(act), *params))
    assert torch.isfinite(from_input[1:3]).all()
    for bits in VALID_BITS:
        borders = random_borders(bits)
        _, codes = ops.activation_forward(x, int(act), *params, bits, borders)
        unpacked = ops.unpack_bits(codes, bits, x.numel())
        # NaN, +inf, -inf (Hardsigmoid codes -|x|: -inf for both infinities)
        top = 0 if act in CODES_NEGATED_MAGNITUDE else 2**bits - 1
        assert unpacked[0] == 0 and unpacked[1] == top and unpacked[2] == 0
        assert torch.equal(codes, ref.pack_bits(ref.activation_codes(x, act, borders), bits))


def float32_ulps(out: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|out - exact| in units of the float32 spacing at exact (float64), denormals included."""
    mag = exact.float().abs()
    spacing = (torch.nextafter(mag, torch.full_like(mag, math.inf)) - mag).double()
    return (out.double() - exact).abs() / spacing


def test_bfloat16_rounding_of_every_value():
    """Every bfloat16 x (NaN, inf, denormals included) through LeakyReLU with slope -1.5: the float
    products need rounding back to bfloat16, ties among them, and must round as torch's casts do."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    y, saved = ops.activation_forward(x, int(Activation.LEAKY_RELU), -1.5, 0.0, 0, None)
    y_ref, saved_ref = ref.activation_forward(x, int(Activation.LEAKY_RELU), -1.5, 0.0, 0, None)
    for got, want in ((y, y_ref), (saved, saved_ref)):
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan)
        assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


def test_float32_inline_math_accuracy():
    # The float kernels compute exp, expm1, tanh and log1p inline (vec_math.h), held here to float64.
    # ELU's f'(x) (alpha 1) is exp(x) for x < 0: within 2 ulp, denormal results included. Softplus's
    # f'(x) is 1 / (1 + exp(-x)), which is 1 / exp(-x) in float32 below x = -20 (and normal above
    # -87): the division adds its rounding, and an ulp of exp(-x) can be up to two ulps of the
    # result, so 3 ulp there (a correctly rounded exp gives 1.5).
    x = torch.linspace(-110, 0, 1_000_001)
    y, d = ops.activation_forward(x, int(Activation.ELU), 1.0, 0.0, 0, None)
    assert float32_ulps(d, torch.exp(x.double())).max() <= 2
    assert float32_ulps(y, torch.expm1(x.double())).max() <= 2  # ELU's f(x) is expm1(x) for x < 0
    x = torch.linspace(-87, -20, 1_000_001)
    _, d = ops.activation_forward(x, int(Activation.SOFTPLUS), 1.0, 20.0, 0, None)
    assert float32_ulps(d, 1 / torch.exp(-x.double())).max() <= 3
    # Softplus's f(x) is log1p(exp(x)) up to its threshold: both inline, 3 ulp together.
    x = torch.linspace(-100, 20, 1_000_001)
    y, _ = ops.activation_forward(x, int(Activation.SOFTPLUS), 1.0, 20.0, 0, None)
    assert float32_ulps(y, torch.log1p(torch.exp(x.double()))).max() <= 3
    # tanh: 3 ulp, and within 1e-7 of tanh near +-1, where GELU's tanh form and Mish take 1 + tanh
    # or 1 - tanh^2 (1e-7 is less than two float spacings below 1).
    x = torch.linspace(-12, 12, 1_000_001)
    y, _ = ops.activation_forward(x, int(Activation.TANH), 0.0, 0.0, 0, None)
    exact = torch.tanh(x.double())
    assert float32_ulps(y, exact).max() <= 3
    assert (y.double() - exact).abs().max() <= 1e-7


@pytest.mark.parametrize("bits", VALID_BITS)
def test_activation_codes_repeated_borders(bits):
    # The vector kernels find a code by binary search; equal borders must still count as in the
    # reference (#{j : borders[j] < x}).
    borders = torch.sort(torch.randint(-3, 4, (2**bits - 1,)).float()).values
    x = torch.cat([borders, borders + 0.5, torch.randn(4097) * 3])
    _, codes = ops.activation_forward(x, int(Activation.RELU), 0.0, 0.0, bits, borders)
    assert torch.equal(codes, ref.pack_bits(ref.codes(x, borders), bits))


@pytest.mark.parametrize("bits", VALID_BITS)
def test_float64_codes_compare_exactly(bits):
    # A float64 x a hair above a border (or 1e-50 above ReLU's 0) is above it: its code is not
    # that of x rounded to float32.
    borders = random_borders(bits)
    borders[0] = 0.0
    borders = borders.sort().values
    x = float64_around_borders(borders)
    assert torch.equal(ref.codes(x, borders), exact_codes(x, borders))
    _, codes = ops.activation_forward(x, int(Activation.GELU), 0.0, 0.0, bits, borders)
    assert torch.equal(codes, ref.pack_bits(exact_codes(x, borders), bits))
    _, codes = ops.gated_forward(x, torch.ones_like(x), int(Activation.SILU), bits, borders)
    assert torch.equal(codes, ref.pack_bits(exact_codes(x, borders), bits))
    # Hardsigmoid codes -|x|: negated before it is rounded
    _, codes = ops.activation_forward(x, int(Activation.HARDSIGMOID), 0.0, 0.0, bits, borders)
    assert torch.equal(codes, ref.pack_bits(exact_codes(-x.abs(), borders), bits))
    assert torch.equal(ref.activation_codes(x, Activation.HARDSIGMOID, borders), exact_codes(-x.abs(), borders))


# ---- gated_forward / gated_backward ----

@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gate", GATES, ids=lambda g: g.name)
@pytest.mark.parametrize("bits", (0, 1, 3, 8))
def test_gated(bits, gate, dtype, shape):
    a, b = random_input(shape, dtype), random_input(shape, dtype)
    borders = random_borders(bits) if bits else None
    y, code = ops.gated_forward(a, b, int(gate), bits, borders)
    y_ref, code_ref = ref.gated_forward(a, b, int(gate), bits, borders)
    assert_matches(y, y_ref)
    assert code.dtype == torch.uint8 and torch.equal(code, code_ref)
    g = torch.randn(shape).to(dtype)
    levels = random_levels(bits) if bits else None
    value_levels = random_levels(bits) if bits else None
    saved_a = a if bits == 0 else code
    grads = ops.gated_backward(g, saved_a, b, int(gate), bits, levels, value_levels)
    grads_ref = ref.gated_backward(g, saved_a, b, int(gate), bits, levels, value_levels)
    assert_matches(grads[0], grads_ref[0], factor=g.double() * b.double())
    assert_matches(grads[1], grads_ref[1], factor=g)


# Outputs of 8 MB and more are written with streaming stores (vec_math.h, kStreamBytes); 5 elements
# past that leave a partial vector at the end, which is stored the ordinary way. Outputs of 32 MB
# and more are fresh mappings (glibc maps them anew), which each task populates before it writes
# (populate_fresh_pages).
STREAMED_BYTES = 8 << 20
FRESH_MAPPING_BYTES = 32 << 20


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize("bits", (0, 3))
@pytest.mark.parametrize("nbytes", (STREAMED_BYTES, FRESH_MAPPING_BYTES))
def test_large_outputs(nbytes, bits, dtype):
    numel = nbytes // dtype.itemsize + 5
    x = random_input((numel,), dtype)
    borders, levels = (random_borders(bits), random_levels(bits)) if bits else (None, None)
    y, saved = ops.activation_forward(x, int(Activation.SIGMOID), 0.0, 0.0, bits, borders)
    y_ref, saved_ref = ref.activation_forward(x, int(Activation.SIGMOID), 0.0, 0.0, bits, borders)
    assert_matches(y, y_ref)
    if bits == 0:
        assert_matches(saved, saved_ref)
    else:
        assert torch.equal(saved, saved_ref)
    g = torch.randn(numel).to(dtype)
    assert_matches(ops.activation_backward(g, saved, bits, levels), ref.activation_backward(g, saved_ref, bits, levels))
    if bits == 0:
        assert_matches(ops.activation_backward_from_input(g, x, int(Activation.SIGMOID), 0.0, 0.0),
                       ref.activation_backward_from_input(g, x, int(Activation.SIGMOID)), factor=g)
    b = random_input((numel,), dtype)
    y, code = ops.gated_forward(x, b, int(Activation.SILU), bits, borders)
    y_ref, code_ref = ref.gated_forward(x, b, int(Activation.SILU), bits, borders)
    assert_matches(y, y_ref)
    assert torch.equal(code, code_ref)
    saved_a = x if bits == 0 else code
    grads = ops.gated_backward(g, saved_a, b, int(Activation.SILU), bits, levels, levels)
    grads_ref = ref.gated_backward(g, saved_a, b, int(Activation.SILU), bits, levels, levels)
    assert_matches(grads[0], grads_ref[0], factor=g.double() * b.double())
    assert_matches(grads[1], grads_ref[1], factor=g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gate", GATES, ids=lambda g: g.name)
def test_gated_special_values(gate, dtype):
    a = torch.tensor(SPECIAL_VALUES).to(dtype)
    b = torch.linspace(-2, 2, a.numel()).to(dtype)
    y, _ = ops.gated_forward(a, b, int(gate), 0, None)
    assert_matches(y, ref.gated_forward(a, b, int(gate), 0, None)[0])
    g = torch.ones_like(a)
    for got, want in zip(ops.gated_backward(g, a, b, int(gate), 0, None, None),
                         ref.gated_backward(g, a, b, int(gate), 0, None, None)):
        assert_matches(got, want)


# ---- pack_bits / unpack_bits ----

@pytest.mark.parametrize("numel", (0, 1, 7, 8, 9, 1023, 4097))
@pytest.mark.parametrize("bits", VALID_BITS)
def test_pack_unpack_round_trip(bits, numel):
    codes = torch.randint(0, 2**bits, (numel,), dtype=torch.uint8)
    packed = ops.pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 7) // 8 * bits
    assert torch.equal(packed, ref.pack_bits(codes, bits))
    assert torch.equal(ops.unpack_bits(packed, bits, numel), codes)
    assert torch.equal(ops.unpack_bits(packed, bits, numel), ref.unpack_bits(packed, bits, numel))


@pytest.mark.parametrize("bits", [b for b in VALID_BITS if b < 8])  # every uint8 is an 8-bit code
def test_pack_bits_refuses_a_code_past_its_bits(bits):
    codes = torch.zeros(13, dtype=torch.uint8)
    codes[11] = 2**bits
    with pytest.raises(RuntimeError, match=rf"codes must be < 2\*\*bits = {2**bits} for bits = {bits}"):
        ops.pack_bits(codes, bits)


def test_pack_bits_layout():
    # k = 3: codes 1..7, 0 -> the little-endian 24-bit word sum(c_j << 3j).
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    word = sum(int(c) << (3 * j) for j, c in enumerate(codes))
    assert ops.pack_bits(codes, 3).tolist() == [word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF]


def test_pack_bits_accepts_any_shape():
    codes = torch.randint(0, 4, (3, 5, 7), dtype=torch.uint8)
    assert torch.equal(ops.pack_bits(codes, 2), ref.pack_bits(codes.reshape(-1), 2))
    assert torch.equal(ops.pack_bits(codes.transpose(0, 2), 2), ref.pack_bits(codes.transpose(0, 2).reshape(-1), 2))


# ---- layouts: non-contiguous, empty ----

def non_contiguous_inputs(dtype):
    base = random_input((64, 66), dtype)
    return {"transposed": base.t(), "sliced": base[:, ::3], "expanded": base[:1].expand(5, 66)}


@pytest.mark.filterwarnings("ignore:torch.searchsorted")  # the reference's bucketize on strided x
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", (0, 3))
def test_non_contiguous(bits, dtype):
    borders, levels = random_borders(3), random_levels(3)
    for name, x in non_contiguous_inputs(dtype).items():
        tables = (borders if bits else None)
        y, saved = ops.activation_forward(x, int(Activation.SILU), 0.0, 0.0, bits, tables)
        y_ref, saved_ref = ref.activation_forward(x, int(Activation.SILU), 0.0, 0.0, bits, tables)
        assert_matches(y, y_ref)
        g = random_input(x.shape[::-1], dtype).t()  # non-contiguous grad_out too
        if bits == 0:
            assert_matches(saved, saved_ref)
            saved_nc = saved_ref.t().contiguous().t()
            assert_matches(ops.activation_backward(g, saved_nc, 0, None), ref.activation_backward(g, saved_ref, 0, None))
            assert_matches(ops.activation_backward_from_input(g, x, int(Activation.SILU), 0.0, 0.0),
                           ref.activation_backward_from_input(g, x, int(Activation.SILU)), factor=g)
        else:
            assert torch.equal(saved, saved_ref), name
            assert_matches(ops.activation_backward(g, saved, 3, levels), ref.activation_backward(g, saved_ref, 3, levels))
        b = random_input(x.shape[::-1], dtype).t()
        y, code = ops.gated_forward(x, b, int(Activation.GELU), bits, tables)
        assert_matches(y, ref.gated_forward(x, b, int(Activation.GELU), bits, tables)[0])
        saved_a = x if bits == 0 else code
        got = ops.gated_backward(g, saved_a, b, int(Activation.GELU), bits, levels if bits else None,
                                 levels if bits else None)
        want = ref.gated_backward(g, saved_a, b, int(Activation.GELU), bits, levels if bits else None,
                                  levels if bits else None)
        assert_matches(got[0], want[0], factor=g.double() * b.double())
        assert_matches(got[1], want[1], factor=g)


@pytest.mark.parametrize("shape", ((0,), (3, 0)), ids=str)
@pytest.mark.parametrize("bits", (0, 2, 3))
def test_empty(bits, shape):
    x = torch.empty(shape)
    borders = random_borders(bits) if bits else None
    levels = random_levels(bits) if bits else None
    y, saved = ops.activation_forward(x, int(Activation.GELU), 0.0, 0.0, bits, borders)
    assert y.shape == x.shape
    assert saved.shape == (x.shape if bits == 0 else (0,))
    assert ops.activation_backward(torch.empty(shape), saved, bits, levels).shape == x.shape
    assert ops.activation_backward_from_input(torch.empty(shape), x, int(Activation.SILU), 0.0, 0.0).shape == x.shape
    y, code = ops.gated_forward(x, x, int(Activation.SILU), bits, borders)
    assert y.shape == x.shape and code.shape == (0,) and code.dtype == torch.uint8
    grads = ops.gated_backward(x, x if bits == 0 else code, x, int(Activation.SILU), bits, levels, levels)
    assert grads[0].shape == x.shape and grads[1].shape == x.shape


@pytest.mark.parametrize("bits", (0,) + VALID_BITS)
def test_saved_bytes(bits):
    for numel in (1, 8, 9, 1000):
        x = torch.randn(numel)
        _, saved = ops.activation_forward(x, int(Activation.RELU), 0.0, 0.0, bits,
                                          random_borders(bits) if bits else None)
        nbytes = saved.numel() * saved.element_size()
        assert nbytes == (4 * numel if bits == 0 else math.ceil(numel / 8) * bits)


# ---- errors: every check raises RuntimeError naming the argument ----

def _errors():
    x = torch.randn(16)
    b3, l3 = random_borders(3), random_levels(3)
    codes = ops.pack_bits(torch.zeros(16, dtype=torch.uint8), 3)
    gelu, relu = int(Activation.GELU), int(Activation.RELU)
    return {
        "x dtype": (lambda: ops.activation_forward(x.int(), gelu, 0.0, 0.0, 0, None), "x must be float32"),
        "activation id high": (lambda: ops.activation_forward(x, 14, 0.0, 0.0, 0, None), "activation must be"),
        "activation id low": (lambda: ops.activation_forward(x, -1, 0.0, 0.0, 0, None), "activation must be"),
        "bits": (lambda: ops.activation_forward(x, gelu, 0.0, 0.0, 5, b3), "bits must be"),
        "borders missing": (lambda: ops.activation_forward(x, gelu, 0.0, 0.0, 3, None), "borders must be given"),
        "borders dtype": (lambda: ops.activation_forward(x, gelu, 0.0, 0.0, 3, b3.double()), "borders must be float32"),
        "borders size": (lambda: ops.activation_forward(x, gelu, 0.0, 0.0, 2, b3), "borders must have"),
        "grad_out dtype": (lambda: ops.activation_backward(x.long(), x, 0, None), "grad_out must be float32"),
        "saved shape": (lambda: ops.activation_backward(x, x[:8], 0, None), "saved must have the shape"),
        "saved dtype": (lambda: ops.activation_backward(x, x.double(), 0, None), "saved must have the dtype"),
        "saved not codes": (lambda: ops.activation_backward(x, x, 3, l3), "saved must be the uint8"),
        "saved bytes": (lambda: ops.activation_backward(x, codes[:-1], 3, l3), "saved must hold"),
        "levels missing": (lambda: ops.activation_backward(x, codes, 3, None), "levels must be given"),
        "levels size": (lambda: ops.activation_backward(x, codes, 3, b3), "levels must have"),
        "levels dtype": (lambda: ops.activation_backward(x, codes, 3, l3.half()), "levels must be float32"),
        "from_input x shape": (lambda: ops.activation_backward_from_input(x, x[:8], gelu, 0.0, 0.0),
                               "x must have the shape"),
        "from_input x dtype": (lambda: ops.activation_backward_from_input(x, x.half(), gelu, 0.0, 0.0),
                               "x must have the dtype"),
        "from_input grad_out dtype": (lambda: ops.activation_backward_from_input(x.int(), x.int(), gelu, 0.0, 0.0),
                                      "grad_out must be float32"),
        "from_input activation": (lambda: ops.activation_backward_from_input(x, x, 14, 0.0, 0.0), "activation must be"),
        "b shape": (lambda: ops.gated_forward(x, x[:8], gelu, 0, None), "b must have the shape"),
        "b dtype": (lambda: ops.gated_forward(x, x.double(), gelu, 0, None), "b must have the dtype"),
        "a dtype": (lambda: ops.gated_forward(x.int(), x.int(), gelu, 0, None), "a must be float32"),
        "gate": (lambda: ops.gated_forward(x, x, relu, 0, None), "gated unit"),
        "gated borders": (lambda: ops.gated_forward(x, x, gelu, 3, None), "borders must be given"),
        "gated bits": (lambda: ops.gated_forward(x, x, gelu, 7, None), "bits must be"),
        "saved_a shape": (lambda: ops.gated_backward(x, x[:8], x, gelu, 0, None, None), "saved_a must have the shape"),
        "saved_a bytes": (lambda: ops.gated_backward(x, codes[:1], x, gelu, 3, l3, l3), "saved_a must hold"),
        "gated b": (lambda: ops.gated_backward(x, x, x[:4], gelu, 0, None, None), "b must have the shape"),
        "gated levels": (lambda: ops.gated_backward(x, codes, x, gelu, 3, None, l3), "levels must be given"),
        "value_levels": (lambda: ops.gated_backward(x, codes, x, gelu, 3, l3, None), "value_levels must be given"),
        "backward gate": (lambda: ops.gated_backward(x, x, x, int(Activation.TANH), 0, None, None), "gated unit"),
        "codes dtype": (lambda: ops.pack_bits(torch.zeros(8, dtype=torch.int32), 2), "codes must be uint8"),
        "pack bits": (lambda: ops.pack_bits(torch.zeros(8, dtype=torch.uint8), 0), "bits must be one of"),
        "codes range": (lambda: ops.pack_bits(torch.full((9,), 4, dtype=torch.uint8), 2), "codes must be < 2\\*\\*bits"),
        "packed dtype": (lambda: ops.unpack_bits(torch.zeros(3, dtype=torch.int8), 3, 8), "packed must be uint8"),
        "packed size": (lambda: ops.unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, 9), "packed must hold"),
        "numel": (lambda: ops.unpack_bits(torch.zeros(0, dtype=torch.uint8), 3, -1), "numel must be"),
        "unpack bits": (lambda: ops.unpack_bits(torch.zeros(3, dtype=torch.uint8), 5, 8), "bits must be one of"),
    }


@pytest.mark.parametrize("case", list(_errors()))
def test_errors(case):
    call, message = _errors()[case]
    with pytest.raises(RuntimeError, match=message):
        call()


# ---- schema conformance (no fake kernels needed for these two checks) ----

def _op_samples():
    x = torch.randn(37)
    b3, l3 = random_borders(3), random_levels(3)
    _, codes = ops.activation_forward(x, int(Activation.GELU), 0.0, 0.0, 3, b3)
    return [
        (ops.activation_forward.default, (x, int(Activation.GELU), 0.0, 0.0, 0, None)),
        (ops.activation_forward.default, (x, int(Activation.GELU), 0.0, 0.0, 3, b3)),
        (ops.activation_backward.default, (x, x.clone(), 0, None)),
        (ops.activation_backward.default, (x, codes, 3, l3)),
        (ops.gated_forward.default, (x, x.clone(), int(Activation.SILU), 0, None)),
        (ops.gated_forward.default, (x, x.clone(), int(Activation.SILU), 3, b3)),
        (ops.gated_backward.default, (x, x.clone(), x.clone(), int(Activation.SILU), 0, None, None)),
        (ops.gated_backward.default, (x, codes, x.clone(), int(Activation.SILU), 3, l3, l3)),
        (ops.pack_bits.default, (torch.randint(0, 8, (37,), dtype=torch.uint8), 3)),
        (ops.unpack_bits.default, (codes, 3, 37)),
    ]


def test_opcheck_schema():
    for op, args in _op_samples():
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration"))


def _kernels_isa_under(capability: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    command = [sys.executable, "-c", "import memkernels._C as C; print(C.cpu_kernels_isa())"]
    return subprocess.run(command, env=env, check=True, capture_output=True, text=True,
                          timeout=120).stdout.strip()


def test_kernels_follow_aten_capability():
    """The CPU kernels of ATen's instruction set run, AVX512 with AVX512-BF16 exactly where the CPU
    has it; ATEN_CPU_CAPABILITY holds them where it holds ATen (scripts/test.sh's extra passes)."""
    import memkernels._C as C

    held = os.environ.get("ATEN_CPU_CAPABILITY")
    isa = C.cpu_kernels_isa()
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        assert isa == "AVX2"
        return
    with open("/proc/cpuinfo") as cpuinfo:
        has_bf16 = "avx512_bf16" in cpuinfo.read().split()
    assert isa == ("AVX512_BF16" if has_bf16 and (held or "").lower() != "avx512" else "AVX512")
    assert _kernels_isa_under("avx512") == "AVX512"
    assert _kernels_isa_under("avx2") == "AVX2"
