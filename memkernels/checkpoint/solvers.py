"""Checkpoint schedules under a memory budget: the cost model and the solvers.

Cost model
----------
A graph (memkernels/checkpoint/graph.py) has nodes 0..n-1 in a topological order. Per node v:
time t_v; i_v, the bytes of the buffers its backward keeps that v allocates itself (a dropout mask);
o_v, the bytes of the output storage it allocates (0 for a view); its savers, the nodes whose
backward keeps that storage (v itself, or nodes that read it); h_v, its forward's peak above what
exists before it; w_v, its backward's peak above its saved tensors and output gradient; g_v, the
gradient bytes alive while its backward runs (its output's, plus those of earlier nodes a later node
has already sent a gradient to; fixed by the graph).

A schedule is an increasing chain of lower sets {} = L_0 < L_1 < ... < L_k = V (a lower set holds
every predecessor of its nodes). Segment S_i = L_i \\ L_{i-1} is either kept (run normally: its
saved tensors stay until its backward) or recomputed (run under non-reentrant
torch.utils.checkpoint: it keeps only its inputs, and is run again, once, when the backward reaches
it). Its extra time is the sum of t_v over the recomputed segments.

What a segment holds from its forward to its backward, as torch does:
  kept S:        sum of i_v over S, the storages made in S that a node of S saves, and the storages
                 made before S that a node of S saves (Linear keeps its input, made by the segment
                 before);
  recomputed S:  in(S), the storages made before S that S reads (the checkpoint keeps its inputs),
                 plus c, the bytes each checkpoint keeps of its own (the CPU RNG state it stashes).
The graph's outputs are never held by a segment: the caller holds them until the step ends.
K_i is the sum over S_1..S_i. boundary(L) = the storages made in L that a node outside L, or the
loss, reads (later segments and checkpoints need them). Within segment S (ascending; "held" = made
in S, not an output, and saved by a node of S, which the backward frees at its first saver s_u):
  forward step   F_v = sum of i_u, u in S, u < v  +  sum of o_u, u in S, u < v, u held or still to be
                 read at v (by a node >= v, by a node outside L_i, or the loss)  +  h_v
  backward step  B_v = sum of i_u, u in S, u <= v  +  sum of o_u, u held, s_u <= v  +  w_v + g_v
                 + the outputs made in S or after it
  kept:        peak(S) = max over v of max(F_v - D_v, B_v - D), D = the boundary storages only S
               reads and none of its nodes saves (they die after their last reader; D_v: those
               whose last reader is before v)
  recomputed:  peak(S) = max over v of max(F_v + g_top + outputs made after S, B_v) + c
               (top = S's last node: the recomputation runs while the gradients g_top are alive).
The predicted peak of the schedule is
  max( max_i [K_{i-1} + boundary(L_{i-1}) + peak(S_i)],  K_k + boundary(V) ),
the bytes one forward+backward allocates above what existed before (inputs, parameters and their
gradients are not in it). It over-counts a storage held by two segments (a kept ReLU output that a
recomputed segment also reads, or each single-node segment reading a view of one storage) or held
and still read (a residual stream), and a gradient that a backward passes through unchanged (an
add's) once per receiver; measured peaks of the tests' models lie within 8% of it.

Nested recomputation ("log"): a recomputed segment may carry an inner schedule of its own nodes,
which its recomputation runs (inner recomputed segments are checkpointed again). Its peak is the
inner schedule's, evaluated as above on the segment alone (storages made before it are the outer
level's) with g_top added to every inner forward step, plus c for it and for each checkpoint the
original forward made inside it (alive until its backward); each inner recomputed segment adds its
time once more.

Methods (`solve`)
-----------------
- "none": nothing recomputed (one kept segment). "all": every node its own recomputed segment.
- "sqrt": ceil(sqrt(n)) runs of the topological order, all recomputed but the last, each of
  ceil(n / runs) nodes but the last, which holds the rest (torch.utils.checkpoint.
  checkpoint_sequential with as many segments makes them floor(n / segments) nodes long and puts the
  remainder in its last, kept segment). Budget-blind.
- "chen-greedy": Chen et al. 2016 (arXiv 1604.06174), the budgeted greedy: walk the topological
  order, close a recomputed segment when its kept bytes pass a threshold b; b is searched over a
  grid and the cheapest schedule that fits wins.
- "log": Chen et al.'s recursive variant: the first half of the topological order is a recomputed
  segment whose recomputation runs the same schedule on that half, the rest is scheduled the same
  way, down to single nodes. O(log n) segment inputs alive on a chain, each node recomputed up to
  log2(n) times. Budget-blind.
- "dp": Kusumoto et al. 2019 (arXiv 1905.11722), exact DP over every lower set, with Pareto fronts
  of (kept bytes, extra time): the least extra time of the model above. Exponential in width.
- "dp-approx": the same DP over the n+1 lower sets {}, each node's ancestor closure, V; kept bytes
  rounded up to budget/buckets. Polynomial; never better than "dp" (its schedules are a subset).
- "chain": rotor-style optimal DP over the prefixes of the topological order (a chain's lower
  sets), kept bytes rounded up to budget/buckets as in rotor. Never better than "dp".
The DP methods run in C++ (csrc/planner, memkernels._C.planner_solve); memkernels/checkpoint/
reference.py is a plain-Python copy the tests hold them to.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from memkernels.checkpoint.graph import MAX_BYTES, Graph

METHODS = ("none", "all", "sqrt", "chen-greedy", "log", "dp", "dp-approx", "chain")
DP_METHODS = ("dp", "dp-approx", "chain")
BUDGET_BLIND = ("none", "all", "sqrt", "log")
DEFAULT_BUCKETS = 200
DEFAULT_MAX_LOWER_SETS = 50_000
UNLIMITED = MAX_BYTES  # the budget of "no limit", and the most the C++ solvers take

Segments = list[tuple[tuple[int, ...], bool]]


class InfeasibleBudget(ValueError):
    """No schedule of the method fits the budget; `least_budget` is the least budget that does.

    `estimated`: the least budget comes from measured peaks (`plan` re-solving after a measured
    peak passed its budget), not from the cost model alone, so it is an estimate."""

    def __init__(self, method: str, budget: int, least_budget: int, estimated: bool = False):
        self.method, self.budget, self.least_budget = method, budget, least_budget
        self.estimated = estimated
        least = f"{format_bytes(least_budget)} ({least_budget} bytes)"
        super().__init__(f"method {method!r}: no schedule fits the budget of {format_bytes(budget)} "
                         f"({budget} bytes); " + (
                             f"the least feasible budget is about {least}, an estimate from the "
                             "measured peaks of the plans tried" if estimated else
                             f"the least feasible budget is {least}"))


@dataclass(frozen=True)
class Solution:
    """A schedule: `segments` in order, each (nodes, recomputed); its predicted peak and extra time.
    `nested` maps a recomputed segment's nodes to the schedule its recomputation runs, if not plain."""

    method: str
    segments: Segments
    extra_time: float
    predicted_peak: int
    budget: int | None
    nested: dict[tuple[int, ...], Segments] = field(default_factory=dict)  # inner schedules ("log")

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


def _check_graph(graph, caller: str) -> None:
    if not isinstance(graph, Graph):
        raise TypeError(f"{caller}: graph must be a memkernels.checkpoint.Graph, got {type(graph).__name__}")


def _members_check(graph: Graph, segments: Segments) -> None:
    seen: set[int] = set()
    if isinstance(segments, (str, bytes)) or not hasattr(segments, "__iter__"):
        raise TypeError(f"schedule: segments must be a list of (nodes, recomputed) pairs, got {type(segments).__name__}")
    segments = list(segments)
    for segment in segments:
        if not (isinstance(segment, (tuple, list)) and len(segment) == 2 and hasattr(segment[0], "__iter__")):
            raise TypeError(f"schedule: each segment must be a (nodes, recomputed) pair, a tuple of node "
                            f"numbers and a bool, got {segment!r}")
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


def segment_stats(arrays: dict, nodes: Sequence[int], upper: set[int], enclosing: frozenset[int] = frozenset(),
                  checkpoint_bytes: int | None = None) -> dict:
    """max F_v, max B_v, g_top, kept bytes, inputs and time of the segment `nodes` (ascending)
    that ends the lower set `upper` (see the module docstring). Storages made in `enclosing`
    (before the segment an inner schedule runs in) are that level's, not counted; so are, with
    `checkpoint_bytes=0`, the checkpoints' own bytes."""
    internal, h, w, g = arrays["internal"], arrays["forward_peak"], arrays["backward_peak"], arrays["pending_grads"]
    storage, users, is_output = arrays["storage_bytes"], arrays["users"], arrays["is_output"]
    members = set(nodes)
    first_saver: dict[int, int] = {}
    external: set[int] = set()
    for v in nodes:
        for o in arrays["saves"][v]:
            if o in members:
                first_saver.setdefault(o, v)
            elif o not in enclosing and not is_output[o]:
                external.add(o)
    # The model's outputs stay alive (the caller holds them) until the step ends: boundary bytes
    # after their segment, and in the backward of every segment up to theirs.
    outputs = {u for u in members if storage[u] and is_output[u]}
    later_outputs = sum(storage[u] for u in range(len(storage)) if is_output[u] and u not in upper)
    ends = {}
    for u in nodes:
        if storage[u]:
            outside = u in first_saver or is_output[u] or any(c not in upper for c in users[u])
            ends[u] = math.inf if outside else max(users[u], default=-1)
    freed_at: dict[int, int] = {}
    for u, s in first_saver.items():
        if u not in outputs:
            freed_at[s] = freed_at.get(s, 0) + storage[u]
    read = {o for v in nodes for o in arrays["reads"][v] if o not in members and o not in enclosing}
    inputs = sum(storage[o] for o in read)
    # Boundary bytes that only this segment reads and none of its nodes saves: a kept segment
    # frees them after their last reader (a recomputed one's checkpoint holds them).
    dropped = {o for o in read if not is_output[o] and o not in external
               and all(c in upper for c in users[o])}
    alive_in_backward = sum(storage[u] for u in outputs) + later_outputs
    internal_sum = held = 0
    time = 0.0
    max_forward = max_backward = max_forward_kept = 0
    for v in nodes:
        live = sum(storage[u] for u, end in ends.items() if u < v <= end)
        max_forward = max(max_forward, internal_sum + live + h[v])
        dead = sum(storage[o] for o in dropped if max(users[o]) < v)
        max_forward_kept = max(max_forward_kept, internal_sum + live + h[v] - dead)
        internal_sum += internal[v]
        held += freed_at.get(v, 0)
        max_backward = max(max_backward, internal_sum + held + alive_in_backward + w[v] + g[v])
        time += arrays["time"][v]
    return dict(max_forward=max_forward, max_backward=max_backward, later_outputs=later_outputs,
                max_forward_kept=max_forward_kept,
                max_backward_kept=max_backward - sum(storage[o] for o in dropped),
                top_grads=g[nodes[-1]] if nodes else 0, kept=internal_sum + held + sum(storage[o] for o in external),
                inputs=inputs, time=time,
                checkpoint=arrays["checkpoint_bytes"] if checkpoint_bytes is None else checkpoint_bytes)


def segment_held(stats: dict, recomputed: bool) -> int:
    """Bytes the segment adds to K: its inputs and its checkpoint's own (the RNG state it stashes)
    if recomputed, what its nodes save if kept."""
    return stats["inputs"] + stats["checkpoint"] if recomputed else stats["kept"]


def segment_peak(stats: dict, recomputed: bool) -> int:
    if not recomputed:
        return max(stats["max_forward_kept"], stats["max_backward_kept"])
    recomputation = stats["max_forward"] + stats["top_grads"] + stats["later_outputs"]
    return max(recomputation, stats["max_backward"]) + stats["checkpoint"]


def boundary_bytes(arrays: dict, lower: set[int], enclosing: frozenset[int] = frozenset()) -> int:
    return sum(arrays["storage_bytes"][u] for u in lower
               if arrays["storage_bytes"][u] and u not in enclosing
               and (arrays["is_output"][u] or any(c not in lower for c in arrays["users"][u])))


def evaluate(graph: Graph, segments: Segments, arrays: dict | None = None,
             nested: dict[tuple[int, ...], Segments] | None = None) -> tuple[int, float]:
    """(predicted peak bytes, extra time) of a schedule under the cost model. `nested` maps a
    recomputed segment's nodes to the inner schedule its recomputation runs ("log")."""
    _check_graph(graph, "evaluate")
    _members_check(graph, segments)
    arrays = graph.arrays() if arrays is None else arrays
    return _evaluate(arrays, segments, nested or {}, frozenset(), 0, False)


def _evaluate(arrays: dict, segments: Segments, nested: dict, enclosing: frozenset[int],
              forward_extra: int, inner_level: bool) -> tuple[int, float]:
    """Peak and extra time of `segments` run after the lower set `enclosing` (the storages made
    there are the enclosing level's), with `forward_extra` bytes alive in every forward step;
    `inner_level`: the recomputation of an enclosing segment runs them."""
    lower: set[int] = set(enclosing)
    kept_so_far = 0
    peak = 0
    extra = 0.0
    for nodes, recomputed in segments:
        nodes = tuple(sorted(nodes))
        base = kept_so_far + boundary_bytes(arrays, lower, enclosing)
        # An inner level's checkpoints are those of the original forward, counted at the outer level.
        stats = segment_stats(arrays, nodes, lower | set(nodes), enclosing, 0 if inner_level else None)
        if recomputed and nodes in nested:
            if set(v for inner, _ in nested[nodes] for v in inner) != set(nodes):
                raise ValueError(f"schedule: the inner schedule of segment {list(nodes)} covers other nodes")
            inner_peak, inner_extra = _evaluate(arrays, nested[nodes], nested, frozenset(lower),
                                                stats["top_grads"], True)
            # The checkpoints the original forward made inside the segment live until its backward.
            stats["checkpoint"] *= 1 + _count_recomputed(nested[nodes], nested)
            # The recomputation runs the inner schedule's forward, which holds at least what the
            # original forward of the segment (nothing kept) does.
            peak = max(peak, base + inner_peak + stats["checkpoint"])
            extra += inner_extra
        else:
            forward = stats["max_forward" if recomputed else "max_forward_kept"]
            peak = max(peak, base + segment_peak(stats, recomputed), base + forward + forward_extra)
        lower |= set(nodes)
        kept_so_far += segment_held(stats, recomputed)
        if recomputed:
            extra += stats["time"]
    peak = max(peak, kept_so_far + boundary_bytes(arrays, lower, enclosing))
    return peak, extra


def _count_recomputed(segments: Segments, nested: dict) -> int:
    return sum(1 + _count_recomputed(nested.get(tuple(nodes), []), nested)
               for nodes, recomputed in segments if recomputed)


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


def _kept_weights(arrays: dict) -> list[int]:
    """Bytes each node's forward adds to what is kept when nothing is recomputed: its internal
    buffers, and its output storage when some node saves it."""
    saved = {o for owners in arrays["saves"] for o in owners}
    return [arrays["internal"][v] + (arrays["storage_bytes"][v] if v in saved else 0)
            for v in range(len(arrays["time"]))]


def _log_segments(lo: int, hi: int, nested: dict[tuple[int, ...], Segments]) -> Segments:
    """Chen's recursion on the run lo..hi-1 of the topological order: recompute its first half
    (whose recomputation runs this schedule on that half, recorded in `nested`), then the same on
    the second half, down to a single kept node."""
    segments: Segments = []
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        run = tuple(range(lo, mid))
        if len(run) > 1:
            nested[run] = _log_segments(lo, mid, nested)
        segments.append((run, True))
        lo = mid
    segments.append((tuple(range(lo, hi)), False))
    return segments


def _greedy_segments(weights: list[int], threshold: float, keep_last: bool) -> Segments:
    n = len(weights)
    cuts, running = [], 0
    for v in range(n):
        running += weights[v]
        if running > threshold and v + 1 < n:
            cuts.append(v + 1)
            running = 0
    runs = _runs(n, cuts)
    return [(run, not (keep_last and i == len(runs) - 1)) for i, run in enumerate(runs)]


def _chen_greedy(graph: Graph, arrays: dict, budget: int) -> tuple[Segments, int, float] | None:
    weights = _kept_weights(arrays)
    total = sum(weights)
    largest = max(weights, default=0)
    thresholds = sorted({largest * (max(total, 1) / max(largest, 1)) ** (i / 63) for i in range(64)})
    best = None
    for threshold in thresholds:
        for keep_last in (False, True):
            segments = _greedy_segments(weights, threshold, keep_last)
            peak, extra = evaluate(graph, segments, arrays)
            if peak <= budget and (best is None or (extra, peak) < (best[2], best[1])):
                best = (segments, peak, extra)
    return best


def _dp_native(method: str, arrays: dict, budget: int, buckets: int, max_lower_sets: int):
    from memkernels import ops  # the planner is compiled into the extension
    if not ops.extension_loaded():
        python_methods = ", ".join(m for m in METHODS if m not in DP_METHODS)
        raise RuntimeError(f"checkpoint method {method!r} runs in memkernels._C, which is not built "
                           f"({ops._C_IMPORT_ERROR}); {ops.BUILD_HINT}, or use a method planned in "
                           f"Python: {python_methods}")
    result = ops._C.planner_solve(method, budget=min(budget, UNLIMITED), buckets=buckets,
                              max_lower_sets=max_lower_sets, **arrays)
    if result is None:
        return None
    extra, segments = result
    return [(tuple(nodes), bool(recomputed)) for nodes, recomputed in segments]


def _schedule(graph: Graph, arrays: dict, budget: int, method: str, buckets: int,
              max_lower_sets: int) -> tuple[Segments, dict] | None:
    """The method's schedule and its nested schedules, or None when it finds none that fits `budget`."""
    n = len(graph)
    nested: dict[tuple[int, ...], Segments] = {}
    if method in DP_METHODS:
        segments = _dp_native(method, arrays, budget, buckets, max_lower_sets)
        return None if segments is None else (segments, nested)
    if method == "chen-greedy":
        best = _chen_greedy(graph, arrays, budget)
        return None if best is None else (best[0], nested)
    if method == "none":
        segments = [(tuple(range(n)), False)]
    elif method == "all":
        segments = [((v,), True) for v in range(n)]
    elif method == "log":
        segments = _log_segments(0, n, nested)
    else:  # sqrt
        segments = _sqrt_segments(graph)
    return (segments, nested) if evaluate(graph, segments, arrays, nested)[0] <= budget else None


def least_budget(graph: Graph, method: str = "dp-approx", *, buckets: int = DEFAULT_BUCKETS,
                 max_lower_sets: int = DEFAULT_MAX_LOWER_SETS) -> int:
    """The least budget (bytes, to 0.2%) under which `method` finds a schedule."""
    _check_options(method, buckets, max_lower_sets)
    _check_graph(graph, "least_budget")
    arrays = graph.arrays()
    if method in BUDGET_BLIND:
        segments, nested = _schedule(graph, arrays, UNLIMITED, method, buckets, max_lower_sets)
        return evaluate(graph, segments, arrays, nested)[0]
    high = max(1, evaluate(graph, [(tuple(range(len(graph))), False)], arrays)[0])
    while _schedule(graph, arrays, high, method, buckets, max_lower_sets) is None:
        if high >= UNLIMITED:  # buckets=1 rounds every held byte count up to the whole budget
            raise ValueError(f"method {method!r} finds no schedule under any budget the solvers take "
                             f"(2**62 bytes) with buckets={buckets}, which rounds kept bytes up to "
                             "budget / buckets; use more buckets")
        high = min(2 * high, UNLIMITED)
    low = 0  # infeasible (or every peak is 0)
    while high - low > max(1, high // 500):
        mid = (low + high) // 2
        if _schedule(graph, arrays, mid, method, buckets, max_lower_sets) is None:
            low = mid
        else:
            high = mid
    return high


def _check_options(method: str, buckets: int, max_lower_sets: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
        raise ValueError(f"buckets must be a positive int, got {buckets!r}")
    if isinstance(max_lower_sets, bool) or not isinstance(max_lower_sets, int) or max_lower_sets < 1:
        raise ValueError(f"max_lower_sets must be a positive int, got {max_lower_sets!r}")


def solve(graph: Graph, budget: int | float | str | None, method: str = "dp-approx", *,
          buckets: int = DEFAULT_BUCKETS, max_lower_sets: int = DEFAULT_MAX_LOWER_SETS) -> Solution:
    """The schedule of `method` for `graph` under `budget` (bytes, a string such as "2GB", or None
    for no limit). Raises InfeasibleBudget (a ValueError naming the least feasible budget) when no
    schedule of the method fits."""
    from memkernels.checkpoint.budget import parse_budget

    _check_options(method, buckets, max_lower_sets)
    _check_graph(graph, "solve")
    limit = UNLIMITED if budget is None else parse_budget(budget)
    arrays = graph.arrays()
    schedule = _schedule(graph, arrays, limit, method, buckets, max_lower_sets)
    if schedule is None:
        raise InfeasibleBudget(method, limit, least_budget(graph, method, buckets=buckets,
                                                           max_lower_sets=max_lower_sets))
    segments, nested = schedule
    peak, extra = evaluate(graph, segments, arrays, nested)
    return Solution(method, segments, extra, peak, None if budget is None else limit, nested)
