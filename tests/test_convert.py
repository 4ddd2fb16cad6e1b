"""mk.convert: which modules it swaps, what the replacements take over, and what it reports."""
import pytest
import torch
from torch import nn

import memkernels as mk


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


def test_module_held_twice_gets_one_replacement():
    gelu = nn.GELU()
    model, report = mk.convert(nn.Sequential(gelu, nn.Linear(2, 2), gelu), bits=3, return_report=True)
    assert isinstance(model[0], mk.nn.GELU) and model[0] is model[2]
    assert [name for name, _, _ in report.swapped] == ["0"]


def test_model_itself_is_swapped():
    gelu, report = mk.convert(nn.GELU("tanh"), bits=2, return_report=True)
    assert isinstance(gelu, mk.nn.GELU) and gelu.approximate == "tanh" and gelu.bits == 2
    assert report.swapped[0][:2] == ("", "GELU")
    linear = nn.Linear(3, 3)
    converted = mk.convert(linear, linear="int8")
    assert isinstance(converted, mk.nn.Linear) and converted.weight is linear.weight


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
