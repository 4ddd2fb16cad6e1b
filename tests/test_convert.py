"""mk.convert: which modules it swaps, what the replacements take over, what it reports, and the
bytes kept and gradients of a converted model."""
import copy
import re
import functools

import pytest
import torch
from torch import nn

import memkernels as mk
from memkernels.activations.spec import packed_nbytes


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


@pytest.mark.parametrize("linear", ["int4", "asa"])
def test_convert_swaps_transformers_conv1d(linear):
    """GPT-2's projections are transformers' Conv1D (weight [in, out]): with `linear` each becomes a
    TransposedLinear holding the same Parameters; the state_dict is unchanged, and int codes leave
    the forward as it was (to the ulps of the swapped GELU) while keeping less."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()  # eval: no dropout, so outputs compare
    ids = torch.randint(0, 50, (2, 16))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before, kept_before = model(ids).logits, mk.profile.saved_bytes(lambda i: model(i).logits, ids)
    conv1d = [name for name, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    weights = [model.get_submodule(name).weight for name in conv1d]
    _, report = mk.convert(model, linear=linear, return_report=True)
    assert {name for name, old, _ in report.swapped if old == "Conv1D"} == set(conv1d) and len(conv1d) == 4
    for name, weight in zip(conv1d, weights):
        layer = model.get_submodule(name)
        assert isinstance(layer, mk.nn.TransposedLinear) and layer.weight is weight and layer.save == linear
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    if linear == "int4":
        torch.testing.assert_close(model(ids).logits, before)
    assert mk.profile.saved_bytes(lambda i: model(i).logits, ids) < kept_before
    model(ids).logits.sum().backward()
    assert all(w.grad is not None and w.grad.shape == w.shape for w in weights)


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=50)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config), torch.randint(0, 50, (2, 16))


@pytest.mark.parametrize("bits", [None, 3])
def test_convert_fuses_transformers_gated_mlp(bits):
    """Llama's MLP, down_proj(act_fn(gate_proj(x)) * up_proj(x)), becomes a GatedMLP holding the
    same projections: the same state_dict, logits and (exact mode) gradients, and per layer the
    product no longer keeps silu(gate): torch keeps gate, silu(gate), up and the product (4 floats
    an element); exact SwiGLU keeps gate and up, coded SwiGLU a 3-bit code and up."""
    model, ids = tiny_llama()
    ref = copy.deepcopy(model)
    kept_before = mk.profile.saved_bytes(lambda i: model(i).logits, ids)
    projections = [model.model.layers[0].mlp.gate_proj, model.model.layers[0].mlp.down_proj]
    _, report = mk.convert(model, bits=bits, return_report=True)
    assert [(name, old) for name, old, _ in report.swapped] == [
        ("model.layers.0.mlp", "LlamaMLP"), ("model.layers.1.mlp", "LlamaMLP")]
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp, mk.nn.GatedMLP) and (mlp.activation, mlp.bits) == ("silu", bits)
    assert [mlp.gate_proj, mlp.down_proj] == projections
    assert list(model.state_dict()) == list(ref.state_dict())
    torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    elements = 2 * 16 * 64  # tokens x intermediate size, per layer
    per_layer = 4 * elements if bits is None else 2 * 4 * elements - packed_nbytes(elements, 3)
    assert kept_before - mk.profile.saved_bytes(lambda i: model(i).logits, ids) == 2 * per_layer
    if bits is None:
        model(ids).logits.sum().backward()
        ref(ids).logits.sum().backward()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad)


def test_convert_gated_mlp_with_linear_options_and_opt_out():
    model, _ = tiny_llama()
    mk.convert(model, bits=3, linear="int4")
    mlp = model.model.layers[1].mlp
    assert isinstance(mlp, mk.nn.GatedMLP)  # built from its already converted projections
    assert all(isinstance(p, mk.nn.Linear) and p.save == "int4" for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    model, _ = tiny_llama()
    mk.convert(model, bits=3, gated_mlp=False)
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"
    assert isinstance(model.model.layers[0].mlp.act_fn, mk.nn.SiLU)
    model, _ = tiny_llama()
    mk.convert(model, bits=3, exclude="*.act_fn")  # an MLP fuses only where its act_fn may be swapped
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"


def _mlp_class(forward, act_fn):
    """A class placed like a transformers MLP, with the given forward and act_fn."""
    def __init__(self):
        nn.Module.__init__(self)
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.act_fn = act_fn
    return type("FakeMLP", (nn.Module,), {"__module__": "transformers.models.fake", "__init__": __init__,
                                          "forward": forward})


def gated_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """A docstring and another argument name: still the gated MLP."""
    return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


def added_forward(self, x):
    return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))


def scaled_forward(self, x):
    y = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return 2 * y


def test_convert_reads_the_mlp_forward():
    """Fused only where forward is the gated product and act_fn SiLU or GELU (GeGLU, approximate
    carried over); other forwards and activations leave the MLP, whose act_fn is then swapped."""
    gemma_like = _mlp_class(gated_forward, nn.GELU(approximate="tanh"))()
    x = torch.randn(3, 8)
    want = gemma_like(x)
    model = mk.convert(nn.Sequential(gemma_like))
    assert isinstance(model[0], mk.nn.GatedMLP) and (model[0].activation, model[0].approximate) == ("gelu", "tanh")
    torch.testing.assert_close(model(x), want)
    for forward, act in ((added_forward, nn.SiLU()), (scaled_forward, nn.SiLU()), (gated_forward, nn.ReLU())):
        model = mk.convert(nn.Sequential(_mlp_class(forward, act)()))
        assert type(model[0]).__name__ == "FakeMLP" and type(model[0].act_fn).__module__ == "memkernels.nn"


def test_convert_leaves_a_gated_mlp_whose_projections_are_not_modules():
    """GatedMLP holds three modules: a forward that reads the gated product from plain functions
    is left as it is, and only its act_fn is swapped."""
    mlp = _mlp_class(gated_forward, nn.SiLU())()
    weights = {name: getattr(mlp, name).weight for name in ("gate_proj", "up_proj", "down_proj")}
    for name, weight in weights.items():
        delattr(mlp, name)
        setattr(mlp, name, functools.partial(nn.functional.linear, weight=weight))
    x = torch.randn(3, 8)
    want = mlp(x)
    model = mk.convert(nn.Sequential(mlp))
    assert type(model[0]).__name__ == "FakeMLP" and isinstance(model[0].act_fn, mk.nn.SiLU)
    torch.testing.assert_close(model(x), want)


def test_gated_mlp_arguments():
    linear = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="activation must be"):
        mk.nn.GatedMLP(linear, linear, linear, activation="relu")
    with pytest.raises(ValueError, match="bits"):
        mk.nn.GatedMLP(linear, linear, linear, bits=5)
    assert "activation='silu', bits=3" in repr(mk.nn.GatedMLP(linear, linear, linear, bits=3))


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


def test_replacement_keeps_mode_and_hooks():
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU()).eval()
    calls = []
    handles = [model[0].register_forward_hook(lambda *args: calls.append("linear")),
               model[1].register_forward_pre_hook(lambda *args: calls.append("gelu"))]
    mk.convert(model, bits=3, linear="int4")
    assert isinstance(model[0], mk.nn.Linear) and isinstance(model[1], mk.nn.GELU)
    assert not model[0].training and not model[1].training
    model(torch.randn(2, 8))
    assert calls == ["linear", "gelu"]
    for handle in handles:  # the user's handles still remove the hooks from the replacements
        handle.remove()
    model(torch.randn(2, 8))
    assert calls == ["linear", "gelu"]


def test_replacement_keeps_full_backward_hooks():
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU())
    grads = []
    handle = model[1].register_full_backward_hook(lambda module, grad_in, grad_out: grads.append(grad_out[0]))
    mk.convert(model, bits=None)
    assert isinstance(model[1], mk.nn.GELU)
    model(torch.randn(2, 8)).sum().backward()
    assert len(grads) == 1 and torch.equal(grads[0], torch.ones(2, 16))  # the full hook's grad_output
    handle.remove()
    model(torch.randn(2, 8)).sum().backward()
    assert len(grads) == 1


def test_module_held_twice_gets_one_replacement():
    gelu = nn.GELU()
    model, report = mk.convert(nn.Sequential(gelu, nn.Linear(2, 2), gelu), bits=3, return_report=True)
    assert isinstance(model[0], mk.nn.GELU) and model[0] is model[2]
    assert [name for name, _, _ in report.swapped] == ["0"]


def test_converting_again_reports_modules_left_as_they_are():
    model = mk.convert(nn.Sequential(nn.Linear(2, 2), nn.GELU(), nn.ReLU()), bits=None)
    again, report = mk.convert(model, bits=3, return_report=True)
    assert again[1].bits is None and not report.swapped
    assert [(name, cls) for name, cls, _ in report.skipped] == [("1", "GELU"), ("2", "ReLU")]
    assert "already memkernels with bits=None" in str(report)
    assert not mk.convert(model, bits=None, return_report=True)[1].skipped


def test_model_itself_is_swapped():
    gelu, report = mk.convert(nn.GELU("tanh"), bits=2, return_report=True)
    assert isinstance(gelu, mk.nn.GELU) and gelu.approximate == "tanh" and gelu.bits == 2
    assert report.swapped[0][:2] == ("", "GELU")
    linear = nn.Linear(3, 3)
    converted = mk.convert(linear, linear="int8")
    assert isinstance(converted, mk.nn.Linear) and converted.weight is linear.weight


def test_a_gated_mlp_that_is_the_model_itself_is_fused_whole():
    model, _ = tiny_llama()
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, 32)
    fused, report = mk.convert(copy.deepcopy(mlp), bits=3, linear="int8", return_report=True)
    assert isinstance(fused, mk.nn.GatedMLP) and fused.bits == 3
    assert [(name, old) for name, old, _ in report.swapped] == [
        ("gate_proj", "Linear"), ("up_proj", "Linear"), ("down_proj", "Linear"), ("", "LlamaMLP")]
    assert all(p.save == "int8" for p in (fused.gate_proj, fused.up_proj, fused.down_proj))
    assert list(fused.state_dict()) == list(mlp.state_dict())
    torch.testing.assert_close(fused(x), mlp(x))


def test_layer_subclasses_are_skipped_and_reported():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(4, 4), nn.MultiheadAttention(4, 2), mk.nn.Linear(4, 4, save="asa"))
    _, report = mk.convert(model, linear="int4", return_report=True)
    assert report.swapped == []
    assert [(name, cls) for name, cls, _ in report.skipped] == [
        ("0", "MyLinear"), ("1.out_proj", "NonDynamicallyQuantizableLinear")]  # ours are not listed
    _, report = mk.convert(model, bits=3, return_report=True)  # no linear mode: nothing to report
    assert report.skipped == []


def fresh_model():
    return nn.Sequential(nn.ModuleDict({"enc": nn.Sequential(nn.Linear(4, 4), nn.GELU())}), nn.SiLU())


@pytest.mark.parametrize("include, swapped", [
    ("0.enc.1", ["0.enc.1"]),  # one pattern, not a sequence of one-character patterns
    (nn.SiLU, ["1"]),
    ((p for p in ["1", "0.*"]), ["0.enc.1", "1"]),  # any iterable, read once
])
def test_include_forms(include, swapped):
    _, report = mk.convert(fresh_model(), bits=3, include=include, return_report=True)
    assert sorted(name for name, _, _ in report.swapped) == swapped


def test_exclude_generator_is_read_once():
    _, report = mk.convert(fresh_model(), bits=3, exclude=(p for p in ["1"]), return_report=True)
    assert [name for name, _, _ in report.swapped] == ["0.enc.1"]


def test_bad_patterns_are_named():
    with pytest.raises(TypeError, match="include must be a name pattern"):
        mk.convert(fresh_model(), include=[3])
    with pytest.raises(TypeError, match="exclude must be a name pattern"):
        mk.convert(fresh_model(), exclude=3)


def test_convert_swaps_layers_and_keeps_parameters():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    keys, params = list(model.state_dict()), list(model.parameters())
    model, report = mk.convert(model, bits=None, linear="int4", conv2d="asa", return_report=True)
    assert isinstance(model[0], mk.nn.Conv2d) and model[0].save == "asa"
    assert isinstance(model[3], mk.nn.Linear) and model[3].save == "int4"
    assert list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert len(report.swapped) == 3
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    assert all(p.grad is not None for p in params)


@pytest.mark.parametrize("model", ["model", None, lambda t: t, [nn.GELU()]])
def test_convert_needs_a_module(model):
    with pytest.raises(TypeError, match=rf"^model must be an nn.Module, got {type(model).__name__}"):
        mk.convert(model)


@pytest.mark.parametrize("patterns", [3, [3], b"x", nn.GELU()])
def test_convert_patterns_error_shows_what_was_given(patterns):
    with pytest.raises(TypeError, match=r"^exclude must be a name pattern \(str\), a module class, or an iterable "
                                        rf"of those, got {re.escape(repr(patterns))}$"):
        mk.convert(nn.Sequential(nn.GELU()), exclude=patterns)
