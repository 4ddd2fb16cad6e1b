"""The benchmarks run end to end and report what they measured; their shared harness.

Nothing here asserts a timing: only that every row, column and file is there and that the kept
bytes the bench reports are the ones memkernels.profile.saved_bytes measures.
"""
from __future__ import annotations

import collections
import csv
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
QUICK_SIZES = (4096, 65536)  # what --quick runs: 4K, 64K
TIME_COLUMNS = [f"{who}_{mode}_ms" for who in ("mk", "eager", "compile") for mode in ("fwd", "bwd", "fwdbwd")]
RATIO_COLUMNS = [f"{mode}_mk_over_{base}" for mode in ("fwd", "bwd", "fwdbwd") for base in ("eager", "compile")]
BYTE_COLUMNS = ["eager_saved_bytes", "compile_saved_bytes", "mk_saved_bytes", "saved_eager_over_mk",
                "saved_compile_over_mk"]


@pytest.fixture
def bench_module(monkeypatch):
    """Import a bench script as the CLI would run it: its folder (for _harness) on sys.path."""
    monkeypatch.syspath_prepend(str(BENCH))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module

    return load


def read_results(out: Path) -> tuple[list[dict], str, Path]:
    (csv_path,) = out.glob("activations_cpu_*.csv")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, csv_path.with_suffix(".md").read_text(), csv_path.with_suffix(".png")


def test_activations_quick_reports_every_case(tmp_path, bench_module):
    out = tmp_path / "results"
    # One thread: on a busy 2-core machine a second OpenMP thread waits for a core, not for work.
    command = [sys.executable, "bench/activations.py", "--quick", "--no-compile", "--device", "cpu",
               "--threads", "1", "--out", str(out)]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True, timeout=300)
    rows, markdown, png = read_results(out)
    activations = list(bench_module("activations").CASES)

    expected = {(a, d, n, b) for a in activations for d in ("fp32", "bf16") for n in QUICK_SIZES for b in ("none", "3")}
    assert len(rows) == len(expected)
    assert {(r["activation"], r["dtype"], int(r["numel"]), r["bits"]) for r in rows} == expected
    for column in TIME_COLUMNS + RATIO_COLUMNS + BYTE_COLUMNS + ["input_mb", "compile_error", "device", "repeats"]:
        assert column in rows[0], column
    assert {r["backend"] for r in rows} == {"cpu"}  # one row a case: the CUDA backends are not timed on CPU
    for row in rows:
        for mode in ("fwd", "bwd", "fwdbwd"):
            mk_ms, eager_ms = float(row[f"mk_{mode}_ms"]), float(row[f"eager_{mode}_ms"])
            assert mk_ms > 0 and eager_ms > 0
            assert math.isclose(float(row[f"{mode}_mk_over_eager"]), mk_ms / eager_ms, rel_tol=1e-2, abs_tol=2e-3)
        assert row["compile_fwdbwd_ms"] == row["fwdbwd_mk_over_compile"] == row["compile_saved_bytes"] == ""
        if row["bits"] == "3":  # a 3-bit code keeps less than any PyTorch activation does
            assert int(row["mk_saved_bytes"]) < int(row["eager_saved_bytes"]), row

    # bf16 GELU keeps x (2 bytes an element) in PyTorch; 3 bits an element packed: a 16/3 reduction.
    for n in QUICK_SIZES:
        (gelu3,) = [r for r in rows if (r["activation"], r["dtype"], int(r["numel"]), r["bits"]) == ("gelu", "bf16", n, "3")]
        assert int(gelu3["eager_saved_bytes"]) == 2 * n
        assert int(gelu3["mk_saved_bytes"]) == math.ceil(n / 8) * 3
        assert float(gelu3["saved_eager_over_mk"]) == round(16 / 3, 3)
        (gelu_exact,) = [r for r in rows if (r["activation"], r["dtype"], int(r["numel"]), r["bits"]) == ("gelu", "bf16", n, "none")]
        assert int(gelu_exact["mk_saved_bytes"]) == 2 * n  # f'(x) in bf16
        assert float(gelu_exact["saved_eager_over_mk"]) == 1.0

    for header in ("- device: ", "- date: ", "- torch ", "- memkernels ", "- command: `python"):
        assert header in markdown, header
    assert "--quick --no-compile --device cpu --threads 1" in markdown
    assert "cross 32 MB: none" in markdown
    assert "retain_graph=True" in markdown  # how backward alone was timed
    assert "| bits | backend |" in markdown
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table) == 2 + len(rows)  # header, rule, one line a row
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_activations_compile_baseline(tmp_path, bench_module):
    """The torch.compile baseline is timed and its kept bytes measured (one tiny case)."""
    activations = bench_module("activations")
    out = tmp_path / "results"
    activations.main(["--quick", "--device", "cpu", "--activations", "gelu", "--dtypes", "fp32",
                      "--sizes", "4096", "--bits", "3", "--threads", "1", "--out", str(out)])
    (row,), markdown, _ = read_results(out)
    assert row["compile_error"] == ""
    assert float(row["compile_fwdbwd_ms"]) > 0 and row["fwdbwd_mk_over_compile"] != ""
    assert int(row["compile_saved_bytes"]) == 4 * 4096  # inductor keeps x, fp32
    assert float(row["saved_compile_over_mk"]) == round(4 * 4096 / (4096 // 8 * 3), 3)
    assert "fwd+bwd mk/compile" in markdown


def test_activations_records_a_failing_compile(tmp_path, bench_module, monkeypatch):
    """A torch.compile that fails (no C++ compiler, say) is recorded, not fatal."""
    activations = bench_module("activations")

    def failing_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("no working C++ compiler\nsecond line")
        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    out = tmp_path / "results"
    activations.main(["--quick", "--device", "cpu", "--activations", "relu,swiglu", "--dtypes", "bf16",
                      "--sizes", "64", "--threads", "1", "--out", str(out)])
    rows, markdown, png = read_results(out)
    assert len(rows) == 4
    for row in rows:
        assert row["compile_error"] == "RuntimeError: no working C++ compiler"
        assert row["compile_fwd_ms"] == row["fwd_mk_over_compile"] == ""
        assert float(row["mk_fwdbwd_ms"]) > 0
    assert "torch.compile failed for relu bf16: `RuntimeError: no working C++ compiler`" in markdown
    assert png.exists()


def test_activations_append_fills_in_the_backend_of_older_rows(tmp_path, bench_module):
    """--append into a result written before the backend column: the old rows are the same cases."""
    activations = bench_module("activations")
    out = tmp_path / "results"
    args = ["--quick", "--no-compile", "--device", "cpu", "--activations", "relu", "--dtypes", "fp32",
            "--bits", "none", "--threads", "1", "--out", str(out)]
    activations.main([*args, "--sizes", "64,128"])
    (csv_path,) = out.glob("activations_cpu_*.csv")
    old = activations.h.read_csv(csv_path)
    activations.h.write_csv([{k: v for k, v in r.items() if k != "backend"} for r in old], csv_path)

    activations.main([*args, "--sizes", "128,256", "--append"])
    rows, _, _ = read_results(out)
    assert [(int(r["numel"]), r["backend"]) for r in rows] == [(64, "cpu"), (128, "cpu"), (256, "cpu")]


def test_harness_parsing_and_files(tmp_path, bench_module):
    h = bench_module("_harness")
    assert h.parse_sizes("4K,1M, 4097,2g") == [4096, 2**20, 4097, 2 * 2**30]
    with pytest.raises(ValueError, match="1.5M"):
        h.parse_sizes("1.5M")
    with pytest.raises(ValueError, match="fp8"):
        h.parse_dtypes("fp32,fp8")
    assert [h.size_label(n) for n in (4096, 2**24, 4097, 3 * 2**30)] == ["4K", "16M", "4097", "3G"]
    assert h.ratio(1.0, 3.0) == 0.333 and h.ratio(None, 1.0) is None and h.ratio(1.0, 0) is None
    assert h.error_summary(ValueError("first\nsecond")) == "ValueError: first"

    timing = h.time_ms(lambda: torch.ones(10).sum(), torch.device("cpu"), warmup=1, repeats=7)
    assert timing.repeats == 7 and 0 < timing.q20_ms <= timing.median_ms <= timing.q80_ms

    rows = [{"name": "a", "value": 1.5}, {"name": "b", "value": None, "extra": 2}]
    h.write_csv(rows, tmp_path / "r.csv")
    with open(tmp_path / "r.csv", newline="") as f:
        assert list(csv.DictReader(f)) == [{"name": "a", "value": "1.5", "extra": ""},
                                           {"name": "b", "value": "", "extra": "2"}]
    table = h.markdown_table(rows, [h.Column("name", "Name"), h.Column("value", "Value", "{:.2f}")])
    assert table.splitlines() == ["| Name | Value |", "| --- | --- |", "| a | 1.50 |", "| b | – |"]

    # --append: a later run's rows replace the same cases and add new ones after the old
    old = h.read_csv(tmp_path / "r.csv")
    assert old == [{"name": "a", "value": 1.5, "extra": None}, {"name": "b", "value": None, "extra": 2}]
    merged = h.merge_rows(old, [{"name": "c", "value": 3}, {"name": "a", "value": 4}], key=("name",))
    assert [(r["name"], r["value"]) for r in merged] == [("a", 4), ("b", None), ("c", 3)]


def test_saved_input_bytes_splits_inputs_from_new_tensors(bench_module):
    h = bench_module("_harness")
    a = torch.randn(100, requires_grad=True)
    b = torch.randn(100, requires_grad=True)
    # mul keeps both inputs; sigmoid keeps its (new) output
    assert h.saved_input_bytes(lambda a, b: a * b, a, b) == 800
    assert h.saved_input_bytes(lambda a, b: torch.sigmoid(a) + b, a, b) == 0


def test_device_time_is_measured_on_cuda_only(bench_module):
    # Kernel time comes from the CUDA trace of torch.profiler; on CPU there is none to read.
    h = bench_module("_harness")
    for measure in (h.device_activity, h.device_ms_per_call):
        with pytest.raises(ValueError, match="must be a CUDA device, got cpu"):
            measure(lambda: None, torch.device("cpu"), calls=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_activity_lists_each_kernel_once(bench_module):
    # Three calls of one copy each: three copies in the trace, not also the CPU ops' view of them.
    h = bench_module("_harness")
    device = torch.device("cuda")
    src = torch.ones(2**20, device=device)
    dst = torch.empty_like(src)
    activity = h.device_activity(lambda: dst.copy_(src), device, calls=3)
    assert len(activity) == 3 and all(us > 0 for _, us in activity)


def test_feedback_quick_reports_every_section(tmp_path):
    out = tmp_path / "results"
    command = [sys.executable, "bench/feedback.py", "--quick", "--device", "cpu", "--threads", "1", "--out", str(out)]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True, timeout=300)
    (csv_path,) = out.glob("feedback_cpu_*.csv")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    rules = ("bp", "fa", "dfa", "memdfa")
    accuracy = [r for r in rows if r["section"] == "accuracy"]
    assert {(r["model"], r["rule"]) for r in accuracy} == {(m, r) for m in ("mlp 1x256 tanh", "mlp 3x256 tanh",
                                                                          "cnn 2 conv") for r in rules}
    assert all(0 <= float(r["test_accuracy"]) <= 100 for r in accuracy)
    memory = {(r["rule"], int(r["depth"])): r for r in rows if r["section"] == "memory"}
    assert set(memory) == {(r, d) for r in rules for d in (2, 4, 8)}
    assert all(int(r["feedback_bytes_kept"]) == 0 for r in memory.values())
    assert int(memory["memdfa", 8]["kept_bytes"]) == int(memory["memdfa", 4]["kept_bytes"])
    assert int(memory["bp", 8]["kept_bytes"]) > 1.5 * int(memory["bp", 4]["kept_bytes"])
    speed = [r for r in rows if r["section"] == "speed"]
    assert len(speed) == 2 and all(float(r["fused_ms"]) > 0 and r["speedup_vs_materialise"] for r in speed)
    markdown = csv_path.with_suffix(".md").read_text()
    for header in ("- device: ", "- date: ", "- command: `python", "## Accuracy", "## Memory", "## Speed"):
        assert header in markdown, header
    assert csv_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_host_overhead_reports_every_call(tmp_path):
    out = tmp_path / "results"
    command = [sys.executable, "bench/host_overhead.py", "--device", "cpu", "--calls", "5", "--repeats", "2",
               "--out", str(out)]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True, timeout=300)
    (csv_path,) = out.glob("host_overhead_cpu_*.csv")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    expected = [(a, b, "cpu", c) for a in ("gelu", "silu", "swiglu") for b in ("none", "3")
                for c in ("fwd no_grad", "fwd", "fwd+bwd")]
    assert [(r["activation"], r["bits"], r["backend"], r["call"]) for r in rows] == expected
    for r in rows:
        mk, eager = float(r["mk_us"]), float(r["eager_us"])
        assert mk > 0 and eager > 0 and abs(float(r["mk_over_eager"]) - mk / eager) <= 5e-4  # 3 decimals
    markdown = csv_path.with_suffix(".md").read_text()
    for header in ("- device: ", "- date: ", "- command: `python", "| mk / eager |"):
        assert header in markdown, header


def test_harness_runs_forward_and_backward_in_each_functions_context(bench_module):
    # The activations bench selects a CUDA backend per variant with MEMKERNELS_BACKEND; its backward
    # kernels must run under the same setting as its forward, inside the timed calls.
    h = bench_module("_harness")
    active = []  # the context each call ran in, forward and backward alike
    seen = {"a": set(), "b": set()}

    class Record(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, name):
            ctx.name = name
            seen[name].add(("forward", active[-1] if active else None))
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            seen[ctx.name].add(("backward", active[-1] if active else None))
            return grad * 2, None

    class Context:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            active.append(self.name)

        def __exit__(self, *exc):
            active.pop()

    x = torch.randn(8, requires_grad=True)
    timings = h.time_forward_backward({"a": lambda t: Record.apply(t, "a"), "b": lambda t: Record.apply(t, "b")},
                                      [x], torch.device("cpu"), warmup=1, repeats=3,
                                      contexts={"a": lambda: Context("a")})
    assert seen["a"] == {("forward", "a"), ("backward", "a")}
    assert seen["b"] == {("forward", None), ("backward", None)}
    assert set(timings) == {"a", "b"} and all(t["fwdbwd"].repeats == 3 for t in timings.values())


@pytest.mark.parametrize("n", range(1, 8))
def test_turn_orders_are_balanced(bench_module, n):
    """Each function runs once a turn, and over a full design every one holds every position and
    directly follows every other equally often (n orders for even n, 2n for odd)."""
    h = bench_module("_harness")
    rows = 2 * n if n % 2 else n
    orders = h.turn_orders(n, 3 * rows + 1)
    assert all(sorted(order) == list(range(n)) for order in orders)
    assert orders[rows:2 * rows] == orders[:rows] and orders[-1] == orders[0]  # the design repeats
    follows = collections.Counter((o[i], o[i + 1]) for o in orders[:rows] for i in range(n - 1))
    assert len(follows) == n * (n - 1) and len(set(follows.values())) <= 1
    positions = collections.Counter((o[i], i) for o in orders[:rows] for i in range(n))
    assert len(positions) == n * n and len(set(positions.values())) == 1


def test_interleaved_timing_follows_the_turn_orders(bench_module):
    h = bench_module("_harness")
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    h.time_ms_interleaved(fns, torch.device("cpu"), warmup=1, repeats=6)
    timed = calls[3:]  # after one warm-up call each
    expected = [["abc"[i] for i in order] for order in h.turn_orders(3, 6)]
    assert timed == [name for order in expected for name in order]
