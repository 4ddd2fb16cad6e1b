"""`plan` a model's recomputation under a memory budget, `apply` it, `measure_peak` what it uses.

    plan = mk.checkpoint.plan(model, x, budget="2GB", method="dp-approx")
    print(plan)                                 # kept / recomputed nodes, predicted peak, extra time
    model = mk.checkpoint.apply(model, plan)    # same outputs and gradients, bit for bit
    mk.checkpoint.measure_peak(model, x)        # measured peak of one forward+backward

The budget is the peak bytes one forward+backward allocates above what exists before it: the
inputs, parameters, their gradients and optimizer state are not in it (memkernels.checkpoint.budget
for units). Recomputed segments run under torch.utils.checkpoint with use_reentrant=False and
preserve_rng_state=True, so dropout draws the same mask when recomputed and autocast is replayed.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memkernels.checkpoint.graph import Graph, _Program, _refs_of, as_inputs, trace
from memkernels.checkpoint.budget import parse_budget
from memkernels.checkpoint.solvers import InfeasibleBudget, Solution, format_bytes, solve
from memkernels.profile import peak_memory


@dataclass(frozen=True)
class Plan:
    """A schedule for one model and input shape: the traced graph and the solver's solution."""

    graph: Graph
    solution: Solution
    measured_peak: int | None = None  # of one forward+backward of the applied plan, when measured

    @property
    def method(self) -> str:
        return self.solution.method

    @property
    def budget(self) -> int | None:
        return self.solution.budget

    @property
    def predicted_peak(self) -> int:
        return self.solution.predicted_peak

    @property
    def extra_time(self) -> float:
        """Seconds of forward recomputed per step (the measured node times)."""
        return self.solution.extra_time

    @property
    def kept(self) -> list[str]:
        """Names of the nodes whose saved tensors are kept from forward to backward."""
        return [self.graph.nodes[v].name for v in sorted(self.solution.kept)]

    @property
    def recomputed(self) -> list[str]:
        return [self.graph.nodes[v].name for v in sorted(self.solution.recomputed)]

    def __str__(self) -> str:
        forward = sum(node.time for node in self.graph.nodes)
        budget = "none" if self.budget is None else format_bytes(self.budget)
        measured = "" if self.measured_peak is None else f", measured {format_bytes(self.measured_peak)}"
        lines = [f"checkpoint plan ({self.method}, budget {budget}): {len(self.graph)} nodes, "
                 f"{len(self.solution.segments)} segments{measured}",
                 f"  predicted peak {format_bytes(self.predicted_peak)}, extra compute "
                 f"{self.extra_time * 1e3:.3f} ms ({self.extra_time / forward:.0%} of a forward)"
                 if forward > 0 else f"  predicted peak {format_bytes(self.predicted_peak)}"]
        for nodes, recomputed in self.solution.segments:
            names = [self.graph.nodes[v].name for v in nodes]
            shown = ", ".join(names if len(names) <= 6 else names[:3] + ["..."] + names[-2:])
            inner = self.solution.nested.get(tuple(nodes))
            nested = f" (recomputation runs {len(inner)} inner segments)" if recomputed and inner else ""
            lines.append(f"  {'recompute' if recomputed else 'keep     '} [{shown}]{nested}")
        return "\n".join(lines)


def plan(model: nn.Module, example_inputs, budget: int | str | None, method: str = "dp-approx",
         *, verify: bool = True, graph: Graph | None = None, **solver_options) -> Plan:
    """Trace `model` on `example_inputs` (costs measured on their device) and solve for `budget`.

    With `verify`, the plan is applied and one forward+backward measured (`measure_peak`); when the
    measured peak passes the budget (the cost model under-counts, e.g. allocator rounding or
    buffers the trace did not see), the solver is asked again with the budget scaled down by
    budget / measured, at most 4 times. Raises memkernels.checkpoint.InfeasibleBudget (a
    ValueError) naming the least feasible budget when no schedule fits (an estimate, and said to
    be, when it comes from re-solving). `graph`: a `trace` of this model and input shape to reuse.

    Autocast: call `plan` inside the ``torch.autocast(...)`` context the model will train in, and
    run the applied model there too; trace and measurement then run in that mode (bf16 outputs
    and saved tensors are counted at their size), and recomputation replays it.
    """
    graph = trace(model, example_inputs) if graph is None else graph
    limit = None if budget is None else parse_budget(budget)
    target = limit
    for _ in range(4):
        try:
            result = Plan(graph, solve(graph, target, method, **solver_options))
        except InfeasibleBudget as error:
            if target == limit:
                raise
            # The model's least budget, scaled as the measurement said.
            raise InfeasibleBudget(method, limit, error.least_budget * limit // target,
                                   estimated=True) from error
        if not verify:
            return result
        measured = measure_peak(apply(model, result), example_inputs)
        result = replace(result, measured_peak=measured)
        if limit is None or measured <= limit:
            return replace(result, solution=replace(result.solution, budget=limit))
        target = max(0, target * limit // measured - 1)
    raise InfeasibleBudget(method, limit, measured, estimated=True)


class PlannedModule(nn.Module):
    """Runs `model` node by node as its plan says; `model` stays a submodule (same parameters)."""

    def __init__(self, model: nn.Module, plan: Plan):
        super().__init__()
        self.model = model
        self.plan = plan
        program: _Program = plan.graph.program
        n = len(program.steps)
        needed_after = [set() for _ in range(n)]  # needed_after[v]: readers of v (or n: the output)
        for v, refs in enumerate(program.refs):
            for u in refs:
                needed_after[u].add(v)
        for u in _refs_of(program.output):
            needed_after[u].add(n)
        # Outputs are dropped after their last reader, so that (as in eager mode) only what
        # autograd keeps outlives the forward.
        # Segments need not run in node order (their union is a lower set, not a prefix), so the
        # last reader is the last in the order the schedule runs them.
        position = {v: i for i, v in enumerate(v for nodes, _ in plan.solution.segments for v in nodes)}
        position[n] = n
        self._last_reader = [max(readers, key=position.__getitem__, default=-1) for readers in needed_after]
        self._needed_after = needed_after
        self._schedule = self._compile(plan.solution.segments)

    def _compile(self, segments) -> list[tuple]:
        """Per segment: nodes, recomputed, the nodes it reads from outside, the nodes read outside
        it, and its compiled inner schedule when its recomputation runs one (nested, "log")."""
        program: _Program = self.plan.graph.program
        nested = self.plan.solution.nested
        compiled = []
        for nodes, recomputed in segments:
            members = set(nodes)
            reads = sorted({u for v in nodes for u in program.refs[v] if u not in members})
            exports = [v for v in nodes if any(r not in members for r in self._needed_after[v])]
            inner = self._compile(nested[tuple(nodes)]) if recomputed and tuple(nodes) in nested else None
            compiled.append((list(nodes), recomputed, reads, exports, inner))
        return compiled

    def _run(self, nodes, inputs, env):
        program = self.plan.graph.program
        for v in nodes:
            env[v] = program.run_step(v, self.model, inputs, env)
            self._release(program.refs[v], {v}, env)

    def _release(self, reads, readers, env):
        for u in reads:
            if self._last_reader[u] in readers:
                env.pop(u, None)

    def _run_schedule(self, schedule, inputs, env):
        for nodes, recomputed, reads, exports, inner in schedule:
            if not recomputed:
                self._run(nodes, inputs, env)
                continue

            def segment(*values, _nodes=nodes, _reads=reads, _exports=exports, _inner=inner):
                local = dict(zip(_reads, values[len(inputs):]))
                if _inner is None:
                    self._run(_nodes, values[:len(inputs)], local)
                else:  # nested: inner recomputed segments are checkpoints inside this one
                    self._run_schedule(_inner, values[:len(inputs)], local)
                return tuple(local[v] for v in _exports)

            outs = checkpoint(segment, *inputs, *(env[u] for u in reads),
                              use_reentrant=False, preserve_rng_state=True)
            env.update(zip(exports, outs))
            self._release(reads, set(nodes), env)

    def forward(self, *inputs):
        program: _Program = self.plan.graph.program
        env: dict[int, Any] = {}
        self._run_schedule(self._schedule, inputs, env)
        return program.resolve(program.output, self.model, inputs, env)


def apply(model: nn.Module, plan: Plan) -> PlannedModule:
    """`model` wrapped to run `plan`: the same outputs and gradients, bit for bit (dropout
    included), within the plan's budget. Inputs must have the shapes the plan was traced with."""
    if not isinstance(plan, Plan):
        raise TypeError(f"apply: plan must be a memkernels.checkpoint.Plan, got {type(plan).__name__}")
    if plan.graph.program is None:
        raise ValueError("apply: the plan's graph was built by hand, not traced from a model; "
                         "use memkernels.checkpoint.plan(model, ...)")
    return PlannedModule(model, plan)


def measure_peak(model: nn.Module, example_inputs) -> int:
    """Measured peak bytes of one forward and backward (of the outputs' sum) of `model`, above what
    exists before: parameter gradients are allocated (zeros) first so that they are not counted,
    and left as they were found."""
    inputs = as_inputs(example_inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    previous = [p.grad for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    try:
        device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), None)
        return peak_memory(model, *inputs, device=device)
    finally:
        for p, grad in zip(params, previous):
            p.grad = grad
