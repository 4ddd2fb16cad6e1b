"""SwiGLU / GeGLU against silu(a) * b and gelu(a) * b."""
import pytest
import torch
import torch.nn.functional as TF

import memkernels as mk
from memkernels import reference
from memkernels.activations.spec import Activation as A, packed_nbytes
from memkernels.activations.tables import get_table

from _cases import LOSSES, kept_beyond, loss_grad

GATES = [
    ("swiglu", lambda a, b, **k: mk.functional.swiglu(a, b, **k), lambda a, b: TF.silu(a) * b, A.SILU),
    ("geglu", lambda a, b, **k: mk.functional.geglu(a, b, **k), lambda a, b: TF.gelu(a) * b, A.GELU),
    ("geglu_tanh", lambda a, b, **k: mk.functional.geglu(a, b, approximate="tanh", **k),
     lambda a, b: TF.gelu(a, approximate="tanh") * b, A.GELU_TANH),
]
IDS = [g[0] for g in GATES]
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2 ** -6, 2 ** -6), torch.float16: (2 ** -9, 2 ** -9)}


def halves(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b, go = (torch.randn(shape, generator=g).to(dtype).to(device) for _ in range(3))
    return a.mul(2).requires_grad_(), b.requires_grad_(), go


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", [(1,), (7,), (1023,), (4097,), (3, 5, 7)], ids=str)
@pytest.mark.parametrize("gate", GATES, ids=IDS)
def test_exact_matches_torch(gate, shape, dtype, device):
    _, mfn, tfn, _ = gate
    a, b, go = halves(shape, dtype, device)
    y = mfn(a, b)
    ga, gb = torch.autograd.grad(y, (a, b), go)
    ty = tfn(a, b)
    tga, tgb = torch.autograd.grad(ty, (a, b), go)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y, ty.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(ga, tga, rtol=rtol, atol=atol)
    torch.testing.assert_close(gb, tgb, rtol=rtol, atol=atol)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("gate", GATES, ids=IDS)
def test_coded_backward_uses_interval_levels(gate, bits, device):
    _, mfn, tfn, act = gate
    a, b, go = halves((1000,), torch.float32, device, seed=bits)
    y = mfn(a, b, bits=bits)
    torch.testing.assert_close(y, tfn(a, b).detach())
    ga, gb = torch.autograd.grad(y, (a, b), go)
    t = get_table(act, bits)
    c = reference.codes(a.detach(), t.borders).long()
    torch.testing.assert_close(ga, go * b.detach() * t.levels.to(device)[c])
    torch.testing.assert_close(gb, go * t.value_levels.to(device)[c])


@pytest.mark.parametrize("gate", GATES, ids=IDS)
def test_gradcheck_float64(gate, device):
    _, mfn, _, _ = gate
    a, b, _ = halves((40,), torch.float64, device)
    assert torch.autograd.gradcheck(lambda a, b: mfn(a, b), (a, b))


def test_bytes_kept_less_than_torch_and_liger(device):
    n = 4096
    a, b, _ = halves((n,), torch.bfloat16, device)
    torch_kept = mk.profile.saved_bytes(lambda a, b: TF.silu(a) * b, a, b)
    assert torch_kept == 3 * 2 * n  # a (silu), silu(a) and b (mul)
    assert mk.profile.saved_bytes(mk.functional.swiglu, a, b) == 2 * 2 * n  # a, b: what Liger keeps
    for bits in (1, 2, 3, 4, 8):
        kept = mk.profile.saved_bytes(lambda a, b: mk.functional.swiglu(a, b, bits=bits), a, b)
        assert kept == 2 * n + packed_nbytes(n, bits)  # b and the code of a: 16 + bits per element


@pytest.mark.parametrize("bits", [None, 3])
def test_module_splits_concatenated_input(bits, device):
    x = torch.randn(4, 6, 10, device=device, requires_grad=True)
    g = torch.randn(4, 6, 5, device=device)
    m = mk.nn.SwiGLU(bits=bits)
    y = m(x)
    a, b = x.chunk(2, -1)
    torch.testing.assert_close(y, mk.functional.swiglu(a, b, bits=bits))
    (grad,) = torch.autograd.grad(y, x, g)
    ga, gb = torch.autograd.grad(mk.functional.swiglu(a, b, bits=bits), (a, b), g)
    torch.testing.assert_close(grad, torch.cat([ga, gb], -1))
    kept = mk.profile.saved_bytes(m, x)
    # Exact keeps x itself (a and b are views of it); coded keeps a compact b and the code of a:
    # never x, whose first half would then stay alive.
    assert kept == (x.numel() * 4 if bits is None else x.numel() // 2 * 4 + packed_nbytes(x.numel() // 2, 3))
    torch.testing.assert_close(mk.nn.GeGLU(dim=0)(x), TF.gelu(x[:2]) * x[2:])


@pytest.mark.parametrize("module, gate", [(mk.nn.SwiGLU, GATES[0]), (mk.nn.GeGLU, GATES[1])], ids=["swiglu", "geglu"])
def test_module_takes_the_two_halves(module, gate):
    a, b, _ = halves((3, 5), torch.float32, "cpu")
    m = module(dim=0, bits=3)  # dim splits one tensor only: two are a and b as given
    torch.testing.assert_close(m(a, b), gate[2](a, b))
    (ga, gb) = torch.autograd.grad(m(a, b).sum(), (a, b))
    (wa, wb) = torch.autograd.grad(gate[1](a, b, bits=3).sum(), (a, b))
    assert torch.equal(ga, wa) and torch.equal(gb, wb)


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("bits", [None, 1, 3])
@pytest.mark.parametrize("gate", GATES, ids=IDS)
def test_loss_on_the_output(gate, bits, dtype, device):
    """y.sum() and y.mean() straight on the output (sum: an expanded scalar grad_out, read as one
    value, uncopied): both gradients are those of a contiguous grad_out of the same values, bit for
    bit, for two tensors and for the module's halves of one."""
    name, mfn, _, _ = gate
    module = {"swiglu": mk.nn.SwiGLU(bits=bits), "geglu": mk.nn.GeGLU(bits=bits)}.get(name)
    for shape in ((1,), (7,), (1023,), (4097,), (0,), (3, 5, 7)):
        a, b, _ = halves(shape, dtype, device)
        for loss in LOSSES:
            y = mfn(a, b, bits=bits)
            grads = torch.autograd.grad(getattr(y, loss)(), (a, b))
            g = loss_grad(loss, y)
            wants = torch.autograd.grad(mfn(a, b, bits=bits), (a, b), g.contiguous())
            for grad, want in zip(grads, wants):
                assert grad.dtype == want.dtype and grad.stride() == want.stride() and torch.equal(grad, want)
            if module is not None:
                x = torch.cat([a, b], -1).detach().requires_grad_()
                (grad,) = torch.autograd.grad(getattr(module(x), loss)(), x)
                (want,) = torch.autograd.grad(module(x), x, loss_grad(loss, module(x)).contiguous())
                assert torch.equal(grad, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits", [None, 3])
@pytest.mark.parametrize("gate", GATES, ids=IDS)
def test_sum_backward_peak_memory(gate, bits, dtype):
    """The peak of fn(a, b).sum().backward() is y, the two gradients and the sum's two scalars, as
    for a * b, plus what the unit allocates to keep (the code of a): no full-size copy of the
    expanded scalar gradient."""
    _, mfn, _, _ = gate
    fn = lambda s, t: mfn(s, t, bits=bits)  # noqa: E731
    a, b = (torch.randn(1 << 14, dtype=dtype, requires_grad=True) for _ in range(2))
    fn(a, b).sum().backward()  # loads the tables first: they stay, cached
    a.grad = b.grad = None
    baseline = mk.profile.peak_memory(torch.mul, a, b)
    assert baseline == 3 * a.nbytes + 2 * a.element_size()
    a.grad = b.grad = None
    assert mk.profile.peak_memory(fn, a, b) == baseline + kept_beyond(fn, a, b)


def test_bad_arguments():
    with pytest.raises(ValueError, match="even"):
        mk.nn.SwiGLU()(torch.randn(3, 5))
    for module, x in ((mk.nn.SwiGLU(dim=3), torch.randn(3, 4)), (mk.nn.GeGLU(), torch.tensor(1.0))):
        with pytest.raises(ValueError, match="dims"):
            module(x)
    with pytest.raises(TypeError, match="b must be"):
        mk.functional.swiglu(torch.randn(3), torch.arange(3))
    with pytest.raises(RuntimeError, match="shape"):
        mk.functional.swiglu(torch.randn(3), torch.randn(4))


@pytest.mark.parametrize("bits", [None, 3])
def test_second_derivative_raises(bits, device):
    a = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, device=device)
    y = mk.functional.swiglu(a, b, bits=bits)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(y.sum(), a, create_graph=True)


@pytest.mark.parametrize("bits", [None, 3])
def test_no_grad_and_layout(bits, device):
    """Without grad only y is computed (no code, nothing kept); a shared dense layout is kept."""
    a, b = (torch.randn(2, 3, 4, 5, device=device).to(memory_format=torch.channels_last) for _ in range(2))
    with torch.no_grad():
        y = mk.functional.swiglu(a, b, bits=bits)
    assert y.grad_fn is None
    assert torch.equal(y, mk.functional.swiglu(a.clone().requires_grad_(), b, bits=bits).detach())
    assert y.stride() == (TF.silu(a) * b).stride()
    a.requires_grad_()
    mk.functional.swiglu(a, b, bits=bits).sum().backward()
    assert a.grad.stride() == a.stride()
    assert mk.profile.saved_bytes(lambda s, t: mk.functional.swiglu(s, t, bits=bits), a.detach(), b) == 0
