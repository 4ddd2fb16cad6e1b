"""Shared pieces of the benchmarks: timing, device description, result files, plots.

Every bench script measures its method against a PyTorch baseline in the same run and writes
``<name>_<device tag>.csv`` (all columns), ``.md`` (a header naming device, date, versions and
command, then a table) and ``.png`` under bench/results/. Scripts run from a checkout as
``python bench/<name>.py``; this module puts the repository root on ``sys.path`` for them.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
# Run from a checkout without installing: `python bench/x.py` puts bench/, not the root, on the path.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
# glibc serves allocations of this size or more with fresh mmap'ed pages (DESIGN.md, "Measuring").
CPU_MMAP_THRESHOLD_BYTES = 32 * 2**20


# ---------------------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call over `repeats` timed calls: median and the 20th/80th percentiles."""

    median_ms: float
    q20_ms: float
    q80_ms: float
    repeats: int


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> Timing:
    """Time `fn()` call by call: perf_counter on CPU, CUDA events (then one synchronize) on GPU.

    Each call is timed on its own, so the median ignores the odd slow call (page faults of a
    first touch, a GC pause) instead of averaging it in.
    """
    return time_ms_interleaved({"fn": fn}, device, warmup=warmup, repeats=repeats)["fn"]


def time_ms_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int,
                        repeats: int) -> dict[str, Timing]:
    """time_ms of several functions, taking turns call by call: the k-th call of each is timed
    next to the k-th call of the others, so when the machine's speed drifts (a shared CPU, a GPU's
    clocks) it slows them alike, rather than whichever was timed during the slow spell. The orders
    of the turns are balanced (turn_orders), so that each follows every other equally often: a
    call inherits the freed memory and cache state of the one before it."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    names = list(fns)
    turns = [[names[i] for i in order] for order in turn_orders(len(names), repeats)]
    times: dict[str, list[float]] = {name: [] for name in fns}
    if device.type == "cuda":
        events = {name: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                         for _ in range(repeats)] for name in fns}
        for k, turn in enumerate(turns):
            for name in turn:
                start, end = events[name][k]
                start.record()
                fns[name]()
                end.record()
        torch.cuda.synchronize(device)
        for name in fns:
            times[name] = [start.elapsed_time(end) for start, end in events[name]]
    else:
        for turn in turns:
            for name in turn:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: summarize(t) for name, t in times.items()}


def turn_orders(n: int, repeats: int) -> list[list[int]]:
    """`repeats` orders of range(n), cycling through a Williams design: in each n orders (2n for
    odd n) every index takes every position equally often and directly follows every other index
    equally often. (Rotating one order would not do: each index would keep the same predecessor.)"""
    if n == 0:
        return [[] for _ in range(repeats)]
    first = [0]  # 0, 1, n-1, 2, n-2, ...
    for j in range(1, n):
        first.append((j + 1) // 2 if j % 2 else n - j // 2)
    rows = [[(r + i) % n for i in first] for r in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return [rows[k % len(rows)] for k in range(repeats)]


def summarize(times: list[float]) -> Timing:
    """Median and 20th/80th percentiles of per-call times (ms)."""
    if len(times) == 1:
        return Timing(times[0], times[0], times[0], 1)
    q = statistics.quantiles(times, n=5, method="inclusive")
    return Timing(statistics.median(times), q[0], q[3], len(times))


BACKWARD_METHOD = (
    "backward is timed alone: one forward, then torch.autograd.grad(..., retain_graph=True) "
    "re-run on that graph; fwd+bwd is a forward and a backward timed together; the methods of a "
    "row (eager, torch.compile, memkernels) take turns call by call, in balanced orders (each "
    "follows every other equally often)"
)


def time_forward_backward(
    fns: dict[str, Callable[..., torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    wrt: Sequence[torch.Tensor] | None = None,
    contexts: dict[str, Callable[[], contextlib.AbstractContextManager]] | None = None,
) -> dict[str, dict[str, Timing]]:
    """Timings of a training step of each `fn(*inputs)` (one tensor out) in three modes, the
    functions taking turns (time_ms_interleaved); {name: {mode: Timing}}.

    ``fwd``: the forward with autograd recording (what a training forward costs, saving included).
    ``bwd``: gradients w.r.t. `wrt` (default: the inputs that require grad) from one retained graph.
    ``fwdbwd``: a forward and its backward. The incoming gradient is a fixed random tensor.
    contexts: per name, a context every call of that function (forward and backward) runs in.
    """
    wrt = [t for t in inputs if t.requires_grad] if wrt is None else list(wrt)
    contexts = contexts or {}

    def under(name, call):
        context = contexts.get(name, contextlib.nullcontext)

        def run():
            with context():
                return call()
        return run

    outs = {name: under(name, lambda fn=fn: fn(*inputs))() for name, fn in fns.items()}
    grad_out = torch.randn_like(next(iter(outs.values())))

    def forward(fn):
        return lambda: fn(*inputs)

    def backward(out):
        return lambda: torch.autograd.grad(out, wrt, grad_out, retain_graph=True)

    def forward_backward(fn):
        return lambda: torch.autograd.grad(fn(*inputs), wrt, grad_out)

    def timed(calls):
        return time_ms_interleaved({name: under(name, call) for name, call in calls.items()}, device,
                                   warmup=warmup, repeats=repeats)

    modes = {
        "fwd": timed({name: forward(fn) for name, fn in fns.items()}),
        "bwd": timed({name: backward(out) for name, out in outs.items()}),
        "fwdbwd": timed({name: forward_backward(fn) for name, fn in fns.items()}),
    }
    del outs
    return {name: {mode: timings[name] for mode, timings in modes.items()} for name in fns}


def device_activity(call: Callable[[], object], device: torch.device, *, calls: int) -> list[tuple[str, float]]:
    """(name, us) of each CUDA kernel, copy and fill that `calls` calls of `call()` run, in the
    order torch.profiler's CUPTI trace lists them; one call before the trace compiles, allocates
    and fills caches."""
    if device.type != "cuda":
        raise ValueError(f"device_activity: device must be a CUDA device, got {device}")
    call()
    synchronize(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as trace:
        for _ in range(calls):
            call()
        synchronize(device)
    # The trace's device-side events are each kernel (copy, fill) once; the CPU events that
    # launched them list them again as their kernels, so only the former are read.
    return [(e.name, e.time_range.elapsed_us()) for e in trace.events()
            if e.device_type == torch.autograd.DeviceType.CUDA]


def device_ms_per_call(call: Callable[[], object], device: torch.device, *, calls: int) -> float:
    """Device time of one `call()` in ms: the durations of its kernels, copies and fills
    (device_activity over `calls` calls) summed, divided by `calls`. Host time (Python, dispatch,
    launches) is not in it, so where the host is slower than the kernels (small tensors, or 16-bit
    ones on a fast GPU) this still measures the kernels, which per-call CUDA events do not: the GPU
    idles between launches inside the timed span."""
    activity = device_activity(call, device, calls=calls)
    if not activity:
        raise RuntimeError("device_ms_per_call: torch.profiler recorded no CUDA activity for the call")
    return sum(us for _, us in activity) / calls / 1e3


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 2**30, *, warmup: int = 5, repeats: int = 20) -> float:
    """The device's measured copy bandwidth: (bytes read + written) / time of ``dst.copy_(src)``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    timing = time_ms(lambda: dst.copy_(src), device, warmup=warmup, repeats=repeats)
    return 2 * nbytes / (timing.median_ms * 1e-3) / 1e9


def saved_input_bytes(fn: Callable[..., object], *args: torch.Tensor) -> int:
    """Bytes of what autograd keeps for backward that are `args` themselves, i.e. not newly written.

    Counted as memkernels.profile.saved_bytes counts (distinct storages at their full size), so the
    difference of the two is what the forward wrote to keep.
    """
    arg_storages = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() in arg_storages:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(kept.values())


# ------------------------------------------------------------------------------------ the machine


def device_name(device: torch.device) -> str:
    """GPU name from torch, or the CPU model from /proc/cpuinfo (platform's answer elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_tag(device: torch.device) -> str:
    """File-name tag: device type and a slug of its name, e.g. ``cuda_nvidia-h100-80gb-hbm3``."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return f"{device.type}_{slug[:40].rstrip('-')}"


@contextlib.contextmanager
def environment_variable(name: str, value: str):
    """Set `name` to `value` inside the block; afterwards it is as before (unset if it was)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def backend_selected(backend: str):
    """A block in which every op runs `backend`: MEMKERNELS_BACKEND set to it on CUDA ("cpu":
    nothing to set, CPU tensors have one backend)."""
    if backend == "cpu":
        return contextlib.nullcontext()
    return environment_variable("MEMKERNELS_BACKEND", backend)


def cuda_cpp_kernels_built() -> bool:
    """Whether memkernels._C is built, with its CUDA C++ kernels."""
    import memkernels.ops

    return memkernels.ops.extension_loaded() and memkernels.ops._C.with_cuda


def device_backends(device: torch.device) -> list[str]:
    """The backends memkernels' ops run on `device`: "cpu", or on CUDA "triton" and, where
    memkernels._C has its CUDA C++ kernels, "cuda" (the MEMKERNELS_BACKEND values)."""
    if device.type == "cpu":
        return ["cpu"]
    return ["triton", "cuda"] if cuda_cpp_kernels_built() else ["triton"]


def check_can_pick_backends(device: torch.device) -> None:
    """Stop before measuring when --pick-backends has nothing to compare: it picks between the two
    CUDA backends (Triton, CUDA C++) on a GPU."""
    if device.type != "cuda":
        raise SystemExit("--pick-backends picks between the CUDA backends (Triton, CUDA C++): run it with "
                         "--device cuda on a GPU")
    if not cuda_cpp_kernels_built():
        raise SystemExit("--pick-backends: memkernels._C is not built with its CUDA C++ kernels, so there is "
                         "nothing to compare Triton with; build it with a CUDA torch and nvcc on PATH")


def backend_totals(rows: Sequence[dict], column: str) -> dict:
    """{"triton_ms", "cuda_ms", "cases"} of rows that each measured a case under one CUDA backend
    (rows["backend"]), every case under both: `column` summed per backend, the cases counted."""
    totals = {b: round(sum(r[column] for r in rows if r["backend"] == b), 5) for b in ("triton", "cuda")}
    return {"triton_ms": totals["triton"], "cuda_ms": totals["cuda"],
            "cases": sum(r["backend"] == "cuda" for r in rows)}


def faster_backend(totals: dict) -> str:
    """"cuda" where totals["cuda_ms"] < totals["triton_ms"]; a tie goes to Triton, which covers every op."""
    return "cuda" if totals["cuda_ms"] < totals["triton_ms"] else "triton"


def record_backend_choice(evidence: dict[str, dict], *, rule: str, command: str,
                          device: torch.device) -> dict[str, str]:
    """Each op's default CUDA backend, the faster_backend of evidence[op] = {"triton_ms", "cuda_ms",
    "cases"}, merged into memkernels/ops/cuda_backends.json (the other ops' entries stay), read back
    through memkernels.ops._cuda (which raises, naming the file, on a record it would not load) and
    made this process's default. Returns {op: backend} for the ops of `evidence`."""
    import json

    from memkernels.ops import _cuda

    path = _cuda.BACKENDS_FILE
    record = json.loads(path.read_text()) if path.exists() else {}
    defaults, kept_evidence = record.get("defaults", {}), record.get("evidence", {})
    picked = {op: faster_backend(totals) for op, totals in evidence.items()}
    provenance = {"rule": rule, "picked_by": command, "device": device_name(device), "date": now_iso(),
                  "torch": torch.__version__, "triton": triton_version()}
    defaults.update(picked)
    kept_evidence.update({op: {**totals, **provenance} for op, totals in evidence.items()})
    path.write_text(json.dumps({"defaults": defaults, "evidence": kept_evidence}, indent=2) + "\n")
    _cuda.reload_default_backends()
    for op, backend in picked.items():
        print(f"{op:>22}: {backend:<6} (total ms triton {evidence[op]['triton_ms']:.3f}, "
              f"cuda {evidence[op]['cuda_ms']:.3f}, {evidence[op]['cases']} cases)")
    print(f"wrote {path}")
    return picked


def memkernels_build_line() -> str:
    """Which memkernels kernels ran: the compiled extension, or the slow reference fallback."""
    import memkernels.ops

    backend = os.environ.get("MEMKERNELS_BACKEND")
    built = ("extension memkernels._C loaded" if memkernels.ops.extension_loaded()
             else "extension memkernels._C NOT built: the plain-PyTorch reference ran (timings meaningless)")
    return f"memkernels {memkernels.__version__}: {built}" + (f", MEMKERNELS_BACKEND={backend}" if backend else "")


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that ran, e.g. ``python bench/activations.py --quick`` (`argv` default sys.argv)."""
    return shlex.join([Path(sys.executable).name, *(sys.argv if argv is None else argv)])


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def now_iso() -> str:
    """The local date and time, e.g. ``2025-01-31T14:02:11+01:00``."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def environment_lines(device: torch.device, commands: Sequence[str]) -> list[str]:
    """Header lines of a result: device, date, versions, which kernels ran, the command(s) that
    wrote its rows."""
    threads = f", torch threads: {torch.get_num_threads()}" if device.type == "cpu" else ""
    return [
        f"device: {device_name(device)} ({device.type}{threads})",
        f"date: {now_iso()}",
        f"torch {torch.__version__}, triton {triton_version()}, python {platform.python_version()}",
        memkernels_build_line(),
        *(f"command: `{command}`" for command in commands),
    ]


# ---------------------------------------------------------------------------------- command line

_SIZE_SUFFIXES = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def parse_sizes(text: str) -> list[int]:
    """``"1M,4M,4097"`` -> element counts; K, M, G are powers of 2 (1M = 1,048,576)."""
    sizes = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)\s*", item, flags=re.IGNORECASE)
        if not match:
            raise ValueError(f"size {item!r} is not a count like 4096, 64K, 4M or 1G")
        sizes.append(int(match.group(1)) * _SIZE_SUFFIXES[match.group(2).upper()])
    return sizes


def parse_dtypes(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in DTYPES]
    if unknown:
        raise ValueError(f"unknown dtype(s) {unknown}; known: {sorted(DTYPES)}")
    return names


def size_label(numel: int) -> str:
    """4194304 -> "4M", 65536 -> "64K", 4097 -> "4097"."""
    for suffix in ("G", "M", "K"):
        if numel % _SIZE_SUFFIXES[suffix] == 0:
            return f"{numel // _SIZE_SUFFIXES[suffix]}{suffix}"
    return str(numel)


def add_common_arguments(parser, *, cpu_sizes: str, cuda_sizes: str, quick_sizes: str, dtypes: str) -> None:
    """--device, --dtypes, --sizes, --repeats, --quick, --out; sizes default by device (resolve_sizes)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"], help="default: cuda if available")
    parser.add_argument("--dtypes", default=dtypes, help=f"comma list of {','.join(DTYPES)} (default {dtypes})")
    parser.add_argument("--sizes", default=None,
                        help=f"element counts, K/M/G = 2^10/2^20/2^30 (default: cpu {cpu_sizes}; "
                             f"cuda {cuda_sizes}; --quick {quick_sizes})")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement "
                        "(default: cpu 10, cuda 50, --quick 3)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats: a smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default bench/results)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--append", action="store_true", help="merge into the existing result files (rows "
                        "of the same case replaced) instead of overwriting them")
    parser.set_defaults(_size_defaults={"cpu": cpu_sizes, "cuda": cuda_sizes, "quick": quick_sizes})


def steady_cpu_heap() -> bool:
    """Hold glibc's malloc at the thresholds a long-running process settles at: blocks under 32 MB
    come from the heap, and the heap is trimmed only past 64 MB free at its top.

    A fresh process starts at 128 KB and raises the mmap threshold to the largest block it frees
    (up to 32 MB), trimming the heap's top past twice that. A bench that frees the same few
    blocks call after call then hands their pages back and faults them in again on some calls and
    not on others, depending on the order of earlier allocations: timings of one kernel came out
    bimodal, 0.5 or 3.6 ms. Applies to the baseline and to memkernels alike. Returns whether it
    applied (glibc only).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, CPU_MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(m_trim_threshold, 2 * CPU_MMAP_THRESHOLD_BYTES))


STEADY_HEAP_NOTE = (
    "glibc's malloc is held at the thresholds a long-running process settles at (mmap from 32 MB, "
    "heap trimmed past 64 MB free), so timings below 32 MB do not depend on the order of earlier calls"
)


def apply_threads(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def resolve_sizes(args) -> list[int]:
    key = "quick" if args.quick else args.device
    return parse_sizes(args.sizes or args._size_defaults[key])


def resolve_repeats(args) -> tuple[int, int]:
    """(warmup, repeats) for the device and mode, --repeats overriding the repeats."""
    if args.quick:
        warmup, repeats = 1, 3
    elif args.device == "cuda":
        warmup, repeats = 10, 50
    else:
        warmup, repeats = 2, 10
    return warmup, args.repeats or repeats


# ---------------------------------------------------------------------------------- result files


@dataclass(frozen=True)
class Column:
    """A column of the markdown table: row key, header and how to print the value."""

    key: str
    title: str
    fmt: str = "{}"


def _cell(value, fmt: str) -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value)


def write_csv(rows: Sequence[dict], path: Path) -> None:
    """All keys of all rows as columns (first-seen order); missing values are empty cells."""
    fields = list(dict.fromkeys(key for row in rows for key in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)


def _parse_cell(text: str):
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_csv(path: Path) -> list[dict]:
    """Rows written by write_csv, numbers parsed back (empty cells -> None)."""
    with open(path, newline="") as f:
        return [{k: _parse_cell(v) for k, v in row.items()} for row in csv.DictReader(f)]


def merge_rows(old: Sequence[dict], new: Sequence[dict], key: Sequence[str]) -> list[dict]:
    """`old` with every row that a `new` row has the same `key` values as replaced; the rest of
    `new` after it. Lets a long run be split into several commands writing one result."""
    replacements = {tuple(row[k] for k in key): row for row in new}
    merged = [replacements.pop(tuple(row[k] for k in key), row) for row in old]
    return merged + [row for row in new if tuple(row[k] for k in key) in replacements]


def markdown_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    lines = [
        "| " + " | ".join(c.title for c in columns) + " |",
        "|" + "|".join(" --- " for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c.key), c.fmt) for c in columns) + " |")
    return "\n".join(lines)


def write_markdown(path: Path, title: str, header_lines: Sequence[str], body: Sequence[str]) -> None:
    """``# title``, the header lines as a list, then the body blocks (tables, notes) in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = [f"# {title}", "", *(f"- {line}" for line in header_lines), ""]
    for block in body:
        text += [block, ""]
    path.write_text("\n".join(text))


def error_summary(error: BaseException) -> str:
    """``"Type: first line of the message"`` (at most 200 characters), for a table cell."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def ratio(numerator: float | None, denominator: float | None, digits: int = 3) -> float | None:
    """numerator / denominator rounded, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, digits)


# ------------------------------------------------------------------------------------------ plots


@dataclass(frozen=True)
class Panel:
    """A subplot: its title, which rows it shows and which column is its y."""

    title: str
    keep: Callable[[dict], bool]
    y: str


def plot_lines(
    rows: Sequence[dict],
    path: Path,
    *,
    x: str,
    panels: Sequence[Panel],
    line: Callable[[dict], str],
    title: str,
    xlabel: str,
    ylabel: str,
    color: Callable[[dict], str] | None = None,
    dashed: Callable[[dict], bool] = lambda row: False,
    reference_y: float | None = None,
    logy: bool = False,
) -> None:
    """One panel per `Panel`, one line per label `line(row)`: y against x (log2 axis), perf_report style.

    Rows with an empty y are left out. Lines with the same `color(row)` key share a colour (default:
    one per label), `dashed(row)` draws a row's line dashed; `reference_y` draws a dotted
    horizontal line (e.g. ratio 1).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter

    ncols = min(len(panels), 2)
    nrows = math.ceil(len(panels) / ncols)
    color = color or line
    keys = list(dict.fromkeys(color(row) for row in rows))
    palette = plt.get_cmap("tab20" if len(keys) > 10 else "tab10")
    colors = {key: palette(i % palette.N) for i, key in enumerate(keys)}
    fig, axes = plt.subplots(nrows, ncols, figsize=(8 * ncols, 5 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        series: dict[str, tuple[dict, list[tuple[float, float]]]] = {}
        for row in rows:
            if panel.keep(row) and row.get(panel.y) not in (None, ""):
                series.setdefault(line(row), (row, []))[1].append((row[x], row[panel.y]))
        for label, (first, points) in series.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=label,
                    color=colors[color(first)], linestyle="--" if dashed(first) else "-")
        if reference_y is not None:
            ax.axhline(reference_y, color="black", linewidth=0.8, linestyle=":")
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
            # plain numbers (0.5, 2) rather than 5x10^-1; minor ticks labelled only over a short range
            ax.yaxis.set_major_formatter(LogFormatter())
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
        ax.set_title(panel.title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    legend = {}  # one legend for the figure: label -> handle, first seen
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="center right", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
