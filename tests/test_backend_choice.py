"""How the CUDA ops get their default backend: the benches' --pick-backends (activations.py,
linear.py, feedback.py) pick it from measured rows and record it in memkernels/ops/cuda_backends.json;
memkernels.ops._cuda reads that file.

No GPU needed: the picking runs on synthetic rows, the file on a temporary path.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

import memkernels as mk

pytestmark = pytest.mark.skipif(not mk.ops.extension_loaded(), reason="memkernels._C not built")

BENCH = Path(__file__).resolve().parents[1] / "bench"
M = 2**20


def import_bench(monkeypatch, name: str):
    """bench/<name>.py, imported as the CLI runs it (its folder on sys.path for _harness)."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench(monkeypatch):
    return import_bench(monkeypatch, "activations")


@pytest.fixture
def cuda_module():
    from memkernels.ops import _cuda
    return _cuda


def row(activation, backend, fwd, bwd, numel=16 * M, dtype="bf16", bits="none"):
    return {"activation": activation, "dtype": dtype, "numel": numel, "bits": bits, "backend": backend,
            "mk_fwd_ms": fwd, "mk_bwd_ms": bwd}


def test_the_benches_pick_every_op_that_has_two_backends(bench, cuda_module, monkeypatch):
    decided_by = {a for activations, _, _ in bench.PICK_RULES.values() for a in activations}
    assert decided_by == set(bench.BACKEND_CASES)
    linear, feedback = import_bench(monkeypatch, "linear"), import_bench(monkeypatch, "feedback")
    picked = set(bench.PICK_RULES) | {linear.SIGN_OP, feedback.PICKED_OP}
    assert picked == set(cuda_module.CHOSEN_OPS) == set(cuda_module.DEFAULT_BACKEND)


def test_backend_totals_sum_each_backends_rows(bench):
    rows = [{"backend": "triton", "op_ms": 1.0}, {"backend": "cuda", "op_ms": 0.5},
            {"backend": "triton", "op_ms": 2.0}, {"backend": "cuda", "op_ms": 2.25}]
    assert bench.h.backend_totals(rows, "op_ms") == {"triton_ms": 3.0, "cuda_ms": 2.75, "cases": 2}


def test_pick_backends_sums_each_ops_rows_and_picks_the_smaller_total(bench):
    rows = [
        # activation ops: gelu favours cuda forward, silu favours triton by more; totals decide
        row("gelu", "triton", fwd=2.0, bwd=3.0, bits=3), row("gelu", "cuda", fwd=1.0, bwd=3.5, bits=3),
        row("silu", "triton", fwd=1.0, bwd=3.0, numel=64 * M, bits=3),
        row("silu", "cuda", fwd=2.5, bwd=2.0, numel=64 * M, bits=3),
        # gated ops: cuda faster forward over two dtypes, backward an exact tie
        row("swiglu", "triton", fwd=4.0, bwd=6.0), row("swiglu", "cuda", fwd=3.0, bwd=5.0),
        row("geglu", "triton", fwd=4.0, bwd=6.0, dtype="fp32"), row("geglu", "cuda", fwd=4.5, bwd=7.0, dtype="fp32"),
        # exact single-input rows decide the backward from x alone (their forward follows the coded
        # rows' activation_forward)
        row("silu", "triton", fwd=9.0, bwd=9.0), row("silu", "cuda", fwd=0.0, bwd=0.5),
        # ignored: too small, other activations, CPU rows
        row("gelu", "triton", fwd=100.0, bwd=100.0, numel=16 * M - 1, bits=3),
        row("gelu", "cuda", fwd=0.0, bwd=0.0, numel=4 * M, bits=3),
        row("relu", "triton", fwd=9.0, bwd=9.0), row("gelu", "cpu", fwd=0.0, bwd=0.0, bits=3),
    ]
    defaults, evidence = bench.pick_backends(rows)
    assert defaults == {"activation_forward": "triton", "activation_backward": "cuda",
                        "activation_backward_from_input": "cuda", "gated_forward": "cuda",
                        "gated_backward": "triton"}
    assert evidence["activation_forward"] == {"triton_ms": 3.0, "cuda_ms": 3.5, "cases": 2}
    assert evidence["activation_backward"] == {"triton_ms": 6.0, "cuda_ms": 5.5, "cases": 2}
    assert evidence["gated_forward"] == {"triton_ms": 8.0, "cuda_ms": 7.5, "cases": 2}
    assert evidence["gated_backward"] == {"triton_ms": 12.0, "cuda_ms": 12.0, "cases": 2}  # tie: triton
    assert evidence["activation_backward_from_input"] == {"triton_ms": 9.0, "cuda_ms": 0.5, "cases": 1}


def test_cuda_cpp_covers_the_backward_from_x_of_its_activations(cuda_module):
    from memkernels.activations.spec import Activation
    args = lambda act: (None, None, int(act), 0.0, 0.0)  # noqa: E731  (grad_out, x, activation, p0, p1)
    covered = {a for a in Activation if cuda_module._covered_by_cuda_cpp("activation_backward_from_input", args(a))}
    assert covered == {Activation.GELU, Activation.GELU_TANH, Activation.SILU}


def test_pick_backends_compares_only_cases_measured_under_both(bench):
    rows = [
        row("gelu", "triton", fwd=5.0, bwd=5.0, bits=3), row("gelu", "cuda", fwd=4.0, bwd=6.0, bits=3),
        # triton alone at 64M (the cuda row failed or was not built): left out of both totals
        row("gelu", "triton", fwd=1.0, bwd=1.0, numel=64 * M, bits=3),
        row("gelu_tanh", "cuda", fwd=50.0, bwd=50.0, bits=3),
        # an empty time cell (None, as read back from the CSV) leaves the case unpaired in that column
        row("silu", "triton", fwd=1.0, bwd=None, bits=3), row("silu", "cuda", fwd=1.5, bwd=0.5, bits=3),
        # gated ops measured under triton only: no decision
        row("swiglu", "triton", fwd=1.0, bwd=1.0),
    ]
    defaults, evidence = bench.pick_backends(rows)
    assert defaults == {"activation_forward": "cuda", "activation_backward": "triton"}
    assert evidence["activation_forward"] == {"triton_ms": 6.0, "cuda_ms": 5.5, "cases": 2}
    assert evidence["activation_backward"] == {"triton_ms": 5.0, "cuda_ms": 6.0, "cases": 1}
    assert bench.pick_backends([]) == ({}, {})


def test_rows_name_their_backend(bench):
    assert bench.backends_to_time("gelu", "cpu", with_cuda=True) == ("cpu",)
    assert bench.backends_to_time("swiglu", "cuda", with_cuda=True) == ("triton", "cuda")
    assert bench.backends_to_time("swiglu", "cuda", with_cuda=False) == ("triton",)
    assert bench.backends_to_time("relu", "cuda", with_cuda=True) == ("triton",)  # no CUDA C++ forward


def test_backend_is_set_only_while_measuring(bench, monkeypatch):
    monkeypatch.delenv("MEMKERNELS_BACKEND", raising=False)
    with bench.h.backend_selected("cuda"):
        assert os.environ["MEMKERNELS_BACKEND"] == "cuda"
    assert "MEMKERNELS_BACKEND" not in os.environ
    monkeypatch.setenv("MEMKERNELS_BACKEND", "triton")
    with pytest.raises(KeyError), bench.h.backend_selected("cuda"):
        raise KeyError("a failing measurement")
    assert os.environ["MEMKERNELS_BACKEND"] == "triton"
    with bench.h.backend_selected("cpu"):
        assert os.environ["MEMKERNELS_BACKEND"] == "triton"


@pytest.mark.parametrize("name", ["activations", "linear", "feedback"])
def test_pick_backends_needs_a_gpu_run(monkeypatch, tmp_path, capsys, name):
    module = import_bench(monkeypatch, name)
    out = [] if name == "linear" else ["--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="--device cuda"):
        module.main(["--pick-backends", "--device", "cpu", "--quick", *out])
    assert not any(tmp_path.iterdir()) and not capsys.readouterr().out  # stopped before measuring


def test_recorded_choice_is_what_cuda_ops_default_to(bench, cuda_module, tmp_path, monkeypatch):
    path = tmp_path / "cuda_backends.json"
    monkeypatch.setattr(cuda_module, "BACKENDS_FILE", path)
    monkeypatch.setattr(cuda_module, "DEFAULT_BACKEND", dict.fromkeys(cuda_module.CHOSEN_OPS, "triton"))
    assert cuda_module.read_default_backends() == dict.fromkeys(cuda_module.CHOSEN_OPS, "triton")  # no file
    cuda = "cuda" if mk.ops._C.with_cuda else "triton"  # what a build without CUDA C++ runs instead

    evidence = {"activation_forward": {"triton_ms": 2.0, "cuda_ms": 1.0, "cases": 4},
                "gated_backward": {"triton_ms": 2.0, "cuda_ms": 2.0, "cases": 4}}  # a tie: triton
    picked = bench.h.record_backend_choice(evidence, rule="the smaller total", device=bench.torch.device("cpu"),
                                           command="python bench/activations.py --pick-backends")
    assert picked == {"activation_forward": "cuda", "gated_backward": "triton"}
    record = json.loads(path.read_text())
    assert record["defaults"] == picked
    entry = record["evidence"]["activation_forward"]
    assert {k: entry[k] for k in evidence["activation_forward"]} == evidence["activation_forward"]
    assert entry["picked_by"] == "python bench/activations.py --pick-backends" and entry["rule"] == "the smaller total"
    assert entry["torch"] == bench.torch.__version__ and entry["triton"] and entry["date"] and entry["device"]
    assert cuda_module.read_default_backends() == {**dict.fromkeys(cuda_module.CHOSEN_OPS, "triton"), **picked}
    assert cuda_module.DEFAULT_BACKEND["activation_forward"] == cuda  # this process runs it from now on

    # another bench's op joins the record; the ops it did not measure keep their entries
    bench.h.record_backend_choice({"feedback_project": {"triton_ms": 5.0, "cuda_ms": 4.0, "cases": 4}},
                                  rule="r", command="python bench/feedback.py --pick-backends",
                                  device=bench.torch.device("cpu"))
    record = json.loads(path.read_text())
    assert record["defaults"] == {**picked, "feedback_project": "cuda"}
    assert set(record["evidence"]) == {"activation_forward", "gated_backward", "feedback_project"}
    assert record["evidence"]["activation_forward"]["picked_by"] == "python bench/activations.py --pick-backends"
    assert cuda_module.DEFAULT_BACKEND["feedback_project"] == cuda

    # a record of some ops only: the others stay on Triton
    path.write_text(json.dumps({"defaults": {"gated_backward": "cuda"}}))
    assert cuda_module.read_default_backends() == {**dict.fromkeys(cuda_module.CHOSEN_OPS, "triton"),
                                                   "gated_backward": "cuda"}
    # the C++ kernels were told the picks above: tell them the real file's again
    monkeypatch.undo()
    cuda_module.reload_default_backends()


@pytest.mark.skipif(not torch.cuda.is_available() or not mk.ops._C.with_cuda,
                    reason="needs a GPU and memkernels._C's CUDA C++ kernels")
def test_default_cuda_cpp_calls_run_without_python(cuda_module, monkeypatch):
    """The ops' CUDA kernels in C++ (csrc/cuda/dispatch.cpp) run CUDA C++ themselves where it is the
    default and covers the activation, and hand every other call to the Python kernel."""
    calls = []

    def counting_kernel(op):
        kernel = cuda_module._kernel(op)

        def run(*args):
            calls.append(op)
            return kernel(*args)
        return run

    watched = ("activation_forward", "activation_backward")
    try:
        for op in watched:
            mk.ops._C.set_python_kernel(op, counting_kernel(op))
            monkeypatch.setitem(cuda_module.DEFAULT_BACKEND, op, "cuda")
        cuda_module.publish_defaults()
        monkeypatch.delenv("MEMKERNELS_BACKEND", raising=False)
        x = torch.randn(100, device="cuda", requires_grad=True)
        mk.functional.gelu(x, bits=3).sum().backward()
        assert calls == []
        mk.functional.tanh(x, bits=3).sum().backward()  # no CUDA C++ Tanh forward; every backward
        assert calls == ["activation_forward"]
        calls.clear()
        monkeypatch.setenv("MEMKERNELS_BACKEND", "cuda")  # the environment's choice: Python decides
        mk.functional.gelu(x, bits=3).sum().backward()
        assert calls == ["activation_forward", "activation_backward"]
    finally:
        for op in watched:
            mk.ops._C.set_python_kernel(op, cuda_module._kernel(op))
        monkeypatch.undo()
        cuda_module.publish_defaults()


@pytest.mark.parametrize("text, why", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "no \"defaults\""),
    ('{"defaults": ["cuda"]}', "no \"defaults\""),
    ('{"defaults": {"pack_bits": "cuda"}}', "unknown op.*pack_bits"),
    ('{"defaults": {"gated_forward": "hip"}}', "unknown backend.*hip"),
])
def test_malformed_choice_fails_naming_the_file(cuda_module, tmp_path, monkeypatch, text, why):
    path = tmp_path / "cuda_backends.json"
    path.write_text(text)
    monkeypatch.setattr(cuda_module, "BACKENDS_FILE", path)
    with pytest.raises(RuntimeError, match=why) as error:
        cuda_module.read_default_backends()
    assert str(path) in str(error.value) and "--pick-backends" in str(error.value)


def test_a_build_without_cuda_kernels_runs_triton(cuda_module):
    picked = {"activation_forward": "cuda", "activation_backward": "triton"}
    assert cuda_module.runnable_defaults(picked, with_cuda=True) == picked
    assert cuda_module.runnable_defaults(picked, with_cuda=False) == dict.fromkeys(picked, "triton")
    if not mk.ops._C.with_cuda:
        assert set(cuda_module.DEFAULT_BACKEND.values()) == {"triton"}
