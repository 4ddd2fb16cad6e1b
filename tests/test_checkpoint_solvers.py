"""The checkpoint solvers against a brute force over every schedule of the same cost model, the C++
DP solvers against the Python reference, budgets and errors."""
import math
import random

import pytest

import memkernels.checkpoint as ck
from memkernels.checkpoint import reference
from memkernels.checkpoint.solvers import evaluate


def random_graph(rng: random.Random, n: int, chain: bool) -> ck.Graph:
    edges = [(v - 1, v) for v in range(1, n)] if chain else []
    if not chain:
        for v in range(1, n):
            preds = rng.sample(range(v), rng.randint(1, min(2, v)))
            edges += [(u, v) for u in preds]
    nodes = []
    for v in range(n):
        out = rng.choice([0, 1, 2, 4]) * 8 if v and rng.random() < 0.15 else rng.randint(1, 8) * 8
        view_of = v - 1 if out == 0 and (v - 1, v) in edges else None
        readers = [w for u, w in edges if u == v]
        # Its own backward (ReLU), a reader's (Linear), both or none keep the output.
        saved_by = [s for s in [v, *readers] if rng.random() < 0.35]
        nodes.append(ck.Node(name=f"n{v}", time=rng.choice([0.5, 1.0, 2.0, 3.0]),
                             output_bytes=out if view_of is None else 0,
                             kept_bytes=rng.choice([0, 0, 8, 16]), saved_by=tuple(saved_by),
                             forward_peak=out + rng.choice([0, 8]), backward_peak=rng.randint(1, 10) * 8,
                             grad_bytes=max(out, 8), view_of=view_of))
    sinks = {v for v in range(n) if not any(u == v for u, _ in edges)}
    nodes = [ck.Node(**{**node.__dict__, "is_output": v in sinks}) for v, node in enumerate(nodes)]
    return ck.Graph(nodes, edges, checkpoint_bytes=rng.choice([0, 8]))


def brute_force(graph: ck.Graph, budget: int):
    """Least extra time over every chain of lower sets and every kept/recomputed choice."""
    arrays = graph.arrays()
    sets = reference.lower_sets(arrays)
    full = frozenset(range(len(graph)))
    best = [math.inf]

    def walk(lower, segments):
        if lower == full:
            peak, extra = evaluate(graph, segments, arrays)
            if peak <= budget:
                best[0] = min(best[0], extra)
            return
        for upper in sets:
            if lower < upper:
                nodes = tuple(sorted(upper - lower))
                for recomputed in (False, True):
                    walk(upper, segments + [(nodes, recomputed)])

    walk(frozenset(), [])
    return best[0]


def all_peaks(graph: ck.Graph) -> tuple[int, int]:
    peaks = [evaluate(graph, s)[0] for s in ([(tuple(range(len(graph))), False)],
                                            [((v,), True) for v in range(len(graph))])]
    return min(peaks), max(peaks)


CASES = [(seed, n, chain) for seed in range(6) for n, chain in ((5, True), (6, True), (5, False), (6, False))]


@pytest.mark.parametrize("seed,n,chain", CASES)
def test_methods_against_brute_force(seed, n, chain):
    rng = random.Random(1000 * seed + n)
    graph = random_graph(rng, n, chain)
    low, high = all_peaks(graph)
    least = ck.least_budget(graph, "dp")
    for budget in sorted({least, (least + high) // 2, high, max(0, least - 1)}):
        optimum = brute_force(graph, budget)
        if optimum == math.inf:
            with pytest.raises(ck.InfeasibleBudget):
                ck.solve(graph, budget, "dp")
            continue
        exact = ck.solve(graph, budget, "dp")
        assert exact.extra_time == pytest.approx(optimum, abs=1e-9), (budget, exact.segments)
        assert exact.predicted_peak <= budget
        for method in ("dp-approx", "chain", "sqrt", "chen-greedy", "none", "all"):
            try:
                solution = ck.solve(graph, budget, method)
            except ck.InfeasibleBudget:
                continue
            assert solution.predicted_peak <= budget, method
            assert solution.extra_time >= optimum - 1e-9, method


@pytest.mark.parametrize("seed,n,chain", CASES[:12])
def test_native_solvers_equal_reference(seed, n, chain):
    rng = random.Random(7 + seed)
    graph = random_graph(rng, n + 2, chain)
    arrays = graph.arrays()
    low, high = all_peaks(graph)
    for budget in (low, (low + high) // 2, high):
        for method in ("dp", "dp-approx", "chain"):
            expected = reference.solve(method, arrays, budget, ck.solvers.DEFAULT_BUCKETS)
            native = ck.solvers._dp_native(method, arrays, budget, ck.solvers.DEFAULT_BUCKETS, 10**6)
            if expected is None:
                assert native is None, (method, budget)
                continue
            assert native == [(tuple(s), r) for s, r in expected[1]], (method, budget)
            assert evaluate(graph, native, arrays)[1] == pytest.approx(expected[0], abs=1e-9)


def test_chain_methods_on_a_longer_chain():
    """On a 40-node chain "chain" equals "dp" up to its rounding, both beat "sqrt"."""
    rng = random.Random(3)
    graph = ck.Graph.chain([rng.uniform(1, 3) for _ in range(40)], [64] * 40, [64] * 40)
    budget = ck.solve(graph, None, "sqrt").predicted_peak
    sqrt = ck.solve(graph, budget, "sqrt")
    for method in ("chain", "dp-approx"):
        solution = ck.solve(graph, budget, method, buckets=10_000)
        assert solution.predicted_peak <= budget
        assert solution.extra_time <= sqrt.extra_time + 1e-9


def test_native_dp_equals_reference_on_a_longer_chain():
    """On a 60-node chain, long enough that the candidate lists of the native "dp" are pruned while
    they fill (its fronts come from the smaller lower sets one at a time), its schedule is the
    reference's, at the sqrt budget and at the least one."""
    rng = random.Random(0)
    n = 60
    nodes = [ck.Node(f"n{v}", rng.uniform(1, 10), rng.choice([1, 2, 4]) * 64, kept_bytes=rng.choice([0, 64]),
                     saved_by=rng.choice([(), (v,), (v + 1,)]) if v + 1 < n else (), is_output=v == n - 1)
             for v in range(n)]
    graph = ck.Graph(nodes, [(v - 1, v) for v in range(1, n)])
    arrays = graph.arrays()
    for budget in (ck.solve(graph, None, "sqrt").predicted_peak, ck.least_budget(graph, "dp")):
        expected = reference.solve("dp", arrays, budget, ck.solvers.DEFAULT_BUCKETS)
        native = ck.solvers._dp_native("dp", arrays, budget, ck.solvers.DEFAULT_BUCKETS, 10**6)
        assert native == [(tuple(s), r) for s, r in expected[1]]


@pytest.mark.parametrize("text,expected", [("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("1.5kB", 1500),
                                           ("3 gib", 3 * 2**30), (" 100 ", 100), ("1e3B", 1000), (7, 7),
                                           (2e9, 2 * 10**9), (10**30, 10**30)])
def test_parse_budget(text, expected):
    assert ck.parse_budget(text) == expected


@pytest.mark.parametrize("bad,error,message", [
    ("2 parsecs", ValueError, "not a number of bytes"), ("GB", ValueError, "not a number of bytes"),
    (-1, ValueError, ">= 0"), ("-1GB", ValueError, ">= 0"), (-2e9, ValueError, ">= 0"),
    ("1e400GB", ValueError, "not finite"), (1.5, ValueError, "whole number"),
    (float("nan"), ValueError, "whole number"),
    (True, TypeError, "budget must be"), (None, TypeError, "budget must be")])
def test_parse_budget_rejects(bad, error, message):
    with pytest.raises(error, match=message):
        ck.parse_budget(bad)


@pytest.mark.parametrize("method", ck.METHODS)
@pytest.mark.parametrize("budget", [10**30, "1e30", 1e30])
def test_budgets_past_int64_mean_no_limit(method, budget):
    graph = ck.Graph.chain([1.0] * 4, [8] * 4, [8] * 4)
    assert ck.solve(graph, budget, method).predicted_peak == ck.solve(graph, None, method).predicted_peak


def test_infeasible_budget_names_least_budget():
    graph = ck.Graph.chain([1.0] * 6, [100] * 6, [50] * 6)
    least = ck.least_budget(graph, "dp")
    with pytest.raises(ck.InfeasibleBudget, match=f"least feasible budget is .*\\({least} bytes\\)") as info:
        ck.solve(graph, least - 1, "dp")
    assert info.value.least_budget == least
    assert ck.solve(graph, least, "dp").predicted_peak <= least


def test_bad_inputs():
    graph = ck.Graph.chain([1.0] * 3, [8] * 3, [8] * 3)
    with pytest.raises(ValueError, match="method must be one of"):
        ck.solve(graph, 100, "magic")
    with pytest.raises(ValueError, match="saved_by"):
        ck.Graph([ck.Node("a", 1.0, 8), ck.Node("b", 1.0, 8), ck.Node("c", 1.0, 8, saved_by=(0,))], [(0, 1), (1, 2)])
    with pytest.raises(ValueError, match="topological"):
        ck.Graph([ck.Node("a", 1.0, 8), ck.Node("b", 1.0, 8)], [(1, 0)])
    with pytest.raises(ValueError, match="one entry per node"):
        ck.Graph.chain([1.0, 2.0], [8], [8, 8])
    with pytest.raises(ValueError, match="no nodes"):
        ck.Graph([], [])
    with pytest.raises(ValueError, match="time must be >= 0"):
        ck.Graph([ck.Node("a", -1.0, 8)], [])
    for time in (math.nan, math.inf):
        with pytest.raises(ValueError, match="time must be >= 0 and finite"):
            ck.Graph.chain([1.0, time], [8, 8], [8, 8])
    for field in ("forward_peak", "backward_peak", "grad_bytes"):
        with pytest.raises(ValueError, match=f"{field} must be >= 0"):
            ck.Graph.chain([1.0, 1.0], [8, 8], [8, 8], **{field: [8, -8]})
    for options in (dict(buckets=0), dict(max_lower_sets=0)):
        with pytest.raises(ValueError, match=f"{next(iter(options))} must be a positive int"):
            ck.solve(graph, 100, "dp", **options)
    with pytest.raises(TypeError, match="Graph"):
        ck.solve("not a graph", 100)
    with pytest.raises(ValueError, match="predecessor"):
        evaluate(graph, [((1,), True), ((0, 2), False)])


@pytest.mark.parametrize("method", ck.METHODS)
def test_byte_counts_past_what_the_solvers_take_are_refused(method):
    # Beyond 2**62 in all, int64 sums in the C++ solvers would overflow (a crash, or a schedule over
    # budget), and no budget could hold the graph (least_budget would search forever).
    for graph in (ck.Graph.chain([1.0], [2**62 + 1], [0]),
                  ck.Graph.chain([1.0] * 3, [0] * 3, [2**62] * 3, forward_peak=[0] * 3),
                  ck.Graph([ck.Node("a", 1.0, 0, kept_bytes=1, forward_peak=0),
                            ck.Node("b", 1.0, 0, kept_bytes=2**63 - 1, forward_peak=0, is_output=True)], [(0, 1)])):
        with pytest.raises(ValueError, match="more than the solvers take"):
            ck.solve(graph, None if method in ("none", "all") else 1000, method)


def test_native_solvers_check_what_they_are_given():
    # The binding's own checks, for a caller that skips memkernels.checkpoint.Graph.
    from memkernels import _C

    def solve(method="chain", internal=(0, 0), checkpoint_bytes=0, budget=100):
        return _C.planner_solve(method, [1.0, 1.0], list(internal), [0, 0], [0, 0], [0, 0], [1, 1], [0, 1],
                                [[], [0]], [[1], []], [[], []], [[], [0]], checkpoint_bytes, budget, 10, 100)
    for method in ("chain", "dp-approx", "dp"):
        for budget in (-1, 2**63 - 1):
            with pytest.raises(ValueError, match="budget must be in \\[0, 2\\*\\*62\\]"):
                solve(method, budget=budget)
        with pytest.raises(ValueError, match="internal must be >= 0"):
            solve(method, internal=(-2**62, -2**62))
        with pytest.raises(ValueError, match="checkpoint_bytes must be >= 0"):
            solve(method, checkpoint_bytes=-2**62)
        with pytest.raises(ValueError, match="add up to more than 2\\*\\*62"):
            solve(method, internal=(2**62, 2**62))
    assert solve() is not None


def test_native_dp_refuses_huge_lower_set_counts():
    graph = ck.Graph([ck.Node(str(v), 1.0, 8, is_output=True) for v in range(24)], [])
    with pytest.raises(ValueError, match="lower sets"):
        ck.solve(graph, 10**9, "dp", max_lower_sets=1000)
    # Counted while the next level is found: 2,000 unordered nodes have ~2 million lower sets of
    # two nodes, which used to fill gigabytes before the count was checked.
    graph = ck.Graph([ck.Node(str(v), 1.0, 8, is_output=True) for v in range(2000)], [])
    with pytest.raises(ValueError, match="more than 50000 lower sets"):
        ck.solve(graph, 10**9, "dp")


@pytest.mark.parametrize("method", ["dp", "dp-approx", "chain"])
def test_native_methods_without_the_extension_say_so(monkeypatch, method):
    from memkernels import ops
    monkeypatch.setattr(ops, "_C", None)
    monkeypatch.setattr(ops, "_C_IMPORT_ERROR", ImportError("no _C here"))
    graph = ck.Graph.chain([1.0, 1.0], [8, 8], [8, 8])
    with pytest.raises(RuntimeError, match=rf"{method!r} runs in memkernels._C, which is not built \(no _C here\)"
                       r".*Python: none, all, sqrt, chen-greedy, log"):
        ck.solve(graph, None, method)
    assert ck.solve(graph, None, "sqrt").predicted_peak > 0  # the Python methods still plan


def test_graph_checks_its_nodes_and_says_its_size():
    assert repr(ck.Graph.chain([1.0] * 3, [8] * 3, [8] * 3)) == "Graph(3 nodes, 2 edges)"
    with pytest.raises(ValueError, match="checkpoint_bytes must be >= 0, got -8"):
        ck.Graph.chain([1.0], [8], [8], checkpoint_bytes=-8)
    for view_of in (1, 2, -1):
        with pytest.raises(ValueError, match=rf"node 1 \(b\): view_of must be an earlier node, got {view_of}"):
            ck.Graph([ck.Node("a", 1.0, 8), ck.Node("b", 1.0, 0, view_of=view_of)], [(0, 1)])


def test_evaluate_names_what_is_wrong_with_a_schedule():
    graph = ck.Graph.chain([1.0] * 3, [8] * 3, [8] * 3)
    with pytest.raises(ValueError, match="a segment is empty"):
        evaluate(graph, [((), True), ((0, 1, 2), False)])
    for segments in ([((0, 1), True), ((1, 2), False)], [((0, 1, 2, 3), False)], [((0, 1, -1, 2), False)]):
        with pytest.raises(ValueError, match="out of range or in two segments"):
            evaluate(graph, segments)
    with pytest.raises(ValueError, match="covers 2 of 3 nodes"):
        evaluate(graph, [((0, 1), False)])
    with pytest.raises(ValueError, match=r"the inner schedule of segment \[0, 1\] covers other nodes"):
        evaluate(graph, [((0, 1), True), ((2,), False)], nested={(0, 1): [((0,), True), ((2,), False)]})
    assert evaluate(graph, [((0, 1), True), ((2,), False)], nested={(0, 1): [((0,), True), ((1,), False)]})[1] == 3.0


@pytest.mark.parametrize("method", ["dp", "dp-approx", "chain"])
def test_reference_and_native_solvers_agree_at_the_least_budget_and_with_few_buckets(method):
    """None just below the least budget, the same schedule at it; with 3 buckets the rounded kept
    bytes run past the last bucket (seed 0's chain at the higher of its all-kept and
    all-recomputed peaks)."""
    for seed in range(4):
        graph = random_graph(random.Random(seed), 5 + seed % 2, seed % 2 == 0)
        arrays = graph.arrays()
        for buckets in (3, 8):
            least = ck.least_budget(graph, method, buckets=buckets)
            for budget in (least - 1, least, all_peaks(graph)[1]):
                expected = reference.solve(method, arrays, budget, buckets)
                native = ck.solvers._dp_native(method, arrays, budget, buckets, 10**6)
                assert (expected is None) == (native is None) == (budget < least), (seed, buckets, budget)
                if expected is not None:
                    assert native == [(tuple(s), r) for s, r in expected[1]], (seed, buckets, budget)
    with pytest.raises(ValueError, match="method must be 'dp', 'dp-approx' or 'chain', got 'sqrt'"):
        reference.solve("sqrt", arrays, 100, 8)


@pytest.mark.parametrize("method", ["dp-approx", "chain"])
def test_native_solvers_keep_segments_that_free_a_large_input(method):
    """A kept segment frees the boundary bytes that only it reads, so its peak can lie below its
    internal and saved bytes by up to the boundary: the native solvers' pruning must not subtract the
    boundary (it did, and skipped keeping nodes 1-3 after recomputing node 0, whose 512-byte
    output only node 1 reads)."""
    nodes = [ck.Node(name=f"n{v}", time=t, output_bytes=out, kept_bytes=kept, saved_by=saved,
                     forward_peak=out, backward_peak=8, grad_bytes=8, is_output=v == 3)
             for v, (t, out, kept, saved) in enumerate([(0.5, 512, 0, (0,)), (1.0, 16, 64, ()),
                                                         (1.0, 8, 64, ()), (1.0, 16, 0, ())])]
    graph = ck.Graph(nodes, [(0, 1), (1, 2), (2, 3)], checkpoint_bytes=8)
    arrays = graph.arrays()
    best = [((0,), True), ((1, 2, 3), False)]
    assert evaluate(graph, best, arrays) == (552, 0.5)
    for buckets in (7, ck.solvers.DEFAULT_BUCKETS):
        assert reference.solve(method, arrays, 648, buckets)[1] == best
        assert ck.solvers._dp_native(method, arrays, 648, buckets, 10**6) == best


@pytest.mark.parametrize("method", ["dp-approx", "chain"])
def test_least_budget_with_one_bucket_ends(method):
    """buckets=1 rounds every held byte count up to the whole budget: no schedule of this graph fits
    any budget (its outputs take bytes, every segment holds some), and least_budget used to double
    its bound forever (solve, naming the least budget, hung with it)."""
    graph = random_graph(random.Random(0), 5, False)
    with pytest.raises(ValueError, match=rf"method {method!r} finds no schedule under any budget .* buckets=1"):
        ck.least_budget(graph, method, buckets=1)
    with pytest.raises(ValueError, match="use more buckets"):
        ck.solve(graph, None, method, buckets=1)
    # Where the keep-all peak does not fit the rounding, the bound doubles until a budget does.
    graph = random_graph(random.Random(4), 3, False)
    arrays = graph.arrays()
    keep_all = evaluate(graph, [(tuple(range(len(graph))), False)], arrays)[0]
    assert ck.solvers._schedule(graph, arrays, keep_all, method, 2, 10**6) is None
    least = ck.least_budget(graph, method, buckets=2)
    assert least > keep_all and ck.solve(graph, least, method, buckets=2).predicted_peak <= least


def test_argument_errors_name_what_was_expected():
    g = ck.Graph.chain([1.0, 1.0, 1.0], [100, 100, 100], [100, 100, 100])
    with pytest.raises(TypeError, match=r"^least_budget: graph must be a memkernels.checkpoint.Graph, got str"):
        ck.least_budget("g")
    with pytest.raises(TypeError, match=r"^evaluate: graph must be a memkernels.checkpoint.Graph, got str"):
        ck.evaluate("g", [])
    with pytest.raises(TypeError, match=r"^schedule: segments must be a list of \(nodes, recomputed\) pairs, got str"):
        ck.evaluate(g, "x")
    with pytest.raises(TypeError, match=r"^schedule: each segment must be a \(nodes, recomputed\) pair"):
        ck.evaluate(g, [(0, 1, 2)])
    with pytest.raises(ValueError, match=r"^buckets must be a positive int, got True"):
        ck.solve(g, 10**6, method="chain", buckets=True)
    with pytest.raises(ValueError, match=r"^checkpoint_bytes must be >= 0, got nan"):
        ck.Graph.chain([1.0], [1], [1], checkpoint_bytes=math.nan)
    nodes = [ck.Node("a", 1.0, 1, 1), ck.Node("b", 1.0, 1, 1)]
    with pytest.raises(ValueError, match=r"^Graph: each edge must be a pair \(u, v\) of node numbers, got \(0, 1, 2\)"):
        ck.Graph(nodes, [(0, 1, 2)])
    with pytest.raises(TypeError, match=r"^Graph: nodes must be memkernels.checkpoint.Node, got str at 0"):
        ck.Graph("ab", [])
