"""Quantisation tables of the few-bit activation derivative (Novikov et al. 2023, "Few-bit backward").

A k-bit table replaces f' by a piecewise-constant function with ``2**k`` levels: ``borders`` (sorted,
``2**k - 1`` of them) cut the x axis into intervals, ``code(x) = #{borders < x}`` (reference.codes)
names the interval, and backward multiplies the gradient by ``levels[code]``. The table minimises

    E_{x ~ N(0, 1)} (f'(x) - levels[code(x)])**2,

so every level is the N(0, 1)-weighted mean of f' over its interval, and the borders are chosen by

1. an exact dynamic programme over a coarse grid (1024 cells) for up to 16 intervals, which finds the
   global optimum there even for f' that is not monotone (GELU, SiLU) or that jumps (SELU at 0);
2. splitting every interval of the (k-1)-bit table at its best point, so the error never grows with k;
3. coordinate descent on a fine grid (65536 cells of width 2**-12 on [-8, 8]): each border in turn
   moves to the best point between its neighbours, levels re-fitted. At convergence every border is
   stationary, f'(b_i) = (levels[i] + levels[i+1]) / 2 wherever f' is continuous at b_i.

The k-bit result is the better of (1)+(3) and (2)+(3). Where f' is flat the optimum is not unique
(a step function needs as many levels as it has steps, not 256): among border positions whose error
is equal, the one that splits the probability mass most evenly is taken, so no interval is empty,
adjacent intervals share a level, and the output is deterministic. Grid nodes are dyadic, so every
border is exactly a float32; integers are nodes, so the jumps of the built-in derivatives (0, +-3)
fall on cell edges (a jump inside a cell costs that one cell: its mean comes from 3 Gauss points).
Mass beyond +-8 (about 1e-15) is ignored; the end intervals stand for (-inf, b_0] and (b_last, inf).

``value_levels[i]`` is the weighted mean of f itself over interval i: gated units (y = f(a) * b) need
f(a) in backward and keep only the code of a.

ReLU, LeakyReLU and Hardsigmoid are not fitted: their f' takes two values, which one border codes
exactly (Hardsigmoid's on -|x|), so they keep 1 bit whatever ``bits`` is.

Shipped tables (tables.json, written by scripts/make_tables.py) cover every activation at torch's
default parameters for bits 1, 2, 3, 4 and 8; other parameters are fitted on demand (~0.3 s) and
cached.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Callable

import numpy as np
import torch

from memkernels import reference
from memkernels.activations.spec import PARAMS, TWO_VALUED, VALID_BITS, Activation, default_params

GRID_LIMIT = 8.0
GRID_CELLS = 1 << 16  # cell width 2**-12
DENSITY = "N(0, 1)"
MAX_BITS = 8  # codes are uint8

_DP_CELL_FACTOR = 64  # the dynamic programme runs on GRID_CELLS / 64 = 1024 coarse cells
_DP_MAX_INTERVALS = 16  # its cost grows with the number of intervals; beyond 16, splitting suffices
_WINDOW = 64  # coordinate descent looks this many fine cells either side of a border
_MAX_SWEEPS = 32  # later sweeps move the error by < 0.1% (measured on GELU, 8 bits)
# Border positions whose error differs by less than this (relative to the error of the two
# intervals, plus a floor for rounding in a flat f') count as ties.
_TIE_RTOL = 1e-9
_TIE_FLOOR = 1e-20

# 3-point Gauss-Legendre on [-1, 1]: exact for polynomials of degree 5 within a cell.
_GAUSS_NODES = (-math.sqrt(0.6), 0.0, math.sqrt(0.6))
_GAUSS_WEIGHTS = (5.0 / 9.0, 8.0 / 9.0, 5.0 / 9.0)


@dataclass(frozen=True, eq=False)  # eq=False: tensor fields have no boolean ==; compare by identity
class Table:
    """A k-bit table of an activation's derivative (CPU float32 tensors; do not modify them).

    borders: (2**bits - 1,), strictly increasing and finite; code(x) = #{borders < x}.
    levels: (2**bits,), mean of f' over each interval under N(0, 1).
    value_levels: (2**bits,), mean of f over each interval (zeros when fitted without f).
    """

    bits: int
    borders: torch.Tensor
    levels: torch.Tensor
    value_levels: torch.Tensor


def _quadrature(nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Points and weights, both (len(nodes) - 1, 3) float64, integrating g * N(0,1) pdf per cell."""
    left, width = nodes[:-1, None], (nodes[1:] - nodes[:-1])[:, None]
    gauss = torch.tensor(_GAUSS_NODES, dtype=torch.float64)
    x = left + width * (gauss + 1.0) / 2.0
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return x, pdf * torch.tensor(_GAUSS_WEIGHTS, dtype=torch.float64) * width / 2.0


def _evaluate(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, name: str) -> torch.Tensor:
    """fn(x) as float64 of x's shape; a scalar result is broadcast (a constant f')."""
    y = torch.as_tensor(fn(x)).to(torch.float64).expand_as(x)
    # Levels are float32, and the fit sums squares in float64: past float32's range it would
    # overflow to inf and NaN.
    bad = ~(y.abs() <= torch.finfo(torch.float32).max)
    if bad.any():
        raise ValueError(f"{name} is not finite in float32 at x = {x[bad][0].item():.6g} (and "
                         f"{int(bad.sum()) - 1} other grid points); tables need f' and f finite in float32 "
                         f"on [-{GRID_LIMIT}, {GRID_LIMIT}]")
    return y


def _grid_nodes() -> torch.Tensor:
    return torch.linspace(-GRID_LIMIT, GRID_LIMIT, GRID_CELLS + 1, dtype=torch.float64)


def _border_values(edges: np.ndarray) -> torch.Tensor:
    """Fine-grid node indices -> x, float32 (exact: the nodes are multiples of 2**-12)."""
    return torch.from_numpy(edges * (2.0 * GRID_LIMIT / GRID_CELLS) - GRID_LIMIT).to(torch.float32)


class _CellMoments:
    """Per-cell integrals of the N(0,1) weight against 1, f' and f'**2 on the fine grid.

    Interval sums come from prefix sums taken from the left for cells left of 0 and from the right
    for cells right of 0, so the tiny masses of the tails keep their precision. f' is centred on
    its mean first, which changes no error and keeps the second moments small. The search runs in
    numpy: its many small steps cost microseconds there, and no thread pool is woken for them.
    """

    def __init__(self, weights: torch.Tensor, derivative: torch.Tensor):
        w, d = weights.numpy(), derivative.numpy()
        mass = w.sum(axis=1)
        total_mass = mass.sum()
        centred = d - (w * d).sum() / total_mass
        moments = (mass, (w * centred).sum(axis=1), (w * centred * centred).sum(axis=1))
        self._from_left = [np.concatenate([[0.0], np.cumsum(m)]) for m in moments]
        self._from_right = [np.concatenate([np.cumsum(m[::-1])[::-1], [0.0]]) for m in moments]
        # Rounding scale of the centred moments: a constant f' must read as exactly flat.
        self.tie_floor = _TIE_FLOOR * float((w * d * d).sum() / total_mass)

    def range_sum(self, moment: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Sum of moment 0 (mass), 1 (centred f') or 2 over cells [lo, hi); lo, hi node indices."""
        left, right = self._from_left[moment], self._from_right[moment]
        return np.where(lo >= GRID_CELLS // 2, right[lo] - right[hi], left[hi] - left[lo])

    def explained(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """S1**2 / M of cells [lo, hi): the part of the second moment that the interval's mean keeps."""
        s1 = self.range_sum(1, lo, hi)
        return s1 * s1 / self.range_sum(0, lo, hi)

    def error(self, edges: np.ndarray) -> float:
        """Weighted squared error of the table with interior borders at node indices `edges`."""
        lo, hi = _intervals(edges)
        return float((self.range_sum(2, lo, hi) - self.explained(lo, hi)).sum())


def _intervals(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) node indices of every interval cut by interior border indices `edges`."""
    full = np.concatenate([[0], edges, [GRID_CELLS]])
    return full[:-1], full[1:]


def _best_split(moments: _CellMoments, lo: np.ndarray, hi: np.ndarray,
                first: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each pair of intervals [lo, q), [q, hi), the node q in [first, last] of least error.

    All int64 (S,) with lo < first <= last < hi. Returns q (S,) and the gain (S,) float64: error of
    [lo, hi) as one interval minus that of the best split. Ties go to the most even split of the mass,
    then to the smallest q.
    """
    count = last - first + 1
    starts = np.cumsum(count) - count  # candidates of pair s: [starts[s], starts[s] + count[s])
    pair = np.repeat(np.arange(lo.size), count)
    q = first[pair] + np.arange(pair.size) - starts[pair]
    a, b = lo[pair], hi[pair]
    kept = moments.explained(a, q) + moments.explained(q, b)
    best = np.maximum.reduceat(kept, starts)
    tolerance = _TIE_RTOL * moments.range_sum(2, lo, hi) + moments.tie_floor * moments.range_sum(0, lo, hi)
    tie = kept >= (best - tolerance)[pair]
    imbalance = np.where(tie, np.abs(moments.range_sum(0, a, q) - moments.range_sum(0, q, b)), np.inf)
    least = np.minimum.reduceat(imbalance, starts)
    q_best = np.minimum.reduceat(np.where(tie & (imbalance == least[pair]), q, GRID_CELLS), starts)
    return q_best, best - moments.explained(lo, hi)


def _refine(moments: _CellMoments, edges: np.ndarray) -> np.ndarray:
    """Coordinate descent: borders of even, then odd index move to their best node between their
    neighbours (at most _WINDOW cells away), until none moves or _MAX_SWEEPS sweeps."""
    edges = edges.copy()
    for _ in range(_MAX_SWEEPS):
        before = edges.copy()
        for parity in (0, 1):
            index = np.arange(parity, edges.size, 2)
            if index.size == 0:
                continue
            lo, hi = _intervals(edges)
            lo, hi = lo[index], hi[index + 1]
            first = np.maximum(lo + 1, edges[index] - _WINDOW)
            last = np.minimum(hi - 1, edges[index] + _WINDOW)
            edges[index] = _best_split(moments, lo, hi, first, last)[0]
        if np.array_equal(before, edges):
            break
    return edges


def _split_all(moments: _CellMoments, edges: np.ndarray) -> np.ndarray:
    """Double the number of intervals, splitting each at its best node. An interval of one cell
    cannot be split; its share goes to the intervals whose split gains most."""
    wanted = edges.size + 1
    while wanted > 0:
        lo, hi = _intervals(edges)
        splittable = hi - lo >= 2
        if not splittable.any():
            raise AssertionError("no interval left to split")  # 2**MAX_BITS << GRID_CELLS
        lo, hi = lo[splittable], hi[splittable]
        q, gain = _best_split(moments, lo, hi, lo + 1, hi - 1)
        chosen = q[np.argsort(-gain, kind="stable")[:wanted]]
        edges = np.sort(np.concatenate([edges, chosen]))
        wanted -= chosen.size
    return edges


def _dynamic_programme(moments: _CellMoments, max_intervals: int) -> dict[int, np.ndarray]:
    """Globally optimal borders on the coarse grid for 2, 4, ... max_intervals intervals.

    best[j] = least error of covering coarse cells [0, j) with k intervals; O(k * 1024**2).
    Returns {intervals: fine node indices of the borders}.
    """
    coarse = GRID_CELLS // _DP_CELL_FACTOR
    nodes = np.arange(coarse + 1) * _DP_CELL_FACTOR
    lo, hi = np.meshgrid(nodes, nodes, indexing="ij")
    valid = hi > lo
    lo, hi = np.where(valid, lo, 0), np.where(valid, hi, GRID_CELLS)
    cost = np.where(valid, moments.range_sum(2, lo, hi) - moments.explained(lo, hi), np.inf)
    best = cost[0]
    choices, found = [], {}
    for intervals in range(2, max_intervals + 1):
        total = best[:, None] + cost
        choice = total.argmin(axis=0)
        best = total[choice, np.arange(coarse + 1)]
        choices.append(choice)
        if intervals & (intervals - 1) == 0:
            end, cuts = coarse, []
            for choice_k in reversed(choices):
                end = int(choice_k[end])
                cuts.append(end)
            found[intervals] = np.array(cuts[::-1], dtype=np.int64) * _DP_CELL_FACTOR
    return found


def _optimal_edges(moments: _CellMoments, bits: int) -> np.ndarray:
    """Fine node indices of the 2**bits - 1 borders; the error is non-increasing in bits."""
    from_dp = _dynamic_programme(moments, min(2 ** bits, _DP_MAX_INTERVALS))
    edges = np.zeros(0, dtype=np.int64)
    for k in range(1, bits + 1):
        edges = _refine(moments, _split_all(moments, edges))
        if 2 ** k in from_dp:
            candidate = _refine(moments, from_dp[2 ** k])
            error, error_dp = moments.error(edges), moments.error(candidate)
            # The DP start must win by more than rounding: a flat f' keeps the even split.
            if error_dp < error - _TIE_RTOL * max(error, 0.0) - moments.tie_floor:
                edges = candidate
    return edges


def _code_means(weights: torch.Tensor, weighted_values: torch.Tensor, codes: torch.Tensor,
                count: int) -> torch.Tensor:
    """sum(weighted_values) / sum(weights) over the entries of each code in range(count); 1-D
    tensors of one length."""
    mass = torch.zeros(count, dtype=torch.float64).index_add_(0, codes, weights)
    return torch.zeros(count, dtype=torch.float64).index_add_(0, codes, weighted_values) / mass


def _interval_means(weights: torch.Tensor, values: torch.Tensor, borders: torch.Tensor) -> torch.Tensor:
    """Weighted mean of `values` over each interval; weights, values (S, 3) on the fine grid."""
    # Borders are grid nodes: the cell [t, t + h) lies in interval #{borders <= t}.
    cell_codes = torch.bucketize(_grid_nodes()[:-1], borders.to(torch.float64), right=True)
    return _code_means(weights.sum(1), (weights * values).sum(1), cell_codes, borders.numel() + 1)


def fit_table(derivative: Callable[[torch.Tensor], torch.Tensor],
              value: Callable[[torch.Tensor], torch.Tensor] | None, bits: int) -> Table:
    """The least-squares ``bits``-bit table of any f (see the module docstring for the method).

    derivative, value: f' and f, element-wise on float64 tensors of any shape (a scalar result is
    broadcast); both must be finite on [-8, 8]. value=None: value_levels are zeros (no gated use).
    bits: 1..8. Takes ~0.3 s for bits=8.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in 1..{MAX_BITS}, got {bits!r}")
    x, weights = _quadrature(_grid_nodes())
    derivative_values = _evaluate(derivative, x, "derivative")
    borders = _border_values(_optimal_edges(_CellMoments(weights, derivative_values), bits))
    levels = _interval_means(weights, derivative_values, borders)
    if value is None:
        value_levels = torch.zeros_like(levels)
    else:
        value_levels = _interval_means(weights, _evaluate(value, x, "value"), borders)
    return Table(bits, borders, levels.to(torch.float32), value_levels.to(torch.float32))


def integrated_error(table: Table, derivative: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """E_{x ~ N(0,1)} (f'(x) - levels[code(x)])**2 for any table, by 3-point Gauss-Legendre on the
    fine grid refined at the table's borders (so a border need not be a grid node)."""
    borders = table.borders.to(torch.float64)
    inside = borders[(borders > -GRID_LIMIT) & (borders < GRID_LIMIT)]
    nodes = torch.unique(torch.cat([_grid_nodes(), inside]))  # sorted
    x, weights = _quadrature(nodes)
    cell_codes = torch.bucketize((nodes[:-1] + nodes[1:]) / 2, borders, right=False)
    residual = _evaluate(derivative, x, "derivative") - table.levels.to(torch.float64)[cell_codes][:, None]
    return float((weights * residual * residual).sum())


def _used_params(act: Activation, p0: float | None, p1: float | None) -> tuple[float, float]:
    """(p0, p1) with torch's defaults for None and 0.0 in the slots `act` does not use."""
    used, defaults = len(PARAMS.get(act, ())), default_params(act)
    return tuple(0.0 if i >= used else float(defaults[i] if given is None else given)
                 for i, given in enumerate((p0, p1)))  # type: ignore[return-value]


def fit_activation_table(act: Activation | int, bits: int, p0: float | None = None,
                         p1: float | None = None) -> Table:
    """fit_table for a built-in activation (reference.py's f and f', float64), no shipped tables."""
    act = Activation(act)
    p0, p1 = _used_params(act, p0, p1)
    try:
        return fit_table(lambda x: reference.activation_derivative(x, act, p0, p1),
                         lambda x: reference.activation_value(x, act, p0, p1), bits)
    except ValueError as error:
        given = ", ".join(f"{name}={value}" for (name, _), value in zip(PARAMS.get(act, ()), (p0, p1)))
        raise ValueError(f"{act.name} ({given}), bits={bits}: {error}") from error


# The exact 1-bit table of a two-valued f': its border, and an x of code 0 and one of code 1.
_TWO_VALUED_CODES = {
    Activation.RELU: (0.0, (-1.0, 1.0)),  # code: x > 0
    Activation.LEAKY_RELU: (0.0, (-1.0, 1.0)),
    Activation.HARDSIGMOID: (-3.0, (4.0, 0.0)),  # code: -|x| > -3, that is -3 < x < 3
}


def _two_valued_table(act: Activation, p0: float) -> Table:
    """ReLU, LeakyReLU, Hardsigmoid: f' is exactly levels[code] with one border."""
    border, sides = _TWO_VALUED_CODES[act]
    borders = torch.tensor([border], dtype=torch.float32)
    levels = reference.activation_derivative(torch.tensor(sides, dtype=torch.float64), act, p0)
    x, weights = _quadrature(_grid_nodes())
    # value_levels: the mean of f over each code (Hardsigmoid's code 1 is not one interval of x)
    codes = reference.activation_codes(x, act, borders).long()
    values = _code_means(weights.reshape(-1), (weights * reference.activation_value(x, act, p0)).reshape(-1),
                         codes, 2)
    return Table(1, borders, levels.to(torch.float32), values.to(torch.float32))


@functools.cache
def _shipped() -> dict:
    """tables.json, read once."""
    text = resources.files("memkernels.activations").joinpath("tables.json").read_text()
    return json.loads(text)


def _shipped_table(act: Activation, bits: int, params: tuple[float, float]) -> Table | None:
    entry = _shipped()["activations"].get(act.name)
    if entry is None or tuple(entry["params"]) != params or str(bits) not in entry["tables"]:
        return None
    table = entry["tables"][str(bits)]
    return Table(bits, *(torch.tensor(table[name], dtype=torch.float32)
                         for name in ("borders", "levels", "value_levels")))


@functools.lru_cache(maxsize=None)
def _table(act: Activation, bits: int, p0: float, p1: float) -> Table:
    """get_table's cached work, on normalised arguments."""
    if act in TWO_VALUED:
        return _two_valued_table(act, p0)
    shipped = _shipped_table(act, bits, (p0, p1))
    return shipped if shipped is not None else fit_activation_table(act, bits, p0, p1)


def get_table(act: Activation | int, bits: int, p0: float | None = None, p1: float | None = None) -> Table:
    """The ``bits``-bit table of a built-in activation with parameters (p0, p1) (None: torch's default).

    ReLU, LeakyReLU and Hardsigmoid get their exact 1-bit table whatever ``bits`` is (Hardsigmoid's
    codes -|x|: reference.activation_codes). Others: the shipped table at
    default parameters, else fitted now; cached per (act, bits, p0, p1). Parameters an activation does
    not use are ignored.
    """
    act = Activation(act)
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise ValueError(f"bits must be one of {VALID_BITS}, got {bits!r}")
    return _table(act, 1 if act in TWO_VALUED else bits, *_used_params(act, p0, p1))
