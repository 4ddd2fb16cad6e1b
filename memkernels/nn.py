"""Drop-in modules for torch.nn's activations: same constructor arguments, plus ``bits``.

``bits=None`` keeps f'(x) in the input's dtype (exact); ``bits`` in {1, 2, 3, 4, 8} keeps a packed
code of that many bits an element (see memkernels.functional). The modules hold no parameters or
buffers, so swapping them into a model leaves its state_dict unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from memkernels import functional as F
from memkernels.activations.spec import check_bits

__all__ = ["GELU", "SiLU", "Mish", "Softplus", "ELU", "SELU", "CELU", "LeakyReLU", "ReLU",
           "Sigmoid", "Tanh", "Hardswish", "Hardsigmoid", "SwiGLU", "GeGLU"]


class _FusedActivation(nn.Module):
    """Shared ``bits`` handling and repr; ``_args`` names the torch arguments shown in repr."""

    _args: tuple[str, ...] = ()

    def __init__(self, bits: int | None = None):
        super().__init__()
        check_bits(bits)
        self.bits = bits

    def extra_repr(self) -> str:
        args = [f"{name}={getattr(self, name)!r}" for name in self._args]
        return ", ".join(args + [f"bits={self.bits}"])


class GELU(_FusedActivation):
    _args = ("approximate",)

    def __init__(self, approximate: str = "none", bits: int | None = None):
        super().__init__(bits)
        F._gelu_id(approximate)  # validate now, not at the first call
        self.approximate = approximate

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.gelu(input, self.approximate, bits=self.bits)


class _InplaceActivation(_FusedActivation):
    """Activations whose torch twin takes ``inplace``; kept for compatibility (see functional)."""

    def __init__(self, inplace: bool = False, bits: int | None = None):
        super().__init__(bits)
        self.inplace = inplace


class SiLU(_InplaceActivation):
    def forward(self, input):
        return F.silu(input, bits=self.bits)


class Mish(_InplaceActivation):
    def forward(self, input):
        return F.mish(input, bits=self.bits)


class SELU(_InplaceActivation):
    def forward(self, input):
        return F.selu(input, bits=self.bits)


class ReLU(_InplaceActivation):
    def forward(self, input):
        return F.relu(input, bits=self.bits)


class Hardswish(_InplaceActivation):
    def forward(self, input):
        return F.hardswish(input, bits=self.bits)


class Hardsigmoid(_InplaceActivation):
    def forward(self, input):
        return F.hardsigmoid(input, bits=self.bits)


class Sigmoid(_FusedActivation):
    def forward(self, input):
        return F.sigmoid(input, bits=self.bits)


class Tanh(_FusedActivation):
    def forward(self, input):
        return F.tanh(input, bits=self.bits)


class Softplus(_FusedActivation):
    _args = ("beta", "threshold")

    def __init__(self, beta: float = 1.0, threshold: float = 20.0, bits: int | None = None):
        super().__init__(bits)
        self.beta, self.threshold = beta, threshold

    def forward(self, input):
        return F.softplus(input, self.beta, self.threshold, bits=self.bits)


class ELU(_InplaceActivation):
    _args = ("alpha",)

    def __init__(self, alpha: float = 1.0, inplace: bool = False, bits: int | None = None):
        super().__init__(inplace, bits)
        self.alpha = alpha

    def forward(self, input):
        return F.elu(input, self.alpha, bits=self.bits)


class CELU(ELU):
    def forward(self, input):
        return F.celu(input, self.alpha, bits=self.bits)


class LeakyReLU(_InplaceActivation):
    _args = ("negative_slope",)

    def __init__(self, negative_slope: float = 0.01, inplace: bool = False, bits: int | None = None):
        super().__init__(inplace, bits)
        self.negative_slope = negative_slope

    def forward(self, input):
        return F.leaky_relu(input, self.negative_slope, bits=self.bits)


class _GLU(_FusedActivation):
    """Gated unit f(a) * b. Called with one tensor x, it splits x along ``dim`` into halves
    ``a, b = x.chunk(2, dim)`` (the first half is gated: f applies to it); called with two
    tensors, they are a and b. Input (..., 2H) -> output (..., H) for dim=-1."""

    _args = ("dim",)

    def __init__(self, dim: int = -1, bits: int | None = None):
        super().__init__(bits)
        self.dim = dim

    def _halves(self, a, b):
        if b is not None:
            return a, b
        if a.shape[self.dim] % 2:
            raise ValueError(f"{type(self).__name__} splits dim {self.dim} in two halves; its size "
                             f"must be even, got {a.shape[self.dim]}")
        return a.chunk(2, self.dim)


class SwiGLU(_GLU):
    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return F.swiglu(*self._halves(a, b), bits=self.bits)


class GeGLU(_GLU):
    _args = ("approximate", "dim")

    def __init__(self, approximate: str = "none", dim: int = -1, bits: int | None = None):
        super().__init__(dim, bits)
        F._gelu_id(approximate)
        self.approximate = approximate

    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return F.geglu(*self._halves(a, b), self.approximate, bits=self.bits)
from memkernels.feedback.layers import FAConv2d, FALinear  # noqa: E402,F401  (random feedback layers)
