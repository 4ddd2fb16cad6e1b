"""`plan` a model's recomputation under a memory budget, `apply` it, `measure_peak` what it uses.

    plan = mk.checkpoint.plan(model, x, budget="2GB", method="dp-approx")
    print(plan)                                 # kept / recomputed nodes, predicted peak, extra time
    model = mk.checkpoint.apply(model, plan)    # same outputs and gradients, bit for bit
    mk.checkpoint.measure_peak(model, x)        # measured peak of one forward+backward

The budget is the peak bytes one forward+backward allocates above what exists before it: the
inputs, parameters, their gradients and optimizer state are not in it (memkernels.checkpoint.budget
for units). Recomputed segments run under torch.utils.checkpoint with use_reentrant=False and
preserve_rng_state=True, so dropout draws the same mask when recomputed and autocast is replayed;
a recomputed node that updates buffers (BatchNorm's running stats) replays on their values from
before its forward and leaves them as they were, so they are updated once a step.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memkernels.checkpoint.graph import (Graph, _get_attr, _leaf_copy, _Program, _refs_of, as_inputs,
                                         restore_buffers_and_rng, trace)
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


def plan(model: nn.Module, example_inputs, budget: int | float | str | None, method: str = "dp-approx",
         *, verify: bool = True, graph: Graph | None = None, **solver_options) -> Plan:
    """Trace `model` on `example_inputs` (costs measured on their device) and solve for `budget`.

    With `verify`, the plan is applied and one forward+backward measured (`measure_peak`; the
    model's buffers and the RNG states are put back after it); when the measured peak passes the
    budget (the cost model under-counts, e.g. allocator rounding or buffers the trace did not see),
    the solver is asked again with the budget scaled down by budget / measured, at most 4 times.
    Raises memkernels.checkpoint.InfeasibleBudget (a ValueError) naming the least feasible budget
    when no schedule fits (an estimate, and said to be, when it comes from re-solving). `graph`: a
    `trace` of this model and input shape to reuse. Raises TypeError for a PlannedModule.

    Autocast: call `plan` inside the ``torch.autocast(...)`` context the model will train in, and
    run the applied model there too; trace and measurement then run in that mode (bf16 outputs
    and saved tensors are counted at their size), and recomputation replays it.
    """
    _check_not_planned(model, "plan")
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
        with restore_buffers_and_rng(model):
            measured = measure_peak(apply(model, result), example_inputs)
        result = replace(result, measured_peak=measured)
        if limit is None or measured <= limit:
            return replace(result, solution=replace(result.solution, budget=limit))
        target = max(0, target * limit // measured - 1)
    raise InfeasibleBudget(method, limit, measured, estimated=True)


class PlannedModule(nn.Module):
    """Runs `model` node by node as its plan says; `model` stays a submodule (same parameters), and
    state_dict / load_state_dict, named_parameters and named_buffers use the model's own names (no
    "model." prefix). It takes the inputs
    the plan was traced with, positionally or by name, and forward's other arguments at the values
    they were traced with (their defaults). Under torch.no_grad (nothing kept for a backward) it
    runs `model` itself, on whatever it is given."""

    def __init__(self, model: nn.Module, plan: Plan):
        super().__init__()
        self.model = model
        self.plan = plan
        self.register_state_dict_post_hook(_drop_model_prefix)
        self.register_load_state_dict_pre_hook(_add_model_prefix)
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

    def _run(self, nodes, inputs, env, snapshots=None, recomputing=False):
        """Runs `nodes` into `env`. `snapshots` (given in recomputed segments): per node that updates
        buffers, their values from before its forward run; its recomputation runs on those, then
        puts back the values it found, so that it replays the forward and leaves the buffers alone."""
        program = self.plan.graph.program
        for v in nodes:
            writes = program.steps[v].writes if snapshots is not None else ()
            buffers = [_get_attr(self.model, name) for name in writes]
            if not buffers:
                env[v] = program.run_step(v, self.model, inputs, env)
            elif not recomputing:
                snapshots[v] = [b.clone() for b in buffers]
                env[v] = program.run_step(v, self.model, inputs, env)
            else:
                found = [b.clone() for b in buffers]
                _copy_into(buffers, snapshots[v])
                try:  # a recomputation stops (raises) once it has what the backward needs
                    env[v] = program.run_step(v, self.model, inputs, env)
                finally:
                    _copy_into(buffers, found)
            self._release(program.refs[v], {v}, env)

    def _release(self, reads, readers, env):
        for u in reads:
            if self._last_reader[u] in readers:
                env.pop(u, None)

    def _run_schedule(self, schedule, inputs, env, snapshots=None, recomputing=False):
        """Runs `schedule` into `env`; inside a recomputed segment, `snapshots` is its buffer
        snapshots (see _run) and `recomputing` tells a recomputation from the forward run."""
        for nodes, recomputed, reads, exports, inner in schedule:
            if not recomputed:
                self._run(nodes, inputs, env, snapshots, recomputing)
                continue
            # The segment's function runs first as the forward (or as part of a recomputation),
            # then only as recomputations.
            runs = itertools.chain([recomputing], itertools.repeat(True))

            def segment(*values, _nodes=nodes, _reads=reads, _exports=exports, _inner=inner, _runs=runs,
                        _snapshots={} if snapshots is None else snapshots):
                local = dict(zip(_reads, values[len(inputs):]))
                again = next(_runs)
                if _inner is None:
                    self._run(_nodes, values[:len(inputs)], local, _snapshots, again)
                else:  # nested: inner recomputed segments are checkpoints inside this one
                    self._run_schedule(_inner, values[:len(inputs)], local, _snapshots, again)
                return tuple(local[v] for v in _exports)

            outs = checkpoint(segment, *inputs, *(env[u] for u in reads),
                              use_reentrant=False, preserve_rng_state=True)
            env.update(zip(exports, outs))
            self._release(reads, set(nodes), env)

    def forward(self, *inputs, **kwargs):
        if not torch.is_grad_enabled():  # nothing is kept for a backward: nothing to recompute
            return self.model(*inputs, **kwargs)
        self._check_model()
        program: _Program = self.plan.graph.program
        inputs = program.bind(self.model, inputs, kwargs)
        env: dict[int, Any] = {}
        self._run_schedule(self._schedule, inputs, env)
        return program.output_of(self.model, inputs, env)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """The model's parameters under its own names, as state_dict gives them (torch's
        checkpoint_wrapper does the same), so that name-built parameter groups carry over."""
        for name, p in super().named_parameters(prefix, recurse, remove_duplicate):
            yield _without_model_prefix(name, prefix), p

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """The model's buffers under its own names, as named_parameters."""
        for name, b in super().named_buffers(prefix, recurse, remove_duplicate):
            yield _without_model_prefix(name, prefix), b

    def _check_model(self):
        """fx bakes `self.training` into the traced steps, and the measured costs depend on it.
        The model's own hooks would not run: its forward is never called."""
        hooks = self.model._forward_pre_hooks or self.model._forward_hooks or self.model._backward_hooks \
            or self.model._backward_pre_hooks
        if hooks:
            raise RuntimeError(f"checkpoint plan: {type(self.model).__name__} has hooks of its own, which a "
                               "PlannedModule, running it node by node, would not call; register them on "
                               "the PlannedModule (or on the modules inside) instead")
        traced = self.plan.graph.program.training
        if tuple(m.training for m in self.model.modules()) == traced:
            return
        for (name, module), training in zip(self.model.named_modules(), traced):
            if module.training != training:
                mode = {True: "train", False: "eval"}
                raise RuntimeError(
                    f"checkpoint plan: module {name or type(self.model).__name__!r} is in "
                    f"{mode[module.training]} mode, but the plan was traced with it in {mode[training]} "
                    "mode; re-plan the model in the current mode, or run it under torch.no_grad()")
        raise RuntimeError("checkpoint plan: the model's modules changed since the plan was traced; re-plan it")


def _copy_into(tensors: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for t, value in zip(tensors, values):
            t.copy_(value)


def _without_model_prefix(name: str, prefix: str) -> str:
    """"model.0.weight" -> "0.weight" (after `prefix` and its dot, when given)."""
    head = prefix + "." if prefix else ""
    return head + name[len(head) + len("model."):] if name.startswith(head + "model.") else name


def _drop_model_prefix(module, state_dict, prefix, local_metadata):
    """state_dict post-hook of a PlannedModule: the wrapped model's entries, and its modules'
    versions (state_dict._metadata, keyed by module path), under the model's own keys."""
    inner = prefix + "model."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)
    metadata = getattr(state_dict, "_metadata", {})
    for path in [p for p in metadata if (p + ".").startswith(inner)]:  # "model" -> "", "model.0" -> "0"
        metadata[(prefix + (path + ".")[len(inner):])[:-1]] = metadata.pop(path)


def _add_model_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                      error_msgs):
    """load_state_dict pre-hook of a PlannedModule: the model's own keys go to the wrapped model."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[prefix + "model." + key[len(prefix):]] = state_dict.pop(key)


def _check_module(model: nn.Module, caller: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be an nn.Module, got {type(model).__name__}")


def _check_not_planned(model: nn.Module, caller: str) -> None:
    _check_module(model, caller)
    if isinstance(model, PlannedModule):
        raise TypeError(f"{caller}: the model is already a PlannedModule; pass its unplanned .model")


def apply(model: nn.Module, plan: Plan) -> PlannedModule:
    """`model` wrapped to run `plan`: the same outputs and gradients, bit for bit (dropout
    included), within the plan's budget. Inputs must have the shapes the plan was traced with.
    Raises TypeError for a model that is already a PlannedModule (apply the plan to its .model)."""
    if not isinstance(plan, Plan):
        raise TypeError(f"apply: plan must be a memkernels.checkpoint.Plan, got {type(plan).__name__}")
    _check_not_planned(model, "apply")
    if plan.graph.program is None:
        raise ValueError("apply: the plan's graph was built by hand, not traced from a model; "
                         "use memkernels.checkpoint.plan(model, ...)")
    return PlannedModule(model, plan)


def measure_peak(model: nn.Module, example_inputs) -> int:
    """Measured peak bytes of one forward and backward (of the outputs' sum) of `model`, above what
    exists before: parameter gradients are allocated (zeros) first so that they are not counted,
    and left as they were found; the inputs' gradients go to copies of them."""
    _check_module(model, "measure_peak")
    inputs = _leaf_copy(as_inputs(example_inputs))
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
