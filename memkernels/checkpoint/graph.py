"""The graph the checkpoint solvers plan over, and `trace`, which measures it on a real model.

A `Graph` is a DAG of nodes numbered in a topological order (every edge goes from a lower to a
higher number). Each node carries the costs of the model in memkernels/checkpoint/solvers.py:

- ``time``: seconds of its forward.
- ``output_bytes``: bytes of the storage its output allocates (0 for a view of another node's).
- ``kept_bytes``: bytes autograd keeps for its backward that it allocated itself (internal buffers:
  a dropout mask, a packed k-bit code), not counting its output storage.
- ``saved_by``: the nodes whose backward keeps this node's output storage: itself (ReLU keeps its
  result) or nodes that read it (Linear keeps its input). Which of them hold it depends on the
  schedule: a recomputed segment keeps nothing until its backward.
- ``forward_peak``: peak bytes its forward allocates above what exists before it (output included).
- ``backward_peak``: peak bytes its backward allocates above its saved tensors and its output's
  gradient (the gradients it produces and its temporaries).
- ``grad_bytes``: bytes of the gradient of its output.
- ``view_of``: the node whose storage its output views, if any.
- ``is_output``: its output is (part of) the model's output.

`trace` builds one from a model: an ``nn.Sequential`` becomes a chain of its children (a repeated
module once per place, as its forward runs them); any other module is traced with
``torch.fx.symbolic_trace`` into a DAG of module calls, functions and methods (residual branches
included; torch.nn and memkernels.nn modules stay single nodes), with forward's arguments past
the example inputs fixed at their defaults. A node that modifies a tensor in
place (``ReLU(inplace=True)``) becomes one node with the nodes whose outputs live on that tensor's
storage (the one that made it, views of it), so that no segment boundary falls between them. Every
node runs once on the example inputs on their device, its costs measured there: bytes kept counted
as ``memkernels.profile.saved_bytes`` counts them (distinct storages at their real size, so packed
codes count as packed; parameters and the model's inputs not at all), peaks with
``memkernels.profile.peak_memory``.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import operator
import statistics
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from memkernels.profile import peak_memory


# The most bytes a graph may add up to (peak_bound): every peak the solvers form stays below it,
# and the C++ solvers' int64 sums of them with a budget (at most this too) cannot overflow.
MAX_BYTES = 2**62


@dataclass(frozen=True)
class Node:
    """One node's costs (see the module docstring). Defaults for hand-built graphs: the forward
    allocates its output and kept bytes, the backward the gradients of its inputs."""

    name: str
    time: float
    output_bytes: int
    kept_bytes: int = 0
    saved_by: tuple[int, ...] = ()
    forward_peak: int | None = None
    backward_peak: int | None = None
    grad_bytes: int | None = None
    view_of: int | None = None
    is_output: bool = False


class Graph:
    """Nodes in a topological order and edges ``(u, v)``, u < v: v reads u's output.
    ``checkpoint_bytes``: what each checkpoint keeps of its own on the measured device until its
    backward (the CPU RNG state it stashes, when measuring on CPU).

    ``Graph.chain(times, output_bytes, saved_bytes)`` builds a chain; `trace` measures a model.
    """

    def __init__(self, nodes: Sequence[Node], edges: Sequence[tuple[int, int]], checkpoint_bytes: int = 0):
        n = len(nodes)
        if n == 0:
            raise ValueError("Graph: no nodes, nothing to plan")
        if not checkpoint_bytes >= 0:  # NaN too
            raise ValueError(f"checkpoint_bytes must be >= 0, got {checkpoint_bytes}")
        self.checkpoint_bytes = checkpoint_bytes
        self.preds: list[list[int]] = [[] for _ in range(n)]
        self.succs: list[list[int]] = [[] for _ in range(n)]
        for v, node in enumerate(nodes):
            if not isinstance(node, Node):
                raise TypeError(f"Graph: nodes must be memkernels.checkpoint.Node, got {type(node).__name__} at {v}")
        for edge in edges:
            if not (isinstance(edge, (tuple, list)) and len(edge) == 2):
                raise ValueError(f"Graph: each edge must be a pair (u, v) of node numbers, got {edge!r}")
            u, v = edge
            if not (0 <= u < v < n):
                raise ValueError(f"edge ({u}, {v}): edges must go from a lower to a higher node "
                                 f"number in 0..{n - 1} (nodes in a topological order)")
            if u not in self.preds[v]:
                self.preds[v].append(u)
                self.succs[u].append(v)
        filled = []
        for v, node in enumerate(nodes):
            if not math.isfinite(node.time) or node.time < 0:
                raise ValueError(f"node {v} ({node.name}): time must be >= 0 and finite, got {node.time}")
            for name in ("output_bytes", "kept_bytes", "forward_peak", "backward_peak", "grad_bytes"):
                value = getattr(node, name)
                if value is not None and value < 0:
                    raise ValueError(f"node {v} ({node.name}): {name} must be >= 0, got {value}")
            if node.view_of is not None and not (0 <= node.view_of < v):
                raise ValueError(f"node {v} ({node.name}): view_of must be an earlier node, got {node.view_of}")
            grad = node.output_bytes if node.grad_bytes is None else node.grad_bytes
            forward = node.output_bytes + node.kept_bytes if node.forward_peak is None else node.forward_peak
            backward = (sum(filled[u].grad_bytes for u in self.preds[v])
                        if node.backward_peak is None else node.backward_peak)
            filled.append(replace(node, grad_bytes=grad, forward_peak=forward, backward_peak=backward,
                                  saved_by=tuple(sorted(set(node.saved_by)))))
        self.nodes: list[Node] = filled
        self.program: _Program | None = None
        readers: dict[int, set[int]] = {}  # storage owner -> nodes that read it
        for v in range(n):
            readers.setdefault(self.storage_owner(v), set()).update(self.succs[v])
        for v, node in enumerate(self.nodes):
            for s in node.saved_by:
                if s != v and s not in readers[self.storage_owner(v)]:
                    raise ValueError(f"node {v} ({node.name}): saved_by holds {s}, which neither is "
                                     "the node nor reads its output storage")

    @classmethod
    def chain(cls, times: Sequence[float], output_bytes: Sequence[int], saved_bytes: Sequence[int],
              checkpoint_bytes: int = 0, **per_node: Sequence) -> "Graph":
        """Chain 0 -> 1 -> ... -> n-1; the last node is the output. ``per_node`` gives any other
        `Node` field as a sequence (e.g. ``saved_by=[(0,), (2,), ...]``)."""
        n = len(times)
        if len(output_bytes) != n or len(saved_bytes) != n or any(len(s) != n for s in per_node.values()):
            raise ValueError("Graph.chain: times, output_bytes, saved_bytes (and any per-node field) "
                             "must have one entry per node")
        nodes = [Node(name=str(v), time=float(times[v]), output_bytes=int(output_bytes[v]),
                      kept_bytes=int(saved_bytes[v]), is_output=v == n - 1,
                      **{k: s[v] for k, s in per_node.items()}) for v in range(n)]
        return cls(nodes, [(v, v + 1) for v in range(n - 1)], checkpoint_bytes)

    def __len__(self) -> int:
        return len(self.nodes)

    def __repr__(self) -> str:
        return f"Graph({len(self)} nodes, {sum(map(len, self.preds))} edges)"

    # Derived quantities of the cost model (memkernels/checkpoint/solvers.py).

    def storage_owner(self, v: int) -> int:
        while self.nodes[v].view_of is not None:
            v = self.nodes[v].view_of
        return v

    def arrays(self) -> dict[str, list]:
        """The per-node arrays the solvers (C++ and reference) take."""
        n = len(self)
        owner = [self.storage_owner(v) for v in range(n)]
        is_output = [False] * n
        users: list[set[int]] = [set() for _ in range(n)]
        for v, node in enumerate(self.nodes):
            is_output[owner[v]] |= node.is_output
            for s in self.succs[v]:
                users[owner[v]].add(s)
        storage = [self.nodes[v].output_bytes if owner[v] == v else 0 for v in range(n)]
        saves: list[set[int]] = [set() for _ in range(n)]  # saves[s]: storages s's backward keeps
        for v, node in enumerate(self.nodes):
            for s in node.saved_by:
                if storage[owner[v]]:
                    saves[s].add(owner[v])
        # Gradients alive while v's backward runs: v's own, and those of earlier nodes that a later
        # node (or the loss, for outputs) has already sent a gradient to.
        grads = [node.grad_bytes for node in self.nodes]
        last_reader = [max(self.succs[u], default=-1) if not self.nodes[u].is_output else n for u in range(n)]
        pending = [grads[v] + sum(grads[u] for u in range(v) if last_reader[u] > v) for v in range(n)]
        # What any schedule's peak stays below: every storage and internal buffer kept, a
        # checkpoint's own bytes per node, and the largest of one node's peaks and pending gradients.
        peak_bound = (sum(storage) + sum(node.kept_bytes for node in self.nodes) + n * self.checkpoint_bytes
                      + max(node.forward_peak for node in self.nodes) + max(node.backward_peak for node in self.nodes)
                      + max(pending))
        if peak_bound > MAX_BYTES:
            raise ValueError(f"Graph: its byte counts add up to {peak_bound}, more than the solvers take "
                             f"(2**62 = {MAX_BYTES})")
        return dict(time=[node.time for node in self.nodes],
                    internal=[node.kept_bytes for node in self.nodes],
                    forward_peak=[node.forward_peak for node in self.nodes],
                    backward_peak=[node.backward_peak for node in self.nodes],
                    pending_grads=pending, storage_bytes=storage,
                    is_output=[int(b) for b in is_output], preds=[list(p) for p in self.preds],
                    users=[sorted(u) for u in users], saves=[sorted(s) for s in saves],
                    reads=[sorted({owner[q] for q in self.preds[v] if storage[owner[q]]}) for v in range(n)],
                    checkpoint_bytes=self.checkpoint_bytes)


# ------------------------------------------------------------------------------------------ trace


@dataclass(frozen=True)
class _Ref:
    """An argument that is node `index`'s output."""
    index: int


@dataclass(frozen=True)
class _Input:
    """An argument that is the model's positional input `index`."""
    index: int


@dataclass(frozen=True)
class _Attr:
    """An argument that is the model's attribute `target` (a parameter or buffer)."""
    target: str


@dataclass(frozen=True)
class _Local:
    """An argument of a fused step's member that is member `index`'s output."""
    index: int


@dataclass
class _Step:
    name: str
    call: Callable[..., Any]  # (model, *args, **kwargs) -> output
    args: tuple
    kwargs: dict
    modules: tuple[nn.Module, ...] = ()  # the model's modules it calls
    writes: tuple[str, ...] = ()  # the model's buffers its forward updates (BatchNorm's running stats)


@dataclass
class _Program:
    """How to run the model node by node: steps in topological order, the output template (in
    plain containers: dict, list, tuple), and each module's `training` flag (model.modules() order)
    when traced: fx bakes ``self.training`` into the steps. `specialized`: forward's defaulted
    arguments past the inputs, at the values the steps were traced with."""
    steps: list[_Step]
    output: Any
    training: tuple[bool, ...]
    signature: inspect.Signature | None = None  # of the model's forward; None: inputs positional only
    specialized: dict[str, Any] = field(default_factory=dict)
    num_inputs: int | None = None  # the positional inputs traced with (checked where signature is None)
    refs: list[list[int]] = field(init=False)  # refs[v]: nodes step v reads

    def __post_init__(self):
        self.refs = [_refs_of((s.args, s.kwargs)) for s in self.steps]

    def resolve(self, template, model: nn.Module, inputs: Sequence, env: dict[int, Any]):
        def one(a):
            if isinstance(a, _Ref):
                return env[a.index]
            if isinstance(a, _Input):
                return inputs[a.index]
            if isinstance(a, _Attr):
                return _get_attr(model, a.target)
            return a
        # fx's own walk over the containers that map_arg built the template from (tuple, list,
        # dict, slice): several times cheaper per node than a pytree map.
        return torch.fx.node.map_aggregate(template, one)

    def run_step(self, v: int, model: nn.Module, inputs: Sequence, env: dict[int, Any]):
        step = self.steps[v]
        args = self.resolve(step.args, model, inputs, env)
        kwargs = self.resolve(step.kwargs, model, inputs, env)
        return step.call(model, *args, **kwargs)

    def output_of(self, model: nn.Module, inputs: Sequence, env: dict[int, Any]):
        """The model's output: a pytree map keeps the template's plain dicts and lists (fx's walk
        would make them immutable)."""
        return tree_map(lambda a: self.resolve(a, model, inputs, env), self.output)

    def bind(self, model: nn.Module, inputs: tuple, kwargs: dict) -> tuple:
        """The model's inputs from a call's positional and keyword arguments, checked against the
        signature: TypeError for arguments forward does not take, ValueError for a specialized
        argument given another value than the traced one."""
        if self.signature is None:
            if kwargs:
                raise TypeError(f"{type(model).__name__}.forward was planned with positional inputs only; "
                                f"got keyword arguments {sorted(kwargs)}")
            if self.num_inputs is not None and len(inputs) != self.num_inputs:
                raise TypeError(f"{type(model).__name__}.forward was planned with {self.num_inputs} positional "
                                f"input(s), got {len(inputs)}; re-plan it with these inputs")
            return inputs
        try:
            bound = self.signature.bind(*inputs, **kwargs)
        except TypeError as error:
            raise TypeError(f"{type(model).__name__}.forward: {error}") from None
        for name, value in self.specialized.items():
            given = bound.arguments.get(name, value)
            if not _same_constant(given, value):
                shown = (f"a {type(given).__name__} of shape {tuple(given.shape)}"
                         if isinstance(given, torch.Tensor) else repr(given))
                raise ValueError(f"checkpoint plan: {type(model).__name__}.forward was traced with "
                                 f"{name}={value!r}, got {name}={shown}; re-plan the model with {name} "
                                 "among the example inputs")
        inputs = [name for name in self.signature.parameters if name not in self.specialized]
        missing = [name for name in inputs if name not in bound.arguments]
        if missing:  # a defaulted input: the steps were traced with what the example gave
            raise TypeError(f"{type(model).__name__}.forward was planned with {missing} among its inputs; "
                            "pass them")
        return tuple(bound.arguments[name] for name in inputs)


def _get_attr(model: nn.Module, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _Tracer(torch.fx.Tracer):
    """torch.nn and memkernels.nn modules stay single nodes (calls), others are traced through."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m.__module__.startswith("memkernels.nn") or super().is_leaf_module(m, qualname)


def _refs_of(template) -> list[int]:
    leaves, _ = tree_flatten(template)
    return sorted({a.index for a in leaves if isinstance(a, _Ref)})


def _plain(template):
    """The template with fx's immutable_dict / immutable_list as the dict / list the model returns."""
    if isinstance(template, dict):
        return {k: _plain(v) for k, v in template.items()}
    if isinstance(template, list):
        return [_plain(v) for v in template]
    if isinstance(template, tuple):
        items = [_plain(v) for v in template]
        return type(template)(*items) if hasattr(template, "_fields") else tuple(items)
    return template


# Defaults a traced forward may be specialized to: values fx compares with ==, not containers
# (fx would split them into one placeholder a leaf) nor tensors (fx would add them to the model).
_CONSTANT_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _same_constant(value, traced) -> bool:
    return value is traced or (type(value) is type(traced) and value == traced)


def _forward_signature(model: nn.Module, num_inputs: int) -> tuple[inspect.Signature | None, dict[str, Any]]:
    """forward's signature and its arguments past the first `num_inputs`, at their defaults:
    fx traces them as those constants (``if mask is not None`` takes the branch the default takes).
    (None, {}) where forward takes *args or **kwargs: fx makes those inputs placeholders itself."""
    signature = inspect.signature(model.forward)
    parameters = list(signature.parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        return None, {}
    specialized = {}
    for p in parameters[num_inputs:]:
        if p.default is p.empty:
            raise ValueError(f"trace: {type(model).__name__}.forward takes {len(parameters)} arguments and "
                             f"example_inputs has {num_inputs}: {p.name!r} has no default; pass it in "
                             "example_inputs")
        if not isinstance(p.default, _CONSTANT_TYPES):
            raise ValueError(f"trace: {type(model).__name__}.forward's argument {p.name!r} defaults to a "
                             f"{type(p.default).__name__}; a plan can only be traced with a default of "
                             f"None, bool, int, float, str, dtype or device: pass {p.name!r} in example_inputs")
        specialized[p.name] = p.default
    return signature, specialized


def _drop_specialization_guards(graph: torch.fx.Graph, num_inputs: int) -> None:
    """Removes from `graph` the placeholders of the specialized arguments and the checks fx adds on
    them (``_assert_is_none(arg)``, ``torch._assert(arg == value)``), their only readers: fx traced
    the steps with the constants themselves."""
    for placeholder in [node for node in graph.nodes if node.op == "placeholder"][num_inputs:]:
        for user in list(placeholder.users):
            if user.target is operator.eq:
                for check in list(user.users):
                    graph.erase_node(check)
            graph.erase_node(user)
        graph.erase_node(placeholder)


def _program(model: nn.Module, num_inputs: int) -> _Program:
    if isinstance(model, nn.Sequential):
        if len(model) == 0:
            raise ValueError("trace: the nn.Sequential is empty")
        steps = []
        # As nn.Sequential.forward runs them: named_children() would skip a repeated module.
        for i, (name, child) in enumerate(model._modules.items()):
            args = tuple(_Input(k) for k in range(num_inputs)) if i == 0 else (_Ref(i - 1),)
            steps.append(_Step(name, partial(_call_module, name), args, {}, (child,)))
        output = _Ref(len(steps) - 1)
    else:
        signature, specialized = _forward_signature(model, num_inputs)
        try:
            graph = _Tracer().trace(model, concrete_args=specialized or None)
        except Exception as error:  # fx fails on data-dependent control flow; say which model
            raise ValueError(f"trace: torch.fx could not trace {type(model).__name__} ({error}); "
                             "wrap it in nn.Sequential or make it fx-traceable") from error
        # Traced without concrete_args where forward takes *args or **kwargs: no guards to drop, and
        # its keyword-only arguments are placeholders, which run at their defaults (bind takes no keywords).
        if signature is not None:
            _drop_specialization_guards(graph, num_inputs)
        keyword_only = {} if signature is not None else {
            p.name: p.default for p in inspect.signature(model.forward).parameters.values() if p.kind is p.KEYWORD_ONLY}
        index: dict[torch.fx.Node, Any] = {}
        steps = []
        placeholders = 0
        output = None
        for node in graph.nodes:
            if node.op == "placeholder":
                if node.target.startswith("**"):  # forward's **kwargs: a plan's call takes none (bind)
                    index[node] = {}
                elif node.target.startswith("*"):  # forward's *args: the inputs past the named ones
                    index[node] = tuple(_Input(k) for k in range(placeholders, num_inputs))
                    placeholders = max(placeholders, num_inputs)
                elif node.target in keyword_only:
                    if keyword_only[node.target] is inspect.Parameter.empty:
                        raise ValueError(f"trace: {type(model).__name__}.forward's keyword-only argument "
                                         f"{node.target!r} has no default; a plan runs it without keywords")
                    index[node] = keyword_only[node.target]
                else:
                    index[node] = _Input(placeholders)
                    placeholders += 1
                continue
            if node.op == "get_attr":
                index[node] = _Attr(node.target)
                continue
            args = torch.fx.node.map_arg(node.args, lambda a: index[a])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: index[a])
            if node.op == "output":
                output = args[0]
                continue
            if node.op == "call_module":
                call = partial(_call_module, node.target)
                modules = (_get_attr(model, node.target),)
            elif node.op == "call_function":
                call = partial(_call_function, node.target)
                modules = ()
            else:  # call_method
                call = partial(_call_method, node.target)
                modules = ()
            index[node] = _Ref(len(steps))
            steps.append(_Step(node.name, call, args, kwargs, modules))
        if placeholders != num_inputs:
            raise ValueError(f"trace: {type(model).__name__}.forward takes {placeholders} inputs, "
                             f"example_inputs has {num_inputs}")
        if not steps:
            raise ValueError(f"trace: {type(model).__name__}.forward runs no operation (it returns its "
                             "inputs or attributes): there is nothing to plan")
        return _Program(steps, _plain(output), tuple(m.training for m in model.modules()), signature, specialized,
                        num_inputs)
    return _Program(steps, _plain(output), tuple(m.training for m in model.modules()), num_inputs=num_inputs)


# A step's call(model, *args, **kwargs), by fx node kind: partials of these module-level functions,
# not lambdas, so that a planned model pickles (torch.save) with its plan.
def _call_module(target: str, model: nn.Module, *args, **kwargs):
    return _get_attr(model, target)(*args, **kwargs)


def _call_function(fn: Callable, model: nn.Module, *args, **kwargs):
    return fn(*args, **kwargs)


def _call_method(name: str, model: nn.Module, obj, *args, **kwargs):
    return getattr(obj, name)(*args, **kwargs)


def _run_members(members: list[_Step], model: nn.Module, *parts):
    """A fused step: runs `members` in order, each on its part (args, kwargs), where _Local(k) is
    member k's output; returns the last member's output."""
    outputs = []
    for step, (args, kwargs) in zip(members, parts):
        args, kwargs = torch.fx.node.map_aggregate(
            (args, kwargs), lambda a: outputs[a.index] if isinstance(a, _Local) else a)
        outputs.append(step.call(model, *args, **kwargs))
    return outputs[-1]


def _fused(program: _Program, groups: list[list[int]]) -> _Program:
    """`program` with each group of steps (ascending; only its last member's output is read outside
    it) run as one step, the steps in the order of their groups' last members."""
    groups = sorted(groups, key=lambda group: group[-1])
    where = {s: (i, k) for i, group in enumerate(groups) for k, s in enumerate(group)}

    def remap(template, group=()):
        def one(a):
            if not isinstance(a, _Ref):
                return a
            return _Local(where[a.index][1]) if a.index in group else _Ref(where[a.index][0])
        return torch.fx.node.map_aggregate(template, one)

    steps = []
    for group in groups:
        members = [program.steps[s] for s in group]
        if len(members) == 1:
            steps.append(replace(members[0], args=remap(members[0].args), kwargs=remap(members[0].kwargs)))
            continue
        parts = tuple((remap(m.args, group), remap(m.kwargs, group)) for m in members)
        steps.append(_Step("+".join(m.name for m in members), partial(_run_members, members), parts, {},
                           tuple(module for m in members for module in m.modules)))
    output = tree_map(lambda a: _Ref(where[a.index][0]) if isinstance(a, _Ref) else a, program.output)
    return replace(program, steps=steps, output=output)


def _fuse_in_place(program: _Program, model: nn.Module, inputs: Sequence) -> _Program:
    """`program` with each step that modifies a tensor in place fused with the earlier steps whose
    outputs live on that tensor's storage (transitively): checkpointing must not recompute such a
    step on an input it already modified, nor cut between it and what made that input. One
    forward of the program (on copies of the inputs) finds them, by the tensors' version counters.
    Raises ValueError where a step outside a group reads the output of one of its members but the
    last, or a step modifies the model's input."""
    n = len(program.steps)
    names = [step.name for step in program.steps]
    readers: list[set[int]] = [set() for _ in range(n + 1)]  # n: the model's output
    for v, refs in enumerate(program.refs):
        for u in refs:
            readers[u].add(v)
    for u in _refs_of(program.output):
        readers[u].add(n)
    inputs = tree_map(lambda a: a.clone() if isinstance(a, torch.Tensor) else a, inputs)
    group = [{v} for v in range(n)]  # group[v]: the steps v runs with (one set object per group)
    modifier: dict[int, int] = {}    # step -> the step that modifies its output in place
    storages: list[set[int]] = []    # storages[v]: storage pointers of v's output tensors
    env: dict[int, Any] = {}
    for v in range(n):
        watched = [t for u in program.refs[v] for t in _tensors(env[u])]
        versions = [t._version for t in watched]
        input_versions = [t._version for t in _tensors(inputs)]
        env[v] = program.run_step(v, model, inputs, env)
        if input_versions != [t._version for t in _tensors(inputs)]:
            raise ValueError(f"trace: node {names[v]!r} modifies the model's input in place; "
                             "make the operation out of place (e.g. inplace=False)")
        storages.append({_storage(t)[0] for t in _tensors(env[v])} - {0})
        modified = {_storage(t)[0] for t, version in zip(watched, versions) if t._version != version}
        for w in range(v) if modified else ():
            if storages[w] & modified and group[w] is not group[v]:
                modifier[w] = v
                merged = group[v] | group[w]
                for s in merged:
                    group[s] = merged
    groups = {id(g): sorted(g) for g in group}.values()
    for members in groups:
        for w in members[:-1]:
            outside = readers[w] - set(members)
            if outside:
                reader = min(outside)
                read_by = "the model's output" if reader == n else f"node {names[reader]!r}"
                raise ValueError(f"trace: node {names[modifier.get(w, members[-1])]!r} modifies the output of "
                                 f"node {names[w]!r} in place, and {read_by} also reads that output: a "
                                 "plan cannot keep them in one node; make the operation out of place "
                                 "(e.g. inplace=False)")
    return program if len(groups) == n else _fused(program, list(groups))


def _tensors(value) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(value)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _leaf_copy(value):
    """The value with every float tensor that requires grad replaced by a detached leaf that does
    (same storage): each node's autograd graph then stands alone."""
    def one(a):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            return a.detach().requires_grad_(True)
        return a
    return tree_map(one, value)


def as_inputs(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


@contextlib.contextmanager
def restore_buffers_and_rng(model: nn.Module):
    """Runs the block, then puts back the model's buffers (BatchNorm's running stats) and the CPU
    and CUDA RNG states as they were before it."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])


def trace(model: nn.Module, example_inputs, *, repeats: int = 3) -> Graph:
    """Graph of `model` with costs measured by running each node on `example_inputs` (a tensor or a
    tuple of them): forward time (median of `repeats` runs), output, kept, forward and backward
    peak bytes, and the buffers its forward updates. The model's parameters, buffers, gradients
    and the RNG state are left as found.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace: model must be an nn.Module, got {type(model).__name__}")
    if repeats < 1:
        raise ValueError(f"trace: repeats must be >= 1, got {repeats}")
    inputs = as_inputs(example_inputs)
    program = _program(model, len(inputs))
    tensors = _tensors(inputs)
    device = tensors[0].device if tensors else next(model.parameters()).device
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    existing = params | {t.untyped_storage().data_ptr() for t in tensors}
    buffer_names = {id(b): name for name, b in model.named_buffers()}

    owner: dict[int, int] = {}          # storage pointer -> node that allocated it
    env: dict[int, Any] = {}
    nodes_info: list[dict] = []
    savers: list[set[int]] = []         # savers[u]: nodes whose backward keeps u's output storage
    with restore_buffers_and_rng(model):
        program = _fuse_in_place(program, model, inputs)
        output_refs = set(_refs_of(program.output))
        for v, step in enumerate(program.steps):
            env_in = {u: _leaf_copy(env[u]) for u in program.refs[v]}
            inside: dict[int, int] = {}

            def pack(t: torch.Tensor):
                ptr, nbytes = _storage(t)
                if ptr and ptr not in existing and not isinstance(t, nn.Parameter):
                    inside[ptr] = max(inside.get(ptr, 0), nbytes)
                return t

            arguments = _tensors(program.resolve((step.args, step.kwargs), model, inputs, env_in))
            # The buffers it may update: its modules' and those it is given. If it updates one, all
            # count as written: BatchNorm's kernel updates the running stats without bumping their
            # version, and an update can leave a value as it was (only num_batches_tracked shows).
            buffers = [b for m in step.modules for b in m.buffers()]
            buffers += [a for a in arguments if id(a) in buffer_names]
            before = [(b._version, b.clone()) for b in buffers]
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = program.run_step(v, model, inputs, env_in)
            if any(b._version != version or not torch.equal(b, value)
                   for b, (version, value) in zip(buffers, before)):
                step.writes = tuple(dict.fromkeys(buffer_names[id(b)] for b in buffers))
            info = dict(name=step.name, output_bytes=0, view_of=None, grad_bytes=0)
            savers.append(set())
            for t in _tensors(out):
                ptr, nbytes = _storage(t)
                if ptr in owner and owner[ptr] != v:
                    info["view_of"] = owner[ptr]
                elif ptr and ptr not in existing and ptr not in owner:
                    owner[ptr] = v
                    info["output_bytes"] += nbytes
                if t.requires_grad:
                    info["grad_bytes"] += t.numel() * t.element_size()
            kept = 0
            for ptr, nbytes in inside.items():
                if ptr in owner:
                    savers[owner[ptr]].add(v)
                else:
                    kept += nbytes
            info.update(kept_bytes=kept)

            def forward():
                return program.run_step(v, model, inputs, env_in)
            info["forward_peak"] = peak_memory(forward, backward=False, device=device)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                forward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
            info["time"] = statistics.median(times)

            outs = [t for t in _tensors(out) if t.requires_grad]
            wrt = [t for t in _tensors(env_in) if t.requires_grad and t.is_leaf]
            wrt += [p for m in step.modules for p in m.parameters() if p.requires_grad]
            wrt += [a for a in arguments if isinstance(a, nn.Parameter) and a.requires_grad]
            if outs and wrt:
                # The model's outputs get the gradient of their sum, as measure_peak gives them: an
                # expanded scalar, which some backward kernels copy out first.
                is_output = v in output_refs
                grads = [torch.ones((), dtype=t.dtype, device=t.device).expand_as(t) if is_output
                         else torch.ones_like(t) for t in outs]
                info["backward_peak"] = peak_memory(
                    lambda: torch.autograd.grad(outs, wrt, grads, allow_unused=True),
                    backward=False, device=device)
            else:
                info["backward_peak"] = 0
            # Keep the output, not its graph: later nodes read it through fresh leaves.
            env[v] = tree_map(lambda a: a.detach().requires_grad_(a.requires_grad)
                              if isinstance(a, torch.Tensor) else a, out)
            nodes_info.append(info)
            del out, outs, env_in, arguments, before

    nodes = [Node(name=i["name"], time=i["time"], output_bytes=i["output_bytes"],
                  kept_bytes=i["kept_bytes"], saved_by=tuple(savers[v]),
                  forward_peak=i["forward_peak"], backward_peak=i["backward_peak"],
                  grad_bytes=i["grad_bytes"], view_of=i["view_of"], is_output=v in output_refs)
             for v, i in enumerate(nodes_info)]
    edges = [(u, v) for v in range(len(nodes)) for u in program.refs[v]]
    # Non-reentrant checkpoints stash the CPU RNG state (preserve_rng_state) until their backward.
    graph = Graph(nodes, edges, checkpoint_bytes=torch.get_rng_state().nbytes if device.type == "cpu" else 0)
    graph.program = program
    return graph
