"""Swap a model's torch activations (and, on request, Linear / Conv2d layers) for memkernels' ones, in place."""
from __future__ import annotations

import ast
import dataclasses
import fnmatch
import functools
import inspect
import textwrap

from torch import nn

from memkernels import nn as mknn
from memkernels.activations.spec import check_bits
from memkernels.compress import MODES


def _same_args(*names):
    return lambda m: {n: getattr(m, n) for n in names}


# torch.nn class -> (memkernels class, the constructor arguments to carry over).
TORCH_ACTIVATIONS = {
    nn.GELU: (mknn.GELU, _same_args("approximate")),
    nn.SiLU: (mknn.SiLU, _same_args("inplace")),
    nn.Mish: (mknn.Mish, _same_args("inplace")),
    nn.Softplus: (mknn.Softplus, _same_args("beta", "threshold")),
    nn.ELU: (mknn.ELU, _same_args("alpha", "inplace")),
    nn.SELU: (mknn.SELU, _same_args("inplace")),
    nn.CELU: (mknn.CELU, _same_args("alpha", "inplace")),
    nn.LeakyReLU: (mknn.LeakyReLU, _same_args("negative_slope", "inplace")),
    nn.ReLU: (mknn.ReLU, _same_args("inplace")),
    nn.Sigmoid: (mknn.Sigmoid, _same_args()),
    nn.Tanh: (mknn.Tanh, _same_args()),
    nn.Hardswish: (mknn.Hardswish, _same_args("inplace")),
    nn.Hardsigmoid: (mknn.Hardsigmoid, _same_args("inplace")),
}

# transformers.activations classes (matched by name, so transformers need not be installed)
# whose forward is exactly one of ours.
TRANSFORMERS_ACTIVATIONS = {
    "GELUActivation": (mknn.GELU, {"approximate": "none"}),
    "NewGELUActivation": (mknn.GELU, {"approximate": "tanh"}),
    "FastGELUActivation": (mknn.GELU, {"approximate": "tanh"}),
    "PytorchGELUTanh": (mknn.GELU, {"approximate": "tanh"}),
    "GELUTanh": (mknn.GELU, {"approximate": "tanh"}),
    "SiLUActivation": (mknn.SiLU, {}),
    "MishActivation": (mknn.Mish, {}),
}


# transformers' Linear with its weight stored (in, out), GPT-2's projections (matched by name like
# the activations): swapped for mk.nn.TransposedLinear when `linear` is given.
TRANSFORMERS_LINEAR = "Conv1D"


# The forward of the gated MLPs of transformers' decoders (Llama, Mistral, Qwen, Gemma, ... over a
# hundred classes, each its own copy): swapped for mk.nn.GatedMLP where act_fn is SiLU or GELU.
GATED_MLP_FORWARD = "self.down_proj(self.act_fn(self.gate_proj({x})) * self.up_proj({x}))"


@functools.lru_cache(maxsize=None)
def _computes_gated_mlp(cls: type) -> bool:
    """Whether cls.forward(self, x) is ``return GATED_MLP_FORWARD`` (directly or through one
    assignment), read from its source: the class's name and attributes would not say that."""
    try:
        function = ast.parse(textwrap.dedent(inspect.getsource(cls.forward))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return False
    args = function.args
    if (not isinstance(function, ast.FunctionDef) or len(args.args) != 2 or args.vararg or args.kwarg
            or args.kwonlyargs or args.posonlyargs):
        return False
    body = [s for s in function.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    if len(body) == 1 and isinstance(body[0], ast.Return):
        value = body[0].value
    elif (len(body) == 2 and isinstance(body[0], ast.Assign) and len(body[0].targets) == 1
          and isinstance(body[0].targets[0], ast.Name) and isinstance(body[1], ast.Return)
          and isinstance(body[1].value, ast.Name) and body[1].value.id == body[0].targets[0].id):
        value = body[0].value
    else:
        return False
    return value is not None and ast.unparse(value) == GATED_MLP_FORWARD.format(x=args.args[1].arg)


def _gated_activation(module: nn.Module):
    """mk.nn.GatedMLP's (activation, approximate) for a transformers gated MLP, or None."""
    if not (_from_transformers(module) and _computes_gated_mlp(type(module))):
        return None
    if not all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj")):
        return None
    act = _activation_twin(getattr(module, "act_fn", None), None)
    if isinstance(act, mknn.SiLU):
        return "silu", "none"
    if isinstance(act, mknn.GELU):
        return "gelu", act.approximate
    return None


@dataclasses.dataclass
class ConversionReport:
    """What :func:`convert` did: ``swapped`` holds (qualified name, old class, new module repr)."""

    swapped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (name, class, why)

    def __str__(self) -> str:
        lines = [f"swapped {len(self.swapped)} module(s)"]
        lines += [f"  {name}: {old} -> {new}" for name, old, new in self.swapped]
        lines += [f"  skipped {name} ({cls}): {why}" for name, cls, why in self.skipped]
        return "\n".join(lines)


def _replacement(module: nn.Module, bits, layers: dict):
    """The memkernels module computing what `module` computes, or None."""
    for torch_cls, (mk_cls, save) in layers.items():
        if type(module) is torch_cls and save is not None:
            return mk_cls.from_torch(module, save)
    save = layers[nn.Linear][1]
    if type(module).__name__ == TRANSFORMERS_LINEAR and _from_transformers(module) and save is not None:
        return mknn.TransposedLinear.from_torch(module, save)
    return _activation_twin(module, bits)


def _activation_twin(module, bits):
    """The memkernels activation computing what activation `module` computes, or None."""
    entry = TORCH_ACTIVATIONS.get(type(module))
    if entry is not None:
        cls, args = entry
        return cls(**args(module), bits=bits)
    entry = TRANSFORMERS_ACTIVATIONS.get(type(module).__name__) if _from_transformers(module) else None
    if entry is not None:
        cls, kwargs = entry
        return cls(**kwargs, bits=bits)
    return None


def _from_transformers(module) -> bool:
    return type(module).__module__.startswith("transformers.")


def _skip_reason(module: nn.Module, bits, layers: dict):
    """Why a module that derives from a class convert swaps, or a memkernels module set otherwise
    than asked (converted before), is left alone, or None."""
    if type(module).__module__.startswith("memkernels."):
        if "bits" in vars(module) and module.bits != bits:
            return f"already memkernels with bits={module.bits}; convert leaves memkernels modules as they are"
        return None
    for torch_cls, (_, save) in layers.items():
        if save is not None and isinstance(module, torch_cls):
            return f"subclass of nn.{torch_cls.__name__}; its forward may differ"
    if isinstance(module, tuple(TORCH_ACTIVATIONS)):
        return "subclass of a torch activation; its forward may differ"
    return None


# The forward / backward hooks registered on a module, moved to its replacement with the dicts
# themselves, so that the handles the user holds still remove them.
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


def _carry_module_state(old: nn.Module, new: nn.Module) -> nn.Module:
    """new with old's train/eval mode and hooks (the parameters are carried by from_torch)."""
    new.train(old.training)
    for name in _HOOK_DICTS:
        if name in vars(old):
            setattr(new, name, getattr(old, name))
    if vars(old).get("_is_full_backward_hook") is not None:
        new._is_full_backward_hook = old._is_full_backward_hook
    return new


def _patterns(name: str, patterns):
    """include / exclude as a tuple (a str is one pattern); raises TypeError on other items."""
    if patterns is None:
        return None
    if isinstance(patterns, (str, type)):
        return (patterns,)
    given = patterns
    patterns = tuple(patterns) if hasattr(patterns, "__iter__") and not isinstance(patterns, bytes) else (patterns,)
    if any(not isinstance(p, (str, type)) for p in patterns):
        raise TypeError(f"{name} must be a name pattern (str), a module class, or an iterable of those, "
                        f"got {given!r}")
    return patterns


def _matches(name: str, module: nn.Module, patterns) -> bool:
    for p in patterns:
        if isinstance(p, str) and fnmatch.fnmatchcase(name, p):
            return True
        if isinstance(p, type) and isinstance(module, p):
            return True
    return False


def convert(model: nn.Module, bits: int | None = None, include=None, exclude=None,
            return_report: bool = False, linear: str | None = None, conv2d: str | None = None,
            gated_mlp: bool = True):
    """Replace, in place, every torch activation of ``model`` by its memkernels twin with ``bits``,
    and, if ``linear`` / ``conv2d`` is given, every nn.Linear / nn.Conv2d by mk.nn.Linear /
    mk.nn.Conv2d with that ``save`` mode (and, with ``linear``, transformers' Conv1D by
    mk.nn.TransposedLinear). With ``gated_mlp``, a transformers MLP whose forward is
    ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with a SiLU or GELU act_fn (Llama's and its
    kin's) becomes an mk.nn.GatedMLP holding its (converted) projections, its product fused.

    Args:
        model: any nn.Module; it is modified in place and returned.
        bits: None (exact f'(x)) or 1, 2, 3, 4, 8 (see memkernels.functional).
        linear, conv2d: None (leave those layers) or "asa", "int8", "int4", "int2" (see
            memkernels.compress). The new layers hold the same Parameter objects as the old ones.
        include: if given, only modules whose qualified name matches one of these fnmatch
            patterns (str) or that are instances of one of these classes (type) are swapped; a
            single pattern or class may be given alone. The model itself is named "".
        exclude: modules matching any of these (same forms) are left alone. An MLP is fused
            only where it and its act_fn both pass include / exclude.
        return_report: also return a :class:`ConversionReport`.
        gated_mlp: fuse transformers' gated MLPs as above (False: only their act_fn is swapped).

    Returns ``model`` (or ``(model, report)``); when ``model`` itself is one of the modules swapped
    (e.g. a bare nn.GELU), the return value is its replacement. Each replacement takes over its
    module's train/eval mode and hooks; a module held in two places gets one replacement held in
    both. Exact types only: a subclass of nn.GELU or nn.Linear may do something else, so it is
    skipped and reported. The state_dict keys do not change: the activations hold no parameters or
    buffers, and the layers keep theirs under the same names.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_bits(bits)
    for name, save in (("linear", linear), ("conv2d", conv2d)):
        if save is not None and save not in MODES:
            raise ValueError(f"{name} must be None or one of {MODES}, got {save!r}")
    layers = {nn.Linear: (mknn.Linear, linear), nn.Conv2d: (mknn.Conv2d, conv2d)}
    include, exclude = _patterns("include", include), _patterns("exclude", exclude)
    report = ConversionReport()
    swapped = {}  # id of a module -> its replacement, so a module used twice stays one module

    def selected(name: str, module: nn.Module) -> bool:
        return not ((include is not None and not _matches(name, module, include)) or (
            exclude is not None and _matches(name, module, exclude)))

    def fused_mlp(name: str, module: nn.Module):
        """The mk.nn.GatedMLP for a transformers gated MLP, its projections swapped first, or None."""
        activation = _gated_activation(module) if gated_mlp else None
        if activation is None or not selected(f"{name}.act_fn" if name else "act_fn", module.act_fn):
            return None
        projections = [swap(f"{name}.{p}" if name else p, getattr(module, p))
                       for p in ("gate_proj", "up_proj", "down_proj")]
        return mknn.GatedMLP(*projections, *activation, bits=bits)

    def swap(name: str, module: nn.Module):
        """The module to put in module's place (itself if it stays)."""
        if id(module) in swapped:
            return swapped[id(module)]
        if not selected(name, module):
            return module
        new = fused_mlp(name, module) or _replacement(module, bits, layers)
        if new is None:
            why = _skip_reason(module, bits, layers)
            if why is not None:
                report.skipped.append((name, type(module).__name__, why))
            return module
        swapped[id(module)] = _carry_module_state(module, new)
        # One line (a fused MLP's own repr lists its children).
        report.swapped.append((name, type(module).__name__, f"{type(new).__name__}({new.extra_repr()})"))
        return new

    # The model itself first: a gated MLP is fused whole, before its act_fn would be swapped alone.
    model = swap("", model)
    for parent_name, parent in list(model.named_modules()):
        if swapped.get(id(parent), parent) is not parent:
            continue  # replaced already (a fused MLP, built from its converted children)
        for child_name, child in list(parent._modules.items()):  # _modules: a child held twice too
            if child is not None:
                new = swap(f"{parent_name}.{child_name}" if parent_name else child_name, child)
                if new is not child:
                    setattr(parent, child_name, new)
    return (model, report) if return_report else model
