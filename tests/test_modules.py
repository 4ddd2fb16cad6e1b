"""mk.nn modules, mk.convert and mk.elementwise."""
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


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.ReLU(inplace=True),
                         nn.Sequential(nn.Linear(32, 32), nn.SiLU()), nn.Linear(32, 4))


def test_convert_swaps_in_place_keeps_state_dict_and_reports():
    model = mlp()
    keys = list(model.state_dict())
    x = torch.randn(8, 16)
    before = model(x)
    same, report = mk.convert(model, bits=3, return_report=True)
    assert same is model and list(model.state_dict()) == keys
    assert [name for name, _, _ in report.swapped] == ["1", "3", "4.1"]
    assert isinstance(model[1], mk.nn.GELU) and model[1].bits == 3
    assert isinstance(model[3], mk.nn.ReLU) and model[3].inplace
    torch.testing.assert_close(model(x), before)
    assert "swapped 3" in str(report)


def test_convert_cuts_bytes_kept():
    model, x = mlp(), torch.randn(64, 16)
    before = mk.profile.saved_bytes(model, x)
    mk.convert(model, bits=3)
    after = mk.profile.saved_bytes(model, x)
    # GELU and SiLU kept their 32-float inputs (4 bytes each), now 3 bits; ReLU kept its output
    # (which the next Linear keeps anyway), now 1 bit more.
    n = 64 * 32
    assert before - after == 2 * 4 * n - 2 * packed_nbytes(n, 3) - packed_nbytes(n, 1)


def test_convert_include_exclude():
    model = mk.convert(mlp(), include=[nn.GELU, "4.*"])
    assert isinstance(model[1], mk.nn.GELU) and isinstance(model[4][1], mk.nn.SiLU)
    assert type(model[3]) is nn.ReLU
    model = mk.convert(mlp(), exclude=["1"])
    assert type(model[1]) is nn.GELU and isinstance(model[3], mk.nn.ReLU)
    with pytest.raises(ValueError, match="bits"):
        mk.convert(mlp(), bits=6)
    with pytest.raises(TypeError, match="include"):
        mk.convert(mlp(), include=[3])


def test_convert_skips_subclasses_and_matches_transformers_names():
    class MyGELU(nn.GELU):
        def forward(self, x):
            return super().forward(x) * 2

    # A class named and placed like transformers' own, without needing transformers installed.
    NewGELUActivation = type("NewGELUActivation", (nn.Module,), {
        "__module__": "transformers.activations",
        "forward": lambda self, x: nn.functional.gelu(x, approximate="tanh")})
    model = nn.Sequential(MyGELU(), NewGELUActivation())
    model, report = mk.convert(model, bits=2, return_report=True)
    assert type(model[0]) is MyGELU and report.skipped[0][0] == "0"
    assert isinstance(model[1], mk.nn.GELU) and model[1].approximate == "tanh" and model[1].bits == 2


# transformers' ACT2FN names whose module computes exactly one of our activations.
TRANSFORMERS_SWAPPED = ("gelu", "gelu_python", "gelu_new", "gelu_fast", "gelu_pytorch_tanh",
                        "gelu_python_tanh", "silu", "swish", "mish", "relu", "leaky_relu",
                        "sigmoid", "tanh", "hardswish")


@pytest.mark.parametrize("name", TRANSFORMERS_SWAPPED)
def test_convert_swaps_transformers_activations(name):
    """The real transformers classes (their names change between versions): each is swapped and
    the model's values and gradients stay the same."""
    transformers = pytest.importorskip("transformers")
    from transformers.activations import ACT2FN
    if name not in ACT2FN:
        pytest.skip(f"transformers {transformers.__version__} has no {name!r}")
    theirs = ACT2FN[name]
    model, report = mk.convert(nn.Sequential(ACT2FN[name]), return_report=True)
    assert len(report.swapped) == 1, report
    x = torch.linspace(-8, 8, 1001, dtype=torch.float64, requires_grad=True)
    want, = torch.autograd.grad(theirs(x).sum(), x)
    got, = torch.autograd.grad(model(x).sum(), x)
    torch.testing.assert_close(model(x), theirs(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("bits", [None, 3])
def test_training_step_converted_model(bits):
    torch.manual_seed(0)
    model, x, target = mlp(), torch.randn(32, 16), torch.randn(32, 4)
    ref = mlp()
    mk.convert(model, bits=bits)
    for m in (model, ref):
        nn.functional.mse_loss(m(x), target).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        if bits is None:
            torch.testing.assert_close(p.grad, q.grad)
        else:  # coded f': close in direction to the exact gradient
            cos = nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
            assert cos > 0.9


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
    (g,) = torch.autograd.grad(f(x * 2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        g.pow(2).sum().backward()
    assert mk.profile.saved_bytes(f, x.detach()) == 0
    with torch.no_grad():
        assert torch.equal(f(x), swish_beta(x))
