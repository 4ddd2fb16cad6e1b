"""The ops as torch ops: opcheck (schemas, fake kernels, autograd registration), torch.compile
without graph breaks, the CUDA backend choice, and the large-index path."""
import functools
import os
import re

import pytest
import torch

import memkernels as mk
from memkernels import ops, reference
from memkernels.activations.spec import Activation as A, packed_nbytes
from memkernels.activations.tables import get_table


def test_extension_is_built():
    assert ops.extension_loaded(), "memkernels._C did not import: the kernels are not being tested"


def op_samples(device):
    x = torch.randn(37, 5, device=device)
    g = torch.randn(37, 5, device=device)
    t = get_table(A.GELU, 3)
    borders, levels, values = (v.to(device) for v in (t.borders, t.levels, t.value_levels))
    y, code = ops.activation_forward(x, int(A.GELU), 0.0, 0.0, 3, borders)
    _, gcode = ops.gated_forward(x, g, int(A.SILU), 3, borders)
    one = torch.randn((), device=device).expand(x.shape)  # y.sum()'s grad_out: one value, strides 0
    xr, gr = x.clone().requires_grad_(), g.clone().requires_grad_()
    return [
        ("activation_forward", (x, int(A.GELU), 0.0, 0.0, 0, None)),
        ("activation_forward", (x.t(), int(A.SOFTPLUS), 2.0, 3.0, 3, borders)),
        ("activation_value", (x, int(A.GELU), 0.0, 0.0)),
        ("activation_value", (x.t(), int(A.LEAKY_RELU), 0.2, 0.0)),
        ("activation_backward", (g, code, 3, levels)),
        ("activation_backward", (g, g, 0, None)),
        ("activation_backward", (one, code, 3, levels)),
        ("activation_backward", (one, g, 0, None)),
        ("activation_backward_from_input", (g, x, int(A.SILU), 0.0, 0.0)),
        ("activation_backward_from_input", (g.t(), x.t(), int(A.SOFTPLUS), 2.0, 3.0)),
        ("activation_backward_from_input", (one, x, int(A.GELU), 0.0, 0.0)),
        ("gated_forward", (x, g, int(A.SILU), 0, None)),
        ("gated_forward", (x, g, int(A.GELU_TANH), 3, borders)),
        ("gated_backward", (g, x, g, int(A.SILU), 0, None, None)),
        ("gated_backward", (g, gcode, g, int(A.SILU), 3, levels, values)),
        ("gated_backward", (one, x, g, int(A.GELU), 0, None, None)),
        ("gated_backward", (one, gcode, g, int(A.SILU), 3, levels, values)),
        # the differentiable ops (autograd in csrc/autograd.cpp): opcheck's gradients too
        ("activation", (xr, int(A.GELU), 0.0, 0.0, 3, 0, borders, levels)),
        ("activation", (xr.t(), int(A.SOFTPLUS), 2.0, 3.0, 0, 0, None, None)),
        ("activation", (xr, int(A.SILU), 0.0, 0.0, 0, 1, None, None)),
        ("activation", (xr, int(A.SIGMOID), 0.0, 0.0, 0, 2, None, None)),
        ("activation", (xr, int(A.HARDSWISH), 0.0, 0.0, 0, 2, None, None)),
        ("gated", (xr, gr, int(A.SILU), 3, True, borders, levels, values)),
        ("gated", (xr, gr, int(A.GELU), 0, False, None, None, None)),
        ("pack_bits", (torch.randint(0, 8, (37,), dtype=torch.uint8, device=device), 3)),
        ("unpack_bits", (code, 3, x.numel())),
        ("activation_table", (int(A.GELU), 3, 0.0, 0.0, x.device)),
        ("activation_table", (int(A.RELU), 4, 0.0, 0.0, x.device)),  # two-valued: the 1-bit table
    ] + compress_samples(x, g)


def compress_samples(x, g):
    seed = torch.tensor(7)
    codes, stats = ops.quantize_groups(x, 4, 8, seed)
    signs = ops.auxiliary_sign_forward(x, 0.01, False)[1]
    return [
        ("auxiliary_sign_forward", (x, 0.01, False)),
        ("quantize_groups", (x.t(), 2, 16, seed)),
        ("dequantize_groups", (codes, stats, x.shape[1], 4, 8, 0.0, 0.0, torch.bfloat16)),
        ("dequantize_groups", (signs, None, x.shape[1], 1, 256, -1.0, 2.0, torch.float32)),
        ("weight_grad_from_codes", (g, codes, stats, x.shape[1], 4, 8, 0.0, 0.0)),
        ("weight_grad_from_codes", (g.t().contiguous().t(), signs, None, x.shape[1], 1, 256, 0.0, 1.0)),
    ]


def test_opcheck(device):
    for name, args in op_samples(device):
        torch.library.opcheck(getattr(torch.ops.memkernels, name).default, args)


def test_fake_shapes_match_real(device):
    from torch._subclasses.fake_tensor import FakeTensorMode
    for name, args in op_samples(device):
        real = getattr(torch.ops.memkernels, name)(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = getattr(torch.ops.memkernels, name)(*fake_args)
        for r, f in zip(real if isinstance(real, tuple) else (real,), fake if isinstance(fake, tuple) else (fake,)):
            assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride()), name


@pytest.mark.parametrize("bits", [None, 3])
def test_compile_fullgraph(bits, device):
    def step(x, a, b):
        return mk.functional.gelu(x, bits=bits).sum() + mk.functional.swiglu(a, b, bits=bits).sum() \
            + mk.functional.softplus(x, beta=2.0, bits=bits).sum() + mk.functional.sigmoid(a, bits=bits).sum() \
            + mk.functional.hardswish(b, bits=bits).sum()

    x, a, b = (torch.randn(129, device=device, requires_grad=True) for _ in range(3))
    compiled = torch.compile(step, fullgraph=True)
    out = compiled(x, a, b)
    grads = torch.autograd.grad(out, (x, a, b))
    ref = torch.autograd.grad(step(x, a, b), (x, a, b))
    torch.testing.assert_close(out, step(x, a, b))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)
    # what the compiled graph keeps for backward is the code / derivative, and with a code the
    # table of its levels (float32, 2**bits), which the graph looked up and eager keeps aside
    kept = mk.profile.saved_bytes(lambda t: torch.compile(mk.nn.GELU(bits=bits), fullgraph=True)(t), x)
    assert kept == (129 * 4 if bits is None else packed_nbytes(129, 3) + 4 * 2 ** 3)


@pytest.mark.parametrize("bits", [None, 3])
def test_compile_elementwise_fullgraph(bits, device):
    f = mk.elementwise(lambda t: t * torch.tanh(t), bits=bits)
    x = torch.randn(65, device=device, requires_grad=True)
    y = torch.compile(f, fullgraph=True)(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, f(x))
    torch.testing.assert_close(g, torch.autograd.grad(f(x).sum(), x)[0])
    if bits is None:
        torch.testing.assert_close(g, torch.tanh(x) + x * (1 - torch.tanh(x) ** 2))


def test_activation_value_is_forward_without_derivative(device):
    x = torch.randn(1000, device=device) * 3
    for act, p0, p1 in ((A.GELU, 0.0, 0.0), (A.SOFTPLUS, 2.0, 3.0), (A.LEAKY_RELU, 0.2, 0.0)):
        y = ops.activation_value(x, int(act), p0, p1)
        assert torch.equal(y, ops.activation_forward(x, int(act), p0, p1, 0, None)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("act", [A.GELU, A.GELU_TANH, A.SILU], ids=lambda a: a.name)
def test_exact_ops_match_reference(act, dtype, device):
    """The exact forward (y and f'(x)) and both exact backwards, called as ops. On CUDA
    mk.functional's exact modes keep x (activation_value, activation_backward_from_input), so the
    exact path of activation_forward meets the reference here, under either CUDA backend
    (scripts/gpu.sh test-cuda-cpp runs this file with MEMKERNELS_BACKEND=cuda)."""
    x = (torch.randn(4097, generator=torch.Generator().manual_seed(5)) * 4).to(dtype).to(device)
    x[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    g = torch.randn(4097, device=device).to(dtype)
    atol, rtol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-5, 1.6e-2)
    close = functools.partial(torch.testing.assert_close, atol=atol, rtol=rtol, equal_nan=True)
    y, derivative = ops.activation_forward(x, int(act), 0.0, 0.0, 0, None)
    y_ref, derivative_ref = reference.activation_forward(x, int(act), 0.0, 0.0, 0, None)
    close(y, y_ref)
    close(derivative, derivative_ref)
    close(ops.activation_backward(g, derivative, 0, None), reference.activation_backward(g, derivative, 0, None))
    close(ops.activation_backward_from_input(g, x, int(act), 0.0, 0.0),
          reference.activation_backward_from_input(g, x, int(act)))


@pytest.mark.parametrize("make", [
    lambda: (lambda t: mk.functional.gelu(t, bits=3)), lambda: mk.nn.GELU(bits=3), lambda: mk.nn.ReLU(),
    lambda: mk.nn.LeakyReLU(0.2), lambda: mk.nn.Softplus(2.0, 5.0, bits=3), lambda: mk.nn.SwiGLU(bits=3),
    lambda: mk.elementwise(lambda t: t * torch.tanh(t), bits=3)], ids=[
    "gelu3", "GELU3", "ReLU", "LeakyReLU", "Softplus3", "SwiGLU3", "elementwise3"])
def test_compile_dynamic_fullgraph(make, device):
    """dynamic=True makes float parameters (module attributes, defaults) symbolic; the tables are
    looked up by an op that takes them so (assume_constant_result could not)."""
    torch._dynamo.reset()
    fn = make()
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in ((4, 16), (6, 10)):
        x = torch.randn(shape, device=device, requires_grad=True)
        (g,) = torch.autograd.grad(compiled(x).sum(), x)
        torch.testing.assert_close(g, torch.autograd.grad(fn(x).sum(), x)[0])


def test_ops_called_directly_have_no_derivative(device):
    """The ops are the kernels under memkernels' autograd; on a tensor that requires grad their
    outputs' backward raises rather than silently giving no gradient."""
    x = torch.randn(5, device=device, requires_grad=True)
    y, _ = ops.activation_forward(x, int(A.GELU), 0.0, 0.0, 0, None)
    with pytest.raises(RuntimeError, match="derivative for .*memkernels::activation_forward.* not implemented"):
        y.sum().backward()
    e = torch.randn(4, 8, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="memkernels::feedback_project"):
        ops.feedback_project(e, 0, 0, 3, 0.1).sum().backward()


def test_activation_refuses_what_it_cannot_keep(device):
    x = torch.randn(4, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"keep must be 0 \(f'\(x\) or its code\), 1 \(x\) or 2 .*got 3"):
        torch.ops.memkernels.activation(x, int(A.GELU), 0.0, 0.0, 0, 3, None, None)
    with pytest.raises(RuntimeError, match="serves Sigmoid, Tanh and Hardswish, got activation id 2"):
        torch.ops.memkernels.activation(x, int(A.GELU), 0.0, 0.0, 0, 2, None, None)


def test_fake_kernels_check_arguments():
    """A meta (fake) argument takes the call to the fake kernels: they check devices, dtypes and
    shapes as the real kernels do, instead of returning a tensor of garbage."""
    a, b_meta = torch.randn(2, 3), torch.randn(2, 3, device="meta")
    with pytest.raises(RuntimeError, match="b must be on the device of a"):
        mk.functional.swiglu(a, b_meta)
    with pytest.raises(RuntimeError, match="b must be on the device of a"):
        torch.ops.memkernels.gated_forward(a, b_meta, int(A.SILU), 0, None)
    meta = torch.randn(2, 3, device="meta")
    with pytest.raises(RuntimeError, match="b must have the shape of a"):
        torch.ops.memkernels.gated_forward(meta, torch.randn(5, device="meta"), int(A.SILU), 0, None)
    with pytest.raises(RuntimeError, match="b must have the dtype of grad_out"):
        torch.ops.memkernels.gated_backward(meta, meta, meta.double(), int(A.SILU), 0, None, None)
    with pytest.raises(RuntimeError, match="saved must hold"):
        torch.ops.memkernels.activation_backward(meta, torch.empty(2, dtype=torch.uint8, device="meta"), 3,
                                                 torch.empty(8, device="meta"))
    with pytest.raises(RuntimeError, match="borders must be given"):
        torch.ops.memkernels.activation_forward(meta, int(A.GELU), 0.0, 0.0, 3, None)


_UNKNOWN_ACTIVATION = "activation must be an id in [0, 14) (memkernels.activations.spec.Activation), got"
_NOT_A_GATE = "activation of a gated unit must be SILU, GELU or GELU_TANH, got id"


def _refused(device):
    """(op, args, message): arguments on `device` the CPU kernel refuses, with its message."""
    x = torch.randn(2, 3, device=device)
    borders = torch.randn(7, device=device)
    levels = torch.randn(8, device=device)
    codes = torch.zeros(10, dtype=torch.uint8, device=device)
    return [
        ("activation_forward", (x.int(), int(A.GELU), 0.0, 0.0, 0, None),
         "x must be float32, float64, bfloat16 or float16, got Int"),
        ("activation_forward", (x, int(A.GELU), 0.0, 0.0, 5, None), "bits must be 0 (exact) or one of 1, 2, 3, 4, 8, got 5"),
        ("activation_forward", (x, int(A.GELU), 0.0, 0.0, 3, None), "borders must be given when bits > 0 (bits = 3)"),
        ("activation_forward", (x, int(A.GELU), 0.0, 0.0, 3, borders.double()), "borders must be float32, got Double"),
        ("activation_forward", (x, int(A.GELU), 0.0, 0.0, 3, levels),
         "borders must have 2**bits - 1 = 7 values for bits = 3, got 8"),
        ("activation_forward", (x, 14, 0.0, 0.0, 0, None), f"{_UNKNOWN_ACTIVATION} 14"),
        ("activation_forward", (x, -1, 0.0, 0.0, 5, None), f"{_UNKNOWN_ACTIVATION} -1"),  # before bits
        ("activation_value", (x, 99, 0.0, 0.0), f"{_UNKNOWN_ACTIVATION} 99"),
        ("activation_backward_from_input", (x, x, -2, 0.0, 0.0), f"{_UNKNOWN_ACTIVATION} -2"),
        ("gated_forward", (x, x, 99, 0, None), f"{_UNKNOWN_ACTIVATION} 99"),
        ("gated_forward", (x, x, int(A.RELU), 0, None), f"{_NOT_A_GATE} 0"),
        ("gated_backward", (x, x, x, 14, 0, None, None), f"{_UNKNOWN_ACTIVATION} 14"),
        ("gated_backward", (x, x, x, int(A.TANH), 5, None, None), f"{_NOT_A_GATE} 11"),  # before bits
        ("activation_backward", (x, x.double(), 0, None), "saved must have the dtype of grad_out (Float), got Double"),
        ("activation_backward", (x, x[:1], 0, None), "saved must have the shape of grad_out [2, 3], got [1, 3]"),
        ("activation_backward", (x, x, 3, levels), "saved must be the uint8 packed code when bits > 0, got Float"),
        ("activation_backward", (x, codes, 3, levels),
         "saved must hold ceil(numel / 8) * bits = 3 bytes for 6 elements at bits = 3, got 10"),
        ("activation_backward", (x, codes[:3], 3, borders), "levels must have 2**bits = 8 values for bits = 3, got 7"),
        ("gated_forward", (x, x.t(), int(A.SILU), 0, None), "b must have the shape of a [2, 3], got [3, 2]"),
        ("pack_bits", (codes.float(), 2), "codes must be uint8, got Float"),
        ("pack_bits", (codes, 5), "bits must be one of 1, 2, 3, 4, 8, got 5"),
        ("unpack_bits", (codes.int(), 2, 40), "packed must be uint8, got Int"),
        ("unpack_bits", (codes, 0, 40), "bits must be one of 1, 2, 3, 4, 8, got 0"),
        ("unpack_bits", (codes, 2, -1), "numel must be >= 0, got -1"),
        ("unpack_bits", (codes, 2, 41), "packed must hold ceil(numel / 8) * bits = 12 bytes for numel = 41 at "
                                        "bits = 2, got 10"),
    ]


@pytest.mark.parametrize("case", range(len(_refused("cpu"))))
def test_fake_kernels_refuse_as_the_cpu_kernels(case):
    """The fakes' checks (memkernels/ops/_checks.py) are the CPU kernels', messages to the character.
    (The group-code and feedback ops: tests/test_compress_triton.py, tests/test_feedback_ops.py;
    the Triton kernels: tests/test_triton.py.)"""
    for device in ("cpu", "meta"):
        op, args, message = _refused(device)[case]
        with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
            getattr(torch.ops.memkernels, op)(*args)


@pytest.mark.parametrize("case", range(len(_refused("cpu"))))
def test_fake_kernels_refuse_under_fake_tensor_mode(case):
    """What torch.compile traces with: fake tensors of CPU tensors reach the fakes, which refuse
    with the CPU kernel's message."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    op, args, message = _refused("cpu")[case]
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
            getattr(torch.ops.memkernels, op)(*fake_args)


def test_gpu_backend_choice(monkeypatch):
    from memkernels.ops import _cuda
    monkeypatch.delenv("MEMKERNELS_BACKEND", raising=False)
    assert _cuda.backend_for("activation_forward") == _cuda.DEFAULT_BACKEND["activation_forward"]
    assert _cuda.backend_for("pack_bits") == "triton"  # no CUDA C++ kernel
    # values without a gradient are the recorded forward's: activation_value follows its backend
    monkeypatch.setitem(_cuda.DEFAULT_BACKEND, "activation_forward", "cuda" if mk.ops._C.with_cuda else "triton")
    assert _cuda.backend_for("activation_value") == _cuda.backend_for("activation_forward")
    monkeypatch.setenv("MEMKERNELS_BACKEND", "triton")
    assert _cuda.backend_for("gated_backward") == "triton"
    monkeypatch.setenv("MEMKERNELS_BACKEND", "cuda")
    if mk.ops._C.with_cuda:
        assert _cuda.backend_for("gated_backward") == "cuda"
    else:
        with pytest.raises(RuntimeError, match="without CUDA"):
            _cuda.backend_for("gated_backward")
    monkeypatch.setenv("MEMKERNELS_BACKEND", "hip")
    with pytest.raises(ValueError, match="MEMKERNELS_BACKEND"):
        _cuda.backend_for("activation_forward")


def _available_bytes():
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


N_LARGE = 2 ** 31 + 13  # past int32 indexing


@pytest.mark.slow
def test_more_than_2_31_elements():
    need = 4 * 2 * N_LARGE  # two bf16 tensors of N alive at once, and headroom
    if _available_bytes() < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB free memory")
    x = torch.empty(N_LARGE, dtype=torch.bfloat16)
    x[: 2 ** 20].normal_()
    x[-(2 ** 20):].normal_()
    x[2 ** 20: -(2 ** 20)] = 1.0
    t = get_table(A.GELU, 3)
    y, code = ops.activation_forward(x, int(A.GELU), 0.0, 0.0, 3, t.borders)
    assert code.numel() == packed_nbytes(N_LARGE, 3)
    tail = slice(-(2 ** 20), None)
    torch.testing.assert_close(y[tail], torch.nn.functional.gelu(x[tail]))
    del y
    grad = ops.activation_backward(x, code, 3, t.levels)  # grad_out = x
    expect = (x[tail].float() * t.levels[reference.codes(x[tail], t.borders).long()]).bfloat16()
    torch.testing.assert_close(grad[tail], expect, rtol=0, atol=0)


@pytest.mark.slow
def test_auxiliary_sign_forward_past_2_31_elements():
    cols = 4096
    rows = N_LARGE // cols + 1
    need = 4 * 2 * rows * cols  # x and x_aux in bf16, and headroom
    if _available_bytes() < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB free memory")
    x = torch.ones(rows, cols, dtype=torch.bfloat16)
    x[-2:].normal_()
    x_aux, signs = ops.auxiliary_sign_forward(x, 0.01, False)
    assert signs.shape == (rows, cols // 8)
    want_aux, want_signs = reference.auxiliary_sign_forward(x[-2:], 0.01, False)
    assert torch.equal(signs[-2:], want_signs) and torch.equal(x_aux[-2:], want_aux)
