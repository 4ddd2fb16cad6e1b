"""mk.nn modules and mk.elementwise."""
import pytest
import torch
from torch import nn

import memkernels as mk
from memkernels.activations.spec import packed_nbytes

TWINS = [
    (nn.GELU(approximate="tanh"), mk.nn.GELU(approximate="tanh", bits=3)),
    (nn.SiLU(), mk.nn.SiLU(bits=2)), (nn.Mish(), mk.nn.Mish()), (nn.Softplus(2.0, 5.0), mk.nn.Softplus(2.0, 5.0, bits=4)),
    (nn.ELU(0.5), mk.nn.ELU(0.5, bits=8)), (nn.SELU(), mk.nn.SELU(bits=1)), (nn.CELU(1.5), mk.nn.CELU(1.5)),
    (nn.LeakyReLU(0.1), mk.nn.LeakyReLU(0.1)), (nn.ReLU(), mk.nn.ReLU(bits=4)), (nn.Sigmoid(), mk.nn.Sigmoid(bits=3)),
    (nn.Tanh(), mk.nn.Tanh(bits=3)), (nn.Hardswish(), mk.nn.Hardswish(bits=3)), (nn.Hardsigmoid(), mk.nn.Hardsigmoid(bits=3)),
]


@pytest.mark.parametrize("pair", TWINS, ids=lambda p: type(p[0]).__name__)
def test_module_forward_matches_torch(pair):
    theirs, ours = pair
    x = torch.randn(5, 9) * 3
    torch.testing.assert_close(ours(x), theirs(x))
    assert f"bits={ours.bits}" in repr(ours)


def swish_beta(x):
    return x * torch.sigmoid(1.5 * x)


def test_elementwise_exact():
    f = mk.elementwise(swish_beta)
    x = torch.randn(1023, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(f(x), swish_beta(x))
    assert torch.autograd.gradcheck(f, (x,))
    x32 = torch.randn(1023, requires_grad=True)
    assert mk.profile.saved_bytes(f, x32) == 1023 * 4  # only f'(x); torch's swish keeps 3 tensors
    assert mk.profile.saved_bytes(swish_beta, x32) > 1023 * 4


def test_elementwise_coded():
    f = mk.elementwise(bits=3)(swish_beta)
    x = torch.randn(4097, requires_grad=True)
    y = f(x)
    torch.testing.assert_close(y, swish_beta(x))
    (g,) = torch.autograd.grad(y.sum(), x)
    t = f.table()
    from memkernels import reference
    torch.testing.assert_close(g, t.levels[reference.codes(x.detach(), t.borders).long()])
    assert mk.profile.saved_bytes(f, x) == packed_nbytes(4097, 3)
    # levels are conditional means of f': the code's gradient is close to the true one
    exact = torch.autograd.grad(swish_beta(x).sum(), x)[0]
    assert (g - exact).pow(2).mean() < 0.01
    with pytest.raises(ValueError, match="bits"):
        mk.elementwise(swish_beta, bits=7)


def test_elementwise_refuses_gradients_it_cannot_give():
    """fn'(x) gives x's gradient only: a fn whose parameters or captured tensors require grad
    raises where autograd records the call, instead of leaving their .grad silently None."""
    beta = nn.Parameter(torch.tensor(1.5))
    x = torch.randn(5, requires_grad=True)
    for bits in (None, 3):
        with pytest.raises(RuntimeError, match="require grad besides its input"):
            mk.elementwise(lambda t: t * torch.sigmoid(beta * t), bits=bits)(x)
        with pytest.raises(RuntimeError, match="require grad besides its input"):
            mk.elementwise(lambda t: t * torch.sigmoid(beta * t), bits=bits)(x.detach())
        with pytest.raises(RuntimeError, match="require grad besides its input"):
            mk.elementwise(nn.PReLU(), bits=bits)(x)
    with torch.no_grad():
        mk.elementwise(nn.PReLU())(x)
    frozen = nn.PReLU().requires_grad_(False)
    f = mk.elementwise(frozen)
    torch.testing.assert_close(f(x), frozen(x))
    assert list(f.state_dict()) == ["fn.weight"]  # no second registration as __wrapped__
    assert mk.elementwise(swish_beta).__name__ == "swish_beta"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_elementwise_coded_module_with_parameters(dtype):
    # The table fit evaluates fn in float64, a module fn as a float64 copy of itself: PReLU's
    # two-valued f' is then coded exactly, and the module keeps its own dtype.
    prelu = nn.PReLU(init=0.3, dtype=dtype).requires_grad_(False)
    f = mk.elementwise(prelu, bits=3)
    x = torch.randn(1000, dtype=dtype, requires_grad=True)
    y = f(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    (want,) = torch.autograd.grad(prelu(x).sum(), x)
    assert torch.equal(y, prelu(x)) and torch.equal(g, want)
    assert prelu.weight.dtype == dtype


def test_elementwise_fits_again_when_a_module_fns_tensors_change():
    prelu = nn.PReLU(init=0.25).requires_grad_(False)
    f = mk.elementwise(prelu, bits=3)
    x = torch.tensor([-2.0, -1.0, 1.0], requires_grad=True)
    f(x).sum().backward()
    f.load_state_dict({"fn.weight": torch.tensor([0.9])})
    x.grad = None
    f(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.9, 0.9, 1.0]))


@pytest.mark.parametrize("bits", [None, 3])
def test_elementwise_takes_expanded_inputs(bits):
    f = mk.elementwise(torch.tanh, bits=bits)
    x = torch.randn(5, requires_grad=True)
    y = f(x.expand(3, 5))
    (g,) = torch.autograd.grad(y.sum(), x)
    (want,) = torch.autograd.grad(f(x.expand(3, 5).contiguous()).sum(), x)  # the same values, dense
    assert torch.equal(y, torch.tanh(x).expand(3, 5)) and torch.equal(g, want)


def test_elementwise_checks_a_fn_at_a_later_input_without_finite_derivatives_first():
    # sqrt at 0 and anything at NaN give no finite derivative to compare: the check waits.
    f = mk.elementwise(torch.sqrt)
    assert torch.equal(f(torch.zeros(4)), torch.zeros(4))
    assert torch.isnan(mk.elementwise(torch.tanh)(torch.full((4,), float("nan")))).all()
    g = mk.elementwise(lambda t: torch.cumsum(torch.sqrt(t), -1))
    g(torch.zeros(4))
    with pytest.raises(ValueError, match="not element-wise"):
        g(torch.rand(4) + 0.5)


def test_elementwise_names_a_fn_the_table_fit_cannot_evaluate():
    w = torch.tensor([0.25])  # float32, which prelu does not promote to float64
    with pytest.raises(RuntimeError, match="fitting the table of fn' evaluates fn on float64"):
        mk.elementwise(lambda t: nn.functional.prelu(t, w), bits=3)(torch.randn(5, requires_grad=True))


@pytest.mark.parametrize("fn", [lambda t: torch.softmax(t, -1), lambda t: torch.cumsum(t, -1),
                                lambda t: torch.flip(t, (-1,)), lambda t: t - t.mean()],
                         ids=["softmax", "cumsum", "flip", "minus_mean"])
def test_elementwise_refuses_functions_that_mix_elements(fn):
    x = torch.randn(4, 9, requires_grad=True)
    with pytest.raises(ValueError, match="not element-wise"):
        mk.elementwise(fn)(x)
    with pytest.raises(ValueError, match="must be element-wise.*shape"):
        mk.elementwise(lambda t: t.sum(-1))(x)


def test_elementwise_second_derivative_raises_and_no_grad_keeps_nothing():
    f = mk.elementwise(swish_beta)
    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(f(x * 2).sum(), x, create_graph=True)
    assert mk.profile.saved_bytes(f, x.detach()) == 0
    with torch.no_grad():
        assert torch.equal(f(x), swish_beta(x))


def test_elementwise_repr_names_fn_and_bits():
    assert repr(mk.elementwise(torch.tanh, bits=3)) == "Elementwise(fn='tanh', bits=3)"
    assert repr(mk.elementwise(swish_beta)) == "Elementwise(fn='swish_beta', bits=None)"
    assert "fn=PReLU(num_parameters=1), bits=None" in repr(mk.elementwise(nn.PReLU()))


@pytest.mark.parametrize("dim", ["a", 1.0, True])
def test_glu_dim_must_be_an_int(dim):
    for cls in (mk.nn.SwiGLU, mk.nn.GeGLU):
        with pytest.raises(TypeError, match=r"^dim must be an int, got "):
            cls(dim=dim)


def test_activation_module_parameters_are_checked_at_construction():
    with pytest.raises(TypeError, match=r"^alpha must be a real number, got str '1'"):
        mk.nn.ELU(alpha="1")
    with pytest.raises(TypeError, match=r"^beta must be a real number, got NoneType"):
        mk.nn.Softplus(beta=None)
    with pytest.raises(TypeError, match=r"^negative_slope must be a real number, got str"):
        mk.nn.LeakyReLU("0.1")


@pytest.mark.parametrize("fn", [3, "sin", None, torch.ones(3)])
def test_elementwise_needs_a_callable(fn):
    if fn is None:  # mk.elementwise(None) is the decorator form; the class itself refuses it
        with pytest.raises(TypeError, match=r"^fn must be callable .*got NoneType"):
            mk.Elementwise(None)
        return
    with pytest.raises(TypeError, match=rf"^fn must be callable .*got {type(fn).__name__}"):
        mk.elementwise(fn)


def test_elementwise_decorator_checks_bits_at_once():
    with pytest.raises(ValueError, match=r"^bits must be None or one of \(1, 2, 3, 4, 8\), got 5"):
        mk.elementwise(bits=5)


@pytest.mark.parametrize("fn, got", [(lambda t: (t, t), "tuple"), (lambda t: (t > 0).long(), "torch.int64"),
                                     (lambda t: t * 1j, "torch.complex64")])
def test_elementwise_fn_must_return_a_floating_tensor(fn, got):
    x = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(TypeError, match=rf"fn must return a floating-point tensor, got {got}"):
        mk.elementwise(fn)(x)
    with torch.no_grad(), pytest.raises(TypeError, match=rf"fn must return a floating-point tensor, got {got}"):
        mk.elementwise(fn)(x)


@pytest.mark.parametrize("bits", [None, 3])
def test_elementwise_on_meta_tensors(bits):
    f = mk.elementwise(torch.sin, bits=bits)
    y = f(torch.randn(4, 8, device="meta", requires_grad=True))
    assert y.shape == (4, 8) and y.device.type == "meta"
    assert not f._checked  # the element-wise check waits for real values


def test_from_torch_needs_its_torch_layer():
    with pytest.raises(TypeError, match=r"^Linear.from_torch: module must be an nn.Linear, got Conv2d"):
        mk.nn.Linear.from_torch(nn.Conv2d(3, 3, 3), save="int4")
    with pytest.raises(TypeError, match=r"^Conv2d.from_torch: module must be an nn.Conv2d, got str"):
        mk.nn.Conv2d.from_torch("conv", save="int4")


@pytest.mark.parametrize("save", ["asa", "int4"])
def test_coded_layers_run_on_meta(save):
    assert mk.nn.Linear(8, 4, save=save, device="meta")(torch.randn(2, 8, device="meta")).shape == (2, 4)
    y = mk.nn.Conv2d(3, 4, 3, save=save, device="meta")(torch.randn(1, 3, 8, 8, device="meta"))
    assert y.shape == (1, 4, 6, 6)
    with pytest.raises(ValueError, match=r"^weight must be on the device of input \(meta\), got cpu"):
        mk.nn.Linear(8, 4, save=save)(torch.randn(2, 8, device="meta"))
