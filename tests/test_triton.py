"""The Triton kernels (memkernels/triton) held against memkernels/reference.py.

On a GPU they run on CUDA tensors; without one, on CPU tensors under TRITON_INTERPRET=1 (small
shapes: the interpreter runs about a million elements a second).
"""
import contextlib
import math
import re

from _cases import LOSSES, loss_grad
from _codes import exact_codes, float64_around_borders
from _triton_modules import DEVICE, triton_modules

import pytest
import torch

from memkernels import ops
from memkernels import reference as ref
from memkernels.activations.spec import GATES, PARAMS, Activation, default_params

_, tk = triton_modules("pack", "activations")

# The interpreter evaluates with numpy, which warns on the overflows that inf inputs cause.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# (atol, rtol) per dtype. Kernel and torch each round tanh/exp within an ulp, and formulas such
# as 1 + tanh(z) at z << 0 magnify that relatively (2.5e-5 for GELU-tanh at x = -3 in float32);
# half types may round one ulp apart (the interpreter truncates float32 -> bfloat16).
TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-10, 1e-10),
             torch.float16: (1e-5, 1e-3), torch.bfloat16: (1e-5, 1.6e-2)}
SHAPES = ((1,), (7,), (1023,), (4097,), (5, 7, 13))
BITS = (1, 2, 3, 4, 8)
SPECIALS = (float("nan"), float("inf"), -float("inf"), 0.0, -0.0, -3.0, 3.0, 1e30, -1e30, 1e-30)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_close(actual, expected):
    atol, rtol = TOLERANCE[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True)


def make_input(shape, dtype, scale=4.0):
    """Normal values (times `scale`) with the special values at the front."""
    x = torch.randn(shape, dtype=torch.float64) * scale
    flat = x.view(-1)
    n = min(len(SPECIALS), flat.numel())
    flat[:n] = torch.tensor(SPECIALS[:n], dtype=torch.float64)
    return x.to(dtype).to(DEVICE)


def make_tables(bits, x):
    """Sorted float32 borders (2**bits - 1, some equal to elements of x) and float32 levels."""
    borders = torch.randn((1 << bits) - 1) * 3
    finite = x.reshape(-1).float().cpu()
    finite = finite[finite.isfinite()]
    k = min(borders.numel() // 2, finite.numel())
    borders[:k] = finite[:k]  # elements equal to a border: code counts borders strictly below
    borders = borders.sort().values.to(DEVICE)
    return borders, torch.randn(1 << bits).to(DEVICE), torch.randn(1 << bits).to(DEVICE)


def params_of(act, custom):
    if not custom:
        return default_params(act)
    return {Activation.LEAKY_RELU: (0.2, 0.0), Activation.SOFTPLUS: (2.0, 5.0),
            Activation.ELU: (0.5, 0.0), Activation.CELU: (2.0, 0.0)}[act]


CASES = [(act, False) for act in Activation] + [(act, True) for act in PARAMS]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act,custom", CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_activation_exact(act, custom, dtype):
    p0, p1 = params_of(act, custom)
    x = make_input((1023,), dtype)
    y, saved = tk.activation_forward(x, int(act), p0, p1, 0, None)
    y_ref, saved_ref = ref.activation_forward(x, int(act), p0, p1, 0, None)
    assert y.dtype == saved.dtype == dtype and y.shape == saved.shape == x.shape
    assert_close(y, y_ref)
    assert_close(saved, saved_ref)
    # the value-only kernel: the same y, bit for bit
    torch.testing.assert_close(tk.activation_value(x, int(act), p0, p1), y, atol=0, rtol=0, equal_nan=True)
    grad = torch.randn_like(x)
    assert_close(tk.activation_backward(grad, saved_ref, 0, None),
                 ref.activation_backward(grad, saved_ref, 0, None))
    assert_close(tk.activation_backward_from_input(grad, x, int(act), p0, p1),
                 ref.activation_backward_from_input(grad, x, int(act), p0, p1))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", [Activation.GELU, Activation.SOFTPLUS, Activation.HARDSIGMOID],
                         ids=lambda a: a.name)
def test_activation_codes(act, dtype, bits):
    x = make_input((1023,), dtype)
    borders, levels, _ = make_tables(bits, x)
    p0, p1 = default_params(act)
    y, packed = tk.activation_forward(x, int(act), p0, p1, bits, borders)
    y_ref, packed_ref = ref.activation_forward(x, int(act), p0, p1, bits, borders)
    assert packed.dtype == torch.uint8 and packed.shape == packed_ref.shape
    assert torch.equal(packed, packed_ref)
    assert_close(y, y_ref)
    grad = torch.randn_like(x)
    assert_close(tk.activation_backward(grad, packed_ref, bits, levels),
                 ref.activation_backward(grad, packed_ref, bits, levels))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_level_gives_zero_gradient(dtype):
    # Where a code's level is 0 the gradient is 0 (+0), whatever grad_out holds, as in torch's
    # ReLU backward; elsewhere non-finite grad_out multiplies as usual.
    codes = torch.tensor([0, 1, 2, 3] * 4, dtype=torch.uint8)
    levels = torch.tensor([0.0, 0.5, 0.0, -2.0])
    grad = torch.tensor([float("inf"), float("inf"), float("nan"), -1.0, -float("inf"), float("nan"),
                         -3.0, 2.0] * 2, dtype=dtype).to(DEVICE)
    packed = ops.pack_bits(codes, 2).to(DEVICE)
    got = tk.activation_backward(grad, packed, 2, levels.to(DEVICE))
    expected = ref.activation_backward(grad, packed, 2, levels.to(DEVICE))
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    zero = (levels[codes.long()] == 0).to(DEVICE)
    assert torch.equal(got[zero], torch.zeros_like(got[zero])) and not torch.signbit(got[zero]).any()
    assert torch.isinf(got[1]) and torch.isnan(got[5])


@pytest.mark.parametrize("act", list(Activation), ids=lambda a: a.name)
def test_activation_codes_every_activation(act):
    x = make_input((100,), torch.float32)
    borders, _, _ = make_tables(3, x)
    p0, p1 = default_params(act)
    y, packed = tk.activation_forward(x, int(act), p0, p1, 3, borders)
    y_ref, packed_ref = ref.activation_forward(x, int(act), p0, p1, 3, borders)
    assert torch.equal(packed, packed_ref)
    assert_close(y, y_ref)


@pytest.mark.parametrize("bits", (0, 3, 8))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shapes(shape, bits):
    x = make_input(shape, torch.float32)
    borders, levels, _ = make_tables(bits, x) if bits else (None, None, None)
    act = int(Activation.SILU)
    y, saved = tk.activation_forward(x, act, 0.0, 0.0, bits, borders)
    y_ref, saved_ref = ref.activation_forward(x, act, 0.0, 0.0, bits, borders)
    assert y.shape == x.shape
    assert_close(y, y_ref)
    if bits:
        assert torch.equal(saved, saved_ref)
    else:
        assert_close(saved, saved_ref)
    grad = torch.randn_like(x)
    assert_close(tk.activation_backward(grad, saved_ref, bits, levels),
                 ref.activation_backward(grad, saved_ref, bits, levels))


def test_codes_of_special_values():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1.0, 2.0],
                     device=DEVICE)
    borders = torch.tensor([-1.0, 0.0, 1.0], device=DEVICE)
    _, packed = tk.activation_forward(x, int(Activation.GELU), 0.0, 0.0, 2, borders)
    # NaN -> 0; +inf above every border; a value equal to a border is not above it.
    assert tk.unpack_bits(packed, 2, x.numel()).tolist() == [0, 3, 0, 1, 0, 2, 3]


@pytest.mark.parametrize("bits", BITS)
def test_float64_codes_compare_exactly(bits):
    # float64 x is compared with the float32 borders as it is, not rounded to float32 first.
    borders = torch.cat([torch.zeros(1), torch.randn((1 << bits) - 2) * 3]).sort().values
    x = float64_around_borders(borders)
    expected = ref.pack_bits(exact_codes(x, borders), bits)
    borders, x = borders.to(DEVICE), x.to(DEVICE)
    _, packed = tk.activation_forward(x, int(Activation.GELU), 0.0, 0.0, bits, borders)
    assert torch.equal(packed.cpu(), expected)
    _, packed = tk.gated_forward(x, torch.ones_like(x), int(Activation.SILU), bits, borders)
    assert torch.equal(packed.cpu(), expected)
    _, packed = tk.activation_forward(x, int(Activation.HARDSIGMOID), 0.0, 0.0, bits, borders)
    assert torch.equal(packed.cpu(), ref.pack_bits(exact_codes(-x.abs().cpu(), borders.cpu()), bits))


@pytest.mark.parametrize("bits", (0,) + BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", GATES, ids=lambda a: a.name)
def test_gated(act, dtype, bits):
    a = make_input((5, 7, 13), dtype)
    b = make_input((5, 7, 13), dtype, scale=1.0).flip(-1)
    borders, levels, value_levels = make_tables(bits, a) if bits else (None, None, None)
    y, code = tk.gated_forward(a, b, int(act), bits, borders)
    y_ref, code_ref = ref.gated_forward(a, b, int(act), bits, borders)
    assert y.dtype == dtype and y.shape == a.shape
    assert_close(y, y_ref)
    assert code.dtype == torch.uint8 and torch.equal(code, code_ref)
    saved_a = a if bits == 0 else code_ref
    grad = torch.randn_like(a)
    grads = tk.gated_backward(grad, saved_a, b, int(act), bits, levels, value_levels)
    grads_ref = ref.gated_backward(grad, saved_a, b, int(act), bits, levels, value_levels)
    for got, want in zip(grads, grads_ref):
        assert got.shape == a.shape
        assert_close(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(Activation), ids=lambda a: a.name)
def test_backward_of_a_loss_on_the_output(act, dtype):
    """The grad_out of y.sum() (an expanded scalar, which the kernel reads as one value, uncopied)
    and of y.mean(): every backward op gives what a contiguous grad_out of the same values gives,
    bit for bit, in the same layout. activation_backward multiplies by what forward kept whatever
    the activation: it runs for GELU alone, on f'(x) and on 3-bit codes (the code width and the
    gradient's load are independent parts of the kernel, and the other tests cover every width)."""
    p0, p1 = default_params(act)
    for shape in ((1,), (7,), (1023,), (4097,), (0,), (5, 7, 13)):
        x = make_input(shape, dtype)
        b = make_input(shape, dtype, scale=1.0).flip(0)
        calls = [lambda g: (tk.activation_backward_from_input(g, x, int(act), p0, p1),)]
        if act == Activation.GELU:
            _, derivative = tk.activation_forward(x, int(act), p0, p1, 0, None)
            borders, levels, _ = make_tables(3, x)
            _, code = tk.activation_forward(x, int(act), p0, p1, 3, borders)
            calls += [lambda g: (tk.activation_backward(g, derivative, 0, None),),
                      lambda g: (tk.activation_backward(g, code, 3, levels),)]
        if act in GATES:
            borders, gate_levels, value_levels = make_tables(3, x)
            _, gated_code = tk.gated_forward(x, b, int(act), 3, borders)
            calls += [lambda g: tk.gated_backward(g, x, b, int(act), 0, None, None),
                      lambda g: tk.gated_backward(g, gated_code, b, int(act), 3, gate_levels, value_levels)]
        for loss in LOSSES:
            g = loss_grad(loss, x)
            assert g.numel() <= 1 or loss == "mean" or set(g.stride()) == {0}
            for call in calls:
                for got, want in zip(call(g), call(g.contiguous())):
                    assert got.dtype == want.dtype and got.stride() == want.stride()
                    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_one_value_grad_is_read_uncopied(monkeypatch):
    """Only a grad_out of one value broadcast to every element (each dim of more than one element
    with stride 0) reaches the kernel as it is; a partly expanded, sliced or transposed one is
    copied first (the one value is read from the tensor's first element)."""
    x = make_input((5, 7, 13), torch.float32)
    _, derivative = tk.activation_forward(x, int(Activation.GELU), 0.0, 0.0, 0, None)
    one = torch.randn((), device=DEVICE)
    cases = [(one.expand(5, 7, 13), True), (one.view(1, 1, 1).expand(5, 1, 13).expand(5, 7, 13), True),
             (torch.randn(1, 7, 1, device=DEVICE).expand(5, 7, 13), False),
             (torch.randn(7, 13, device=DEVICE).expand(5, 7, 13), False),
             (torch.randn(13, 7, 5, device=DEVICE).permute(2, 1, 0), False),
             (torch.randn(5, 14, 13, device=DEVICE)[:, ::2], False)]
    seen = []  # (grad, GRAD_BROADCAST) of each launch

    class Recording:
        def __getitem__(self, grid):
            launch = kernel[grid]
            return lambda *args, **kwargs: (seen.append((args[0], kwargs["GRAD_BROADCAST"])),
                                            launch(*args, **kwargs))

    kernel = tk._backward_kernel
    monkeypatch.setattr(tk, "_backward_kernel", Recording())
    for g, broadcast in cases:
        assert tk._broadcasts_one_value(g) == broadcast
        got = tk.activation_backward(g, derivative, 0, None)
        want = tk.activation_backward(g.contiguous(), derivative, 0, None)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        assert seen[-2][1] == broadcast and (seen[-2][0] is g) == broadcast
    assert tk._broadcasts_one_value(torch.randn(1, 1, device=DEVICE).t())  # one element: either way
    assert not tk._broadcasts_one_value(torch.empty(0, 3, device=DEVICE))


@pytest.mark.parametrize("numel", (1, 7, 8, 9, 1000, 4097))
@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack(bits, numel):
    codes = torch.randint(0, 1 << bits, (numel,), dtype=torch.uint8, device=DEVICE)
    packed = tk.pack_bits(codes, bits)
    assert torch.equal(packed, ref.pack_bits(codes, bits))
    assert torch.equal(tk.unpack_bits(packed, bits, numel), codes)
    noise = torch.randint(0, 256, packed.shape, dtype=torch.uint8, device=DEVICE)
    assert torch.equal(tk.unpack_bits(noise, bits, numel), ref.unpack_bits(noise, bits, numel))


@pytest.mark.parametrize("bits", [b for b in BITS if b < 8])  # every uint8 is an 8-bit code
def test_pack_bits_keeps_the_low_bits_of_a_large_code(bits):
    # The CPU op raises on a code of 2**bits or more; the Triton kernel cannot without waiting on
    # the device, so it packs the code's low bits and leaves its neighbours intact.
    codes = torch.randint(0, 1 << bits, (21,), dtype=torch.uint8, device=DEVICE)
    codes[[0, 9, 20]] = torch.tensor([255, 1 << bits, (1 << bits) + 1], dtype=torch.uint8)
    assert torch.equal(tk.pack_bits(codes, bits), ref.pack_bits(codes & ((1 << bits) - 1), bits))


def test_non_contiguous():
    base = make_input((64, 48), torch.float32)
    x = base.t()[:, ::3]
    assert not x.is_contiguous()
    borders, levels, _ = make_tables(4, x)
    act = int(Activation.GELU_TANH)
    y, derivative = tk.activation_forward(x, act, 0.0, 0.0, 0, None)
    y_ref, derivative_ref = ref.activation_forward(x, act, 0.0, 0.0, 0, None)
    assert_close(y, y_ref)
    assert_close(derivative, derivative_ref)
    _, saved = tk.activation_forward(x, act, 0.0, 0.0, 4, borders)
    _, saved_ref = ref.activation_forward(x, act, 0.0, 0.0, 4, borders)
    assert torch.equal(saved, saved_ref)
    grad = torch.randn(x.shape[1], x.shape[0], device=DEVICE).t()
    b = make_input((x.shape[1], x.shape[0]), torch.float32, scale=1.0).t()
    assert_close(tk.activation_backward(grad, saved_ref, 4, levels),
                 ref.activation_backward(grad, saved_ref, 4, levels))
    assert_close(tk.activation_backward_from_input(grad, x, act, 0.0, 0.0),
                 ref.activation_backward_from_input(grad, x, act))
    got = tk.gated_backward(grad, x, b, act, 0, None, None)
    want = ref.gated_backward(grad, x, b, act, 0, None, None)
    for g, w in zip(got, want):
        assert_close(g, w)
    codes = torch.arange(30, dtype=torch.uint8, device=DEVICE)[::2] % 8
    assert torch.equal(tk.pack_bits(codes, 3), ref.pack_bits(codes, 3))
    # A packed code at an odd address (kernels read whole words of it).
    for bits in BITS:
        packed = ref.pack_bits(codes & ((1 << bits) - 1), bits)
        unaligned = torch.zeros(packed.numel() + 1, dtype=torch.uint8, device=DEVICE)[1:]
        unaligned.copy_(packed)
        expected = codes & ((1 << bits) - 1)
        assert torch.equal(tk.unpack_bits(unaligned, bits, codes.numel()), expected)


def test_empty():
    x = torch.empty(0, 3, device=DEVICE)
    borders = torch.zeros(7, device=DEVICE)
    levels = torch.zeros(8, device=DEVICE)
    y, saved = tk.activation_forward(x, int(Activation.GELU), 0.0, 0.0, 0, None)
    assert y.shape == saved.shape == x.shape
    y, packed = tk.activation_forward(x, int(Activation.GELU), 0.0, 0.0, 3, borders)
    assert y.shape == x.shape and packed.shape == (0,) and packed.dtype == torch.uint8
    assert tk.activation_backward(x, packed, 3, levels).shape == x.shape
    assert tk.activation_backward_from_input(x, x, int(Activation.SILU), 0.0, 0.0).shape == x.shape
    y, code = tk.gated_forward(x, x, int(Activation.SILU), 0, None)
    assert y.shape == x.shape and code.shape == (0,)
    grads = tk.gated_backward(x, packed, x, int(Activation.SILU), 3, levels, levels)
    assert [g.shape for g in grads] == [x.shape, x.shape]
    assert tk.pack_bits(torch.empty(0, dtype=torch.uint8, device=DEVICE), 3).shape == (0,)
    assert tk.unpack_bits(packed, 3, 0).shape == (0,)


def _refused(device):
    """(op, args, message): arguments on `device` that every kernel of the op refuses, with the CPU
    kernel's message to the character (csrc/cpu/activations.cpp, pack_bits.cpp; the Triton kernels
    and the fakes make the same checks, memkernels/ops/_checks.py)."""
    x = torch.zeros(2, 10, device=device)  # 20 elements: 9 bytes of 3-bit code
    borders = torch.zeros(7, device=device)
    levels = torch.zeros(8, device=device)
    packed = torch.zeros(9, dtype=torch.uint8, device=device)
    gelu, silu = int(Activation.GELU), int(Activation.SILU)
    relu, hardswish = int(Activation.RELU), int(Activation.HARDSWISH)
    floating = "must be float32, float64, bfloat16 or float16, got"
    bits_or_exact = "bits must be 0 (exact) or one of 1, 2, 3, 4, 8, got"
    unknown = "activation must be an id in [0, 14) (memkernels.activations.spec.Activation), got"
    not_a_gate = "activation of a gated unit must be SILU, GELU or GELU_TANH, got id"
    return [
        ("activation_forward", (x.int(), gelu, 0.0, 0.0, 0, None), f"x {floating} Int"),
        ("activation_forward", (x.int(), 99, 0.0, 0.0, 5, None), f"x {floating} Int"),  # the first check fails
        ("activation_forward", (x, 99, 0.0, 0.0, 0, None), f"{unknown} 99"),
        ("activation_forward", (x, -1, 0.0, 0.0, 5, None), f"{unknown} -1"),
        ("activation_forward", (x, gelu, 0.0, 0.0, 5, borders), f"{bits_or_exact} 5"),
        ("activation_forward", (x, gelu, 0.0, 0.0, 3, None), "borders must be given when bits > 0 (bits = 3)"),
        ("activation_forward", (x, gelu, 0.0, 0.0, 3, borders.double()), "borders must be float32, got Double"),
        ("activation_forward", (x, gelu, 0.0, 0.0, 3, borders[:6]),
         "borders must have 2**bits - 1 = 7 values for bits = 3, got 6"),
        ("activation_value", (x.long(), gelu, 0.0, 0.0), f"x {floating} Long"),
        ("activation_value", (x, 14, 0.0, 0.0), f"{unknown} 14"),
        ("activation_backward", (x.int(), x, 0, None), f"grad_out {floating} Int"),
        ("activation_backward", (x, x, 7, levels), f"{bits_or_exact} 7"),
        ("activation_backward", (x, x.double(), 0, None), "saved must have the dtype of grad_out (Float), got Double"),
        ("activation_backward", (x, x[:, :5], 0, None), "saved must have the shape of grad_out [2, 10], got [2, 5]"),
        ("activation_backward", (x, x, 3, levels), "saved must be the uint8 packed code when bits > 0, got Float"),
        ("activation_backward", (x, packed[:5], 3, levels),
         "saved must hold ceil(numel / 8) * bits = 9 bytes for 20 elements at bits = 3, got 5"),
        ("activation_backward", (x, packed, 3, None), "levels must be given when bits > 0 (bits = 3)"),
        ("activation_backward", (x, packed, 3, borders), "levels must have 2**bits = 8 values for bits = 3, got 7"),
        ("activation_backward_from_input", (x.bool(), x, gelu, 0.0, 0.0), f"grad_out {floating} Bool"),
        ("activation_backward_from_input", (x, x.half(), gelu, 0.0, 0.0),
         "x must have the dtype of grad_out (Float), got Half"),
        ("activation_backward_from_input", (x, x[:, :5], gelu, 0.0, 0.0),
         "x must have the shape of grad_out [2, 10], got [2, 5]"),
        ("activation_backward_from_input", (x, x, 99, 0.0, 0.0), f"{unknown} 99"),
        ("gated_forward", (x.int(), x.int(), silu, 0, None), f"a {floating} Int"),
        ("gated_forward", (x, x.t(), silu, 0, None), "b must have the shape of a [2, 10], got [10, 2]"),
        ("gated_forward", (x, x, relu, 0, None), f"{not_a_gate} 0"),
        ("gated_forward", (x, x, 99, 0, None), f"{unknown} 99"),
        ("gated_forward", (x, x, silu, 5, None), f"{bits_or_exact} 5"),
        ("gated_forward", (x, x, silu, 3, levels), "borders must have 2**bits - 1 = 7 values for bits = 3, got 8"),
        ("gated_backward", (x.int(), x, x, silu, 0, None, None), f"grad_out {floating} Int"),
        ("gated_backward", (x, x, x.double(), silu, 0, None, None),
         "b must have the dtype of grad_out (Float), got Double"),
        ("gated_backward", (x, x, x, hardswish, 0, None, None), f"{not_a_gate} 12"),
        ("gated_backward", (x, x, x, -3, 0, None, None), f"{unknown} -3"),
        ("gated_backward", (x, packed, x, gelu, 6, levels, levels), f"{bits_or_exact} 6"),
        ("gated_backward", (x, x[:, :5], x, gelu, 0, None, None),
         "saved_a must have the shape of grad_out [2, 10], got [2, 5]"),
        ("gated_backward", (x, packed[:5], x, gelu, 3, levels, levels),
         "saved_a must hold ceil(numel / 8) * bits = 9 bytes for 20 elements at bits = 3, got 5"),
        ("gated_backward", (x, packed, x, gelu, 3, levels, None),
         "value_levels must be given when bits > 0 (bits = 3)"),
        ("gated_backward", (x, packed, x, gelu, 3, levels.double(), levels), "levels must be float32, got Double"),
        ("pack_bits", (x, 3), "codes must be uint8, got Float"),
        ("pack_bits", (packed, 0), "bits must be one of 1, 2, 3, 4, 8, got 0"),
        ("pack_bits", (packed, 5), "bits must be one of 1, 2, 3, 4, 8, got 5"),
        ("unpack_bits", (packed.int(), 3, 20), "packed must be uint8, got Int"),
        ("unpack_bits", (packed, 0, 20), "bits must be one of 1, 2, 3, 4, 8, got 0"),
        ("unpack_bits", (packed, 3, -1), "numel must be >= 0, got -1"),
        ("unpack_bits", (packed, 3, 100),
         "packed must hold ceil(numel / 8) * bits = 39 bytes for numel = 100 at bits = 3, got 9"),
    ]


def _refused_beside_meta(device):
    """(op, args, message): a table or code on the meta device beside tensors on `device`."""
    x = torch.zeros(2, 10, device=device)
    meta_table = torch.zeros(8, device="meta")
    meta_code = torch.zeros(9, dtype=torch.uint8, device="meta")
    gelu = int(Activation.GELU)
    return [
        ("activation_forward", (x, gelu, 0.0, 0.0, 3, meta_table[:7]), f"borders must be on {x.device}, got meta"),
        ("activation_backward", (x, meta_code, 3, meta_table), f"saved must be on {x.device}, got meta"),
        ("activation_backward", (x, x.to("meta"), 0, None),
         f"saved must be on the device of grad_out ({x.device}), got meta"),
        ("gated_forward", (x, x.to("meta"), gelu, 0, None), f"b must be on the device of a ({x.device}), got meta"),
        ("gated_backward", (x, torch.zeros(9, dtype=torch.uint8, device=device), x, gelu, 3,
                            torch.zeros(8, device=device), meta_table),
         f"value_levels must be on {x.device}, got meta"),
    ]


def _cpu_op_message(op, args):
    """The message the CPU kernel refuses `args` with."""
    with pytest.raises(RuntimeError) as info:
        getattr(torch.ops.memkernels, op)(*args)
    return str(info.value)


def assert_refused(call, message):
    with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
        call()


@pytest.mark.parametrize("case", range(len(_refused("cpu"))))
def test_refused_as_by_the_cpu_kernel(case):
    """The Triton kernel refuses with the CPU kernel's message, to the character, and so does the
    fake (on meta tensors)."""
    op, args, message = _refused(DEVICE)[case]
    assert_refused(lambda: getattr(tk, op)(*args), message)
    if ops.extension_loaded():
        _, cpu_args, _ = _refused("cpu")[case]
        assert _cpu_op_message(op, cpu_args) == message
        _, meta_args, _ = _refused("meta")[case]
        assert_refused(lambda: getattr(torch.ops.memkernels, op)(*meta_args), message)


@pytest.mark.parametrize("case", range(len(_refused_beside_meta("cpu"))))
def test_refused_beside_another_device(case):
    op, args, message = _refused_beside_meta(DEVICE)[case]
    assert_refused(lambda: getattr(tk, op)(*args), message)
    if ops.extension_loaded():
        op, args, message = _refused_beside_meta("cpu")[case]
        assert _cpu_op_message(op, args) == message


@pytest.mark.skipif(DEVICE != "cuda", reason="needs two devices")
def test_refused_beside_the_cpu():
    x = torch.zeros(10, device=DEVICE)
    assert_refused(lambda: tk.activation_forward(x, int(Activation.GELU), 0, 0, 3, torch.zeros(7)),
                   f"borders must be on {x.device}, got cpu")


def test_triton_kernels_take_cuda_tensors_only():
    """Past the op's checks, a tensor on a device the kernels do not run on is refused by name."""
    x = torch.zeros(2, 10, device="meta")
    packed = torch.zeros(9, dtype=torch.uint8, device="meta")
    gelu = int(Activation.GELU)
    calls = [(lambda: tk.activation_forward(x, gelu, 0.0, 0.0, 0, None), "x"),
             (lambda: tk.activation_value(x, gelu, 0.0, 0.0), "x"),
             (lambda: tk.activation_backward(x, x, 0, None), "grad_out"),
             (lambda: tk.activation_backward_from_input(x, x, gelu, 0.0, 0.0), "grad_out"),
             (lambda: tk.gated_forward(x, x, gelu, 0, None), "a"),
             (lambda: tk.gated_backward(x, x, x, gelu, 0, None, None), "grad_out"),
             (lambda: tk.pack_bits(packed, 3), "codes"),
             (lambda: tk.unpack_bits(packed, 3, 20), "packed")]
    for call, name in calls:
        assert_refused(call, f"{name} must be a CUDA tensor (CPU tensors run these Triton kernels only under "
                             f"TRITON_INTERPRET=1), got meta")


def test_cuda_kernels_make_their_tensors_device_current(monkeypatch):
    """Triton launches on the current device, not on its arguments': the ops' CUDA kernels
    (memkernels/ops/_cuda.py) launch inside torch.cuda.device_of(their first tensor)."""
    from memkernels.ops import _cuda
    events = []

    @contextlib.contextmanager
    def device_of(t):
        events.append(("enter", t))
        yield
        events.append(("exit", t))

    value = tk.activation_value
    monkeypatch.setattr(torch.cuda, "device_of", device_of)
    monkeypatch.setattr(tk, "activation_value", lambda *args: events.append("launch") or value(*args))
    x = make_input((10,), torch.float32)
    y = _cuda._kernel("activation_value")(x, int(Activation.TANH), 0.0, 0.0)  # no CUDA C++ Tanh: Triton
    assert [e if e == "launch" else (e[0], e[1] is x) for e in events] == \
        [("enter", True), "launch", ("exit", True)]
    assert_close(y, ref.activation_value(x, int(Activation.TANH)))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_ops_on_a_device_that_is_not_current(monkeypatch, backend):
    import memkernels as mk
    if backend == "cuda" and not mk._C.with_cuda:
        pytest.skip("memkernels._C was built without the CUDA C++ kernels")
    monkeypatch.setenv("MEMKERNELS_BACKEND", backend)
    x = make_input((4097,), torch.float32).to("cuda:1")
    borders, levels, _ = (t.to("cuda:1") for t in make_tables(3, x))
    gelu = int(Activation.GELU)
    with torch.cuda.device(0):
        y, packed = torch.ops.memkernels.activation_forward(x, gelu, 0.0, 0.0, 3, borders)
        grad = torch.ops.memkernels.activation_backward(x, packed, 3, levels)
    y_ref, packed_ref = ref.activation_forward(x, gelu, 0.0, 0.0, 3, borders)
    assert y.device == packed.device == grad.device == x.device
    assert_close(y, y_ref)
    assert torch.equal(packed, packed_ref)
    assert_close(grad, ref.activation_backward(x, packed_ref, 3, levels))


def test_float_parameters_split_into_float32_parts_as_torch_rounds():
    # The kernels take p as hi + lo, both float32, rounded on the host without a tensor.
    values = [0.0, -0.0, 0.1, 1 / 3, 0.044715, 1e-46, 3.4028235e38, 3.5e38, -1e300, float("inf"),
              float("nan"), *torch.randn(200, dtype=torch.float64).mul(1e3).tolist()]
    for p in values:
        expected_hi = torch.tensor(p, dtype=torch.float64).float()
        expected_lo = (torch.tensor(p, dtype=torch.float64) - expected_hi.double()).float()
        hi, lo = tk._split_float(p)
        torch.testing.assert_close(torch.tensor([hi, lo], dtype=torch.float32),
                                   torch.stack([expected_hi, expected_lo]), atol=0, rtol=0, equal_nan=True)
        assert math.copysign(1, hi) == math.copysign(1, expected_hi.item())  # a zero's sign too
