"""The Triton kernels of the compressed saved inputs (memkernels/triton/compress.py) held against
memkernels/reference.py: codes, stats, signs and dequantized values bit for bit, the weight
gradient to a tolerance (it sums in another order, and 16-bit dtypes multiply x_hat rounded).

On a GPU they run on CUDA tensors; without one, on CPU tensors under TRITON_INTERPRET=1 (small
shapes: rows <= 64, and tl.dot is slow there).
"""
from _triton_modules import DEVICE, triton_modules

import re

import pytest
import torch

from memkernels import ops, reference as ref

_, tk, tc = triton_modules("pack", "activations", "compress")

# The interpreter evaluates with numpy, which warns on the overflows that inf inputs cause.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
BITS = (1, 2, 4, 8)
COLS = (1, 7, 77, 1023)
SEEDS = (0, -1, 2**40 + 5)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_exact(actual, expected):
    """Equal values, NaN where NaN, same dtype and shape (-0.0 == 0.0)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=0, rtol=0, equal_nan=True)


def make_rows(rows, cols, dtype, specials=True):
    """Normal values times 3 [rows, cols]; with `specials`, row 0 holds NaN, row 1 +-Inf, row 2 a
    constant run and row 3 values near the float32 range, where they exist."""
    x = torch.randn(rows, cols, dtype=torch.float64) * 3
    if specials and cols:
        if rows > 0:
            x[0, cols // 2] = float("nan")
        if rows > 1:
            x[1, 0] = float("inf")
            x[1, -1] = -float("inf")
        if rows > 2:
            x[2, :40] = 1.3
        if rows > 3 and dtype in (torch.float32, torch.float64):
            x[3, ::2] = 3e38
            x[3, 1::2] = -3e38
        if rows > 4:
            x[4, :8] = -0.0
    return x.to(dtype).to(DEVICE)


def seed_tensor(seed):
    return torch.tensor(seed, dtype=torch.int64)


@pytest.mark.parametrize("nonnegative", (False, True))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cols", COLS)
def test_auxiliary_sign_forward(cols, dtype, nonnegative):
    x = make_rows(6, cols, dtype)
    x_aux, signs = tc.auxiliary_sign_forward(x, 0.01, nonnegative)
    x_aux_ref, signs_ref = ref.auxiliary_sign_forward(x.cpu(), 0.01, nonnegative)
    assert_exact(x_aux.cpu(), x_aux_ref)
    assert signs.dtype == torch.uint8 and torch.equal(signs.cpu(), signs_ref)


@pytest.mark.parametrize("group_size", (8, 24, 256))
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("cols", COLS)
def test_quantize_groups(cols, bits, group_size):
    x = make_rows(6, cols, torch.float32)
    for seed in SEEDS:
        codes, stats = tc.quantize_groups(x, bits, group_size, seed_tensor(seed))
        codes_ref, stats_ref = ref.quantize_groups(x.cpu(), bits, group_size, seed_tensor(seed))
        assert codes.dtype == torch.uint8 and codes.shape == codes_ref.shape
        assert torch.equal(codes.cpu(), codes_ref), (codes.cpu() != codes_ref).nonzero()[:8].tolist()
        assert_exact(stats.cpu(), stats_ref)


@pytest.mark.parametrize("group_size", (1024, 2**21))
def test_quantize_groups_wider_than_the_row(group_size):
    """A group wider than the row is the row: its tile is the row's width, not group_size's (a tile
    of 2**21 values is more than triton allows)."""
    x = make_rows(6, 77, torch.float32)
    codes, stats = tc.quantize_groups(x, 4, group_size, seed_tensor(5))
    codes_ref, stats_ref = ref.quantize_groups(x.cpu(), 4, group_size, seed_tensor(5))
    assert torch.equal(codes.cpu(), codes_ref)
    assert_exact(stats.cpu(), stats_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_groups_dtypes(dtype):
    x = make_rows(7, 300, dtype)
    codes, stats = tc.quantize_groups(x, 4, 64, seed_tensor(123))
    codes_ref, stats_ref = ref.quantize_groups(x.cpu(), 4, 64, seed_tensor(123))
    assert torch.equal(codes.cpu(), codes_ref)
    assert_exact(stats.cpu(), stats_ref)


def test_quantize_groups_noise_and_special_groups():
    # Constant groups code 0 (0 / 0), groups with NaN or Inf get NaN stats and code 0, and the
    # noise is reference.rounding_noise: a stride-2 view checks the kernel reads x by its strides.
    x = torch.linspace(-1, 1, 2 * 64 * 40, device=DEVICE).view(64, 80)[:, ::2]
    x[0] = 0.25
    x[1, 5] = float("nan")
    x[2, 33] = -float("inf")
    assert not x.is_contiguous()
    codes, stats = tc.quantize_groups(x, 2, 8, seed_tensor(7))
    codes_ref, stats_ref = ref.quantize_groups(x.cpu(), 2, 8, seed_tensor(7))
    assert torch.equal(codes.cpu(), codes_ref)
    assert_exact(stats.cpu(), stats_ref)
    values = tc.dequantize_groups(codes, stats, 40, 2, 8, 0.0, 0.0, torch.float32).cpu()
    assert torch.equal(values[0], torch.full((40,), 0.25))
    assert values[1, :8].isnan().all() and not values[1, 8:].isnan().any()
    assert values[2, 32:40].isnan().all()


def test_quantize_groups_is_unbiased():
    x = torch.rand(16, 64, device=DEVICE) * 4 - 2
    mean = torch.zeros_like(x, dtype=torch.float64)
    seeds = 64
    for seed in range(seeds):
        codes, stats = tc.quantize_groups(x, 2, 32, seed_tensor(seed))
        mean += tc.dequantize_groups(codes, stats, 64, 2, 32, 0.0, 0.0, torch.float64)
    # Each estimate is within one step (<= 4 / 3) of x: the mean of 64 has std <= 0.09.
    assert (mean / seeds - x.double()).abs().mean() < 0.05


def random_codes(rows, cols, bits, group_size, with_nan=True):
    codes = torch.randint(0, 256, (rows, (cols + 7) // 8 * bits), dtype=torch.uint8, device=DEVICE)
    groups = -(-cols // group_size)
    stats = (torch.randn(rows, groups, 2, device=DEVICE) * 3).to(torch.bfloat16)
    if with_nan and rows and groups:
        stats[0, 0] = float("nan")
    return codes, stats


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("cols", COLS)
def test_dequantize_groups(cols, bits, dtype):
    codes, stats = random_codes(5, cols, bits, 24)
    got = tc.dequantize_groups(codes, stats, cols, bits, 24, 0.0, 0.0, dtype)
    want = ref.dequantize_groups(codes.cpu(), stats.cpu(), cols, bits, 24, 0.0, 0.0, dtype)
    assert_exact(got.cpu(), want)
    # Without stats (the sign code): lo + step * code, lo and step rounded to float32.
    got = tc.dequantize_groups(codes, None, cols, bits, 24, -0.1, 0.2, dtype)
    want = ref.dequantize_groups(codes.cpu(), None, cols, bits, 24, -0.1, 0.2, dtype)
    assert_exact(got.cpu(), want)


# (atol, rtol) of the weight gradient, relative to max |result|: float32 and float64 multiply
# exactly and only sum in another order; 16-bit grad_out multiplies x_hat rounded to its dtype.
WEIGHT_GRAD_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2,
                         torch.float16: 4e-3}


def assert_weight_grad_close(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = WEIGHT_GRAD_TOLERANCE[want.dtype] * max(1.0, want.double().abs().max().item())
    torch.testing.assert_close(got.cpu().double(), want.double(), atol=tol, rtol=0)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_grad_from_codes(dtype, bits):
    rows, out, cols = 50, 20, 77
    x = make_rows(rows, cols, torch.float32, specials=False)
    codes, stats = tc.quantize_groups(x, bits, 24, seed_tensor(1))
    grad = torch.randn(rows, out, device=DEVICE).to(dtype)
    got = tc.weight_grad_from_codes(grad, codes, stats, cols, bits, 24, 0.0, 0.0)
    want = ref.weight_grad_from_codes(grad.cpu(), codes.cpu(), stats.cpu(), cols, bits, 24, 0.0, 0.0)
    assert_weight_grad_close(got, want)


@pytest.mark.parametrize("cols", COLS)
def test_weight_grad_from_signs(cols):
    # The sign code: x_hat = lo + step * bit, here -1 / +1; grad_out a transposed view.
    x = make_rows(64, cols, torch.float32, specials=False)
    _, signs = tc.auxiliary_sign_forward(x, 0.01, False)
    grad = torch.randn(33, 64, device=DEVICE).t()
    assert not grad.is_contiguous()
    got = tc.weight_grad_from_codes(grad, signs, None, cols, 1, 8, -1.0, 2.0)
    want = ref.weight_grad_from_codes(grad.cpu(), signs.cpu(), None, cols, 1, 8, -1.0, 2.0)
    assert_weight_grad_close(got, want)
    assert torch.allclose(want, grad.cpu().t() @ torch.where(x.cpu() > 0, 1.0, -1.0), atol=1e-4)


@pytest.mark.parametrize("group_size", (64, 128, 256))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_weight_grad_groups_spanning_whole_tiles(dtype, group_size):
    # Groups that are whole tiles of columns (64 or 128 wide) read one (min, scale) a row; the
    # last tile is partial, one group holds NaN.
    rows, out, cols = 45, 20, 300
    codes, stats = random_codes(rows, cols, 4, group_size, with_nan=True)
    grad = torch.randn(rows, out, device=DEVICE).to(dtype)
    got = tc.weight_grad_from_codes(grad, codes, stats, cols, 4, group_size, 0.0, 0.0)
    want = ref.weight_grad_from_codes(grad.cpu(), codes.cpu(), stats.cpu(), cols, 4, group_size, 0.0, 0.0)
    nan = want.isnan()
    assert nan.any() and torch.equal(got.isnan().cpu(), nan)
    assert_weight_grad_close(got.cpu().masked_fill(nan, 0), want.masked_fill(nan, 0))


def test_weight_grad_strided_grad_and_nan_group():
    rows, cols = 40, 100
    codes, stats = random_codes(rows, cols, 4, 32, with_nan=True)
    grad = torch.randn(rows, 2 * 24, device=DEVICE, dtype=torch.bfloat16)[:, ::2]
    got = tc.weight_grad_from_codes(grad, codes, stats, cols, 4, 32, 0.0, 0.0)
    want = ref.weight_grad_from_codes(grad.cpu(), codes.cpu(), stats.cpu(), cols, 4, 32, 0.0, 0.0)
    assert got[:, :32].isnan().all() and not got[:, 32:].isnan().any()
    assert_weight_grad_close(got[:, 32:], want[:, 32:])


@pytest.mark.parametrize("bits", (1, 4))
def test_weight_grad_unaligned_codes_and_stats(bits):
    # Rows of whole 4-byte words are read as int32 words and stats as one int32 a (min, scale)
    # pair: codes and stats starting off a 4-byte boundary are read at their own offsets.
    rows, out, cols = 9, 5, 64
    codes, stats = random_codes(rows, cols, bits, 16, with_nan=False)
    grad = torch.randn(rows, out, device=DEVICE)
    want = ref.weight_grad_from_codes(grad.cpu(), codes.cpu(), stats.cpu(), cols, bits, 16, 0.0, 0.0)
    codes_at_1 = torch.empty(codes.numel() + 1, dtype=torch.uint8, device=DEVICE)[1:].view(codes.shape)
    stats_at_1 = torch.empty(stats.numel() + 1, dtype=torch.bfloat16, device=DEVICE)[1:].view(stats.shape)
    codes_at_1.copy_(codes)
    stats_at_1.copy_(stats)
    assert codes_at_1.data_ptr() % 4 and stats_at_1.data_ptr() % 4
    got = tc.weight_grad_from_codes(grad, codes_at_1, stats_at_1, cols, bits, 16, 0.0, 0.0)
    assert_weight_grad_close(got, want)


@pytest.mark.parametrize("bits", (1, 2, 4, 8))
def test_groups_near_the_float_range_stay_finite(bits):
    # As tests/test_compress.py: overflowing differences computed from halves, min clamped to
    # -BFLOAT16_MAX; bit for bit the reference's codes, stats and values, all finite.
    big = 3.0e38
    x = torch.tensor([[big, -big, 1.0, -2.0e38, 0.5, 0.25, -1.0, 7.0],
                      [-3.4e38, 3.4e38, 0.0, 1e38, 2.0, -2.0, 3.3e38, -3.3e38]], device=DEVICE)
    codes, stats = tc.quantize_groups(x, bits, 8, seed_tensor(11))
    want_codes, want_stats = ref.quantize_groups(x.cpu(), bits, 8, seed_tensor(11))
    assert_exact(codes.cpu(), want_codes)
    assert_exact(stats.cpu(), want_stats)
    x_hat = tc.dequantize_groups(codes, stats, 8, bits, 8, 0.0, 0.0, torch.float32)
    assert_exact(x_hat.cpu(), ref.dequantize_groups(want_codes, want_stats, 8, bits, 8, 0.0, 0.0, torch.float32))
    assert torch.isfinite(stats.cpu()).all() and torch.isfinite(x_hat.cpu()).all()


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_values_saturate_at_the_dtype_range(dtype):
    top = torch.finfo(dtype).max
    x = torch.tensor([[0.0, top, 0.4 * top, 0.99 * top, 100.0, 5.0, top, 1.0]], device=DEVICE).to(dtype)
    for bits in (2, 4, 8):
        codes, stats = tc.quantize_groups(x, bits, 8, seed_tensor(3))
        x_hat = tc.dequantize_groups(codes, stats, 8, bits, 8, 0.0, 0.0, dtype)
        assert torch.isfinite(x_hat.cpu()).all() and (x_hat[x == top] == top).all()
        assert_exact(x_hat.cpu(), ref.dequantize_groups(codes.cpu(), stats.cpu(), 8, bits, 8, 0.0, 0.0, dtype))
        grad_weight = tc.weight_grad_from_codes(torch.ones(1, 2, device=DEVICE, dtype=dtype), codes, stats, 8, bits,
                                                8, 0.0, 0.0)
        assert torch.equal(grad_weight[0].cpu(), x_hat[0].cpu())


def test_empty():
    for rows, cols in ((0, 13), (3, 0), (0, 0)):
        x = torch.empty(rows, cols, device=DEVICE)
        x_aux, signs = tc.auxiliary_sign_forward(x, 0.01, False)
        assert x_aux.shape == (rows, cols) and signs.shape == (rows, (cols + 7) // 8)
        codes, stats = tc.quantize_groups(x, 4, 16, seed_tensor(0))
        assert codes.shape == (rows, (cols + 7) // 8 * 4) and stats.shape == (rows, -(-cols // 16), 2)
        assert stats.dtype == torch.bfloat16
        values = tc.dequantize_groups(codes, stats, cols, 4, 16, 0.0, 0.0, torch.bfloat16)
        assert values.shape == (rows, cols) and values.dtype == torch.bfloat16
        grad = torch.randn(rows, 5, device=DEVICE)
        grad_weight = tc.weight_grad_from_codes(grad, codes, stats, cols, 4, 16, 0.0, 0.0)
        assert torch.equal(grad_weight.cpu(), torch.zeros(5, cols))


def _refused(device):
    """(op, args, message): arguments on `device` that every kernel of the op refuses, with the CPU
    kernel's message to the character (memkernels/ops/_checks.py holds the checks of the fakes and
    the Triton kernels)."""
    x = torch.zeros(4, 20, device=device)
    seed = seed_tensor(0)
    codes = torch.zeros(4, 12, dtype=torch.uint8, device=device)  # 4 bits, 20 columns
    stats = torch.zeros(4, 2, 2, dtype=torch.bfloat16, device=device)  # group_size 16
    grad = torch.zeros(4, 3, device=device)
    f32 = torch.float32
    return [
        ("auxiliary_sign_forward", (x.long(), 0.01, False),
         "x must be float32, float64, bfloat16 or float16, got Long"),
        ("auxiliary_sign_forward", (x[0], 0.01, False), "x must be 2-D [rows, cols], got shape [20]"),
        ("quantize_groups", (x.int(), 4, 16, seed), "x must be float32, float64, bfloat16 or float16, got Int"),
        ("quantize_groups", (x.view(2, 2, 20), 4, 16, seed), "x must be 2-D [rows, cols], got shape [2, 2, 20]"),
        ("quantize_groups", (x, 3, 16, seed), "bits must be one of 1, 2, 4, 8, got 3"),
        ("quantize_groups", (x, 4, 12, seed), "group_size must be a positive multiple of 8, got 12"),
        ("quantize_groups", (x, 4, 0, seed), "group_size must be a positive multiple of 8, got 0"),
        ("quantize_groups", (x, 4, 16, seed.int()),
         "seed must be an int64 scalar tensor on the CPU, got Int of shape [] on cpu"),
        ("quantize_groups", (x, 4, 16, torch.zeros(2, dtype=torch.int64)),
         "seed must be an int64 scalar tensor on the CPU, got Long of shape [2] on cpu"),
        ("quantize_groups", (x, 4, 16, seed.to("meta")),
         "seed must be an int64 scalar tensor on the CPU, got Long of shape [] on meta"),
        ("dequantize_groups", (codes, stats, -1, 4, 16, 0.0, 0.0, f32), "cols must be >= 0, got -1"),
        ("dequantize_groups", (codes, stats, 20, 3, 16, 0.0, 0.0, f32), "bits must be one of 1, 2, 4, 8, got 3"),
        ("dequantize_groups", (codes, stats, 20, 4, 4, 0.0, 0.0, f32),
         "group_size must be a positive multiple of 8, got 4"),
        ("dequantize_groups", (codes.float(), stats, 20, 4, 16, 0.0, 0.0, f32), "codes must be uint8, got Float"),
        ("dequantize_groups", (codes[:, :8], stats, 20, 4, 16, 0.0, 0.0, f32),
         "codes must be [rows, 12] (ceil(cols / 8) * bits bytes a row for cols = 20, bits = 4), got shape [4, 8]"),
        ("dequantize_groups", (codes[0], stats, 20, 4, 16, 0.0, 0.0, f32),
         "codes must be [rows, 12] (ceil(cols / 8) * bits bytes a row for cols = 20, bits = 4), got shape [12]"),
        ("dequantize_groups", (codes, stats.float(), 20, 4, 16, 0.0, 0.0, f32), "stats must be bfloat16, got Float"),
        ("dequantize_groups", (codes, stats[:, :1], 20, 4, 16, 0.0, 0.0, f32),
         "stats must be [rows, ceil(cols / group_size), 2] = [4, 2, 2], got shape [4, 1, 2]"),
        ("dequantize_groups", (codes, stats, 20, 4, 16, 0.0, 0.0, torch.int32),
         "dtype must be float32, float64, bfloat16 or float16, got Int"),
        ("weight_grad_from_codes", (grad.int(), codes, stats, 20, 4, 16, 0.0, 0.0),
         "grad_out must be float32, float64, bfloat16 or float16, got Int"),
        ("weight_grad_from_codes", (grad[0], codes, stats, 20, 4, 16, 0.0, 0.0),
         "grad_out must be 2-D [rows, cols], got shape [3]"),
        ("weight_grad_from_codes", (grad, codes, stats, 20, 8, 16, 0.0, 0.0),
         "codes must be [rows, 24] (ceil(cols / 8) * bits bytes a row for cols = 20, bits = 8), got shape [4, 12]"),
        ("weight_grad_from_codes", (grad[:3], codes, stats, 20, 4, 16, 0.0, 0.0),
         "codes must have a row for each of the 3 rows of grad_out, got 4"),
    ]


def _refused_beside_meta(device):
    """(op, args, message): a meta tensor beside tensors on `device` (not meta)."""
    codes = torch.zeros(4, 12, dtype=torch.uint8, device=device)
    stats = torch.zeros(4, 2, 2, dtype=torch.bfloat16, device="meta")
    grad = torch.zeros(4, 3, device=device)
    return [
        ("dequantize_groups", (codes, stats, 20, 4, 16, 0.0, 0.0, torch.float32),
         f"stats must be on the device of codes ({codes.device}), got meta"),
        ("weight_grad_from_codes", (grad, codes.to("meta"), None, 20, 4, 16, 0.0, 0.0),
         f"codes must be on the device of grad_out ({grad.device}), got meta"),
    ]


def assert_refused(call, message):
    with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
        call()


@pytest.mark.parametrize("case", range(len(_refused("cpu"))))
def test_refused_as_by_the_cpu_kernel(case):
    """The Triton kernel, the CPU kernel and the fake (on meta tensors) refuse alike."""
    op, args, message = _refused(DEVICE)[case]
    assert_refused(lambda: getattr(tc, op)(*args), message)
    if ops.extension_loaded():
        for device in ("cpu", "meta"):
            op, args, message = _refused(device)[case]
            assert_refused(lambda: getattr(ops, op)(*args), message)


@pytest.mark.parametrize("case", range(len(_refused_beside_meta("cpu"))))
def test_refused_beside_another_device(case):
    op, args, message = _refused_beside_meta(DEVICE)[case]
    assert_refused(lambda: getattr(tc, op)(*args), message)
    if ops.extension_loaded():
        op, args, message = _refused_beside_meta("cpu")[case]
        assert_refused(lambda: getattr(ops, op)(*args), message)


def test_triton_kernels_take_cuda_tensors_only():
    x = torch.zeros(4, 20, device="meta")
    codes = torch.zeros(4, 12, dtype=torch.uint8, device="meta")
    grad = torch.zeros(4, 3, device="meta")
    calls = [(lambda: tc.auxiliary_sign_forward(x, 0.01, False), "x"),
             (lambda: tc.quantize_groups(x, 4, 16, seed_tensor(0)), "x"),
             (lambda: tc.dequantize_groups(codes, None, 20, 4, 16, 0.0, 0.0, torch.float32), "codes"),
             (lambda: tc.weight_grad_from_codes(grad, codes, None, 20, 4, 16, 0.0, 0.0), "grad_out")]
    for call, name in calls:
        assert_refused(call, f"{name} must be a CUDA tensor (CPU tensors run these Triton kernels only under "
                             f"TRITON_INTERPRET=1), got meta")
