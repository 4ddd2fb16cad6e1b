"""Compressed saved inputs (memkernels.compress): the ops against memkernels/reference.py, and
mk.nn.Linear / Conv2d against their own rules, torch's layers, and the bytes they keep."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import memkernels as mk
from memkernels import ops, reference as R
from memkernels.activations.spec import packed_nbytes
from memkernels.compress import MODES
from memkernels.compress.coded_input import _input_anchor

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (3, 7), (5, 300), (2, 1023), (1, 4097), (0, 9), (9, 0)]


def same_values(a, b):
    """Equal, NaN where the other is NaN (NaN payloads may differ)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(torch.nan_to_num(a.float()), torch.nan_to_num(b.float()))


def awkward(rows, cols, dtype, device="cpu"):
    """Random values with a constant row, a NaN and Infs where the shape allows (the NaN and the
    -Inf early in a row, where the CPU kernels take 16 values at a time)."""
    x = torch.randn(rows, cols, device=device) * 3
    if rows > 2 and cols > 0:
        x[2] = 0.37
    if rows > 1 and cols > 3:
        x[1, 3] = float("nan")
        x[0, cols - 1] = float("inf")
    if rows > 3 and cols > 20:
        x[3, 20] = -float("inf")
    return x.to(dtype)


# ---- ops ----

@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_groups_matches_reference(shape, dtype, device):
    x = awkward(*shape, dtype, device)
    for bits in (1, 2, 4, 8):
        for group_size in (8, 64, 256):
            seed = torch.tensor(bits * 1000 + group_size)
            codes, stats = ops.quantize_groups(x, bits, group_size, seed)
            want_codes, want_stats = R.quantize_groups(x.cpu(), bits, group_size, seed)
            assert codes.shape == (shape[0], packed_nbytes(shape[1], bits)) and codes.device == x.device
            assert torch.equal(codes.cpu(), want_codes), (bits, group_size)
            assert stats.dtype == torch.bfloat16 and same_values(stats.cpu(), want_stats), (bits, group_size)
            x_hat = ops.dequantize_groups(codes, stats, shape[1], bits, group_size, 0.0, 0.0, dtype)
            want = R.dequantize_groups(want_codes, want_stats, shape[1], bits, group_size, 0.0, 0.0, dtype)
            torch.testing.assert_close(x_hat.cpu(), want, equal_nan=True)


def test_quantize_groups_bounds_and_stats():
    x = torch.randn(64, 1000) * torch.logspace(-3, 3, 64)[:, None]
    for bits in (2, 4, 8):
        codes, stats = ops.quantize_groups(x, bits, 256, torch.tensor(5))
        x_hat = ops.dequantize_groups(codes, stats, 1000, bits, 256, 0.0, 0.0, torch.float32)
        scale = stats[..., 1].float().repeat_interleave(256, dim=1)[:, :1000]
        # Every value is within one step of its code, and the stats bracket the group.
        assert ((x_hat - x).abs() <= scale * 1.0001).all()
        mn = stats[..., 0].float().repeat_interleave(256, dim=1)[:, :1000]
        assert (mn <= x).all() and (x <= mn + scale * (2 ** bits - 1)).all()


@pytest.mark.parametrize("bits", (1, 2, 4, 8))
def test_groups_near_the_float_range_stay_finite(bits, device):
    # Finite groups whose max - min, (x - min) or scale * code overflow float32 are computed from
    # halves; a min below bfloat16's range is -BFLOAT16_MAX. Stats, codes and values equal the
    # reference, and every value stays finite and in its group's span.
    big = 3.0e38
    x = torch.tensor([[big, -big, 1.0, -2.0e38, 0.5, 0.25, -1.0, 7.0],
                      [-3.4e38, 3.4e38, 0.0, 1e38, 2.0, -2.0, 3.3e38, -3.3e38]], device=device)
    seed = torch.tensor(11)
    codes, stats = ops.quantize_groups(x, bits, 8, seed)
    want_codes, want_stats = R.quantize_groups(x.cpu(), bits, 8, seed)
    assert torch.equal(codes.cpu(), want_codes) and torch.equal(stats.cpu().float(), want_stats.float())
    assert torch.isfinite(stats).all() and (stats[:, :, 0] >= -R.BFLOAT16_MAX).all()
    x_hat = ops.dequantize_groups(codes, stats, 8, bits, 8, 0.0, 0.0, torch.float32)
    assert torch.equal(x_hat.cpu(), R.dequantize_groups(want_codes, want_stats, 8, bits, 8, 0.0, 0.0, torch.float32))
    assert torch.isfinite(x_hat).all()
    if bits > 1:  # 1-bit codes of a span past BFLOAT16_MAX take a clamped scale
        mn, scale = stats.float().unbind(-1)
        low = torch.maximum(x, mn)  # values below bfloat16's range sit at -BFLOAT16_MAX
        assert ((x_hat - low).abs() <= scale).all()


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_values_saturate_at_the_dtype_range(dtype, device):
    # A group reaching the dtype's largest values: scale * top, rounded up, passes them, and the top
    # code saturates at the dtype's largest finite value instead of overflowing to inf, in
    # dequantize_groups and inside the weight-gradient GEMM.
    top = torch.finfo(dtype).max
    x = torch.tensor([[0.0, top, 0.4 * top, 0.99 * top, 100.0, 5.0, top, 1.0]], device=device).to(dtype)
    for bits in (2, 4, 8):
        codes, stats = ops.quantize_groups(x, bits, 8, torch.tensor(3))
        x_hat = ops.dequantize_groups(codes, stats, 8, bits, 8, 0.0, 0.0, dtype)
        assert torch.isfinite(x_hat).all() and (x_hat[x == top] == top).all()
        assert torch.equal(x_hat.cpu(), R.dequantize_groups(codes.cpu(), stats.cpu(), 8, bits, 8, 0.0, 0.0, dtype))
        grad = torch.ones(1, 2, device=device, dtype=dtype)
        grad_weight = ops.weight_grad_from_codes(grad, codes, stats, 8, bits, 8, 0.0, 0.0)
        assert torch.equal(grad_weight[0], x_hat[0])


def test_stochastic_rounding_is_unbiased():
    # One row repeated: every copy gets its own noise (the counter holds the row), so the mean
    # over copies estimates the expectation of the dequantized value.
    torch.manual_seed(0)
    row = torch.randn(1, 300)
    x = row.expand(8192, 300).contiguous()
    for bits in (2, 4):
        codes, stats = ops.quantize_groups(x, bits, 256, torch.tensor(11))
        x_hat = ops.dequantize_groups(codes, stats, 300, bits, 256, 0.0, 0.0, torch.float32)
        scale = stats[0, :, 1].float().repeat_interleave(256)[:300]
        # The error of one value is within [-scale, scale], variance <= scale^2 / 4: 6 sigma.
        assert ((x_hat.mean(0) - row[0]).abs() <= 6 * scale / (2 * math.sqrt(8192))).all()
        # Deterministic rounding would be biased: the mean error is not ~0 for a fixed code.
        assert (x_hat[0] != x_hat[1]).any()


def test_seed_decides_codes():
    x = torch.randn(4, 64)
    a = ops.quantize_groups(x, 2, 64, torch.tensor(1))[0]
    assert torch.equal(a, ops.quantize_groups(x, 2, 64, torch.tensor(1))[0])
    assert not torch.equal(a, ops.quantize_groups(x, 2, 64, torch.tensor(2))[0])


def test_group_size_beyond_the_row_is_one_group(device):
    # One group per row, whatever group_size says: no buffer of group_size elements.
    x = torch.randn(4, 20, device=device)
    codes, stats = ops.quantize_groups(x, 8, 24, torch.tensor(1))
    for group_size in (2 ** 20, 2 ** 40):
        got = ops.quantize_groups(x, 8, group_size, torch.tensor(1))
        assert torch.equal(got[0], codes) and torch.equal(got[1], stats)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_auxiliary_sign_forward_matches_reference(shape, dtype, device):
    x = awkward(*shape, dtype, device)
    x[..., :1] = 0.0  # sign(0): the bit is 0 (s = -1, or 0 when nonnegative)
    x[..., 1:2] = torch.finfo(dtype).tiny / 4  # subnormal, > 0: bit 1 (unless flushed to zero)
    for nonnegative in (False, True):
        x_aux, signs = ops.auxiliary_sign_forward(x, 0.05, nonnegative)
        want_aux, want_signs = R.auxiliary_sign_forward(x.cpu(), 0.05, nonnegative)
        assert signs.shape == (shape[0], packed_nbytes(shape[1], 1)) and signs.device == x.device
        assert torch.equal(signs.cpu(), want_signs)
        assert x_aux.dtype == dtype and same_values(x_aux.cpu(), want_aux)


def test_auxiliary_sign_forward_non_contiguous():
    x = torch.randn(40, 30).t()
    x_aux, signs = ops.auxiliary_sign_forward(x, 0.01, False)
    want_aux, want_signs = R.auxiliary_sign_forward(x.contiguous(), 0.01, False)
    assert torch.equal(signs, want_signs) and torch.equal(x_aux, want_aux)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_weight_grad_from_codes_matches_reference(dtype, device):
    torch.manual_seed(1)
    for rows, cols, out in [(1, 1, 1), (7, 13, 5), (600, 300, 17), (0, 8, 3)]:
        x = torch.randn(rows, cols, dtype=dtype, device=device)
        g = torch.randn(out, rows, dtype=dtype, device=device).t()  # non-contiguous grad_out
        codes, stats = ops.quantize_groups(x, 4, 64, torch.tensor(3))
        got = ops.weight_grad_from_codes(g, codes, stats, cols, 4, 64, 0.0, 0.0)
        want = R.weight_grad_from_codes(g.cpu(), codes.cpu(), stats.cpu(), cols, 4, 64, 0.0, 0.0)
        assert got.dtype == dtype and got.shape == (out, cols) and got.device == x.device
        tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
        torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol * max(rows, 1))
        signs = ops.auxiliary_sign_forward(x, 0.01, False)[1]
        got = ops.weight_grad_from_codes(g, signs, None, cols, 1, 256, -1.0, 2.0)
        want = g.cpu().to(torch.float64).t() @ torch.where(x.cpu() > 0, 1.0, -1.0).to(torch.float64)
        torch.testing.assert_close(got.cpu().to(torch.float64), want, rtol=tol, atol=tol * max(rows, 1))


def test_weight_grad_nan_stays_in_its_group():
    x = torch.randn(4, 32)
    x[1, 20] = float("nan")
    codes, stats = ops.quantize_groups(x, 8, 16, torch.tensor(0))
    gw = ops.weight_grad_from_codes(torch.ones(4, 2), codes, stats, 32, 8, 16, 0.0, 0.0)
    assert gw[:, 16:].isnan().all() and not gw[:, :16].isnan().any()


@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta: the fake kernels check as the real ones
def test_op_errors(device):
    x = torch.randn(4, 16, device=device)
    seed = torch.tensor(0)
    for bits in (3, -1, 2 ** 60):  # checked before the outputs are sized by it
        with pytest.raises(RuntimeError, match="bits must be one of 1, 2, 4, 8"):
            ops.quantize_groups(x, bits, 8, seed)
    with pytest.raises(RuntimeError, match="group_size must be a positive multiple of 8"):
        ops.quantize_groups(x, 2, 12, seed)
    with pytest.raises(RuntimeError, match="x must be float32"):
        ops.quantize_groups(x.to(torch.int32), 2, 8, seed)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        ops.quantize_groups(x[0], 2, 8, seed)
    with pytest.raises(RuntimeError, match="seed must be an int64 scalar tensor on the CPU"):
        ops.quantize_groups(x, 2, 8, torch.tensor(0.5))
    codes, stats = ops.quantize_groups(x, 2, 8, seed)
    with pytest.raises(RuntimeError, match="codes must be \\[rows, 6\\]"):
        ops.dequantize_groups(codes, stats, 15 + 9, 2, 8, 0.0, 0.0, torch.float32)
    with pytest.raises(RuntimeError, match="stats must be \\[rows, ceil"):
        ops.dequantize_groups(codes, stats[:, :1], 16, 2, 8, 0.0, 0.0, torch.float32)
    with pytest.raises(RuntimeError, match="stats must be bfloat16"):
        ops.dequantize_groups(codes, stats.float(), 16, 2, 8, 0.0, 0.0, torch.float32)
    with pytest.raises(RuntimeError, match="codes must have a row for each of the 3 rows"):
        ops.weight_grad_from_codes(torch.randn(3, 2, device=device), codes, stats, 16, 2, 8, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="bits must be one of 1, 2, 4, 8"):  # no rows to hide it
        ops.weight_grad_from_codes(torch.randn(0, 2, device=device), codes[:0], None, 16, 5, 8, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="x must be float32"):
        ops.auxiliary_sign_forward(x.to(torch.int64), 0.01, False)
    if device == "cpu":  # a meta argument beside CPU ones: the fake's device checks
        with pytest.raises(RuntimeError, match="stats must be on the device of codes"):
            ops.dequantize_groups(codes, stats.to("meta"), 16, 2, 8, 0.0, 0.0, torch.float32)
        with pytest.raises(RuntimeError, match="codes must be on the device of grad_out"):
            ops.weight_grad_from_codes(torch.randn(4, 2), codes.to("meta"), None, 16, 2, 8, 0.0, 0.0)


# ---- layers ----

def drawn_seed(seed):
    """The seed a coded layer draws after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return torch.randint(0, 2 ** 62, (), dtype=torch.int64)


def run_layer(layer, x, seed=0):
    """(y, grad_x, grad_weight, grad_bias) of layer(x) under torch.manual_seed(seed), for a fixed
    upstream gradient."""
    x = x.detach().requires_grad_()
    torch.manual_seed(seed)
    y = layer(x)
    g = torch.linspace(-1, 1, y.numel(), dtype=torch.float32, device=y.device).reshape(y.shape).to(y.dtype)
    y.backward(g)
    bias_grad = layer.bias.grad if layer.bias is not None else None
    return y, x.grad, layer.weight.grad, bias_grad, g


@pytest.mark.parametrize("save", ["int8", "int4", "int2"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 40), (2, 3, 7), (40,), (0, 16)])
def test_linear_int_codes(save, dtype, shape, device):
    torch.manual_seed(0)
    torch_layer = torch.nn.Linear(shape[-1], 6, dtype=dtype, device=device)
    layer = mk.nn.Linear.from_torch(torch_layer, save, group_size=8)
    x = torch.randn(shape, dtype=dtype, device=device)
    y_want, gx_want, _, gb_want, g = run_layer(torch_layer, x)
    torch_layer.weight.grad = torch_layer.bias.grad = None
    y, gx, gw, gb, _ = run_layer(layer, x, seed=3)
    # Forward and input gradient are torch's exactly; the weight gradient is g^T @ x_hat.
    assert torch.equal(y, y_want) and torch.equal(gx, gx_want) and torch.equal(gb, gb_want)
    bits = int(save[3:])
    codes, stats = R.quantize_groups(x.cpu().reshape(-1, shape[-1]), bits, 8, drawn_seed(3))
    want = R.weight_grad_from_codes(g.cpu().reshape(-1, 6), codes, stats, shape[-1], bits, 8, 0.0, 0.0)
    torch.testing.assert_close(gw.cpu(), want, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-2)


@pytest.mark.parametrize("nonnegative", [None, True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_asa_rule(nonnegative, dtype, device):
    torch.manual_seed(0)
    layer = mk.nn.Linear(24, 5, dtype=dtype, device=device, save="asa", eps=0.1, nonnegative=nonnegative)
    x = torch.randn(3, 4, 24, dtype=dtype, device=device)
    if nonnegative:
        x = x.relu()
    y, gx, gw, gb, g = run_layer(layer, x)
    positive = (x > 0).to(torch.float32)
    detected = nonnegative if nonnegative is not None else bool((x >= 0).all())
    s = positive if detected else 2 * positive - 1
    w = layer.weight.float()
    y_want = TF.linear((x.float() + 0.1 * s).to(dtype).float(), w, layer.bias.float())
    torch.testing.assert_close(y.float(), y_want, rtol=1e-2, atol=1e-2)
    g2 = g.reshape(-1, 5).float()
    torch.testing.assert_close(gw.float(), g2.t() @ s.reshape(-1, 24), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gx.float(), (g2 @ w).reshape(x.shape), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gb.float(), g2.sum(0), rtol=1e-2, atol=1e-2)


def test_linear_asa_detects_nonnegative_inputs():
    layer = mk.nn.Linear(8, 2, bias=False, save="asa")
    x = torch.rand(4, 8)
    x[0, 0] = 0.0
    _, _, gw, _, g = run_layer(layer, x)
    torch.testing.assert_close(gw, g.t() @ (x > 0).float())  # 0/1, not +-1


@pytest.mark.parametrize("save", ["asa", "int4"])
def test_linear_without_bias_and_frozen_parts(save):
    layer = mk.nn.Linear(16, 4, bias=False, save=save)
    x = torch.randn(3, 16)
    layer.weight.requires_grad_(False)
    x.requires_grad_()
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is None
    layer.weight.requires_grad_(True)
    layer(x.detach()).sum().backward()
    assert layer.weight.grad is not None


@pytest.mark.parametrize("save", MODES)
@pytest.mark.parametrize("make", [lambda save: mk.nn.Linear(64, 8, save=save, nonnegative=False),
                                  lambda save: mk.nn.Conv2d(3, 4, 3, padding=1, save=save, nonnegative=False)])
def test_frozen_weight_keeps_no_code(make, save):
    # The codes serve only the weight gradient: a frozen weight keeps none, yet the forward (with
    # asa's auxiliary term) and the input gradient are those of a trained one.
    torch.manual_seed(0)
    layer = make(save)
    x = torch.randn(2, 64) if isinstance(layer, torch.nn.Linear) else torch.randn(2, 3, 6, 6)
    y_trained, gx_trained, _, _, g = run_layer(layer, x)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    assert mk.profile.saved_bytes(layer, x.detach().requires_grad_()) == 0
    x_frozen = x.detach().requires_grad_()
    torch.manual_seed(0)
    y = layer(x_frozen)
    y.backward(g)
    assert torch.equal(y, y_trained) and torch.equal(x_frozen.grad, gx_trained)


LAYER_PAIRS = {
    "linear": (lambda: torch.nn.Linear(8, 8), lambda save: mk.nn.Linear(8, 8, save=save), (4, 8)),
    "conv2d": (lambda: torch.nn.Conv2d(3, 3, 1), lambda save: mk.nn.Conv2d(3, 3, 3, padding=1, save=save),
               (2, 3, 5, 5)),
}


@pytest.mark.parametrize("save", MODES)
@pytest.mark.parametrize("layers", LAYER_PAIRS)
def test_weight_gradient_from_codes_has_no_derivative(layers, save):
    # A weight gradient from codes lacks its dependence on the input: differentiating it raises,
    # also where another term reaches the same parameter (which would hide a missing term).
    make_torch, make_coded, shape = LAYER_PAIRS[layers]
    torch.manual_seed(0)
    first, coded = make_torch(), make_coded(save)
    h = first(torch.randn(shape))
    grad_weight, = torch.autograd.grad(coded(torch.tanh(h)).square().sum(), coded.weight, create_graph=True)
    for loss in (grad_weight.square().sum(), grad_weight.sum() + h.sum()):
        with pytest.raises(RuntimeError, match="weight gradient of mk.nn.Linear / Conv2d with save="):
            torch.autograd.grad(loss, first.weight, retain_graph=True)
    with pytest.raises(RuntimeError, match="comes from a code of the input"):
        torch.autograd.grad(grad_weight.sum(), coded.weight, retain_graph=True)
    # Nor through grad_out, which the gradient is computed from detached: a layer after the coded
    # one (a frozen input: Linear then keeps no weight).
    after = make_torch()
    grad_weight, = torch.autograd.grad(after(coded(h.detach())).square().sum(), coded.weight, create_graph=True)
    with pytest.raises(RuntimeError, match="comes from a code of the input"):
        torch.autograd.grad(grad_weight.square().sum(), after.weight)


@pytest.mark.parametrize("save", ["int8", "int4", "int2"])
@pytest.mark.parametrize("layers", LAYER_PAIRS)
def test_input_gradient_stays_twice_differentiable(layers, save):
    # A gradient penalty on the input gradient (g @ W, exact) works with create_graph=True: with the
    # int modes, whose forward is torch's, its input gradient is torch's layer's; its weight
    # gradient goes through the layer's first-order backward, from codes (close to torch's in int8).
    _, make_coded, shape = LAYER_PAIRS[layers]
    torch.manual_seed(0)
    coded = make_coded(save)
    plain = make_coded(None)  # torch's layer
    plain.load_state_dict(coded.state_dict())
    x = torch.randn(shape)
    penalty_grads = []
    for layer in (coded, plain):
        xr = x.clone().requires_grad_()
        grad_x, = torch.autograd.grad(layer(xr).square().sum(), xr, create_graph=True)
        grad_x.square().sum().backward()
        penalty_grads.append(xr.grad)
    torch.testing.assert_close(*penalty_grads)
    torch.testing.assert_close(coded.bias.grad, plain.bias.grad)
    error = (coded.weight.grad - plain.weight.grad).norm() / plain.weight.grad.norm()
    assert 0 < error < (0.02 if save == "int8" else 1.0)


def test_input_anchor_keeps_no_input_memory():
    # The node through which a second derivative finds the input keeps only sizes.
    x = torch.randn(4, 8, requires_grad=True)
    node = _input_anchor(x * 2, keep=True).grad_fn
    while node is not None and node.name() != "MulBackward0":
        saved = [name for name in dir(node) if name.startswith("_saved_")]
        assert saved and not any(isinstance(getattr(node, name), torch.Tensor) for name in saved)
        node = node.next_functions[0][0]
    assert node is not None
    assert _input_anchor(x, keep=False) is None and _input_anchor(x.detach(), keep=True) is None


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("save", MODES)
def test_no_grad_draws_as_grad_mode_does(save, frozen):
    # A forward under no_grad leaves the random stream as the same forward with grad does (a
    # reentrant checkpoint replays one as the other): int modes draw a seed where the weight is
    # trainable, and nothing draws for a frozen weight, as with torch.nn.Linear.
    layer = mk.nn.Linear(8, 8, save=save).requires_grad_(not frozen)

    def rand_after(grad: bool):
        torch.manual_seed(0)
        with torch.set_grad_enabled(grad):
            layer(torch.ones(2, 8))
        return torch.rand(4)

    assert torch.equal(rand_after(False), rand_after(True))
    torch.manual_seed(0)
    untouched = torch.rand(4)
    assert torch.equal(rand_after(False), untouched) == (frozen or save == "asa")


@pytest.mark.parametrize("save", ["int8", "int2"])
def test_reentrant_checkpoint_replays_dropout(save):
    # The forward under no_grad and its replay with grad draw the same dropout mask.
    torch.manual_seed(0)
    layer, drop = mk.nn.Linear(8, 64, save=save), torch.nn.Dropout(0.5)
    x = torch.randn(4, 8, requires_grad=True)
    y = torch.utils.checkpoint.checkpoint(lambda t: drop(layer(t)), x, use_reentrant=True)
    y.sum().backward()
    assert torch.equal(layer.bias.grad, ((y != 0).float() * 2).sum(0))


@pytest.mark.parametrize("save", MODES)
def test_empty_batch_and_zero_features(save):
    conv = mk.nn.Conv2d(3, 4, 3, padding=1, save=save)
    x = torch.randn(0, 3, 8, 8, requires_grad=True)
    y = conv(x)
    y.sum().backward()
    assert y.shape == (0, 4, 8, 8) and x.grad.shape == x.shape and torch.equal(conv.weight.grad,
                                                                                torch.zeros_like(conv.weight))
    linear = mk.nn.Linear(0, 3, save=save)
    x = torch.randn(4, 0, requires_grad=True)
    y = linear(x)
    y.sum().backward()
    assert torch.equal(y, linear.bias.detach().expand(4, 3)) and x.grad.shape == (4, 0)
    linear = mk.nn.Linear(5, 0, save=save)
    x = torch.randn(2, 3, 5, requires_grad=True)
    y = linear(x)
    y.sum().backward()
    assert y.shape == (2, 3, 0) and torch.equal(x.grad, torch.zeros_like(x))
    assert linear.weight.grad.shape == (0, 5)


@pytest.mark.parametrize("save", MODES)
def test_autocast_keeps_no_weight_copy_for_an_input_without_gradient(save):
    # Under autocast the weight the layer computes with is a bfloat16 copy; torch's linear keeps
    # it only for an input gradient, and so does a coded layer.
    torch_layer = torch.nn.Linear(64, 32)
    layer = mk.nn.Linear.from_torch(torch_layer, save, nonnegative=False)
    x = torch.randn(16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = mk.profile.saved_bytes(layer, x)
        kept_with_input_grad = mk.profile.saved_bytes(layer, x.requires_grad_())
    weight_copy = 64 * 32 * 2
    code = kept_with_input_grad - weight_copy
    assert code > 0 and kept == code


@pytest.mark.parametrize("save", ["asa", "int8", "int4", "int2"])
def test_linear_bytes_kept(save, device):
    rows, cols = 32, 1024
    x = torch.randn(rows, cols, dtype=torch.bfloat16, device=device, requires_grad=True)
    torch_layer = torch.nn.Linear(cols, 64, dtype=torch.bfloat16, device=device)
    layer = mk.nn.Linear.from_torch(torch_layer, save)
    kept = mk.profile.saved_bytes(layer, x)
    torch_kept = mk.profile.saved_bytes(torch_layer, x)
    assert torch_kept == rows * cols * 2
    if save == "asa":
        assert kept == rows * cols // 8 and kept * 16 == torch_kept
    else:
        bits = int(save[3:])
        assert kept == rows * cols * bits // 8 + rows * (cols // 256) * 4
        assert kept * 16 == torch_kept * (bits + 0.125)


@pytest.mark.parametrize("save", ["asa", "int4"])
def test_linear_under_autocast(save, device):
    torch.manual_seed(0)
    torch_layer = torch.nn.Linear(32, 8, device=device)
    layer = mk.nn.Linear.from_torch(torch.nn.Linear(32, 8, device=device), save, nonnegative=False)
    layer.load_state_dict(torch_layer.state_dict())
    x = torch.randn(4, 32, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y_want = torch_layer(x)
        y = layer(x)
    assert y.dtype == y_want.dtype == torch.bfloat16
    if save == "int4":
        assert torch.equal(y, y_want)
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and layer.bias.grad.dtype == torch.float32


@pytest.mark.parametrize("save", ["asa", "int4"])
def test_autocast_leaves_float64_layers(save):
    # As torch's autocast: float64 is not an eligible type, it stays float64.
    torch_layer = torch.nn.Linear(8, 4, dtype=torch.float64)
    layer = mk.nn.Linear.from_torch(torch_layer, save, nonnegative=False)
    x = torch.randn(2, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch_layer(x).dtype == layer(x).dtype == torch.float64


@pytest.mark.parametrize("save", ["asa", "int2"])
def test_linear_compiles_without_graph_breaks(save):
    layer = mk.nn.Linear(16, 8, save=save, nonnegative=False)
    x = torch.randn(4, 16, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    assert y.shape == (4, 8) and layer.weight.grad is not None and x.grad is not None


@pytest.mark.parametrize("nonnegative_input", [False, True])
@pytest.mark.parametrize("make", [lambda device: mk.nn.Linear(40, 8, save="asa", device=device),
                                  lambda device: mk.nn.Conv2d(3, 4, 3, padding=1, save="asa", device=device)])
def test_asa_detection_compiles_to_eager_results(make, nonnegative_input, device):
    # With nonnegative=None the variant is read from the data, which cannot steer Python in a
    # fullgraph trace: it flows as data there, and output and gradients are eager's exactly.
    torch.manual_seed(0)
    layer = make(device)
    x = torch.randn((5, 40) if isinstance(layer, torch.nn.Linear) else (2, 3, 6, 6), device=device)
    x = x.relu() if nonnegative_input else x
    eager = run_layer(layer, x)
    layer.weight.grad = layer.bias.grad = None
    compiled = run_layer(torch.compile(layer, fullgraph=True, backend="aot_eager"), x)
    for want, got in zip(eager, compiled):
        assert torch.equal(got, want)


def test_linear_state_dict_and_repr():
    torch_layer = torch.nn.Linear(8, 3)
    layer = mk.nn.Linear(8, 3, save="int2", group_size=64)
    layer.load_state_dict(torch_layer.state_dict())
    assert list(layer.state_dict()) == list(torch_layer.state_dict())
    assert "save='int2', group_size=64" in repr(layer)
    assert isinstance(layer, torch.nn.Linear)
    assert repr(mk.nn.Linear(8, 3)) == "Linear(in_features=8, out_features=3, bias=True, save=None)"


def test_linear_save_none_is_torch():
    torch.manual_seed(0)
    torch_layer = torch.nn.Linear(8, 3)
    layer = mk.nn.Linear.from_torch(torch_layer, None)
    x = torch.randn(2, 8)
    assert torch.equal(layer(x), torch_layer(x))
    assert mk.profile.saved_bytes(layer, x.requires_grad_()) == x.nbytes


@pytest.mark.parametrize("save", [None, *MODES])
@pytest.mark.parametrize("dtype", DTYPES)
def test_transposed_linear_is_linear_of_the_transposed_weight(save, dtype, device):
    """TransposedLinear (weight [in, out], transformers' Conv1D layout) computes what Linear does
    with weight.t(): the same forward, gradients (the weight's transposed) and bytes kept."""
    torch.manual_seed(0)
    transposed = mk.nn.TransposedLinear(40, 6, save=save, group_size=8, device=device, dtype=dtype)
    torch.nn.init.uniform_(transposed.bias, -1, 1)
    linear = mk.nn.Linear(40, 6, save=save, group_size=8, device=device, dtype=dtype)
    # The transposed view of the same weight: the same GEMMs (BLAS rounds a copy's differently).
    linear.weight = torch.nn.Parameter(transposed.weight.detach().t())
    linear.bias = torch.nn.Parameter(transposed.bias.detach().clone())
    x = torch.randn(2, 5, 40, device=device, dtype=dtype)
    y, gx, gw, gb, _ = run_layer(linear, x, seed=3)
    y_t, gx_t, gw_t, gb_t, _ = run_layer(transposed, x, seed=3)
    assert torch.equal(y_t, y) and torch.equal(gx_t, gx) and torch.equal(gb_t, gb)
    assert gw_t.shape == (40, 6) and torch.equal(gw_t, gw.t())
    x.requires_grad_()
    assert mk.profile.saved_bytes(transposed, x) == mk.profile.saved_bytes(linear, x)


def test_transposed_linear_without_bias_state_dict_and_repr():
    layer = mk.nn.TransposedLinear(8, 3, bias=False, save="int2", group_size=64)
    assert list(layer.state_dict()) == ["weight"] and layer.weight.shape == (8, 3)
    assert "in_features=8, out_features=3, bias=False, save='int2', group_size=64" in repr(layer)
    x = torch.randn(4, 8)
    assert torch.equal(layer(x), x @ layer.weight)
    with pytest.raises(ValueError, match="save must be"):
        mk.nn.TransposedLinear(8, 3, save="int3")


def test_layer_argument_errors():
    with pytest.raises(ValueError, match="save must be None or one of"):
        mk.nn.Linear(4, 4, save="int3")
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 8"):
        mk.nn.Linear(4, 4, save="int4", group_size=100)
    for eps in (0, -0.1, float("inf"), float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="eps must be a positive finite number"):
            mk.nn.Linear(4, 4, save="asa", eps=eps)
    # numpy scalars are numbers too
    assert mk.nn.Linear(4, 4, save="int4", eps=np.float32(0.1), group_size=np.int64(64)).group_size == 64
    layer = mk.nn.Linear(4, 4, save="int4")
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        layer(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="weight must have the dtype of input"):
        layer(torch.ones(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"input must be \(\.\.\., 4\)"):
        layer(torch.ones(2, 5))
    with pytest.raises(ValueError, match="linear must be None or one of"):
        mk.convert(torch.nn.Linear(2, 2), linear="int16")
    for nonnegative in ("yes", 1, 0.0):  # 1 == True, yet not a bool: a typo of some other argument
        with pytest.raises(TypeError, match="nonnegative must be None"):
            mk.nn.Linear(4, 4, save="asa", nonnegative=nonnegative)


def test_conv2d_function_argument_errors():
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    assert torch.equal(mk.compress.conv2d(x, w, padding=1), TF.conv2d(x, w, padding=1))  # save=None
    with pytest.raises(ValueError, match="conv2d with save needs integer padding"):
        mk.compress.conv2d(x, w, padding="same", save="int4")
    with pytest.raises(ValueError, match=r"input must be \(N, C, H, W\) or \(C, H, W\), got shape \(5, 5\)"):
        mk.compress.conv2d(x[0, 0], w, save="int4")


@pytest.mark.parametrize("save", ["asa", "int8", "int2"])
@pytest.mark.parametrize("conv", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, dilation=2, groups=2),
    dict(kernel_size=(3, 1), padding="same", padding_mode="reflect", bias=False),
])
def test_conv2d_against_its_rule(save, conv):
    torch.manual_seed(0)
    torch_layer = torch.nn.Conv2d(4, 6, **conv)
    layer = mk.nn.Conv2d.from_torch(torch_layer, save, group_size=16, nonnegative=False)
    x = torch.randn(2, 4, 9, 7)
    y_want, gx_want, _, gb_want, g = run_layer(torch_layer, x)
    torch_layer.zero_grad(set_to_none=True)  # the layers share parameters
    y, gx, gw, gb, _ = run_layer(layer, x, seed=5)
    torch.testing.assert_close(gx, gx_want)  # the input gradient needs only W, in every mode
    if save != "asa":
        assert torch.equal(y, y_want)
    if conv.get("bias", True):
        torch.testing.assert_close(gb, gb_want)
    # The weight gradient of the padded input's code, as the rule says.
    padded = x
    if conv.get("padding") == "same":
        padded = TF.pad(x, torch_layer._reversed_padding_repeated_twice, mode="reflect")
        conv_padding = 0
    else:
        conv_padding = torch_layer.padding
    flat = padded.reshape(2, -1)
    if save == "asa":
        x_hat = torch.where(flat > 0, 1.0, -1.0)
    else:
        bits = int(save[3:])
        codes, stats = R.quantize_groups(flat, bits, 16, drawn_seed(5))
        x_hat = R.dequantize_groups(codes, stats, flat.shape[1], bits, 16, 0.0, 0.0, torch.float32)
    want = torch.nn.grad.conv2d_weight(x_hat.view(padded.shape), torch_layer.weight.shape, g,
                                       torch_layer.stride, conv_padding, torch_layer.dilation, torch_layer.groups)
    torch.testing.assert_close(gw, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("save", ["asa", "int8"])
def test_conv2d_same_padding_codes_no_padding(save):
    # 'same' is integer padding: the convolution pads, nothing padded is coded (nor given asa's
    # auxiliary term), with an even kernel too (its output cropped).
    odd = mk.nn.Conv2d(3, 4, 3, padding=2, dilation=2, save=save, nonnegative=False)
    same = mk.nn.Conv2d(3, 4, 3, padding="same", dilation=2, save=save, nonnegative=False)
    same.load_state_dict(odd.state_dict())
    x = torch.randn(2, 3, 9, 10)
    runs = [run_layer(layer, x, seed=1) for layer in (odd, same)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][:4], runs[1][:4]))
    even = mk.nn.Conv2d(3, 4, (2, 4), padding="same", eps=0.5, save=save, nonnegative=False)
    torch_even = torch.nn.Conv2d(3, 4, (2, 4), padding="same")
    torch_even.load_state_dict(even.state_dict())
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    y, gx, gw, gb, g = run_layer(even, x, seed=1)
    even.zero_grad(set_to_none=True)  # torch_even has its own parameters
    x_rule = x + 0.5 * torch.where(x > 0, 1.0, -1.0) if save == "asa" else x  # the rule on x alone
    y_want, gx_want, _, gb_want, _ = run_layer(torch_even, x_rule)
    torch.testing.assert_close(y, y_want)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(gx, gx_want)
    torch.testing.assert_close(gb, gb_want)
    coded = 3 * 9 * 10  # C * H * W
    kept = mk.profile.saved_bytes(even, x)
    stats = 0 if save == "asa" else math.ceil(coded / 256) * 4  # a (min, scale) pair a group
    assert kept == 2 * (packed_nbytes(coded, 1 if save == "asa" else 8) + stats)


@pytest.mark.parametrize("save", ["asa", "int4"])
def test_conv2d_keeps_channels_last(save):
    # Coded in memory order ([N, H * W * C]), so the output is channels_last as torch's is, and
    # asa (deterministic) gives the contiguous input's results.
    layer = mk.nn.Conv2d(3, 8, 3, padding=1, save=save, nonnegative=False)
    x = torch.randn(2, 3, 6, 7)
    nhwc = run_layer(layer, x.to(memory_format=torch.channels_last))
    layer.weight.grad = layer.bias.grad = None
    nchw = run_layer(layer, x)
    assert nhwc[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc[0], nchw[0])
    torch.testing.assert_close(nhwc[1], nchw[1])
    if save == "asa":
        torch.testing.assert_close(nhwc[2], nchw[2])
    assert mk.profile.saved_bytes(layer, x.to(memory_format=torch.channels_last).requires_grad_()) == \
        mk.profile.saved_bytes(layer, x.requires_grad_())


def test_conv2d_unbatched_and_bytes():
    layer = mk.nn.Conv2d(3, 4, 3, save="int4", group_size=64)
    x = torch.randn(3, 8, 8, requires_grad=True)
    y = layer(x)
    assert y.shape == (4, 6, 6)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert mk.profile.saved_bytes(layer, x) == 3 * 64 * 4 // 8 + 3 * 4


def test_device_mix_is_named():
    layer = mk.nn.Linear(4, 2, save="int4", device="meta")
    with pytest.raises(ValueError, match="weight must be on the device of input"):
        layer(torch.ones(3, 4))


@pytest.mark.parametrize("args, error, message", [
    (([1.0], torch.randn(4, 8), None), TypeError, r"^input must be a torch.Tensor, got list"),
    ((torch.randn(2, 8), "w", None), TypeError, r"^weight must be a torch.Tensor, got str"),
    ((torch.randn(2, 8), torch.randn(4, 8), "b"), TypeError, r"^bias must be a torch.Tensor or None, got str"),
    ((torch.randn(2, 8), torch.randn(2, 4, 8), None), ValueError,
     r"^weight must be 2-D \(out_features, in_features\), got shape \(2, 4, 8\)"),
    ((torch.randn(2, 8), torch.randn(8), None), ValueError, r"^weight must be 2-D .*got shape \(8,\)"),
    ((torch.randn(2, 8), torch.randn(4, 8), torch.randn(3)), ValueError,
     r"^bias must have shape \(4,\) \(out_features of weight \(4, 8\)\), got \(3,\)"),
    ((torch.randn(2, 8), torch.randn(4, 8), torch.randn(4, 4)), ValueError, r"^bias must have shape \(4,\)"),
])
@pytest.mark.parametrize("save", ["asa", "int4"])
def test_linear_argument_errors(args, error, message, save):
    with pytest.raises(error, match=message):
        mk.compress.linear(*args, save=save)


def test_conv2d_weight_must_be_4d():
    with pytest.raises(ValueError, match=r"^weight must be 4-D \(out_channels, in_channels / groups, kh, kw\), "
                                         r"got shape \(4, 3\)"):
        mk.compress.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3), save="int4")
