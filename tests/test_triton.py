"""The Triton kernels (memkernels/triton) held against memkernels/reference.py.

On a GPU they run on CUDA tensors; without one, on CPU tensors under TRITON_INTERPRET=1 (small
shapes: the interpreter runs about a million elements a second).
"""
import contextlib

from _cases import LOSSES, loss_grad
from _codes import exact_codes, float64_around_borders
from _triton_modules import DEVICE, triton_modules

import pytest
import torch

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


def _validation_cases():
    x = torch.zeros(10, device=DEVICE)
    borders = torch.zeros(7, device=DEVICE)
    levels = torch.zeros(8, device=DEVICE)
    packed = torch.zeros(3 * 2, dtype=torch.uint8, device=DEVICE)
    gelu, relu = int(Activation.GELU), int(Activation.RELU)
    return [
        (lambda: tk.activation_forward(x.long(), gelu, 0, 0, 0, None), TypeError,
         "x must be float"),
        (lambda: tk.activation_forward(x, 99, 0, 0, 0, None), ValueError, "activation must be"),
        (lambda: tk.activation_forward(x, gelu, 0, 0, 5, borders), ValueError, "bits must be"),
        (lambda: tk.activation_forward(x, gelu, 0, 0, 3, None), TypeError, "borders must be"),
        (lambda: tk.activation_forward(x, gelu, 0, 0, 3, borders[:6]), ValueError,
         "borders must be a 1-D float32 tensor of 7"),
        (lambda: tk.activation_forward(x, gelu, 0, 0, 3, borders.double()), ValueError,
         "borders must be a 1-D float32"),
        (lambda: tk.activation_backward(x, x[:5], 0, None), ValueError, "saved .* must match"),
        (lambda: tk.activation_backward_from_input(x, x[:5], gelu, 0, 0), ValueError, "x .* must match"),
        (lambda: tk.activation_backward_from_input(x, x, 99, 0, 0), ValueError, "activation must be"),
        (lambda: tk.activation_backward(x, x.half(), 0, None), ValueError, "saved .* must match"),
        (lambda: tk.activation_backward(x, packed[:5], 3, levels), ValueError, "saved must hold"),
        (lambda: tk.activation_backward(x, packed.float(), 3, levels), TypeError,
         "saved must be uint8"),
        (lambda: tk.activation_backward(x, packed, 3, levels[:4]), ValueError, "levels must be"),
        (lambda: tk.gated_forward(x, x[:5], gelu, 0, None), ValueError, "b .* must match"),
        (lambda: tk.gated_forward(x, x, relu, 0, None), ValueError, "activation must be one of"),
        (lambda: tk.gated_backward(x, packed, x, gelu, 3, levels, None), TypeError,
         "value_levels must be"),
        (lambda: tk.pack_bits(x, 3), TypeError, "codes must be uint8"),
        (lambda: tk.pack_bits(packed, 0), ValueError, "bits must be"),
        (lambda: tk.unpack_bits(packed, 3, 100), ValueError, "packed must hold"),
        (lambda: tk.unpack_bits(packed, 3, -1), ValueError, "numel must be"),
        (lambda: tk.activation_forward(x, gelu, 0, 0, 3.0, borders), TypeError,
         "bits must be an int"),
        (lambda: tk.activation_forward(x.to("meta"), gelu, 0, 0, 0, None), ValueError,
         "must be a CUDA tensor"),
    ]


@pytest.mark.parametrize("case", range(len(_validation_cases())))
def test_validation(case):
    call, error, message = _validation_cases()[case]
    with pytest.raises(error, match=message):
        call()


@pytest.mark.skipif(DEVICE != "cuda", reason="needs two devices")
def test_validation_devices():
    x = torch.zeros(10, device=DEVICE)
    with pytest.raises(ValueError, match="borders is on cpu"):
        tk.activation_forward(x, int(Activation.GELU), 0, 0, 3, torch.zeros(7))


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
    y = _cuda._kernel("activation_value")(x, int(Activation.GELU), 0.0, 0.0)  # always Triton
    assert [e if e == "launch" else (e[0], e[1] is x) for e in events] == \
        [("enter", True), "launch", ("exit", True)]
    assert_close(y, ref.activation_value(x, int(Activation.GELU)))


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
