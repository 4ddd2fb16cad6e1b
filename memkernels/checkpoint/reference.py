"""Plain-Python copies of the C++ DP solvers (csrc/planner/planner.cpp), for tests only: same cost
model (memkernels.checkpoint.solvers), same lower-set families, loop orders and tie rules, so on
small graphs both return the same schedule. Slow: O(families^2 * n) Python steps.
"""
from __future__ import annotations

import math

from memkernels.checkpoint.solvers import boundary_bytes, segment_held, segment_peak, segment_stats


def lower_sets(arrays: dict) -> list[frozenset[int]]:
    """Every lower set, ascending by size, then by sorted nodes."""
    n = len(arrays["time"])
    level = {()}
    out = []
    for _ in range(n + 1):
        grown = set()
        for nodes in sorted(level):
            out.append(frozenset(nodes))
            for v in range(n):
                if v not in nodes and all(q in nodes for q in arrays["preds"][v]):
                    grown.add(tuple(sorted((*nodes, v))))
        level = grown
    return out


def ancestor_closures(arrays: dict) -> list[frozenset[int]]:
    n = len(arrays["time"])
    closure: list[frozenset[int]] = []
    for v in range(n):
        closure.append(frozenset({v}).union(*(closure[q] for q in arrays["preds"][v])))
    family = set(closure) | {frozenset(), frozenset(range(n))}
    return sorted(family, key=lambda s: (len(s), sorted(s)))


def prefixes(arrays: dict) -> list[frozenset[int]]:
    n = len(arrays["time"])
    return [frozenset(range(i)) for i in range(n + 1)]


def _segment(family, frm, to):
    return tuple(sorted(family[to] - family[frm]))


def solve_exact(arrays: dict, budget: int):
    """Pareto-front DP over every lower set: (extra_time, segments) or None."""
    family = lower_sets(arrays)
    bounds = [boundary_bytes(arrays, set(s)) for s in family]
    fronts: list[list[tuple]] = [[] for _ in family]
    fronts[0].append((0, 0.0, -1, -1, False))
    for to in range(1, len(family)):
        candidates = []
        for frm in range(to):
            if not fronts[frm] or not family[frm] < family[to]:
                continue
            nodes = _segment(family, frm, to)
            stats = segment_stats(arrays, nodes, set(family[to]))
            for recomputed in (False, True):
                for i, (kept, time, *_rest) in enumerate(fronts[frm]):
                    if kept + bounds[frm] + segment_peak(stats, recomputed) > budget:
                        continue
                    candidates.append((kept + segment_held(stats, recomputed),
                                       time + (stats["time"] if recomputed else 0.0), frm, i, recomputed))
        candidates.sort(key=lambda c: (c[0], c[1]))  # stable, as the C++ stable_sort
        for c in candidates:
            if not fronts[to] or c[1] < fronts[to][-1][1]:
                fronts[to].append(c)
    last = fronts[-1]
    pick = None
    for i, state in enumerate(last):
        if state[0] + bounds[-1] <= budget and (pick is None or state[1] < last[pick][1]):
            pick = i
    if pick is None:
        return None
    segments = []
    at, i = len(family) - 1, pick
    while at != 0:
        _, _, frm, frm_state, recomputed = fronts[at][i]
        segments.append((_segment(family, frm, at), recomputed))
        at, i = frm, frm_state
    return last[pick][1], segments[::-1]


def solve_bucketed(arrays: dict, budget: int, buckets: int, family: list[frozenset[int]]):
    """DP over `family` with kept bytes rounded up to budget/buckets: (extra_time, segments) or None."""
    unit = max(1, -(-budget // buckets))
    top = budget // unit
    f = len(family)
    best = [[math.inf] * (top + 1) for _ in range(f)]
    back = [[None] * (top + 1) for _ in range(f)]
    bounds = [boundary_bytes(arrays, set(s)) for s in family]
    best[0][0] = 0.0
    for frm in range(f):
        if all(t == math.inf for t in best[frm]):
            continue
        for to in range(frm + 1, f):
            if not family[frm] < family[to]:
                continue
            stats = segment_stats(arrays, _segment(family, frm, to), set(family[to]))
            for recomputed in (False, True):
                room = budget - bounds[frm] - segment_peak(stats, recomputed)
                if room < 0:
                    continue
                add = -(-segment_held(stats, recomputed) // unit)
                dt = stats["time"] if recomputed else 0.0
                for k in range(min(top, room // unit) + 1):
                    if k + add > top:
                        break
                    t = best[frm][k]
                    if t != math.inf and t + dt < best[to][k + add]:
                        best[to][k + add] = t + dt
                        back[to][k + add] = (frm, k, recomputed)
    pick = None
    for k in range(top + 1):
        t = best[-1][k]
        if t < math.inf and k * unit + bounds[-1] <= budget and (pick is None or t < best[-1][pick]):
            pick = k
    if pick is None:
        return None
    segments = []
    at, k = f - 1, pick
    while at != 0:
        frm, frm_k, recomputed = back[at][k]
        segments.append((_segment(family, frm, at), recomputed))
        at, k = frm, frm_k
    return best[-1][pick], segments[::-1]


def solve(method: str, arrays: dict, budget: int, buckets: int):
    if method == "dp":
        return solve_exact(arrays, budget)
    if method == "dp-approx":
        return solve_bucketed(arrays, budget, buckets, ancestor_closures(arrays))
    if method == "chain":
        return solve_bucketed(arrays, budget, buckets, prefixes(arrays))
    raise ValueError(f"reference.solve: method must be 'dp', 'dp-approx' or 'chain', got {method!r}")
