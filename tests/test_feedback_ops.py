"""feedback_project: the CPU, Triton (and, on a GPU, CUDA C++) kernels held against the materialised
reference B of memkernels/reference.py, bit for bit where B itself is compared; statistics of B;
opcheck. Triton runs on CPU tensors under TRITON_INTERPRET=1 when there is no GPU (small shapes).
"""
import re

from _triton_modules import DEVICE, triton_modules

import pytest
import torch
import triton
import triton.language as tl

import memkernels as mk
from memkernels import ops, reference as ref

(tk,) = triton_modules("feedback")

pytestmark = pytest.mark.skipif(not ops.extension_loaded(), reason="memkernels._C not built")

# (N, K, M): odd sizes, one of each, K not a multiple of 4, K across two CPU tiles (64 rows), N
# across two CPU row blocks (256 rows), M across CPU column blocks (128) and Triton blocks (64).
SHAPES = ((1, 1, 1), (5, 10, 37), (3, 70, 130), (300, 9, 257), (2, 0, 5), (0, 4, 3))
# (atol, rtol): float32 sums of K products in another order; half types round the output once.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12),
             torch.bfloat16: (1e-2, 1.6e-2), torch.float16: (1e-3, 2e-3)}


def check_close(out, expected, dtype):
    atol, rtol = TOLERANCE[dtype]
    assert out.dtype == expected.dtype and out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)


# ---- the generator ----


@triton.jit
def _randint4x_kernel(out_ptr, key, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK).to(tl.int64) * 977 + 3  # some offsets above 2**32 too
    offsets = offsets * (1 + (offsets % 2) * 5000000)
    w0, w1, w2, w3 = tl.randint4x(key, offsets)
    i = tl.arange(0, BLOCK)
    tl.store(out_ptr + i * 4, w0.to(tl.int32, bitcast=True))
    tl.store(out_ptr + i * 4 + 1, w1.to(tl.int32, bitcast=True))
    tl.store(out_ptr + i * 4 + 2, w2.to(tl.int32, bitcast=True))
    tl.store(out_ptr + i * 4 + 3, w3.to(tl.int32, bitcast=True))


@pytest.mark.parametrize("seed, layer", [(0, 0), (12345, 7), (2**32 - 1, 2**31 - 1)])
def test_reference_philox_is_tritons_randint4x(seed, layer):
    out = torch.empty(64 * 4, dtype=torch.int32, device=DEVICE)
    _randint4x_kernel[(1,)](out, (layer << 32) | seed, 64, BLOCK=64)
    offsets = torch.arange(64, dtype=torch.int64) * 977 + 3
    offsets = offsets * (1 + (offsets % 2) * 5000000)
    zero = torch.zeros_like(offsets)
    words = torch.stack(ref.philox4x32(offsets & 0xFFFFFFFF, offsets >> 32, zero, zero, seed, layer), 1)
    assert torch.equal(out.cpu().long() & 0xFFFFFFFF, words.reshape(-1))


def kernels(device):
    """(name, feedback_project) of every kernel that runs here on `device`."""
    # Triton where it runs: CUDA tensors with a GPU, CPU ones under the interpreter without
    found = [("triton", tk.feedback_project)] if device.type == DEVICE else []
    found.append(("op", ops.feedback_project))  # CPU C++ on CPU; the default CUDA backend on CUDA
    if device.type == "cuda" and mk._C.with_cuda:
        found.append(("cuda", mk._C.feedback_project))
    return found


@pytest.mark.parametrize("rows, cols", [(1, 1), (5, 37), (70, 130), (4, 1000)])
def test_every_kernel_generates_the_reference_b_bit_for_bit(device, rows, cols):
    """e = I projects onto B itself: every kernel's B equals the materialised reference exactly."""
    expected = ref.feedback_matrix(11, 3, rows, cols, 0.25, device)
    for name, project in kernels(device):
        b = project(torch.eye(rows, device=device), 11, 3, cols, 0.25, None)
        assert torch.equal(b, expected), name
    cpu = ops.feedback_project(torch.eye(rows, dtype=torch.float64), 11, 3, cols, 0.25)
    assert torch.equal(cpu, expected.cpu().double())


def test_b_does_not_depend_on_the_batch_or_the_tiling(device):
    e = torch.randn(300, 70, device=device)
    for name, project in kernels(device):
        whole = project(e, 5, 2, 130, 0.1, None)
        for rows in (slice(0, 1), slice(17, 18), slice(256, 300)):
            torch.testing.assert_close(project(e[rows].contiguous(), 5, 2, 130, 0.1, None), whole[rows],
                                       atol=1e-5, rtol=1e-5, msg=name)
    if device.type == "cpu":  # the CPU columns come in blocks of 128, Triton's in 64: same B
        assert torch.equal(tk.feedback_project(torch.eye(70, device=DEVICE), 5, 2, 130, 0.1, None).cpu(),
                           ops.feedback_project(torch.eye(70), 5, 2, 130, 0.1))


def test_more_row_tiles_than_a_grid_axis_of_65535(device):
    """The GPU kernels take their 64 x 64 tiles from one flat grid axis."""
    if device != "cuda":
        pytest.skip("a CUDA grid limit; the CPU kernel has none, and the interpreter would take minutes")
    n = 64 * 65535 + 70
    e = torch.randn(n, 3, device=device)
    expected = e.double() @ ref.feedback_matrix(7, 1, 3, 5, 0.5, device).double()
    for name, project in kernels(device):
        torch.testing.assert_close(project(e, 7, 1, 5, 0.5, None).double(), expected, atol=1e-5,
                                   rtol=1e-5, msg=name)


# ---- the projection ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fused", [False, True])
def test_project_matches_reference(device, dtype, shape, fused):
    n, k, m = shape
    e = torch.randn(n, k, device=device).to(dtype)
    derivative = torch.rand(n, m, device=device).to(dtype) if fused else None
    expected = ref.feedback_project(e, 9, 4, m, 0.3, derivative)
    for name, project in kernels(device):
        check_close(project(e, 9, 4, m, 0.3, derivative), expected, dtype)


def test_project_float64_and_strided_inputs_on_cpu():
    e = torch.randn(70, 13, dtype=torch.float64).t()  # (13, 70), not contiguous
    d = torch.randn(131, 13, dtype=torch.float64).t()
    check_close(ops.feedback_project(e, 1, 2, 131, 0.5, d), ref.feedback_project(e, 1, 2, 131, 0.5, d),
                torch.float64)
    e32 = e.float().to(DEVICE)
    check_close(tk.feedback_project(e32, 1, 2, 131, 0.5, None), ref.feedback_project(e32, 1, 2, 131, 0.5, None),
                torch.float32)


def test_statistics_of_b():
    scale = 0.5
    b = ref.feedback_matrix(0, 1, 64, 4096, scale)
    assert b.abs().max() <= scale and b.min() < -0.99 * scale and b.max() > 0.99 * scale
    n = b.numel()
    assert abs(b.mean().item()) < 4 * scale / (3 * n) ** 0.5  # 4 standard errors of the mean
    assert abs(b.var().item() / (scale**2 / 3) - 1) < 0.02
    # Layers, seeds and neighbouring rows and columns are uncorrelated.
    others = [ref.feedback_matrix(0, 2, 64, 4096, scale), ref.feedback_matrix(1, 1, 64, 4096, scale)]
    pairs = [(b, o) for o in others] + [(b[:-1], b[1:]), (b[:, :-1], b[:, 1:]), (b[:-4], b[4:])]
    for u, v in pairs:
        corr = torch.corrcoef(torch.stack([u.reshape(-1), v.reshape(-1)]))[0, 1]
        assert abs(corr) < 4 / u.numel() ** 0.5, corr
    # Uniform: each tenth of [-scale, scale] holds a tenth of the entries.
    counts = torch.histc(b, bins=10, min=-scale, max=scale) / n
    assert (counts - 0.1).abs().max() < 0.005


# ---- errors and the op's registration ----


@pytest.mark.parametrize("args, message", [
    ((torch.ones(3), 0, 0, 4, 1.0, None), "e must be 2-D (batch, K), got shape [3]"),
    ((torch.ones(2, 3, dtype=torch.int32), 0, 0, 4, 1.0, None),
     "e must be float32, float64, bfloat16 or float16, got Int"),
    ((torch.ones(2, 3), -1, 0, 4, 1.0, None), "seed must be in [0, 2**32), got -1"),
    ((torch.ones(2, 3), 2**32, 0, 4, 1.0, None), "seed must be in [0, 2**32), got 4294967296"),
    ((torch.ones(2, 3), 0, -1, 4, 1.0, None), "layer must be in [0, 2**31), got -1"),
    ((torch.ones(2, 3), 0, 2**31, 4, 1.0, None), "layer must be in [0, 2**31), got 2147483648"),
    ((torch.ones(2, 3), 0, 0, -1, 1.0, None), "out_features must be >= 0, got -1"),
    ((torch.ones(2, 3), 0, 0, 4, 3.5e38, None), "scale must be a finite float32, got 3.5e+38"),  # float(scale) is inf
    ((torch.ones(2, 3), 0, 0, 4, float("nan"), None), "scale must be a finite float32, got nan"),
    ((torch.ones(2, 3), 0, 0, 4, 1.0, torch.ones(2, 4, dtype=torch.float64)),
     "derivative must have e's dtype (Float), got Double"),
    ((torch.ones(2, 3), 0, 0, 4, 1.0, torch.ones(2, 5)), "derivative must have shape (2, 4), got [2, 5]"),
])
def test_bad_arguments_are_named(args, message):
    """The CPU kernel, the fake (on meta tensors) and the Triton kernel refuse alike, to the character
    (memkernels/ops/_checks.py)."""
    for kernel, device in ((ops.feedback_project, "cpu"), (ops.feedback_project, "meta"),
                           (tk.feedback_project, DEVICE)):
        moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
            kernel(*moved)


def test_a_scale_that_rounds_to_the_largest_float32_is_taken():
    # 3.4028235e38 is above float32's largest value but rounds to it: float32(scale) is finite.
    e = torch.full((2, 1), 0.5)
    assert ops.feedback_project(e, 0, 0, 4, 3.4028235e38, None).isfinite().all()
    assert ops.feedback_project(e.to("meta"), 0, 0, 4, 3.4028235e38, None).shape == (2, 4)


def test_a_derivative_on_another_device_is_refused():
    with pytest.raises(RuntimeError, match="^derivative must be on cpu, got meta$"):
        ops.feedback_project(torch.ones(2, 3), 0, 0, 4, 1.0, torch.ones(2, 4, device="meta"))
    e = torch.ones(2, 3, device=DEVICE)
    with pytest.raises(RuntimeError, match=f"^derivative must be on {re.escape(str(e.device))}, got meta$"):
        tk.feedback_project(e, 0, 0, 4, 1.0, torch.ones(2, 4, device="meta"))


def test_triton_kernel_takes_cuda_tensors_only():
    with pytest.raises(RuntimeError, match=re.escape("e must be a CUDA tensor (CPU tensors run these Triton kernels "
                                                     "only under TRITON_INTERPRET=1), got meta")):
        tk.feedback_project(torch.ones(2, 3, device="meta"), 0, 0, 4, 1.0, None)


def test_triton_kernel_takes_no_float64():
    with pytest.raises(RuntimeError, match="^e must be float32, bfloat16 or float16 for the Triton kernel, got Double$"):
        tk.feedback_project(torch.ones(2, 3, dtype=torch.float64, device=DEVICE), 0, 0, 4, 1.0, None)


def test_opcheck(device):
    e = torch.randn(7, 10, device=device)
    for args in [(e, 0, 1, 33, 0.5, None), (e, 3, 2, 33, 0.1, torch.randn(7, 33, device=device)),
                 (e.bfloat16(), 1, 0, 5, 1.0, None)]:
        torch.library.opcheck(torch.ops.memkernels.feedback_project.default, args)
