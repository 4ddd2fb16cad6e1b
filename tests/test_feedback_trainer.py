"""Random feedback training: FA layers against a materialised B, DFA's update against a hand-written
reference, MEM-DFA's updates equal to DFA's (dropout included), memory constant in depth, and
accuracy on scikit-learn's digits."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memkernels as mk
from memkernels import ops, reference as ref
from memkernels.feedback.layers import default_scale

pytestmark = pytest.mark.skipif(not ops.extension_loaded(), reason="memkernels._C not built")


def mlp(hidden: int, width: int = 32, d_in: int = 12, classes: int = 5, act=nn.Tanh, dropout: float = 0.0):
    layers, d = [], d_in
    for _ in range(hidden):
        layers += [nn.Linear(d, width), act()] + ([nn.Dropout(dropout)] if dropout else [])
        d = width
    return nn.Sequential(*layers, nn.Linear(d, classes))


def cnn():
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Tanh(), nn.Dropout(0.2), nn.Flatten(),
                         nn.Linear(24, 10))


# ---- FA layers ----


def test_fa_linear_sends_grad_out_times_b_to_its_input(device):
    torch.manual_seed(0)
    layer = mk.nn.FALinear(7, 5, seed=3, layer=2).to(device)
    plain = nn.Linear(7, 5).to(device)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(4, 6, 7, device=device, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_()
    g = torch.randn(4, 6, 5, device=device)
    y = layer(x)
    torch.testing.assert_close(y, plain(x_plain))
    y.backward(g)
    plain(x_plain).backward(g)
    b = ref.feedback_matrix(3, 2, 5, 7, 1 / 7**0.5, device)
    torch.testing.assert_close(x.grad, g @ b)
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad)
    torch.testing.assert_close(layer.bias.grad, plain.bias.grad)
    assert mk.profile.saved_bytes(layer, x) == x.numel() * 4  # x, not W


@pytest.mark.parametrize("stride, padding, groups, padding_mode", [
    (1, 1, 1, "zeros"), (2, 0, 2, "zeros"), (1, "valid", 1, "zeros"), (1, "same", 1, "zeros"), (1, 2, 1, "reflect"),
    (2, 1, 2, "circular"), (1, "same", 1, "replicate")])
def test_fa_conv2d_sends_the_transposed_convolution_with_b_to_its_input(device, stride, padding, groups, padding_mode):
    torch.manual_seed(0)
    args = dict(stride=stride, padding=padding, groups=groups, padding_mode=padding_mode)
    layer = mk.nn.FAConv2d(4, 6, (3, 4), seed=1, layer=5, **args).to(device)  # even width: 'same' pads unevenly
    plain = nn.Conv2d(4, 6, (3, 4), **args).to(device)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 9, 9, device=device, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_()
    y = layer(x)
    torch.testing.assert_close(y, plain(x_plain))
    g = torch.randn_like(y)
    y.backward(g)
    plain(x_plain).backward(g)
    # The input gradient of a convolution with weight B is the transposed convolution with B.
    fan_in = 4 // groups * 12
    with torch.no_grad():
        plain.weight.copy_(ref.feedback_matrix(1, 5, 6, fan_in, 1 / fan_in**0.5, device).view(layer.weight.shape))
    (expected,) = torch.autograd.grad(plain(x), x, g)
    torch.testing.assert_close(x.grad, expected)
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad)
    torch.testing.assert_close(layer.bias.grad, plain.bias.grad)


def test_fa_conv2d_takes_an_unbatched_input():
    torch.manual_seed(0)
    layer = mk.nn.FAConv2d(2, 3, 3, padding=1, padding_mode="reflect")
    x = torch.randn(2, 5, 5, requires_grad=True)
    batched = x.detach()[None].requires_grad_()
    layer(x).square().sum().backward()
    grads = x.grad, layer.weight.grad, layer.bias.grad
    layer.zero_grad()
    layer(batched).square().sum().backward()
    for got, expected in zip(grads, (batched.grad[0], layer.weight.grad, layer.bias.grad)):
        torch.testing.assert_close(got, expected)


def test_fa_layers_take_an_explicit_scale_and_show_it():
    torch.manual_seed(0)
    layer = mk.nn.FALinear(7, 5, seed=3, layer=2, scale=0.5)
    assert repr(layer) == "FALinear(in_features=7, out_features=5, bias=True, seed=3, layer=2, scale=0.5)"
    x, g = torch.randn(4, 7, requires_grad=True), torch.randn(4, 5)
    layer(x).backward(g)
    torch.testing.assert_close(x.grad, g @ ref.feedback_matrix(3, 2, 5, 7, 0.5))
    whole = mk.nn.FALinear(7, 5, scale=2)
    assert type(whole.scale) is float and whole.scale == 2.0
    conv = mk.nn.FAConv2d(4, 6, 3, seed=1, layer=5)
    assert repr(conv) == "FAConv2d(4, 6, kernel_size=(3, 3), stride=(1, 1), seed=1, layer=5, scale=None)"


def test_fa_conv2d_valid_padding_is_no_padding():
    torch.manual_seed(0)
    weight, bias = torch.randn(3, 2, 3, 3, requires_grad=True), torch.randn(3)
    x = torch.randn(2, 2, 6, 6, requires_grad=True)
    grads = []
    for padding in ("valid", 0):
        y = mk.feedback.fa_conv2d(x, weight, bias, 4, 1, padding=padding)
        assert y.shape == (2, 3, 4, 4)
        grads.append(torch.autograd.grad(y.square().sum(), (x, weight)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("make, shape", [(lambda: mk.nn.FALinear(5, 3), (4, 5)),
                                         (lambda: mk.nn.FAConv2d(2, 3, 3), (2, 2, 6, 6))], ids=["linear", "conv2d"])
def test_fa_layers_under_autocast_as_torchs(make, shape):
    """Forward under autocast, backward after it (the usual loop): dtypes and weight gradients as
    torch's layer gives them (the weight gradient of FA is exact)."""
    torch.manual_seed(0)
    layer = make()
    plain = (nn.Linear(5, 3) if isinstance(layer, nn.Linear) else nn.Conv2d(2, 3, 3))
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(shape, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_plain = layer(x), plain(x_plain)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_plain)
    y.float().sum().backward()
    y_plain.float().sum().backward()
    assert x.grad.dtype == layer.weight.grad.dtype == torch.float32
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad)


def test_fa_layers_reject_what_they_do_not_support():
    with pytest.raises(NotImplementedError, match="padding"):
        mk.feedback.fa_conv2d(torch.ones(1, 2, 3, 3), torch.ones(2, 2, 3, 3), None, 0, 0, padding="same")
    with pytest.raises(ValueError, match="layer"):
        mk.nn.FALinear(2, 2, layer=-1)
    with pytest.raises(TypeError, match="seed"):
        mk.nn.FALinear(2, 2, seed=1.5)
    with pytest.raises(TypeError, match="layer"):
        mk.nn.FAConv2d(2, 2, 3, layer="1")
    for scale in ("x", -1.0, 0, float("nan"), True, float("inf")):
        with pytest.raises(ValueError, match="scale"):
            mk.nn.FALinear(2, 2, scale=scale)
    # Past float32's range: refused here, not at the first backward (nor as float()'s OverflowError).
    for scale in (1e39, 10**39, 10**400):
        with pytest.raises(ValueError, match=r"scale must be None or a positive finite number \(in float32\)"):
            mk.nn.FALinear(2, 2, scale=scale)
    assert mk.nn.FALinear(2, 2, scale=3.4028235e38).scale == 3.4028235e38  # rounds to float32's largest
    with pytest.raises(ValueError, match="scale"):
        mk.feedback.fa_linear(torch.ones(1, 2), torch.ones(2, 2), None, 0, 0, scale=-2.0)


@pytest.mark.parametrize("features", [(0, 4), (10, 0)])
def test_fa_linear_with_zero_features_is_torchs(features):
    layer = mk.nn.FALinear(*features)
    plain = nn.Linear(*features)
    plain.load_state_dict(layer.state_dict())
    x, x_plain = (torch.randn(3, features[0], requires_grad=True) for _ in range(2))
    y = layer(x)
    y.sum().backward()
    plain(x_plain).sum().backward()
    assert y.shape == (3, features[1]) and torch.equal(x.grad, x_plain.grad)
    assert torch.equal(layer.weight.grad, plain.weight.grad)


# ---- blocks ----


def test_split_blocks_of_a_sequential_and_of_a_list():
    model = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Dropout()), nn.Linear(3, 2),
                          nn.LayerNorm(2), nn.Conv2d(1, 1, 1))
    prefix, blocks = mk.feedback.split_blocks(model)
    assert [type(m) for m in prefix] == [nn.Flatten]
    assert [(type(b.weight), [type(m) for m in b.post]) for b in blocks] == [
        (nn.Linear, [nn.ReLU, nn.Dropout]), (nn.Linear, [nn.LayerNorm]), (nn.Conv2d, [])]
    _, blocks = mk.feedback.split_blocks([nn.Sequential(nn.Linear(4, 3), nn.Tanh()), nn.Linear(3, 2)])
    assert len(blocks) == 2 and [type(m) for m in blocks[0].post] == [nn.Tanh]


class Chain(nn.Sequential):
    """A subclass of nn.Sequential that keeps its forward."""


def test_split_blocks_flattens_subclasses_of_sequential():
    post = [nn.BatchNorm1d(3), nn.PReLU(), nn.GroupNorm(1, 3)]  # parameters a block may train
    for model in (Chain(nn.Linear(4, 3), *post, nn.Linear(3, 2)), nn.Sequential(Chain(nn.Linear(4, 3), *post),
                                                                             nn.Linear(3, 2))):
        _, blocks = mk.feedback.split_blocks(model)
        assert [(type(b.weight), [type(m) for m in b.post]) for b in blocks] == [
            (nn.Linear, [nn.BatchNorm1d, nn.PReLU, nn.GroupNorm]), (nn.Linear, [])]
    _, blocks = mk.feedback.split_blocks([Chain(nn.Linear(4, 3), nn.Tanh()), nn.Linear(3, 2)])
    assert [type(m) for m in blocks[0].post] == [nn.Tanh]


class Doubled(nn.Sequential):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("model, message", [
    (nn.Sequential(nn.ReLU()), "no Linear"),
    (nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2)), "parameter-free"),
    (nn.Sequential(nn.Linear(4, 4), nn.TransformerEncoderLayer(4, 1)), "chain"),
    ([nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))], "one Linear"),
    ([nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Linear(4, 2))], "must start"),
    ([], "empty"),
    (nn.Sequential(Doubled(nn.Linear(4, 4), nn.Tanh()), nn.Linear(4, 2)), "Doubled .*own forward"),
    # Weight layers other than Linear and Conv2d would be trained by backprop inside a block.
    (nn.Sequential(nn.Linear(8, 16), nn.Unflatten(1, (4, 4)), nn.Conv1d(4, 4, 3), nn.Flatten(), nn.Linear(8, 2)),
     "Conv1d has parameters"),
    (nn.Sequential(nn.Linear(8, 4), nn.Unflatten(1, (1, 2, 2)), nn.ConvTranspose2d(1, 1, 1)), "ConvTranspose2d"),
    ([nn.Sequential(nn.Linear(8, 4), nn.Embedding(3, 3))], "Embedding"),
])
def test_split_blocks_names_what_is_wrong(model, message):
    with pytest.raises(ValueError, match=message):
        mk.feedback.split_blocks(model)


def test_trainer_checks_its_arguments():
    model = mlp(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="rule"):
        mk.feedback.Trainer(model, rule="backprop", loss=F.cross_entropy, optimizer=opt)
    with pytest.raises(TypeError, match="model"):
        mk.feedback.Trainer(nn.Linear(2, 2), rule="dfa", loss=F.cross_entropy, optimizer=opt)
    with pytest.raises(ValueError, match="seed"):
        mk.feedback.Trainer(model, rule="dfa", loss=F.cross_entropy, optimizer=opt, seed=-1)
    with pytest.raises(TypeError, match="seed"):
        mk.feedback.Trainer(model, rule="dfa", loss=F.cross_entropy, optimizer=opt, seed=0.5)
    with pytest.raises(TypeError, match="optimizer"):
        mk.feedback.Trainer(model, rule="dfa", loss=F.cross_entropy, optimizer=None)
    with pytest.raises(TypeError, match="loss"):
        mk.feedback.Trainer(model, rule="dfa", loss="cross_entropy", optimizer=opt)
    with pytest.raises(ValueError, match="empty"):
        mk.feedback.Trainer([], rule="dfa", loss=F.cross_entropy, optimizer=opt)
    with pytest.raises(ValueError, match="scale"):
        mk.feedback.Trainer(model, rule="dfa", loss=F.cross_entropy, optimizer=opt, scale="x")


def test_fa_rule_rejects_weight_layers_whose_forward_it_cannot_reproduce():
    for layer in (mk.nn.Linear(4, 4, save="asa"), mk.nn.Conv2d(1, 1, 1)):
        model = nn.Sequential(layer, nn.Flatten(), nn.Linear(4, 2))  # construction only: shapes unchecked
        with pytest.raises(ValueError, match=f"block 0's memkernels.nn.{type(layer).__name__}"):
            mk.feedback.Trainer(model, rule="fa", loss=F.cross_entropy, optimizer=torch.optim.SGD([layer.weight]))
        mk.feedback.Trainer(model, rule="dfa", loss=F.cross_entropy, optimizer=torch.optim.SGD([layer.weight]))


# ---- the rules ----


def one_step(model, rule, x, y, lr=1.0, seed=0, optimizer=torch.optim.SGD):
    """(updated copy of model, loss) after one step of `rule`."""
    model = copy.deepcopy(model)
    trainer = mk.feedback.Trainer(model, rule=rule, loss=F.cross_entropy,
                                  optimizer=optimizer(model.parameters(), lr=lr), seed=seed)
    torch.manual_seed(1234)  # dropout draws
    loss = trainer.step(x, y)
    return model, loss


def grads_of_step(model, rule, x, y, seed=0):
    """-(change of each parameter) after one SGD step of lr 1: the gradients the rule computed."""
    updated, _ = one_step(model, rule, x, y, seed=seed)
    return [p0.detach() - p1.detach() for p0, p1 in zip(model.parameters(), updated.parameters())]


def dfa_reference_grads(model, x, y, seed):
    """DFA written out: delta_l = (e B_l) * tanh'(a_l), dW_l = delta_l^T x_l; e = softmax - onehot / N."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    xs, pre, h = [], [], x
    for i, lin in enumerate(linears):
        xs.append(h)
        a = h @ lin.weight.T + lin.bias
        pre.append(a)
        h = torch.tanh(a) if i < len(linears) - 1 else a
    e = (torch.softmax(h, 1) - F.one_hot(y, h.shape[1]).float()) / len(x)
    grads = []
    for i, lin in enumerate(linears):
        if i == len(linears) - 1:
            delta = e
        else:
            b = ref.feedback_matrix(seed, i, e.shape[1], lin.out_features, 1 / e.shape[1] ** 0.5)
            delta = (e @ b) * (1 - torch.tanh(pre[i]) ** 2)
        grads += [delta.T @ xs[i], delta.sum(0)]
    return grads


def test_dfa_update_is_the_projected_output_error():
    torch.manual_seed(0)
    model = mlp(3)
    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    expected = dfa_reference_grads(model, x, y, seed=7)
    model_copy = copy.deepcopy(model)
    trainer = mk.feedback.Trainer(model_copy, rule="dfa", loss=F.cross_entropy,
                                  optimizer=torch.optim.SGD(model_copy.parameters(), lr=1.0), seed=7)
    trainer.step(x, y)
    got = [p0.detach() - p1.detach() for p0, p1 in zip(model.parameters(), model_copy.parameters())]
    for g, r in zip(got, expected):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("act", [nn.Tanh, nn.GELU, lambda: nn.GELU(approximate="tanh")],
                         ids=["tanh", "gelu", "gelu_tanh"])
def test_fused_path_equals_autograd_through_the_activation(act):
    """In MEM-DFA a lone activation takes the fused kernel; activation + Identity goes through autograd."""
    torch.manual_seed(0)
    fused = mlp(2, act=act)
    kind = type(fused[1])
    unfused = nn.Sequential(*[nn.Sequential(m, nn.Identity()) if isinstance(m, kind) else m for m in fused])
    x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
    for g1, g2 in zip(grads_of_step(fused, "memdfa", x, y), grads_of_step(unfused, "memdfa", x, y)):
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


def test_bp_rule_is_backprop_and_fa_differs_from_it():
    torch.manual_seed(0)
    model = mlp(2)
    x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(x), y).backward()
    bp = grads_of_step(model, "bp", x, y)
    for g, p in zip(bp, reference.parameters()):
        torch.testing.assert_close(g, p.grad)
    fa = grads_of_step(model, "fa", x, y)
    torch.testing.assert_close(fa[-2:], bp[-2:])  # the output layer's own gradient is exact
    assert not torch.allclose(fa[0], bp[0])  # the first layer's comes through B


def test_fa_rule_trains_the_models_own_forward():
    """Padding modes and 'same' are kept; FALinear keeps its own seed and layer; the gradients are those
    of the same model built of FA layers, each plain layer l with (the trainer's seed, l)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Tanh(),
                          nn.Conv2d(2, 2, 2, padding="same", padding_mode="circular"), nn.ReLU(),
                          nn.Conv2d(2, 2, 2, padding="same"), nn.Flatten(), mk.nn.FALinear(32, 3, seed=5, layer=9))
    fa_model = nn.Sequential(
        mk.nn.FAConv2d(1, 2, 3, padding=1, padding_mode="reflect", seed=7, layer=0), nn.Tanh(),
        mk.nn.FAConv2d(2, 2, 2, padding="same", padding_mode="circular", seed=7, layer=1), nn.ReLU(),
        mk.nn.FAConv2d(2, 2, 2, padding="same", seed=7, layer=2), nn.Flatten(), mk.nn.FALinear(32, 3, seed=5, layer=9))
    fa_model.load_state_dict(model.state_dict())
    x, y = torch.randn(4, 1, 4, 4), torch.randint(0, 3, (4,))
    F.cross_entropy(fa_model(x), y).backward()
    _, trained_loss = one_step(model, "fa", x, y, seed=7)
    torch.testing.assert_close(trained_loss, F.cross_entropy(model(x), y).detach())
    for g, p in zip(grads_of_step(model, "fa", x, y, seed=7), fa_model.parameters()):
        torch.testing.assert_close(g, p.grad)


def mlp_batchnorm():
    """No bias before a BatchNorm: its gradient would be 0, and the test checks that every parameter moves."""
    return nn.Sequential(nn.Linear(12, 16, bias=False), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 16, bias=False),
                         nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))


def coded_mlp_dropout():
    """An int8 layer draws a seed in MEM-DFA's first pass (under no_grad) too: dropout after it
    draws the masks DFA does."""
    return nn.Sequential(mk.nn.Linear(12, 16, save="int8"), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 5))


@pytest.mark.parametrize("make", [lambda: mlp(3, dropout=0.3, act=nn.GELU), lambda: mlp(2, act=nn.ReLU), cnn,
                                  mlp_batchnorm, coded_mlp_dropout],
                         ids=["mlp-dropout-gelu", "mlp-relu", "cnn-dropout", "mlp-batchnorm", "coded-mlp-dropout"])
@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
def test_memdfa_updates_equal_dfa(make, optimizer):
    torch.manual_seed(0)
    model = make()
    x, y = torch.rand(16, 64 if make is cnn else 12), torch.randint(0, 5, (16,))
    models, losses = [], []
    for rule in ("dfa", "memdfa"):
        m = copy.deepcopy(model)
        trainer = mk.feedback.Trainer(m, rule=rule, loss=F.cross_entropy, optimizer=optimizer(m.parameters(), lr=0.05),
                                      seed=3)
        torch.manual_seed(99)
        losses.append([trainer.step(x, y) for _ in range(3)])  # three steps: later ones see earlier updates
        models.append(m)
    torch.testing.assert_close(losses[0], losses[1])
    changed = 0
    for p, p_dfa, p_mem in zip(model.parameters(), *(m.parameters() for m in models)):
        torch.testing.assert_close(p_mem, p_dfa, atol=1e-6, rtol=1e-5)
        changed += not torch.equal(p_dfa, p)
        assert p_dfa.grad is not None and p_mem.grad is None  # MEM-DFA freed each block's after its update
    assert changed == len(list(model.parameters()))
    for b_dfa, b_mem in zip(*(m.buffers() for m in models)):  # BatchNorm's running statistics
        torch.testing.assert_close(b_mem, b_dfa, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("frozen", [0, 2, 4], ids=["first", "hidden", "last"])
def test_dfa_and_memdfa_train_around_a_frozen_layer(frozen):
    torch.manual_seed(0)
    model = mlp(2)
    model[frozen].requires_grad_(False)
    x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
    trained = {}
    for rule in ("dfa", "memdfa"):
        m = copy.deepcopy(model)
        trainer = mk.feedback.Trainer(m, rule=rule, loss=F.cross_entropy,
                                      optimizer=torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1))
        trainer.step(x, y)
        trained[rule] = m
    for i, layer in enumerate(model):
        trained_layers = (trained["dfa"][i].parameters(), trained["memdfa"][i].parameters())
        for p, p_dfa, p_mem in zip(layer.parameters(), *trained_layers):
            assert torch.equal(p_dfa, p) == (i == frozen)  # the others train, from e
            torch.testing.assert_close(p_mem, p_dfa)


def test_memdfa_keeps_memory_constant_in_depth():
    kept, peak = {}, {}
    for rule in ("bp", "dfa", "memdfa"):
        for depth in (4, 16):
            torch.manual_seed(0)
            model = mlp(depth - 1, width=64, d_in=64, classes=10)
            trainer = mk.feedback.Trainer(model, rule=rule, loss=F.cross_entropy,
                                          optimizer=torch.optim.SGD(model.parameters(), lr=0.01))
            x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
            trainer.step(x, y)
            kept[rule, depth] = mk.profile.peak_saved_bytes(lambda m, x, y: trainer.step(x, y), model, x, y)
            peak[rule, depth] = mk.profile.peak_memory(lambda: trainer.step(x, y), backward=False, device="cpu")
    for rule in ("bp", "dfa"):
        assert kept[rule, 16] > 3.5 * kept[rule, 4]
        assert peak[rule, 16] > 2 * peak[rule, 4]
    assert kept["memdfa", 16] <= 1.05 * kept["memdfa", 4]
    assert peak["memdfa", 16] <= 1.05 * peak["memdfa", 4]


def test_peak_saved_bytes_counts_what_is_alive_at_once():
    x = torch.randn(1000, requires_grad=True)

    def two_graphs(x):
        (x.exp() * 2).sum().backward()  # exp keeps its 4000-byte output until this backward
        return x.sigmoid()              # keeps another 4000 bytes

    assert mk.profile.peak_saved_bytes(two_graphs, x) == 4000
    assert mk.profile.peak_saved_bytes(lambda x: x.exp().sigmoid(), x) == 8000  # one graph, both kept


# ---- accuracy on digits ----


def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32) / 16  # noqa: E731
    return as_x(x_train), torch.tensor(y_train), as_x(x_test), torch.tensor(y_test)


def test_accuracy_on_digits_dfa_and_memdfa_within_two_points_of_bp():
    x_train, y_train, x_test, y_test = digits()
    accuracy = {}
    for hidden in (1, 3):
        for rule in mk.feedback.RULES:
            torch.manual_seed(0)
            model = mlp(hidden, width=128, d_in=64, classes=10)
            trainer = mk.feedback.Trainer(model, rule=rule, loss=F.cross_entropy,
                                          optimizer=torch.optim.Adam(model.parameters(), lr=2e-3))
            order = torch.Generator().manual_seed(0)
            for _ in range(4):
                perm = torch.randperm(len(x_train), generator=order)
                for i in range(0, len(x_train), 32):
                    trainer.step(x_train[perm[i:i + 32]], y_train[perm[i:i + 32]])
            with torch.no_grad():
                accuracy[hidden, rule] = (model(x_test).argmax(1) == y_test).float().mean().item()
    for hidden in (1, 3):
        assert accuracy[hidden, "bp"] > 0.93, accuracy
        assert accuracy[hidden, "fa"] > 0.90, accuracy
        for rule in ("dfa", "memdfa"):
            assert accuracy[hidden, rule] >= accuracy[hidden, "bp"] - 0.02, accuracy
        assert accuracy[hidden, "memdfa"] == pytest.approx(accuracy[hidden, "dfa"], abs=0.005), accuracy


def test_seed_and_layer_refuse_bools():
    with pytest.raises(TypeError, match=r"^seed must be an int, got bool True"):
        mk.feedback.Trainer(nn.Sequential(nn.Linear(4, 2)), rule="dfa", loss=F.cross_entropy,
                            optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), seed=True)
    with pytest.raises(TypeError, match=r"^layer must be an int, got bool False"):
        mk.nn.FALinear(4, 2, layer=False)


@pytest.mark.parametrize("rule", ["bp", "fa", "dfa", "memdfa"])
def test_loss_must_return_a_scalar_tensor(rule):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(2, 8), torch.tensor([0, 1])
    with pytest.raises(TypeError, match=r"^loss\(output, y\) must return a scalar tensor, got float"):
        mk.feedback.Trainer(model, rule=rule, loss=lambda o, t: 1.0, optimizer=opt).step(x, y)
    with pytest.raises(ValueError, match=r"^loss\(output, y\) must return a scalar tensor, got shape \(2, 4\)"):
        mk.feedback.Trainer(model, rule=rule, loss=lambda o, t: o, optimizer=opt).step(x, y)


@pytest.mark.parametrize("args, error, message", [
    ((torch.randn(4, 8), torch.randn(4, 8, device="meta"), None), ValueError,
     r"^weight must be on the device of input \(cpu\), got meta"),
    ((torch.randn(4, 8), torch.randn(8), None), ValueError, r"^weight must be 2-D \(out_features, in_features\)"),
    ((torch.randn(4, 8), "w", None), TypeError, r"^weight must be a torch.Tensor, got str"),
    ((torch.randn(4, 8), torch.randn(4, 8), torch.randn(3)), ValueError, r"^bias must have shape \(4,\)"),
    ((torch.ones(4, 8, dtype=torch.long), torch.randn(4, 8), None), TypeError,
     r"^input must be a floating-point tensor, got torch.int64"),
    ((torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float64), None), TypeError,
     r"^weight must have the dtype of input \(torch.float32\), got torch.float64"),
])
def test_fa_linear_argument_errors(args, error, message):
    with pytest.raises(error, match=message):
        mk.feedback.fa_linear(*args, seed=0, layer=0)


def test_fa_conv2d_argument_errors():
    with pytest.raises(TypeError, match=r"^input must be a floating-point tensor, got torch.int64"):
        mk.feedback.fa_conv2d(torch.ones(1, 3, 8, 8, dtype=torch.long), torch.randn(4, 3, 3, 3), None, 0, 0)
    with pytest.raises(ValueError, match=r"^weight must be 4-D"):
        mk.feedback.fa_conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3), None, 0, 0)
