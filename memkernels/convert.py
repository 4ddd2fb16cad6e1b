"""Swap a model's torch activations (and, on request, Linear / Conv2d layers) for memkernels' ones, in place."""
from __future__ import annotations

import dataclasses
import fnmatch

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
    entry = TORCH_ACTIVATIONS.get(type(module))
    if entry is not None:
        cls, args = entry
        return cls(**args(module), bits=bits)
    if type(module).__module__.startswith("transformers."):
        save = layers[nn.Linear][1]
        if type(module).__name__ == TRANSFORMERS_LINEAR and save is not None:
            return mknn.TransposedLinear.from_torch(module, save)
        entry = TRANSFORMERS_ACTIVATIONS.get(type(module).__name__)
        if entry is not None:
            cls, kwargs = entry
            return cls(**kwargs, bits=bits)
    return None


def _skip_reason(module: nn.Module, layers: dict):
    """Why a module that derives from a class convert swaps is left alone, or None."""
    if type(module).__module__.startswith("memkernels."):
        return None  # already ours
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
    patterns = tuple(patterns) if hasattr(patterns, "__iter__") else (patterns,)
    if any(not isinstance(p, (str, type)) for p in patterns):
        raise TypeError(f"{name} must be a name pattern (str), a module class, or an iterable of those, "
                        f"got {patterns!r}")
    return patterns


def _matches(name: str, module: nn.Module, patterns) -> bool:
    for p in patterns:
        if isinstance(p, str) and fnmatch.fnmatchcase(name, p):
            return True
        if isinstance(p, type) and isinstance(module, p):
            return True
    return False


def convert(model: nn.Module, bits: int | None = None, include=None, exclude=None,
            return_report: bool = False, linear: str | None = None, conv2d: str | None = None):
    """Replace, in place, every torch activation of ``model`` by its memkernels twin with ``bits``,
    and, if ``linear`` / ``conv2d`` is given, every nn.Linear / nn.Conv2d by mk.nn.Linear /
    mk.nn.Conv2d with that ``save`` mode (and, with ``linear``, transformers' Conv1D by
    mk.nn.TransposedLinear).

    Args:
        model: any nn.Module; it is modified in place and returned.
        bits: None (exact f'(x)) or 1, 2, 3, 4, 8 (see memkernels.functional).
        linear, conv2d: None (leave those layers) or "asa", "int8", "int4", "int2" (see
            memkernels.compress). The new layers hold the same Parameter objects as the old ones.
        include: if given, only modules whose qualified name matches one of these fnmatch
            patterns (str) or that are instances of one of these classes (type) are swapped; a
            single pattern or class may be given alone. The model itself is named "".
        exclude: modules matching any of these (same forms) are left alone.
        return_report: also return a :class:`ConversionReport`.

    Returns ``model`` (or ``(model, report)``); when ``model`` itself is one of the modules swapped
    (e.g. a bare nn.GELU), the return value is its replacement. Each replacement takes over its
    module's train/eval mode and hooks; a module held in two places gets one replacement held in
    both. Exact types only: a subclass of nn.GELU or nn.Linear may do something else, so it is
    skipped and reported. The state_dict keys do not change: the activations hold no parameters or
    buffers, and the layers keep theirs under the same names.
    """
    check_bits(bits)
    for name, save in (("linear", linear), ("conv2d", conv2d)):
        if save is not None and save not in MODES:
            raise ValueError(f"{name} must be None or one of {MODES}, got {save!r}")
    layers = {nn.Linear: (mknn.Linear, linear), nn.Conv2d: (mknn.Conv2d, conv2d)}
    include, exclude = _patterns("include", include), _patterns("exclude", exclude)
    report = ConversionReport()
    swapped = {}  # id of a module -> its replacement, so a module used twice stays one module

    def swap(name: str, module: nn.Module):
        """The module to put in module's place (itself if it stays)."""
        if id(module) in swapped:
            return swapped[id(module)]
        if (include is not None and not _matches(name, module, include)) or (
                exclude is not None and _matches(name, module, exclude)):
            return module
        new = _replacement(module, bits, layers)
        if new is None:
            why = _skip_reason(module, layers)
            if why is not None:
                report.skipped.append((name, type(module).__name__, why))
            return module
        swapped[id(module)] = _carry_module_state(module, new)
        report.swapped.append((name, type(module).__name__, repr(new)))
        return new

    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent._modules.items()):  # _modules: a child held twice too
            if child is not None:
                new = swap(f"{parent_name}.{child_name}" if parent_name else child_name, child)
                if new is not child:
                    setattr(parent, child_name, new)
    model = swap("", model)
    return (model, report) if return_report else model
