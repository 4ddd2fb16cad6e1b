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
        entry = TRANSFORMERS_ACTIVATIONS.get(type(module).__name__)
        if entry is not None:
            cls, kwargs = entry
            return cls(**kwargs, bits=bits)
    return None


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
    mk.nn.Conv2d with that ``save`` mode.

    Args:
        model: any nn.Module; it is modified in place and returned.
        bits: None (exact f'(x)) or 1, 2, 3, 4, 8 (see memkernels.functional).
        linear, conv2d: None (leave those layers) or "asa", "int8", "int4", "int2" (see
            memkernels.compress). The new layers hold the same Parameter objects as the old ones.
        include: if given, only modules whose qualified name matches one of these fnmatch
            patterns (str) or that are instances of one of these classes (type) are swapped.
        exclude: modules matching any of these (same forms) are left alone.
        return_report: also return a :class:`ConversionReport`.

    Returns ``model`` (or ``(model, report)``). Exact types only: a subclass of nn.GELU may do
    something else, so it is skipped and reported. The state_dict keys do not change: the
    activations hold no parameters or buffers, and the layers keep theirs under the same names.
    """
    check_bits(bits)
    for name, save in (("linear", linear), ("conv2d", conv2d)):
        if save is not None and save not in MODES:
            raise ValueError(f"{name} must be None or one of {MODES}, got {save!r}")
    layers = {nn.Linear: (mknn.Linear, linear), nn.Conv2d: (mknn.Conv2d, conv2d)}
    for name, p in (("include", include), ("exclude", exclude)):
        if p is not None and any(not isinstance(x, (str, type)) for x in p):
            raise TypeError(f"{name} must be an iterable of name patterns (str) or module classes")
    report = ConversionReport()
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if include is not None and not _matches(name, child, include):
                continue
            if exclude is not None and _matches(name, child, exclude):
                continue
            new = _replacement(child, bits, layers)
            if new is None:
                if isinstance(child, tuple(TORCH_ACTIVATIONS)):
                    report.skipped.append((name, type(child).__name__,
                                           "subclass of a torch activation; its forward may differ"))
                continue
            setattr(parent, child_name, new)
            report.swapped.append((name, type(child).__name__, repr(new)))
    return (model, report) if return_report else model
