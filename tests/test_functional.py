"""mk.functional activations against torch.nn.functional: values, gradients, bytes kept."""
import pytest
import torch

import memkernels as mk
from memkernels import ops, reference
from memkernels.activations.autograd import (FRESH_PAGES_BYTES, TORCH_BACKWARD, device_table, effective_bits,
                                            keeps_input)
from memkernels.activations.spec import TWO_VALUED, Activation as A, packed_nbytes
from memkernels.activations.tables import get_table

from _cases import CASES, IDS, LOSSES, kept_beyond, kept_tensors, loss_grad
from _triton_modules import DEVICE as TRITON_DEVICE, triton_modules

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1,), (7,), (1023,), (4097,), (3, 5, 7)]
# Gradients may differ from torch's by two roundings: f'(x) is rounded to the dtype when kept.
GRAD_TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2 ** -6, 2 ** -6),
            torch.float16: (2 ** -9, 2 ** -9), torch.float64: (1e-12, 1e-12)}


def inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).to(device)
    return x.requires_grad_(), torch.randn(shape, generator=g).to(dtype).to(device)


def torch_grad(tfn, kwargs, x, g):
    x = x.detach().clone().requires_grad_()
    y = tfn(x, **kwargs)
    y.backward(g)
    return y.detach(), x.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_exact_matches_torch(case, shape, dtype, device):
    _, mfn, tfn, kwargs, act, _, _ = case
    x, g = inputs(shape, dtype, device)
    y = mfn(x, **kwargs)
    y.backward(g)
    ty, tgrad = torch_grad(tfn, kwargs, x, g)
    assert y.shape == ty.shape and y.dtype == dtype
    torch.testing.assert_close(y, ty)
    assert_grad_as_accurate_as_torch(x.grad, tgrad, torch_grad(tfn, kwargs, x.double(), g.double())[1])


def assert_grad_as_accurate_as_torch(grad, torch_grad_, exact):
    """grad is as close to `exact` (torch's own op in float64 on the same inputs) as torch's grad
    is, element by element, up to GRAD_TOL. Where f' cancels (GELU's tanh form near x = -4 takes
    1 + tanh), an ulp of tanh moves the gradient by 1e-6 in float32, so matching torch's rounding
    there would mean matching its tanh bit for bit; both are held to float64 instead."""
    rtol, atol = GRAD_TOL[grad.dtype]
    exact = exact.to(grad.device)
    mk_error = (grad.double() - exact).abs()
    torch_error = (torch_grad_.double() - exact).abs()
    worse = mk_error > torch_error + atol + rtol * exact.abs()
    assert not worse.any(), (f"{int(worse.sum())} gradients further from float64 than torch's; first at "
                             f"{worse.nonzero()[0].tolist()}: error {mk_error[worse][0].item():.3g} vs "
                             f"torch's {torch_error[worse][0].item():.3g}")


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_coded_backward_is_level_of_code(case, dtype, bits, device):
    """With bits=k the gradient is grad * levels[code(x)] of the shipped table, exactly."""
    _, mfn, tfn, kwargs, act, p0, p1 = case
    x, g = inputs((4097,), dtype, device, seed=bits)
    y = mfn(x, **kwargs, bits=bits)
    y.backward(g)
    torch.testing.assert_close(y, tfn(x.detach(), **kwargs))
    table = get_table(act, bits, p0, p1)
    expected = g.float() * table.levels.to(device)[reference.activation_codes(x.detach(), act, table.borders).long()]
    torch.testing.assert_close(x.grad, expected.to(dtype), rtol=0, atol=0)
    if act in TWO_VALUED:  # and for these the code is exact
        torch.testing.assert_close(x.grad, torch_grad(tfn, kwargs, x, g)[1], rtol=0, atol=0)


@pytest.mark.parametrize("bits", [None, 1, 2, 3, 4, 8])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bytes_kept(case, bits, device):
    _, mfn, _, kwargs, act, _, _ = case
    for n, dtype in ((1, torch.float32), (7, torch.bfloat16), (1023, torch.float16), (4097, torch.bfloat16)):
        x = torch.randn(n, dtype=dtype, device=device, requires_grad=True)
        kept = mk.profile.saved_bytes(lambda t: mfn(t, **kwargs, bits=bits), x)
        if act in TWO_VALUED:
            assert kept == packed_nbytes(n, 1)
        elif bits is None:
            assert kept == n * x.element_size()
        else:
            assert kept == packed_nbytes(n, bits)


def test_three_bits_pack_eight_elements_in_three_bytes(device):
    x = torch.randn(8 * 1000, dtype=torch.bfloat16, device=device, requires_grad=True)
    assert mk.profile.saved_bytes(lambda t: mk.functional.gelu(t, bits=3), x) == 3000
    assert mk.profile.saved_bytes(torch.nn.functional.gelu, x) == 16000


def _away_from_kinks(x, kinks, margin=1e-3):
    for k in kinks:
        x = torch.where((x - k).abs() < margin, x + 2 * margin, x)
    return x


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradcheck_float64(case, device):
    _, mfn, _, kwargs, act, p0, p1 = case
    x = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 4
    kinks = [0.0, -3.0, 3.0] + ([p1 / p0] if case[0].startswith("softplus") else [])
    x = _away_from_kinks(x, kinks).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: mfn(t, **kwargs), (x,))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_non_contiguous(case, device):
    _, mfn, tfn, kwargs, _, _, _ = case
    base = torch.randn(33, 20, device=device) * 3
    for x in (base.t(), base[:, ::3], base.expand(2, 33, 20)):
        x = x.requires_grad_() if x.is_leaf else x.detach().requires_grad_()
        g = torch.randn(x.shape, device=device)
        for bits in (None, 3):
            y = mfn(x, **kwargs, bits=bits)
            (grad,) = torch.autograd.grad(y, x, g)
            xc = x.detach().contiguous().requires_grad_()
            (grad_c,) = torch.autograd.grad(mfn(xc, **kwargs, bits=bits), xc, g.contiguous())
            torch.testing.assert_close(y, tfn(x.detach(), **kwargs))
            torch.testing.assert_close(grad, grad_c)


@pytest.mark.parametrize("bits", [None, 3])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_empty(case, bits, device):
    _, mfn, _, kwargs, _, _, _ = case
    for shape in ((0,), (3, 0, 2)):
        x = torch.empty(shape, device=device, requires_grad=True)
        y = mfn(x, **kwargs, bits=bits)
        assert y.shape == shape
        y.sum().backward()
        assert x.grad.shape == shape


REDUCED_SHAPES = [(1,), (7,), (1023,), (4097,), (0,), (3, 5, 7)]


def assert_same_grad(grad, want, strides=True):
    assert grad.dtype == want.dtype and grad.shape == want.shape
    assert grad.stride() == want.stride() or not strides
    assert torch.equal(grad, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [None, 1, 3])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_loss_on_the_output(case, bits, dtype, device):
    """y.sum() and y.mean() straight on the output, whose backward hands the activation an
    expanded scalar (sum) that the kernels read as one value, uncopied: the gradient is the one a
    contiguous grad_out of the same values gives, bit for bit, in every mode (f'(x), x or y kept,
    codes), dense layouts (a transpose) included. (Where torch's backward runs, exact Sigmoid,
    Tanh and Hardswish, torch lays out its gradient after its inputs, the expanded one too.)"""
    _, mfn, _, kwargs, act, _, _ = case
    ours = bits is not None or act not in TORCH_BACKWARD
    for shape in REDUCED_SHAPES:
        x, _ = inputs(shape, dtype, device)
        xs = [x] + ([x.detach().mT.contiguous().mT.requires_grad_()] if x.dim() > 1 else [])
        for x in xs:
            for loss in LOSSES:
                x.grad = None
                y = mfn(x, **kwargs, bits=bits)
                getattr(y, loss)().backward()
                g = loss_grad(loss, y)
                if loss == "sum" and g.numel() > 1:
                    assert set(g.stride()) == {0}  # what the kernels must read uncopied
                (want,) = torch.autograd.grad(mfn(x, **kwargs, bits=bits), x, g.contiguous())
                assert_same_grad(x.grad, want, strides=ours)


@pytest.mark.parametrize("bits", [None, 3])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_strided_grad_out(case, bits, device):
    """A grad_out expanded along some dims only, sliced or transposed is copied, not read as one
    value: the gradient is that of its contiguous copy; so is a one-element grad_out."""
    _, mfn, _, kwargs, _, _, _ = case
    x, _ = inputs((3, 5, 7), torch.float32, device)
    w = torch.randn(5, 7, device=device)
    for g in (w.expand(3, 5, 7), w[:, :1].expand(3, 5, 7), torch.randn(3, 10, 7, device=device)[:, ::2],
              torch.randn(7, 5, 3, device=device).permute(2, 1, 0)):
        (grad,) = torch.autograd.grad(mfn(x, **kwargs, bits=bits), x, g)
        (want,) = torch.autograd.grad(mfn(x, **kwargs, bits=bits), x, g.contiguous())
        assert torch.equal(grad, want)
    x1 = x.detach()[:1, :1, :1].requires_grad_()
    (grad,) = torch.autograd.grad(mfn(x1, **kwargs, bits=bits).sum(), x1)
    assert torch.equal(grad, torch.autograd.grad(mfn(x1, **kwargs, bits=bits), x1, torch.ones_like(x1))[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits", [None, 3])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sum_backward_peak_memory(case, bits, dtype):
    """The peak of fn(x).sum().backward() is y, x.grad and the two scalars of the sum, as for
    torch.neg, plus what the activation allocates to keep (f'(x) or its code; nothing where it keeps
    x or y): the backward reads the expanded scalar gradient as one value instead of a full-size
    contiguous copy (which torch's own backward does not make either)."""
    _, mfn, _, kwargs, _, _, _ = case
    fn = lambda t: mfn(t, **kwargs, bits=bits)  # noqa: E731
    x = torch.randn(1 << 14, dtype=dtype, requires_grad=True)
    fn(x).sum().backward()  # fits or loads the tables first: they stay, cached
    x.grad = None
    baseline = mk.profile.peak_memory(torch.neg, x)
    assert baseline == 2 * x.nbytes + 2 * x.element_size()
    x.grad = None
    assert mk.profile.peak_memory(fn, x) == baseline + kept_beyond(fn, x)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_nan_and_inf(case, device):
    """Forward propagates NaN, follows the reference at +-inf and matches torch wherever torch's
    value is not NaN (torch's own GELU gives NaN at +inf, where the limit is +inf). The exact
    gradient is NaN at NaN (torch's where exact mode runs torch's backward) and matches torch wherever torch's is finite (at +-inf ours is the
    finite limit)."""
    _, mfn, tfn, kwargs, act, p0, p1 = case
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5, -2.0], device=device,
                     requires_grad=True)
    y = mfn(x, **kwargs)
    y.sum().backward()
    ty, tgrad = torch_grad(tfn, kwargs, x, torch.ones_like(x))
    torch.testing.assert_close(y, reference.activation_value(x.detach(), act, p0, p1), equal_nan=True)
    defined = ~torch.isnan(ty)
    torch.testing.assert_close(y[defined], ty[defined])
    finite = torch.isfinite(tgrad)
    finite[0] = False
    torch.testing.assert_close(x.grad[finite], tgrad[finite])
    assert torch.isfinite(x.grad[1:]).all()
    if act in TORCH_BACKWARD:  # exact mode runs torch's backward: Hardswish's is finite at NaN
        torch.testing.assert_close(x.grad[0], tgrad[0], equal_nan=True)
    elif act not in TWO_VALUED:
        assert torch.isnan(x.grad[0])
    # Coded: NaN takes code 0, so its gradient is the first level (finite).
    x.grad = None
    mfn(x, **kwargs, bits=3).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name, bits", [("relu", None), ("relu", 3), ("hardsigmoid", None), ("hardsigmoid", 3)])
def test_non_finite_grad_where_the_derivative_is_zero(name, bits, device):
    """torch's ReLU and Hardsigmoid backward give 0 where the derivative is 0, whatever grad_out
    holds (inf, NaN); theirs (always 1 exact bit) are the same, bit for bit."""
    x = torch.tensor([-5.0, -1.0, 0.0, 1.0, 4.0, -0.5, 2.0, -7.0], device=device, requires_grad=True)
    grad = torch.tensor([float("inf"), float("nan"), -float("inf"), float("inf"), float("nan"), 3.0,
                         float("nan"), -float("inf")], device=device)
    (ours,) = torch.autograd.grad(getattr(mk.functional, name)(x, bits=bits), x, grad)
    (theirs,) = torch.autograd.grad(getattr(torch.nn.functional, name)(x), x, grad)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(ours), torch.signbit(theirs))


@pytest.mark.parametrize("bits", [4, 8])
def test_coded_hardswish_gradient_is_zero_below_minus_three(bits, device):
    # Its tables hold a level of exactly 0 for x < -3, where torch's derivative is 0 too.
    x = torch.tensor([-10.0, -4.0, -3.5], device=device, requires_grad=True)
    grad = torch.tensor([float("inf"), float("nan"), -float("inf")], device=device)
    (ours,) = torch.autograd.grad(mk.functional.hardswish(x, bits=bits), x, grad)
    assert torch.equal(ours, torch.zeros_like(ours)) and not torch.signbit(ours).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_subnormal_inputs_keep_their_codes(case, dtype, device):
    """Subnormal x compare with the borders as the numbers they are: several tables have a border
    at 0, and a kernel that flushes subnormals to zero (CUDA's fast math) would code +tiny as 0, as
    would one that rounds a float64 x to float32 before comparing."""
    _, mfn, _, kwargs, act, p0, p1 = case
    tiny = torch.finfo(dtype).tiny
    x = torch.tensor([tiny / 4, -tiny / 4, tiny / 64, 0.0, -0.0], dtype=dtype, device=device,
                     requires_grad=True)
    for bits in (1, 2, 3, 4, 8):
        x.grad = None
        mfn(x, **kwargs, bits=bits).sum().backward()
        table = get_table(act, bits, p0, p1)
        codes = reference.activation_codes(x.detach(), act, table.borders).long()
        if act == A.LEAKY_RELU and dtype == torch.float64:  # the slope at full precision, not a float32 level
            expected = torch.full(codes.shape, p0, dtype=dtype).masked_fill(codes == 1, 1.0).to(device)
        else:
            expected = table.levels.to(device)[codes].to(dtype)
        torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)


def test_bad_arguments():
    x = torch.randn(4)
    with pytest.raises(ValueError, match="bits"):
        mk.functional.gelu(x, bits=5)
    with pytest.raises(ValueError, match="bits"):
        mk.functional.gelu(x, bits=0)
    with pytest.raises(ValueError, match="approximate"):
        mk.functional.gelu(x, approximate="fast")
    with pytest.raises(TypeError, match="input.*floating"):
        mk.functional.silu(torch.arange(4))
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        mk.functional.silu([1.0, 2.0])
    with pytest.raises(ValueError, match="alpha"):
        mk.functional.celu(x, alpha=0.0)
    with pytest.raises(ValueError, match="beta must be non-zero"):
        mk.functional.softplus(x, beta=0.0)


@pytest.mark.parametrize("bits", [None, 3])
@pytest.mark.parametrize("case", CASES[:3] + CASES[10:11], ids=IDS[:3] + IDS[10:11])
def test_second_derivative_raises(case, bits, device):
    """Only f'(x) is kept, so a gradient has no f''(x) in its graph: a backward with
    create_graph=True raises, whether grad_out requires grad (a penalty through weights) or not
    (y.sum() beside x**3, whose second derivative alone would otherwise come out)."""
    _, mfn, _, kwargs, _, _, _ = case
    w = torch.tensor([1.5], dtype=torch.float64, device=device, requires_grad=True)
    x = torch.linspace(-2, 2, 5, dtype=torch.float64, device=device, requires_grad=True)
    for loss in (lambda: (mfn(x, **kwargs, bits=bits) + x ** 3).sum(),
                 lambda: (w * mfn(w * x, **kwargs, bits=bits)).sum()):
        with pytest.raises(RuntimeError, match="no second derivative"):
            torch.autograd.grad(loss(), x, create_graph=True)
        (g,) = torch.autograd.grad(loss(), x)  # without create_graph, as before
        assert g.shape == x.shape


@pytest.mark.parametrize("bits", [None, 3])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_no_grad_computes_values_only(case, bits, device):
    """Where no gradient can be needed, y is computed alone: the same values, nothing kept, and
    no more memory than torch's own activation."""
    _, mfn, tfn, kwargs, _, _, _ = case
    x = torch.randn(4096, device=device) * 3
    y_grad = mfn(x.clone().requires_grad_(), **kwargs, bits=bits).detach()
    with torch.no_grad():
        y = mfn(x.requires_grad_(), **kwargs, bits=bits)
    assert y.grad_fn is None and torch.equal(y, y_grad)
    with torch.inference_mode():
        assert torch.equal(mfn(x, **kwargs, bits=bits), y_grad)
    x = x.detach()
    assert torch.equal(mfn(x, **kwargs, bits=bits), y_grad)
    assert mk.profile.saved_bytes(lambda t: mfn(t, **kwargs, bits=bits), x) == 0
    if device.type == "cpu":
        peak = mk.profile.peak_memory(lambda t: mfn(t, **kwargs, bits=bits), x, backward=False)
        assert peak == mk.profile.peak_memory(lambda t: tfn(t, **kwargs), x, backward=False) == x.nbytes


@pytest.mark.parametrize("bits", [None, 3])
def test_dense_layout_is_kept(bits, device):
    """y and x.grad keep a dense input's layout (channels_last, a transpose), as torch's do."""
    for x in (torch.randn(2, 3, 4, 5, device=device).to(memory_format=torch.channels_last),
              torch.randn(6, 7, device=device).t()):
        x.requires_grad_()
        g = torch.randn(x.shape, device=device)
        y = mk.functional.silu(x, bits=bits)
        y.backward(g)
        ty = torch.nn.functional.silu(x.detach())
        assert y.stride() == ty.stride() and x.grad.stride() == x.stride()
        with torch.no_grad():
            assert mk.functional.silu(x, bits=bits).stride() == ty.stride()
        xc = x.detach().contiguous().requires_grad_()
        yc = mk.functional.silu(xc, bits=bits)
        yc.backward(g.contiguous())
        torch.testing.assert_close(y, yc, rtol=0, atol=0)
        torch.testing.assert_close(x.grad, xc.grad, rtol=0, atol=0)


def test_leaky_relu_float64_slope_is_exact(device):
    """The 1-bit code of LeakyReLU keeps x > 0; in float64 its slope multiplies at full precision
    (a float32 level would make 0.1 into 0.10000000149011612)."""
    x = torch.tensor([-1.0, 2.0, 0.0, -3.5, 1e-50, -1e-50], dtype=torch.float64, device=device,
                     requires_grad=True)
    mk.functional.leaky_relu(x, 0.1).sum().backward()
    xt = x.detach().clone().requires_grad_()
    torch.nn.functional.leaky_relu(xt, 0.1).sum().backward()
    assert torch.equal(x.grad, xt.grad)
    xs = _away_from_kinks(torch.randn(64, dtype=torch.float64), [0.0]).to(device).requires_grad_()
    # 1e-9: the finite differences themselves err by ~1e-10 (torch's own fails at 1e-12)
    assert torch.autograd.gradcheck(lambda t: mk.functional.leaky_relu(t, 0.1), (xs,), atol=1e-9, rtol=1e-9)
    assert mk.profile.saved_bytes(lambda t: mk.functional.leaky_relu(t, 0.1), xs) == packed_nbytes(64, 1)


def test_nan_parameter_is_one_table():
    # NaN != NaN: the table cache keys every NaN alike, or a NaN slope would add a table each call.
    from memkernels.activations import autograd
    x = torch.randn(8, requires_grad=True)
    mk.functional.leaky_relu(x, float("nan"))
    tables = len(autograd._device_tables)
    for _ in range(3):
        y = mk.functional.leaky_relu(x, float("nan"))
    assert len(autograd._device_tables) == tables
    assert torch.equal(y.isnan(), torch.nn.functional.leaky_relu(x, float("nan")).isnan())


KEEP_F_PRIME_OR_X = [c for c in CASES if c[4] not in TORCH_BACKWARD and c[4] not in TWO_VALUED]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("case", KEEP_F_PRIME_OR_X, ids=[c[0] for c in KEEP_F_PRIME_OR_X])
def test_exact_keeps_derivative_or_input(case, dtype, device):
    """bits=None keeps f'(x) (forward's) or, where keeps_input (SiLU, Softplus, the ELUs, GELU's
    forms in float32; on CUDA all), x: x itself when contiguous, a contiguous copy where strided;
    x's bytes either way.
    Backward from x computes forward's f'(x): the gradient is the same (on the CPU bit for bit in
    float32 and float64, where a kept f'(x) is not rounded; on CUDA the forward may be CUDA C++)."""
    _, mfn, tfn, kwargs, act, p0, p1 = case
    fn = lambda t: mfn(t, **kwargs)  # noqa: E731
    base = (torch.randn(1023, 3, generator=torch.Generator().manual_seed(3)) * 4).to(dtype).to(device)
    g = torch.randn(1023, device=device).to(dtype)
    for x in (base[:, 1].requires_grad_(), base[:, 1].contiguous().requires_grad_()):
        y, (kept,) = kept_tensors(fn, x)
        derivative = ops.activation_forward(x.detach(), int(act), p0, p1, 0, None)[1]
        if keeps_input(act, x):
            assert torch.equal(kept, x.detach()) and kept.is_contiguous()
            assert kept.data_ptr() == x.data_ptr() or not x.is_contiguous()
        else:
            assert torch.equal(kept, derivative)
        assert mk.profile.saved_bytes(fn, x) == y.nbytes
        y.backward(g)
        from_derivative = ops.activation_backward(g, derivative, 0, None)
        if device.type == "cpu" and dtype in (torch.float32, torch.float64):
            assert torch.equal(x.grad, from_derivative)
        else:
            torch.testing.assert_close(x.grad, from_derivative)
        torch.testing.assert_close(x.grad, torch_grad(tfn, kwargs, x, g)[1])


FRESH_PAGE_CASES = [(A.GELU, {}, torch.bfloat16), (A.GELU_TANH, {"approximate": "tanh"}, torch.float16),
                    (A.MISH, {}, torch.float32)]


@pytest.mark.parametrize("act,kwargs,dtype", FRESH_PAGE_CASES, ids=[c[0].name for c in FRESH_PAGE_CASES])
def test_exact_keeps_input_from_fresh_page_sizes(act, kwargs, dtype):
    """On the CPU, activations that keep f'(x) below 32 MB keep x from 32 MB on (f'(x) would be one
    more output of fresh pages); the gradient is the one f'(x) gives (in 16-bit floats f' is then
    not rounded to x's dtype before it multiplies)."""
    fn = lambda t: getattr(mk.functional, act.name.lower().removesuffix("_tanh"))(t, **kwargs)  # noqa: E731
    small = torch.randn(1023, dtype=dtype)
    assert not keeps_input(act, small)
    x = torch.randn(FRESH_PAGES_BYTES // small.element_size(), generator=torch.Generator().manual_seed(5))
    x = x.to(dtype).requires_grad_()
    assert keeps_input(act, x) and not keeps_input(act, x.detach()[1:])
    y, (kept,) = kept_tensors(fn, x)
    assert kept.data_ptr() == x.data_ptr()
    g = torch.randn(x.shape, dtype=dtype)
    y.backward(g)
    derivative = ops.activation_forward(x.detach(), int(act), 0.0, 0.0, 0, None)[1]
    from_derivative = ops.activation_backward(g, derivative, 0, None)
    if dtype == torch.float32:
        assert torch.equal(x.grad, from_derivative)
    else:
        torch.testing.assert_close(x.grad, from_derivative)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("act", list(TORCH_BACKWARD), ids=lambda a: a.name)
def test_exact_keeps_what_torch_keeps(act, dtype, device):
    """Sigmoid and Tanh keep y, Hardswish keeps x with bits=None (f' costs less to recompute than
    to write): one tensor of x's size, a contiguous copy where x is strided, the
    gradient is torch's backward from it bit for bit, and a kept y is guarded like torch's (an
    in-place change raises in backward)."""
    keeps_output, torch_backward = TORCH_BACKWARD[act]
    fn = getattr(mk.functional, act.name.lower())
    base = (torch.randn(1023, 3, generator=torch.Generator().manual_seed(3)) * 4).to(dtype).to(device)
    x = base[:, 1].requires_grad_()
    g = torch.randn(x.shape, device=device).to(dtype)
    y, (kept,) = kept_tensors(fn, x)
    if keeps_output:
        assert kept.data_ptr() == y.data_ptr()
    else:
        assert torch.equal(kept, x.detach()) and kept.is_contiguous()
    assert mk.profile.saved_bytes(fn, x) == y.nbytes
    y.backward(g)
    assert torch.equal(x.grad, torch_backward(g, kept))
    if keeps_output:
        y = fn(x)
        y.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()
    # Twice differentiable, as torch's: the second derivative is torch's too, strided x included
    # (to rounding: y, which it is computed from, is ours, within a few ulp of torch's).
    torch_fn = getattr(torch, act.name.lower()) if keeps_output else torch.nn.functional.hardswish
    second = [torch.autograd.grad(torch.autograd.grad(f(x).sum(), x, create_graph=True)[0].sum(), x)[0]
              for f in (fn, torch_fn)]
    torch.testing.assert_close(second[0], second[1])


def signed_zeros(dtype, device):
    """+0.0 and -0.0 alternating over full vectors and a partial tail of the kernels (37 elements:
    2 float vectors of 16 and 5 more on AVX512, 4 of 8 doubles and 5), and a NaN."""
    x = torch.zeros(37, dtype=dtype)
    x[1::2] = -0.0
    x[20] = float("nan")
    return x.to(device)


def assert_signed_zeros_match(y, want, what):
    """y has torch's sign of zero (torch.signbit) wherever torch's value is not NaN, and NaN
    where it is."""
    y, want = y.cpu(), want.cpu()
    nan = want.isnan()
    assert torch.equal(y.isnan(), nan), f"{what}: NaN at {y.isnan().nonzero().flatten().tolist()}"
    differs = (torch.signbit(y) != torch.signbit(want)) & ~nan
    assert not differs.any(), (f"{what}: signbit differs from torch's at {differs.nonzero().flatten().tolist()}: "
                               f"{y[differs].tolist()} vs torch's {want[differs].tolist()}")


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_signed_zero_matches_torch(case, dtype, device):
    """f(+-0.0) has the sign of torch's zero (ReLU, the ELUs, LeakyReLU, Tanh, GELU, SiLU, Mish and
    Hardswish give -0.0 at -0.0, as torch does) in every mode: exact (f'(x), x or y kept, and the
    op that writes f and f' together), coded (bits=3) and values alone (no_grad); NaN stays NaN.
    The exact gradient at +-0.0 is torch's."""
    _, mfn, tfn, kwargs, act, p0, p1 = case
    x = signed_zeros(dtype, device)
    want = tfn(x.cpu(), **kwargs)
    _, torch_grad_ = torch_grad(tfn, kwargs, x.cpu(), torch.ones_like(x.cpu()))
    for bits in (None, 3):
        xg = x.clone().requires_grad_()
        y = mfn(xg, **kwargs, bits=bits)
        assert_signed_zeros_match(y.detach(), want, f"bits={bits}")
        if bits is None:
            y.backward(torch.ones_like(y))
            finite = ~x.isnan()
            assert torch.equal(xg.grad[finite].cpu(), torch_grad_[finite.cpu()])
    with torch.no_grad():
        assert_signed_zeros_match(mfn(x, **kwargs), want, "no_grad")
    assert_signed_zeros_match(ops.activation_forward(x, int(act), p0, p1, 0, None)[0], want, "activation_forward")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, on the interpreter's unused NaN branches
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_triton_signed_zero_matches_torch(case, dtype):
    """The Triton kernels (on CPU tensors under TRITON_INTERPRET=1 without a GPU) give torch's sign
    of zero too: exact (f and f' written together, f alone) and coded (bits=3)."""
    _, tk = triton_modules("pack", "activations")
    _, _, tfn, kwargs, act, p0, p1 = case
    x = signed_zeros(dtype, TRITON_DEVICE)
    want = tfn(x.cpu(), **kwargs)
    bits = effective_bits(act, 3)
    borders = device_table(act, bits, p0, p1, x.device)[0]
    assert_signed_zeros_match(tk.activation_forward(x, int(act), p0, p1, 0, None)[0], want, "exact")
    assert_signed_zeros_match(tk.activation_value(x, int(act), p0, p1), want, "activation_value")
    assert_signed_zeros_match(tk.activation_forward(x, int(act), p0, p1, bits, borders)[0], want, "bits=3")


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_gated_signed_zero_matches_torch(dtype, device):
    """swiglu and geglu at a = +-0.0 (b = +-1): torch's sign of zero of silu(a) * b, gelu(a) * b."""
    a = signed_zeros(dtype, device)
    b = torch.ones_like(a)
    b[::3] = -1.0
    gates = [(mk.functional.swiglu, torch.nn.functional.silu, {}),
             (mk.functional.geglu, torch.nn.functional.gelu, {}),
             (mk.functional.geglu, torch.nn.functional.gelu, {"approximate": "tanh"})]
    for mfn, tfn, kwargs in gates:
        want = tfn(a.cpu(), **kwargs) * b.cpu()
        for bits in (None, 3):
            y = mfn(a.clone().requires_grad_(), b, **kwargs, bits=bits)
            assert_signed_zeros_match(y.detach(), want, f"{tfn.__name__} {kwargs} bits={bits}")


@pytest.mark.parametrize("call, name", [
    (lambda x: mk.functional.softplus(x, beta="a"), "beta"),
    (lambda x: mk.functional.softplus(x, threshold=None), "threshold"),
    (lambda x: mk.functional.elu(x, alpha=None), "alpha"),
    (lambda x: mk.functional.celu(x, alpha="1"), "alpha"),
    (lambda x: mk.functional.leaky_relu(x, negative_slope="a"), "negative_slope"),
    (lambda x: mk.functional.leaky_relu(x, negative_slope=True), "negative_slope"),
])
def test_activation_parameters_of_the_wrong_type_are_named(call, name):
    with pytest.raises(TypeError, match=f"^{name} must be a real number, got "):
        call(torch.randn(4, requires_grad=True))


@pytest.mark.parametrize("bits", [None, 3])
def test_reference_autograd_without_extension(bits, monkeypatch):
    """Without memkernels._C the differentiable ops run their Python reference (reference.activation,
    reference.gated) after a warning: the values, gradients and kept bytes of the C++ autograd."""
    def run(fn, *inputs):
        inputs = [t.detach().requires_grad_() for t in inputs]
        y = fn(*inputs)
        return y, torch.autograd.grad(y, inputs, g), mk.profile.saved_bytes(fn, *inputs)

    x, b = torch.randn(2, 1023, 3, dtype=torch.float64).unbind(0)
    g = torch.randn(1023, 3, dtype=torch.float64)
    cases = [(lambda t: mk.functional.gelu(t, bits=bits), (x,)), (lambda t: mk.functional.silu(t, bits=bits), (x,)),
             (lambda t: mk.functional.leaky_relu(t, 0.1, bits=bits), (x,)),  # float64: the exact slope
             (lambda t: mk.functional.tanh(t, bits=bits), (x,)),  # exact: keeps y, torch's backward
             (lambda t, u: mk.functional.swiglu(t, u, bits=bits), (x, b))]
    with_kernels = [run(fn, *inputs) for fn, inputs in cases]
    monkeypatch.setattr(ops, "_C", None)
    monkeypatch.setattr(ops, "_warned", False)
    with pytest.warns(RuntimeWarning, match="running the plain-PyTorch reference ops"):
        without = [run(fn, *inputs) for fn, inputs in cases]
    for (y, grads, kept), (y_ref, grads_ref, kept_ref) in zip(with_kernels, without):
        torch.testing.assert_close(y, y_ref)
        for grad, grad_ref in zip(grads, grads_ref):
            torch.testing.assert_close(grad, grad_ref)
        assert kept == kept_ref
    xr = x.detach().requires_grad_()
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(mk.functional.gelu(xr, bits=bits).sum(), xr, create_graph=True)
