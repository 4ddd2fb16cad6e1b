"""Checkpoint schedules under a memory budget: the cost model and the solvers.

Cost model
----------
A graph (memkernels/checkpoint/graph.py) has nodes 0..n-1 in a topological order. Per node v:
time t_v; a_v, the bytes kept for its backward that v owns (its internal saved buffers, plus its
output storage when some node's backward keeps it); o_v, the bytes of the output storage it
allocates (0 for a view); l_v = o_v when no backward keeps that storage, else 0 (it is in a_v);
h_v, its forward's peak above what exists before it; w_v, its backward's peak above its saved
tensors and output gradient; g_v, the gradient bytes alive while its backward runs (its output's,
plus those of earlier nodes a later node has already sent a gradient to; fixed by the graph).

A schedule is an increasing chain of lower sets {} = L_0 < L_1 < ... < L_k = V (a lower set holds
every predecessor of its nodes). Segment S_i = L_i \\ L_{i-1} is either kept (run normally: its
saved tensors stay until its backward) or recomputed (run under torch.utils.checkpoint: it keeps
only its inputs, and is run again, once, when the backward reaches it). Its extra time is the sum
of t_v over the recomputed segments.

Memory: K_i = sum over S_1..S_i of a(S) = sum of a_v in S for a kept segment, and of in(S) for a
recomputed one: the bytes of the storages made outside S that S reads (its checkpoint holds them
until its backward). boundary(L) = sum of o_u over the
storages made in L that a node outside L, or the loss, reads (they stay alive: later segments and
checkpoints hold them). Within segment S, with A_v = sum of a_u over u in S, u < v:
  forward step   F_v = A_v + (sum of l_u, u in S, u < v, u's storage still to be read at v) + h_v
                 (read at v: by a node >= v, or by a node outside L_i, or it is an output)
  backward step  B_v = A_v + a_v + w_v + g_v
  peak(S) = max over v in S of max(F_v, B_v) if kept, max(F_v + g_top, B_v) if recomputed
            (top = S's last node: the recomputation runs while the gradients g_top are alive).
The predicted peak of the schedule is
  max( max_i [K_{i-1} + boundary(L_{i-1}) + peak(S_i)],  K_k + boundary(V) ),
the bytes one forward+backward allocates above what existed before (inputs, parameters and their
gradients are not in it). The model over-counts, never under-counts, what is alive: a storage kept
both by a kept segment and as a boundary counts twice; gradients summed by autograd count apart.

Methods (`solve`)
-----------------
- "none": nothing recomputed (one kept segment). "all": every node its own recomputed segment.
- "sqrt": ceil(sqrt(n)) equal runs of the topological order, all recomputed but the last
  (torch.utils.checkpoint.checkpoint_sequential's schedule). Budget-blind.
- "chen-greedy": Chen et al. 2016 (arXiv 1604.06174), the budgeted greedy: walk the topological
  order, close a recomputed segment when its kept bytes pass a threshold b; b is searched over a
  grid and the cheapest schedule that fits wins.
- "dp": Kusumoto et al. 2019 (arXiv 1905.11722), exact DP over every lower set, with Pareto fronts
  of (kept bytes, extra time): the least extra time of the model above. Exponential in width.
- "dp-approx": the same DP over the n+1 lower sets {}, each node's ancestor closure, V; kept bytes
  rounded up to budget/buckets. Polynomial; never better than "dp" (its schedules are a subset).
- "chain": rotor-style optimal DP over the prefixes of the topological order (a chain's lower
  sets), kept bytes rounded up to budget/buckets as in rotor. Never better than "dp".
- "log": Chen's recursive O(log n) variant needs nested recomputation, which this single-level
  model cannot express; it raises NotImplementedError.
The DP methods run in C++ (csrc/planner, memkernels._C.planner_solve); memkernels/checkpoint/
reference.py is a plain-Python copy the tests hold them to.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from memkernels.checkpoint.graph import Graph

METHODS = ("none", "all", "sqrt", "chen-greedy", "log", "dp", "dp-approx", "chain")
DP_METHODS = ("dp", "dp-approx", "chain")
DEFAULT_BUCKETS = 200
DEFAULT_MAX_LOWER_SETS = 50_000

Segments = list[tuple[tuple[int, ...], bool]]


class InfeasibleBudget(ValueError):
    """No schedule of the method fits the budget; `least_budget` is the least budget that does."""

    def __init__(self, method: str, budget: int, least_budget: int):
        self.method, self.budget, self.least_budget = method, budget, least_budget
        super().__init__(f"method {method!r}: no schedule fits the budget of {format_bytes(budget)} "
                         f"({budget} bytes); the least feasible budget is {format_bytes(least_budget)} "
                         f"({least_budget} bytes)")


@dataclass(frozen=True)
class Solution:
    """A schedule: `segments` in order, each (nodes, recomputed); its predicted peak and extra time."""

    method: str
    segments: Segments
    extra_time: float
    predicted_peak: int
    budget: int | None

    @property
    def kept(self) -> frozenset[int]:
        """Nodes whose saved tensors stay from forward to backward (not recomputed)."""
        return frozenset(v for nodes, recomputed in self.segments if not recomputed for v in nodes)

    @property
    def recomputed(self) -> frozenset[int]:
        return frozenset(v for nodes, recomputed in self.segments if recomputed for v in nodes)


def format_bytes(n: float) -> str:
    """Binary units: 1536 -> "1.50 KiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# -------------------------------------------------------------------------------- the cost model


def _members_check(graph: Graph, segments: Segments) -> None:
    seen: set[int] = set()
    for nodes, _ in segments:
        if not nodes:
            raise ValueError("schedule: a segment is empty")
        for v in nodes:
            if not 0 <= v < len(graph) or v in seen:
                raise ValueError(f"schedule: node {v} is out of range or in two segments")
        seen |= set(nodes)
        for v in nodes:
            missing = [u for u in graph.preds[v] if u not in seen]
            if missing:
                raise ValueError(f"schedule: node {v} comes before its predecessor(s) {missing}; "
                                 "each segment must end a lower set")
    if len(seen) != len(graph):
        raise ValueError(f"schedule: covers {len(seen)} of {len(graph)} nodes")


def segment_stats(arrays: dict, nodes: Sequence[int], upper: set[int]) -> dict:
    """max F_v, max B_v, g_top, kept bytes and time of the segment `nodes` (ascending) that ends the
    lower set `upper` (see the module docstring)."""
    a, h, w, g = arrays["kept"], arrays["forward_peak"], arrays["backward_peak"], arrays["pending_grads"]
    live_bytes, users, is_output = arrays["live_output"], arrays["users"], arrays["is_output"]
    ends = {}
    for u in nodes:
        if live_bytes[u]:
            outside = is_output[u] or any(c not in upper for c in users[u])
            ends[u] = math.inf if outside else max(users[u], default=-1)
    members = set(nodes)
    inputs = sum(arrays["storage_bytes"][o] for o in {o for v in nodes for o in arrays["reads"][v]}
                 if o not in members)
    kept = 0
    time = 0.0
    max_forward = max_backward = 0
    for v in nodes:
        live = sum(live_bytes[u] for u, end in ends.items() if u < v <= end)
        max_forward = max(max_forward, kept + live + h[v])
        max_backward = max(max_backward, kept + a[v] + w[v] + g[v])
        kept += a[v]
        time += arrays["time"][v]
    return dict(max_forward=max_forward, max_backward=max_backward,
                top_grads=g[nodes[-1]] if nodes else 0, kept=kept, inputs=inputs, time=time)


def segment_held(stats: dict, recomputed: bool) -> int:
    """Bytes the segment adds to K: its inputs if recomputed, its kept bytes if kept."""
    return stats["inputs"] if recomputed else stats["kept"]


def segment_peak(stats: dict, recomputed: bool) -> int:
    return max(stats["max_forward"] + (stats["top_grads"] if recomputed else 0), stats["max_backward"])


def boundary_bytes(arrays: dict, lower: set[int]) -> int:
    return sum(arrays["storage_bytes"][u] for u in lower
               if arrays["storage_bytes"][u]
               and (arrays["is_output"][u] or any(c not in lower for c in arrays["users"][u])))


def evaluate(graph: Graph, segments: Segments, arrays: dict | None = None) -> tuple[int, float]:
    """(predicted peak bytes, extra time) of a schedule under the cost model."""
    _members_check(graph, segments)
    arrays = graph.arrays() if arrays is None else arrays
    lower: set[int] = set()
    kept_so_far = 0
    peak = 0
    extra = 0.0
    for nodes, recomputed in segments:
        base = kept_so_far + boundary_bytes(arrays, lower)
        lower |= set(nodes)
        stats = segment_stats(arrays, sorted(nodes), lower)
        peak = max(peak, base + segment_peak(stats, recomputed))
        kept_so_far += segment_held(stats, recomputed)
        if recomputed:
            extra += stats["time"]
    peak = max(peak, kept_so_far + boundary_bytes(arrays, lower))
    return peak, extra


# -------------------------------------------------------------------------------------- solvers


def _runs(order_length: int, cuts: Sequence[int]) -> list[tuple[int, ...]]:
    bounds = [0, *cuts, order_length]
    return [tuple(range(bounds[i], bounds[i + 1])) for i in range(len(bounds) - 1) if bounds[i + 1] > bounds[i]]


def _sqrt_segments(graph: Graph) -> Segments:
    n = len(graph)
    count = max(1, math.ceil(math.sqrt(n)))
    size = math.ceil(n / count)
    runs = _runs(n, range(size, n, size))
    return [(run, i < len(runs) - 1) for i, run in enumerate(runs)]


def _greedy_segments(arrays: dict, threshold: float, keep_last: bool) -> Segments:
    n = len(arrays["time"])
    cuts, running = [], 0
    for v in range(n):
        running += arrays["kept"][v]
        if running > threshold and v + 1 < n:
            cuts.append(v + 1)
            running = 0
    runs = _runs(n, cuts)
    return [(run, not (keep_last and i == len(runs) - 1)) for i, run in enumerate(runs)]


def _chen_greedy(graph: Graph, arrays: dict, budget: int) -> tuple[Segments, int, float] | None:
    total = sum(arrays["kept"])
    largest = max(arrays["kept"], default=0)
    thresholds = sorted({largest * (max(total, 1) / max(largest, 1)) ** (i / 63) for i in range(64)})
    best = None
    for threshold in thresholds:
        for keep_last in (False, True):
            segments = _greedy_segments(arrays, threshold, keep_last)
            peak, extra = evaluate(graph, segments, arrays)
            if peak <= budget and (best is None or (extra, peak) < (best[2], best[1])):
                best = (segments, peak, extra)
    return best


def _dp_native(method: str, arrays: dict, budget: int, buckets: int, max_lower_sets: int):
    from memkernels import _C  # the planner is compiled into the extension
    result = _C.planner_solve(method, budget=budget, buckets=buckets, max_lower_sets=max_lower_sets, **arrays)
    if result is None:
        return None
    extra, segments = result
    return [(tuple(nodes), bool(recomputed)) for nodes, recomputed in segments]


def _schedule(graph: Graph, arrays: dict, budget: int, method: str, buckets: int,
              max_lower_sets: int) -> Segments | None:
    """The method's schedule, or None when it finds none that fits `budget`."""
    n = len(graph)
    if method == "log":
        raise NotImplementedError("method 'log' (Chen's recursive checkpointing) needs nested "
                                  "recomputation, which the single-level cost model cannot express; "
                                  "use 'chain', 'dp-approx' or 'dp'")
    if method in DP_METHODS:
        return _dp_native(method, arrays, budget, buckets, max_lower_sets)
    if method == "chen-greedy":
        best = _chen_greedy(graph, arrays, budget)
        return None if best is None else best[0]
    if method == "none":
        segments = [(tuple(range(n)), False)]
    elif method == "all":
        segments = [((v,), True) for v in range(n)]
    else:  # sqrt
        segments = _sqrt_segments(graph)
    return segments if evaluate(graph, segments, arrays)[0] <= budget else None


def least_budget(graph: Graph, method: str = "dp-approx", *, buckets: int = DEFAULT_BUCKETS,
                 max_lower_sets: int = DEFAULT_MAX_LOWER_SETS) -> int:
    """The least budget (bytes, to 0.2%) under which `method` finds a schedule."""
    _check_method(method)
    arrays = graph.arrays()
    if method in ("none", "all", "sqrt"):
        return evaluate(graph, _schedule(graph, arrays, 2**62, method, buckets, max_lower_sets), arrays)[0]
    high = max(1, evaluate(graph, [(tuple(range(len(graph))), False)], arrays)[0])
    while _schedule(graph, arrays, high, method, buckets, max_lower_sets) is None:
        high *= 2
    low = 0  # infeasible (or the empty graph)
    while high - low > max(1, high // 500):
        mid = (low + high) // 2
        if _schedule(graph, arrays, mid, method, buckets, max_lower_sets) is None:
            low = mid
        else:
            high = mid
    return high


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")


def solve(graph: Graph, budget: int | str | None, method: str = "dp-approx", *,
          buckets: int = DEFAULT_BUCKETS, max_lower_sets: int = DEFAULT_MAX_LOWER_SETS) -> Solution:
    """The schedule of `method` for `graph` under `budget` (bytes, a string such as "2GB", or None
    for no limit). Raises InfeasibleBudget (a ValueError naming the least feasible budget) when no
    schedule of the method fits."""
    from memkernels.checkpoint.budget import parse_budget

    _check_method(method)
    if not isinstance(graph, Graph):
        raise TypeError(f"solve: graph must be a memkernels.checkpoint.Graph, got {type(graph).__name__}")
    if not isinstance(buckets, int) or buckets < 1:
        raise ValueError(f"solve: buckets must be a positive int, got {buckets!r}")
    limit = 2**62 if budget is None else parse_budget(budget)
    arrays = graph.arrays()
    segments = _schedule(graph, arrays, limit, method, buckets, max_lower_sets)
    if segments is None:
        raise InfeasibleBudget(method, limit, least_budget(graph, method, buckets=buckets,
                                                           max_lower_sets=max_lower_sets))
    peak, extra = evaluate(graph, segments, arrays)
    return Solution(method, segments, extra, peak, None if budget is None else limit)
