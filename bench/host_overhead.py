"""Host time of a call: memkernels' fused activations against PyTorch eager, on tensors so small
that the device's work takes less than the host's.

A kernel library's call costs host time before its kernel runs: Python checks, autograd's
Function, the op's dispatch, the launcher. Where that exceeds the kernel's own time (on a GPU,
below some millions of elements) it is the time of the call. This bench measures it per call:
`--calls` calls in a row, timed together (perf_counter, the device synchronised before and after),
the median of `--repeats` such runs, eager and memkernels taking turns run by run.

For each activation (gelu, silu, swiglu) and bits (none, 3), on each backend (cpu; on CUDA triton
and, where memkernels._C has them, the CUDA C++ kernels):
  fwd no_grad  the forward under torch.no_grad(): the op and its thin wrapper
  fwd          the forward recording autograd (a Function's apply, what it saves)
  fwd+bwd      torch.autograd.grad of the forward's output: the backward's host time added

    python bench/host_overhead.py                 # CUDA when there is one, else CPU
    python bench/host_overhead.py --quick         # fewer calls, no result files

Writes bench/results/host_overhead_<device tag>.{csv,md}.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import _harness as h  # also puts the repository root on sys.path

import memkernels.functional as mkf

ACTIVATIONS = {
    # name: (eager, memkernels(bits)), taking one input (two for GATED)
    "gelu": (lambda x: F.gelu(x), lambda bits: lambda x: mkf.gelu(x, bits=bits)),
    "silu": (lambda x: F.silu(x), lambda bits: lambda x: mkf.silu(x, bits=bits)),
    "swiglu": (lambda a, b: F.silu(a) * b, lambda bits: lambda a, b: mkf.swiglu(a, b, bits=bits)),
}
GATED = ("swiglu",)
WHAT = ("fwd no_grad", "fwd", "fwd+bwd")


def host_us_per_call(fns: dict[str, callable], device: torch.device, *, calls: int,
                     repeats: int) -> dict[str, float]:
    """Median over `repeats` runs of (host seconds of `calls` calls of fn) / calls, in us; the
    functions take turns run by run (h.turn_orders)."""
    for fn in fns.values():  # warm-up: compiled kernels, allocator, caches
        for _ in range(max(10, calls // 10)):
            fn()
    names = list(fns)
    runs: dict[str, list[float]] = {name: [] for name in names}
    for order in h.turn_orders(len(names), repeats):
        for i in order:
            fn = fns[names[i]]
            h.synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            h.synchronize(device)
            runs[names[i]].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(times) for name, times in runs.items()}


def callables(fn, inputs: list[torch.Tensor]) -> dict[str, callable]:
    """The three calls of WHAT for fn(*inputs)."""
    grad_out = torch.ones_like(fn(*inputs))

    def no_grad():
        with torch.no_grad():
            return fn(*inputs)

    return {"fwd no_grad": no_grad, "fwd": lambda: fn(*inputs),
            "fwd+bwd": lambda: torch.autograd.grad(fn(*inputs), inputs, grad_out)}


def run(args) -> list[dict]:
    device = torch.device(args.device)
    rows = []
    for name, (eager, fused) in ACTIVATIONS.items():
        inputs = [torch.randn(args.numel, device=device, requires_grad=True)
                  for _ in range(2 if name in GATED else 1)]
        eager_calls = callables(eager, inputs)
        for bits in (None, 3):
            for backend in h.device_backends(device):
                with h.backend_selected(backend):
                    mk_calls = callables(fused(bits), inputs)
                    for what in WHAT:
                        us = host_us_per_call({"eager": eager_calls[what], "mk": mk_calls[what]}, device,
                                              calls=args.calls, repeats=args.repeats)
                        row = {"activation": name, "bits": "none" if bits is None else bits, "backend": backend,
                               "call": what, "numel": args.numel, "mk_us": us["mk"], "eager_us": us["eager"],
                               "mk_over_eager": h.ratio(us["mk"], us["eager"]), "calls": args.calls,
                               "repeats": args.repeats}
                        rows.append(row)
                        print(f"{name:>7} bits={row['bits']:<4} {backend:>6} {what:>11}: mk {us['mk']:7.1f} us, "
                              f"eager {us['eager']:7.1f} us", flush=True)
    return rows


COLUMNS = [h.Column("activation", "activation"), h.Column("bits", "bits"), h.Column("backend", "backend"),
           h.Column("call", "call"), h.Column("mk_us", "mk us", "{:.1f}"), h.Column("eager_us", "eager us", "{:.1f}"),
           h.Column("mk_over_eager", "mk / eager", "{:.2f}")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--numel", type=int, default=1024, help="elements of each input (default 1024)")
    parser.add_argument("--calls", type=int, default=None, help="calls a timed run (default 500, --quick 20)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 9, --quick 2)")
    parser.add_argument("--quick", action="store_true", help="fewer calls, no result files")
    parser.add_argument("--out", type=__import__("pathlib").Path, default=h.RESULTS_DIR)
    args = parser.parse_args(argv)
    args.calls = args.calls or (20 if args.quick else 500)
    args.repeats = args.repeats or (2 if args.quick else 9)
    command = h.command_line(None if argv is None else ["bench/host_overhead.py", *argv])
    device = torch.device(args.device)
    rows = run(args)
    table = h.markdown_table(rows, COLUMNS)
    print(table)
    if args.quick:
        return
    base = args.out / f"host_overhead_{h.device_tag(device)}"
    for row in rows:
        row.update(device=h.device_name(device), command=command)
    h.write_csv(rows, base.with_suffix(".csv"))
    h.write_markdown(
        base.with_suffix(".md"), "Host time of a call: memkernels against PyTorch eager",
        h.environment_lines(device, [command]),
        [f"Inputs of {args.numel} elements (float32), so that the host's time is the call's. us: median over "
         f"{args.repeats} runs of {args.calls} calls in a row (perf_counter, device synchronised around each run) "
         "per call; eager and memkernels take turns run by run. fwd no_grad: the forward without autograd; fwd: "
         "recording autograd; fwd+bwd: torch.autograd.grad of its output. backend: the CUDA kernels memkernels ran "
         "(MEMKERNELS_BACKEND); eager is the same in each.", table])
    print(f"wrote {base}.csv, .md")


if __name__ == "__main__":
    main()
