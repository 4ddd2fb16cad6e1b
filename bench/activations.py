"""Fused activations of memkernels against PyTorch eager and torch.compile: time and kept bytes.

For each activation, dtype, size and `bits`, times forward, backward and forward+backward of
``memkernels.functional.<activation>`` and of the PyTorch activation (eager, and torch.compile'd
with dynamic=False) in the same run, and measures with ``memkernels.profile.saved_bytes`` the bytes
each keeps for backward. Ratios are mk / baseline for time (below 1: mk is faster) and
baseline / mk for bytes (above 1: mk keeps less). On CUDA it also reports each mk kernel's achieved
bandwidth as a share of the measured copy bandwidth.

On CUDA, the activations that both CUDA backends of memkernels cover (gelu, gelu_tanh, silu,
swiglu, geglu) are timed once per backend, Triton and CUDA C++ (the latter where memkernels._C was
built with CUDA), with MEMKERNELS_BACKEND set for each; the `backend` column names it ("cpu" on
CPU). ``--pick-backends`` then picks each op's default backend from those rows and writes it to
memkernels/ops/cuda_backends.json, which memkernels.ops._cuda reads at import (see pick_backends).

    python bench/activations.py                         # all activations, default sizes
    python bench/activations.py --dtypes bf16 --activations gelu,swiglu --bits none,1,3
    python bench/activations.py --dtypes fp32 --append  # split a long run; rows merge into one result
    python bench/activations.py --quick --no-compile    # smoke test
    python bench/activations.py --device cpu --threads 1  # a busy CPU: no thread waits for a core
    python bench/activations.py --pick-backends         # on a GPU: measure, then record the defaults

Writes bench/results/activations_<device tag>.{csv,md,png} (--out changes the folder).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch._functorch.config
import torch.nn.functional as F

import _harness as h  # also puts the repository root on sys.path

import memkernels.functional as mkf
import memkernels.profile as mkp

# Bandwidth is reported where one input tensor is at least this large: smaller tensors sit in
# the L2 cache across repeats (50 MB on an H100) and launch overhead weighs in.
BANDWIDTH_MIN_BYTES = 64 * 2**20

# The activations whose ops both CUDA backends run (memkernels.ops._cuda: CUDA C++ covers GELU,
# GELU_TANH and SILU forward and backward from x, every gate, every backward from what forward
# kept), so their rows compare the two.
BACKEND_CASES = ("gelu", "gelu_tanh", "silu", "swiglu", "geglu")
# --pick-backends: op -> (the activations whose rows decide it, the time column that does, which
# rows: "coded", "exact" or "all"). On CUDA the exact single-input activations keep x: they run
# activation_value (activation_forward's backend) and activation_backward_from_input, so coded
# rows decide activation_forward and activation_backward, exact rows the backward from x.
PICK_RULES = {
    "activation_forward": (("gelu", "gelu_tanh", "silu"), "mk_fwd_ms", "coded"),
    "activation_backward": (("gelu", "gelu_tanh", "silu"), "mk_bwd_ms", "coded"),
    "activation_backward_from_input": (("gelu", "gelu_tanh", "silu"), "mk_bwd_ms", "exact"),
    "gated_forward": (("swiglu", "geglu"), "mk_fwd_ms", "all"),
    "gated_backward": (("swiglu", "geglu"), "mk_bwd_ms", "all"),
}
# Only sizes this large decide: there the kernels' memory traffic, not the launch, takes the time.
PICK_MIN_NUMEL = 16 * 2**20
PICK_RULE = (f"the backend with the smaller summed median time over the cases of {h.size_label(PICK_MIN_NUMEL)} "
             "elements or more measured under both (coded rows for activation_forward and "
             "activation_backward, exact rows for activation_backward_from_input); a tie goes to triton")
CASE_KEY = ("activation", "dtype", "numel", "bits", "backend")  # what tells rows apart (--append)


# The PyTorch baselines, one function each: torch.compile caches its graphs per code object, so a
# shared wrapper would make every activation count against one recompile limit.
def torch_gelu(x): return F.gelu(x)
def torch_gelu_tanh(x): return F.gelu(x, approximate="tanh")
def torch_silu(x): return F.silu(x)
def torch_mish(x): return F.mish(x)
def torch_softplus(x): return F.softplus(x)
def torch_elu(x): return F.elu(x)
def torch_selu(x): return F.selu(x)
def torch_celu(x): return F.celu(x)
def torch_leaky_relu(x): return F.leaky_relu(x)
def torch_relu(x): return F.relu(x)
def torch_sigmoid(x): return torch.sigmoid(x)
def torch_tanh(x): return torch.tanh(x)
def torch_hardswish(x): return F.hardswish(x)
def torch_hardsigmoid(x): return F.hardsigmoid(x)
def torch_swiglu(a, b): return F.silu(a) * b
def torch_geglu(a, b): return F.gelu(a) * b


@dataclass(frozen=True)
class Case:
    """An activation: its PyTorch baseline and the memkernels.functional function (+ kwargs)."""

    name: str
    baseline: Callable[..., torch.Tensor]
    mk_name: str
    mk_kwargs: dict = field(default_factory=dict)
    num_inputs: int = 1  # 2 for gated units y = f(a) * b, a and b each of `numel` elements

    def mk_fn(self, bits: int | None) -> Callable[..., torch.Tensor]:
        return functools.partial(getattr(mkf, self.mk_name), **self.mk_kwargs, bits=bits)


CASES = {
    case.name: case
    for case in [
        Case("gelu", torch_gelu, "gelu"),
        Case("gelu_tanh", torch_gelu_tanh, "gelu", {"approximate": "tanh"}),
        Case("silu", torch_silu, "silu"),
        Case("mish", torch_mish, "mish"),
        Case("softplus", torch_softplus, "softplus"),
        Case("elu", torch_elu, "elu"),
        Case("selu", torch_selu, "selu"),
        Case("celu", torch_celu, "celu"),
        Case("leaky_relu", torch_leaky_relu, "leaky_relu"),
        Case("relu", torch_relu, "relu"),
        Case("sigmoid", torch_sigmoid, "sigmoid"),
        Case("tanh", torch_tanh, "tanh"),
        Case("hardswish", torch_hardswish, "hardswish"),
        Case("hardsigmoid", torch_hardsigmoid, "hardsigmoid"),
        Case("swiglu", torch_swiglu, "swiglu", num_inputs=2),
        Case("geglu", torch_geglu, "geglu", num_inputs=2),
    ]
}

MODES = ("fwd", "bwd", "fwdbwd")


def parse_bits(text: str) -> list[int | None]:
    """``"none,3"`` -> [None, 3]."""
    return [None if item.strip().lower() in ("none", "exact") else int(item) for item in text.split(",")]


def bits_label(bits: int | None) -> str | int:
    """The "bits" column: "none" (exact f'(x)) or the number of bits."""
    return "none" if bits is None else bits


def make_inputs(case: Case, numel: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    return [torch.randn(numel, dtype=dtype, device=device, requires_grad=True) for _ in range(case.num_inputs)]


def measure(fns: dict, contexts: dict, inputs, device, warmup, repeats) -> dict[str, dict]:
    """Times (ms) of the three modes and the bytes autograd keeps for backward, per function; the
    functions take turns call by call (h.time_forward_backward), each in its context if it has one."""
    timings = h.time_forward_backward(fns, inputs, device, warmup=warmup, repeats=repeats, contexts=contexts)
    results = {}
    for name, fn in fns.items():
        result = {mode: round(timings[name][mode].median_ms, 5) for mode in MODES}
        result["fwdbwd_q20"] = round(timings[name]["fwdbwd"].q20_ms, 5)
        result["fwdbwd_q80"] = round(timings[name]["fwdbwd"].q80_ms, 5)
        with contexts.get(name, contextlib.nullcontext)():
            result["saved_bytes"] = mkp.saved_bytes(fn, *inputs)
        results[name] = result
    return results


def bytes_moved(fn, inputs, saved_bytes: int) -> tuple[int, int]:
    """(forward, backward) memory traffic of a fused kernel, in bytes.

    Forward reads the inputs, writes y and whatever it keeps that is not an input; backward reads
    the incoming gradient and everything kept, and writes one gradient per input.
    """
    io_bytes = inputs[0].numel() * inputs[0].element_size()  # x, y and every gradient are this size
    new_saved = saved_bytes - h.saved_input_bytes(fn, *inputs)
    forward = len(inputs) * io_bytes + io_bytes + new_saved
    backward = io_bytes + saved_bytes + len(inputs) * io_bytes
    return forward, backward


def kernel_ms(fn, inputs, device, calls: int) -> tuple[float, float]:
    """(forward, backward) device time of `fn(*inputs)` in ms, kernels alone (h.device_ms_per_call):
    the forward recording autograd, the backward re-run on one retained graph."""
    wrt = [t for t in inputs if t.requires_grad]
    out = fn(*inputs)
    grad_out = torch.randn_like(out)
    forward = h.device_ms_per_call(lambda: fn(*inputs), device, calls=calls)
    backward = h.device_ms_per_call(lambda: torch.autograd.grad(out, wrt, grad_out, retain_graph=True), device,
                                    calls=calls)
    return forward, backward


def backends_to_time(case_name: str, device_type: str, with_cuda: bool) -> tuple[str, ...]:
    """The `backend` values of a case's rows: "cpu" on CPU; on CUDA "triton", and "cuda" too where
    the CUDA C++ kernels cover the case and were built (`with_cuda`)."""
    if device_type == "cpu":
        return ("cpu",)
    if case_name in BACKEND_CASES and with_cuda:
        return ("triton", "cuda")
    return ("triton",)


def run_case(case, dtype_name, numel, bits_list, backends, compiled, device, warmup, repeats, copy_gbps):
    """Rows (one per bits and backend) for one activation, dtype and size: the baselines and every
    memkernels variant timed together, taking turns call by call."""
    dtype = h.DTYPES[dtype_name]
    inputs = make_inputs(case, numel, dtype, device)
    fns = {"eager": case.baseline}
    compile_error = ""
    if compiled is not None:
        try:
            out = compiled(*inputs)  # compiles forward and backward for this size: a failure is
            torch.autograd.grad(out, [t for t in inputs if t.requires_grad], torch.ones_like(out))  # recorded
            fns["compile"] = compiled
        except Exception as error:  # recorded in the table: a missing compiler must not end the run
            compile_error = h.error_summary(error)
    variants = list(itertools.product(bits_list, backends))
    contexts = {}  # forward and backward of a memkernels variant run on its backend
    for bits, backend in variants:
        fns[("mk", bits, backend)] = case.mk_fn(bits)
        contexts[("mk", bits, backend)] = functools.partial(h.backend_selected, backend)
    measured = measure(fns, contexts, inputs, device, warmup, repeats)
    eager, compile_result = measured["eager"], measured.get("compile")
    input_bytes = numel * inputs[0].element_size()
    rows = []
    for bits, backend in variants:
        mk = measured[("mk", bits, backend)]
        if copy_gbps is not None and input_bytes >= BANDWIDTH_MIN_BYTES:
            with h.backend_selected(backend):
                fwd_bytes, bwd_bytes = bytes_moved(case.mk_fn(bits), inputs, mk["saved_bytes"])
                fwd_kernel_ms, bwd_kernel_ms = kernel_ms(case.mk_fn(bits), inputs, device, repeats)
        row = {
            "activation": case.name,
            "dtype": dtype_name,
            "numel": numel,
            "input_mb": round(input_bytes / 2**20, 3),
            "bits": bits_label(bits),
            "backend": backend,
        }
        for mode in (*MODES, "fwdbwd_q20", "fwdbwd_q80"):  # the quantiles show how noisy a median is
            row[f"mk_{mode}_ms"] = mk[mode]
            row[f"eager_{mode}_ms"] = eager[mode]
            row[f"compile_{mode}_ms"] = compile_result[mode] if compile_result else None
        for mode in MODES:
            row[f"{mode}_mk_over_eager"] = h.ratio(mk[mode], eager[mode])
            row[f"{mode}_mk_over_compile"] = h.ratio(mk[mode], compile_result[mode] if compile_result else None)
        row["eager_saved_bytes"] = eager["saved_bytes"]
        row["compile_saved_bytes"] = compile_result["saved_bytes"] if compile_result else None
        row["mk_saved_bytes"] = mk["saved_bytes"]
        row["saved_eager_over_mk"] = h.ratio(eager["saved_bytes"], mk["saved_bytes"])
        row["saved_compile_over_mk"] = h.ratio(row["compile_saved_bytes"], mk["saved_bytes"])
        if copy_gbps is not None and input_bytes >= BANDWIDTH_MIN_BYTES:
            fwd_gbps = fwd_bytes / (fwd_kernel_ms * 1e-3) / 1e9
            bwd_gbps = bwd_bytes / (bwd_kernel_ms * 1e-3) / 1e9
            row["mk_fwd_kernel_ms"] = round(fwd_kernel_ms, 5)
            row["mk_bwd_kernel_ms"] = round(bwd_kernel_ms, 5)
            row["mk_fwd_gbps"] = round(fwd_gbps, 1)
            row["mk_bwd_gbps"] = round(bwd_gbps, 1)
            row["mk_fwd_pct_copy_bw"] = round(100 * fwd_gbps / copy_gbps, 1)
            row["mk_bwd_pct_copy_bw"] = round(100 * bwd_gbps / copy_gbps, 1)
        row["compile_error"] = compile_error
        row["repeats"] = repeats
        rows.append(row)
    return rows


def parse_activations(text: str) -> list[str]:
    """``"all"`` or a comma list of CASES names -> the names."""
    names = list(CASES) if text == "all" else [n.strip() for n in text.split(",")]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown activation(s) {unknown}; known: {', '.join(CASES)}")
    return names


def run(args) -> list[dict]:
    """Measure every (dtype, activation, size, bits, backend) the arguments ask for; one row each."""
    device = torch.device(args.device)
    dtype_names = h.parse_dtypes(args.dtypes)
    sizes = h.resolve_sizes(args)
    warmup, repeats = h.resolve_repeats(args)
    h.apply_threads(args)
    if device.type == "cpu":
        h.steady_cpu_heap()
    names = parse_activations(args.activations)
    bits_list = parse_bits(args.bits)
    with_cuda = device.type == "cuda" and h.cuda_cpp_kernels_built()
    copy_gbps = h.copy_bandwidth_gbps(device) if device.type == "cuda" else None
    # dynamic=False compiles one graph per size; the cache is reset per (activation, dtype).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(sizes))
    run_info = {"device": h.device_name(device), "copy_bw_gbps": round(copy_gbps, 1) if copy_gbps else None,
                "threads": torch.get_num_threads() if device.type == "cpu" else None,
                "date": datetime.date.today().isoformat(), "command": args.command}

    rows = []
    # Backward is also timed alone, re-run on a retained graph; a compiled backward whose saved
    # tensors it may donate (overwrite) refuses retain_graph, so the baseline is compiled without.
    with torch._functorch.config.patch(donated_buffer=False):
        for dtype_name in dtype_names:
            for name in names:
                case = CASES[name]
                compiled = None
                if not args.no_compile:
                    torch._dynamo.reset()
                    compiled = torch.compile(case.baseline, dynamic=False)
                backends = backends_to_time(name, device.type, with_cuda)
                for numel in sizes:
                    for row in run_case(case, dtype_name, numel, bits_list, backends, compiled, device, warmup,
                                        repeats, copy_gbps):
                        row.update(run_info)
                        print(format_progress(row), flush=True)
                        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ --pick-backends


def pick_backends(rows: list[dict]) -> tuple[dict[str, str], dict[str, dict]]:
    """Per op of PICK_RULES, the CUDA backend with the smaller total time: (defaults, evidence).

    An op's total sums its time column over its activations' rows of PICK_MIN_NUMEL elements or
    more (those of its rule's kind: coded, exact or all), counting only the cases (activation, dtype, size,
    bits) measured under both backends, so both totals are over the same work. A tie goes to
    Triton (it covers every op). An op with no such case is left out of both dicts.
    evidence[op] = {"triton_ms", "cuda_ms", "cases"}.
    """
    defaults, evidence = {}, {}
    for op, (activations, time_column, kind) in PICK_RULES.items():
        times: dict[tuple, dict[str, float]] = {}
        for row in rows:
            exact = row["bits"] == "none"
            if (row["activation"] in activations and row["numel"] >= PICK_MIN_NUMEL
                    and kind in ("all", "exact" if exact else "coded")
                    and row.get("backend") in ("triton", "cuda") and row.get(time_column) is not None):
                case = tuple(row[k] for k in CASE_KEY if k != "backend")
                times.setdefault(case, {})[row["backend"]] = row[time_column]
        paired = [t for t in times.values() if len(t) == 2]
        if not paired:
            continue
        totals = {backend: round(sum(t[backend] for t in paired), 5) for backend in ("triton", "cuda")}
        evidence[op] = {"triton_ms": totals["triton"], "cuda_ms": totals["cuda"], "cases": len(paired)}
        defaults[op] = h.faster_backend(evidence[op])
    return defaults, evidence


def check_can_pick(args) -> None:
    """Stop before measuring when --pick-backends could not pick every op from this run."""
    h.check_can_pick_backends(torch.device(args.device))
    if not any(n >= PICK_MIN_NUMEL for n in h.resolve_sizes(args)):
        raise SystemExit(f"--pick-backends decides from sizes of {h.size_label(PICK_MIN_NUMEL)} elements or "
                         "more; --sizes (or --quick) has none")
    names = parse_activations(args.activations)
    kinds = {"all"} | {"exact" if b is None else "coded" for b in parse_bits(args.bits)}
    undecidable = [op for op, (activations, _, kind) in PICK_RULES.items()
                   if not set(activations) & set(names) or kind not in kinds]
    if undecidable and not args.append:
        raise SystemExit(f"--pick-backends: no case measured decides {undecidable}; --activations must include "
                         f"one of each of {[list(a) for a, _, _ in PICK_RULES.values()]} and --bits none and "
                         "a number of bits")


def format_progress(row: dict) -> str:
    def show(value):
        return "–" if value is None else f"{value:.2f}"

    return (f"{row['activation']:>11} {row['dtype']:>4} {h.size_label(row['numel']):>5} bits={row['bits']:<4} "
            f"{row['backend']:>6} "
            f"fwd+bwd mk/eager {show(row['fwdbwd_mk_over_eager'])} mk/compile {show(row['fwdbwd_mk_over_compile'])}  "
            f"kept bytes eager/mk {show(row['saved_eager_over_mk'])}")


def markdown_columns(with_bandwidth: bool) -> list[h.Column]:
    columns = [
        h.Column("activation", "activation"),
        h.Column("dtype", "dtype"),
        h.Column("numel", "elements", "{:,}"),
        h.Column("input_mb", "MB/tensor", "{:g}"),
        h.Column("bits", "bits"),
        h.Column("backend", "backend"),
        h.Column("mk_fwdbwd_ms", "mk fwd+bwd ms", "{:.3f}"),
        h.Column("fwd_mk_over_eager", "fwd mk/eager", "{:.2f}"),
        h.Column("bwd_mk_over_eager", "bwd mk/eager", "{:.2f}"),
        h.Column("fwdbwd_mk_over_eager", "fwd+bwd mk/eager", "{:.2f}"),
        h.Column("fwd_mk_over_compile", "fwd mk/compile", "{:.2f}"),
        h.Column("bwd_mk_over_compile", "bwd mk/compile", "{:.2f}"),
        h.Column("fwdbwd_mk_over_compile", "fwd+bwd mk/compile", "{:.2f}"),
        h.Column("eager_saved_bytes", "kept B eager", "{:,}"),
        h.Column("compile_saved_bytes", "kept B compile", "{:,}"),
        h.Column("mk_saved_bytes", "kept B mk", "{:,}"),
        h.Column("saved_eager_over_mk", "kept eager/mk", "{:.3f}"),
    ]
    if with_bandwidth:
        columns += [h.Column("mk_fwd_kernel_ms", "fwd kernel ms", "{:.3f}"),
                    h.Column("mk_bwd_kernel_ms", "bwd kernel ms", "{:.3f}"),
                    h.Column("mk_fwd_pct_copy_bw", "fwd % copy BW", "{:.0f}"),
                    h.Column("mk_bwd_pct_copy_bw", "bwd % copy BW", "{:.0f}")]
    return columns


def notes(rows: list[dict], device: torch.device) -> list[str]:
    """What the table means and how it was measured, read off the rows themselves."""
    compiled = any(r["compile_fwdbwd_ms"] is not None or r["compile_error"] for r in rows)
    lines = [
        "Time ratios are mk / baseline (below 1: mk is faster); kept-bytes ratios are baseline / mk "
        "(above 1: mk keeps less). Times are medians of per-call timings "
        + ("(CUDA events)" if device.type == "cuda" else "(time.perf_counter)") + "; " + h.BACKWARD_METHOD + ".",
        "Kept bytes: memkernels.profile.saved_bytes, what autograd holds for backward after the forward "
        "(measured, not computed). Gated units (swiglu, geglu) take a and b of `elements` each. "
        "bits = none keeps f'(x) exactly; bits = k keeps a packed k-bit code.",
        "torch.compile baseline: torch.compile(f, dynamic=False) of the PyTorch activation, compiled once per "
        "(activation, dtype) (one graph per size), without donated buffers (which forbid re-running a "
        "backward on a retained graph), warmed up before timing"
        + ("." if compiled else " — skipped (--no-compile)."),
    ]
    if device.type == "cpu":
        cases = dict.fromkeys((r["numel"], r["dtype"]) for r in rows)
        crossing = [f"{h.size_label(n)} {d} ({n * h.DTYPES[d].itemsize / 2**20:g} MB)"
                    for n, d in cases if n * h.DTYPES[d].itemsize >= h.CPU_MMAP_THRESHOLD_BYTES]
        lines.append(
            "On CPU, glibc serves every allocation of 32 MB or more with fresh pages, so page faults weigh on "
            "elementwise kernels there. Sizes whose tensors (input, output, gradient) cross 32 MB: "
            + (", ".join(crossing) if crossing else "none") + "; all other sizes stay below it. "
            + h.STEADY_HEAP_NOTE + ". Both sides take their outputs from torch's CPU allocator, pages of "
            + ("transparent huge pages asked for (THP_MEM_ALLOC_ENABLE=1)"
               if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" else
               "4 KB (torch's THP_MEM_ALLOC_ENABLE unset)")
            + "; memkernels' kernels fill an output's fresh pages a task's range at a time with one "
            "madvise(MADV_POPULATE_WRITE), where torch's stores fault them in one by one."
        )
    if device.type == "cuda":
        lines.append(
            f"backend: which CUDA kernels ran the row's ops, MEMKERNELS_BACKEND set to it while it was measured. "
            f"{', '.join(BACKEND_CASES)} are timed under each backend built (triton; cuda = CUDA C++ where "
            "memkernels._C has it); the other activations run Triton only."
        )
    copy_gbps = [r["copy_bw_gbps"] for r in rows if r.get("copy_bw_gbps")]
    if copy_gbps:
        lines.append(
            f"Measured copy bandwidth (bytes read + written / time of a 1 GiB copy_): {copy_gbps[-1]:.0f} GB/s. "
            f"% copy BW is reported for tensors of {BANDWIDTH_MIN_BYTES // 2**20} MB or more, from the kernels' "
            "device time (torch.profiler's CUDA trace: the kernels, copies and fills of one call, summed; host "
            "time excluded, unlike the per-call times of the ratios): forward moves the inputs, y and the newly "
            "kept tensors; backward the incoming gradient, everything kept and the input gradients."
        )
    failures = dict.fromkeys((r["activation"], r["dtype"], r["compile_error"]) for r in rows if r["compile_error"])
    for activation, dtype_name, error in failures:
        lines.append(f"torch.compile failed for {activation} {dtype_name}: `{error}`")
    return lines


def write_results(rows: list[dict], device: torch.device, out: Path) -> Path:
    """The .csv, .md and .png of `rows`; returns their common path without suffix."""
    base = out / f"activations_{h.device_tag(device)}"
    h.write_csv(rows, base.with_suffix(".csv"))
    h.write_markdown(
        base.with_suffix(".md"),
        "Fused activations: memkernels vs PyTorch eager and torch.compile",
        h.environment_lines(device, list(dict.fromkeys(r["command"] for r in rows))),
        notes(rows, device) + [h.markdown_table(rows, markdown_columns(any(r.get("copy_bw_gbps") for r in rows)))],
    )
    panels = []
    for dtype_name in dict.fromkeys(r["dtype"] for r in rows):
        for baseline in ("eager", "compile"):
            y = f"fwdbwd_mk_over_{baseline}"
            if any(r[y] is not None for r in rows if r["dtype"] == dtype_name):
                panels.append(h.Panel(f"{dtype_name}: fwd+bwd time, mk / {baseline}",
                                      lambda r, d=dtype_name: r["dtype"] == d, y))
    h.plot_lines(
        rows, base.with_suffix(".png"), x="numel", panels=panels,
        line=lambda r: f"{r['activation']} bits={r['bits']}" + ("" if r["backend"] == "cpu" else f" {r['backend']}"),
        color=lambda r: r["activation"],
        dashed=lambda r: r["bits"] != "none",
        title=f"memkernels activations on {h.device_name(device)}: time ratio, below 1 = mk faster "
              "(solid: exact f', dashed: k-bit code)",
        xlabel="elements per tensor", ylabel="time ratio (log)", reference_y=1.0, logy=True,
    )
    return base


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    h.add_common_arguments(parser, cpu_sizes="1M,4M,16M", cuda_sizes="1M,4M,16M,64M,256M",
                           quick_sizes="4K,64K", dtypes="fp32,bf16")
    parser.add_argument("--activations", default="all", help=f"comma list of {', '.join(CASES)} (default all)")
    parser.add_argument("--bits", default="none,3", help="comma list of none (exact f'(x)) and 1,2,3,4,8 "
                        "(default none,3)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--pick-backends", action="store_true",
                        help="CUDA only: after measuring, pick each op's default backend (triton or cuda) from "
                             f"the rows of {h.size_label(PICK_MIN_NUMEL)} elements or more (with --append, the "
                             "merged rows) and write memkernels/ops/cuda_backends.json")
    args = parser.parse_args(argv)
    args.command = h.command_line(None if argv is None else ["bench/activations.py", *argv])
    device = torch.device(args.device)
    if args.pick_backends:
        check_can_pick(args)
    rows = run(args)
    csv_path = (args.out / f"activations_{h.device_tag(device)}").with_suffix(".csv")
    if args.append and csv_path.exists():
        old_rows = h.read_csv(csv_path)
        # Rows written before the backend column: on CPU there was none to name; on CUDA it is
        # unknown, so they stay as rows of their own (and --pick-backends passes them over).
        for row in old_rows:
            row.setdefault("backend", "cpu" if device.type == "cpu" else None)
        rows = h.merge_rows(old_rows, rows, key=CASE_KEY)
    base = write_results(rows, device, args.out)
    print(f"wrote {base}.csv, .md, .png")
    if args.pick_backends:
        record_backend_choice(rows, args.command, device)


def record_backend_choice(rows: list[dict], command: str, device: torch.device) -> None:
    """pick_backends(rows), recorded where memkernels.ops._cuda reads it (h.record_backend_choice)."""
    _, evidence = pick_backends(rows)
    undecided = [op for op in PICK_RULES if op not in evidence]
    if undecided:
        raise SystemExit(f"--pick-backends: no case of {h.size_label(PICK_MIN_NUMEL)} elements or more was "
                         f"measured under both backends for {undecided}; cuda_backends.json left as it was")
    h.record_backend_choice(evidence, rule=PICK_RULE, command=command, device=device)


if __name__ == "__main__":
    main()
